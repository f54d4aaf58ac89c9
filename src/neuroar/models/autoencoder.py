"""MONAI's AutoencoderKL as configured here: the latent space of the LDM and latent StarGAN baselines.

Like the tokenizer, it may take the volume as `autoencoder.patch`^3 patches folded into channels, so that
no convolution runs at full resolution (the same speed-up, for a fair comparison of the two).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.nets import AutoencoderKL

from neuroar.config import AutoencoderConfig
from neuroar.distributed import full_precision
from neuroar.models.patches import channels_to_space, space_to_channels


class PatchAutoencoderKL(AutoencoderKL):
    """AutoencoderKL between a patch fold and unfold; `forward`, `encode` and `decode` keep MONAI's meaning."""

    def __init__(self, patch: int, **kwargs):
        super().__init__(**kwargs)
        self.patch = patch

    def encode(self, x_B1DHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().encode(space_to_channels(x_B1DHW, self.patch))

    def decode(self, z_BCdhw: torch.Tensor) -> torch.Tensor:
        return channels_to_space(super().decode(z_BCdhw), self.patch)

    @torch.no_grad()
    def encode_scan(self, volume: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A scan's latent (the posterior mean), (B, C, d, h, w) on this model's device: the one way the latent
        cache and the baselines' predictions encode. `volume` is (D, H, W) or (B, 1, D, H, W); float32 whatever
        the caller's autocast, as the tokenizer's `encode_scan`."""
        x = torch.as_tensor(np.ascontiguousarray(volume) if isinstance(volume, np.ndarray) else volume)
        x_B1DHW = (x[None, None] if x.dim() == 3 else x).to(next(self.parameters()).device, torch.float32)
        with full_precision(x_B1DHW.device):
            return self.encode(x_B1DHW)[0]


def build_autoencoder(config: AutoencoderConfig) -> PatchAutoencoderKL:
    # No non-local attention: at the bottleneck of a 3D volume it is the most expensive layer and the
    # baselines' latent models attend over the latent grid themselves.
    folded = config.patch**3
    return PatchAutoencoderKL(config.patch, spatial_dims=3, in_channels=folded, out_channels=folded,
                              channels=config.channels, num_res_blocks=config.res_blocks,
                              attention_levels=(False,) * len(config.channels), latent_channels=config.latent_channels,
                              norm_num_groups=config.norm_groups, with_encoder_nonlocal_attn=False,
                              with_decoder_nonlocal_attn=False)
