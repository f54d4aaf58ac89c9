"""MS-VQVAE: MONAI's 3D convolutional encoder/decoder around the multi-scale residual quantizer.

The encoder and decoder are MONAI's (residual blocks, GroupNorm, SiLU, one self-attention block at the
bottleneck computed with `scaled_dot_product_attention`); a 1x1x1 convolution on each side of the
quantizer separates the encoder's output space from the codebook's. The volume enters as non-overlapping
`patch`^3 patches folded into channels and leaves the decoder the same way (as video and 3D tokenizers do):
the convolutions never run at full resolution, where they cost most of a step on a CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.nets.autoencoderkl import Decoder, Encoder
from torch import nn

from neuroar.config import TokenizerConfig
from neuroar.distributed import full_precision
from neuroar.models.patches import channels_to_space, space_to_channels
from neuroar.models.quantizer import MultiScaleQuantizer


class MSVQVAE(nn.Module):
    def __init__(self, config: TokenizerConfig, in_channels: int = 1):
        super().__init__()
        self.config = config
        self.patch = config.patch
        channels = config.level_channels
        levels = len(channels)
        common = dict(spatial_dims=3, channels=channels, num_res_blocks=[config.res_blocks] * levels,
                      norm_num_groups=config.norm_groups, norm_eps=1e-6, attention_levels=[False] * levels,
                      with_nonlocal_attn=config.attention, use_flash_attention=True)
        folded = in_channels * self.patch**3
        self.encoder = Encoder(in_channels=folded, out_channels=config.latent_dim, **common)
        self.decoder = Decoder(in_channels=config.latent_dim, out_channels=folded, **common)
        self.quant_conv = nn.Conv3d(config.latent_dim, config.latent_dim, 1)
        self.post_quant_conv = nn.Conv3d(config.latent_dim, config.latent_dim, 1)
        self.quantizer = MultiScaleQuantizer(config.codebook_size, config.latent_dim, config.scales, beta=config.beta)

    def features(self, x_B1DHW: torch.Tensor) -> torch.Tensor:
        """The continuous latent grid f (B, C, d, h, w) that the quantizer tokenizes."""
        return self.quant_conv(self.encoder(space_to_channels(x_B1DHW, self.patch)))

    def forward(self, x_B1DHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Reconstruction, vq loss and codebook statistics."""
        f_hat, _, vq_loss, stats = self.quantizer(self.features(x_B1DHW))
        return self.decode(f_hat), vq_loss, stats

    @torch.no_grad()
    def encode_scan(self, volume: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
        """A scan's token maps, each (B, d, h, w) on this model's device: the one way the token cache,
        prediction, tokenizer-copy, the oracle and "+detail" encode. `volume` is (D, H, W) or (B, 1, D, H, W).
        Always in float32 without TF32, whatever autocast the caller is under, so that the same scan gives the
        same tokens on every path and as nearly as kernels allow on every device (scripts/gpu-check measures it)."""
        x = torch.as_tensor(np.ascontiguousarray(volume) if isinstance(volume, np.ndarray) else volume)
        x_B1DHW = (x[None, None] if x.dim() == 3 else x).to(self._device, torch.float32)
        with full_precision(x_B1DHW.device):
            return self.quantizer.encode(self.features(x_B1DHW))

    @torch.no_grad()
    def decode_scan(self, tokens: list[torch.Tensor]) -> np.ndarray:
        """Token maps decoded to volumes (B, D, H, W) in [0, 1], float32, on the CPU (the counterpart of
        `encode_scan`)."""
        with full_precision(tokens[0].device):
            return self.decode_tokens(tokens)[:, 0].float().clamp(0, 1).cpu().numpy()

    @property
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def decode(self, f_hat_BCdhw: torch.Tensor) -> torch.Tensor:
        return channels_to_space(self.decoder(self.post_quant_conv(f_hat_BCdhw)), self.patch)

    @torch.no_grad()
    def decode_tokens(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        return self.decode(self.quantizer.tokens_to_fhat(tokens))


