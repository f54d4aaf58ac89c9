"""MS-VQVAE: MONAI's 3D convolutional encoder/decoder around the multi-scale residual quantizer.

The encoder and decoder are MONAI's (residual blocks, GroupNorm, SiLU, one self-attention block at the
bottleneck computed with `scaled_dot_product_attention`); a 1x1x1 convolution on each side of the
quantizer separates the encoder's output space from the codebook's. The volume enters as non-overlapping
`patch`^3 patches folded into channels and leaves the decoder the same way (as video and 3D tokenizers do):
the convolutions never run at full resolution, where they cost most of a step on a CPU.

What the tokens code (`config.code`):

- "scan": each scan on its own, x ~ dec(f_hat(tokens(f(x)))) (the paper's MS-VQVAE).
- "change": a follow-up against its earlier scan, later ~ dec(f_e + f_hat(tokens(f_l - f_e))), where f_e and f_l
  are the two scans' continuous latents; the earlier scan itself is dec(f_e). The earlier scan's anatomy stays
  continuous and only the change is quantized, so the decoded change keeps more of what a volume measure counts
  (on the demo's 42 test pairs its oracle carried 70 % / 47 % of the ventricles' / grey matter's change against
  56 % / 21 % for scan coding with the same scales, and 90 % / 77 % with `shortcut`: benchmarks/TOKEN_SPACE.md).
  A pair with no change has the tokens of a zero change, token 0 at every scale (`unchanged_tokens`).

`config.shortcut` adds a linear path around encoder and decoder (patches -> latent -> patches, 1x1x1
convolutions), so that each patch's voxels can pass through linearly and a decoded change keeps its edges.

Both are served by one interface, so that tokenizer-copy, the oracle and a model's prediction are computed alike:
`latent_scan` (a scan's continuous latent), `followup_tokens` (a follow-up's tokens against an earlier latent),
`unchanged_tokens` (the tokens of "nothing changed"), `decode_followup` and `decode_unchanged`.
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
        # `config.shortcut`: the linear path around encoder and decoder (patches -> latent -> patches).
        self.shortcuts = None
        if config.shortcut:
            self.shortcuts = nn.ModuleList([nn.Conv3d(folded, config.latent_dim, 1),
                                            nn.Conv3d(config.latent_dim, folded, 1)])
        # A change coder pins a zero code ("nothing changed here"), see models/quantizer.py.
        self.quantizer = MultiScaleQuantizer(config.codebook_size, config.latent_dim, config.scales, beta=config.beta,
                                             zero_code=config.code == "change", dead_zone=config.dead_zone,
                                             per_scale=config.codebook_per_scale)

    def features(self, x_B1DHW: torch.Tensor) -> torch.Tensor:
        """The continuous latent grid f (B, C, d, h, w) that the quantizer tokenizes."""
        patches = space_to_channels(x_B1DHW, self.patch)
        f_BCdhw = self.quant_conv(self.encoder(patches))
        return f_BCdhw if self.shortcuts is None else f_BCdhw + self.shortcuts[0](patches)

    def forward(self, x_B1DHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Reconstruction, vq loss and codebook statistics. With code "change", `x` is a batch of pairs, the
        earlier scans first and their follow-ups second (B = 2P); the earlier half is reconstructed from its
        continuous latent, the later half from the quantized change on top of it."""
        f_BCdhw = self.features(x_B1DHW)
        if self.config.code == "scan":
            f_hat, _, vq_loss, stats = self.quantizer(f_BCdhw)
            return self.decode(f_hat), vq_loss, stats
        f_earlier, f_later = f_BCdhw.chunk(2)
        change_hat, _, vq_loss, stats = self.quantizer(f_later - f_earlier)
        return self.decode(torch.cat([f_earlier, f_earlier + change_hat])), vq_loss, stats

    @torch.no_grad()
    def latent_scan(self, volume: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A scan's continuous latent f (B, C, d, h, w) on this model's device. `volume` is (D, H, W) or
        (B, 1, D, H, W). Always in float32 without TF32, whatever autocast the caller is under, so that the same
        scan gives the same tokens on every path and as nearly as kernels allow on every device
        (benchmarks/gpu_check.py measures it)."""
        x = torch.as_tensor(np.ascontiguousarray(volume) if isinstance(volume, np.ndarray) else volume)
        x_B1DHW = (x[None, None] if x.dim() == 3 else x).to(self._device, torch.float32)
        with full_precision(x_B1DHW.device):
            return self.features(x_B1DHW).float()

    @torch.no_grad()
    def followup_tokens(self, f_earlier: torch.Tensor | None, f_later: torch.Tensor) -> list[torch.Tensor]:
        """The token maps (B, d, h, w per scale) of a follow-up with latent `f_later` against its earlier scan's
        latent `f_earlier` (read by code "change" only; None is fine for code "scan")."""
        with full_precision(f_later.device):
            if self.config.code == "scan":
                return self.quantizer.encode(f_later)
            return self.quantizer.encode(f_later - f_earlier)

    def unchanged_tokens(self, f_earlier: torch.Tensor) -> list[torch.Tensor]:
        """The tokens of a follow-up identical to the earlier scan: the earlier scan's own (code "scan"), or
        those of a zero change, token 0 at every scale for every scan (code "change": the quantizer's zero code
        and bias-free refinements make it so, without running the quantizer)."""
        if self.config.code == "change":
            return [torch.zeros(len(f_earlier), *scale, dtype=torch.long, device=f_earlier.device)
                    for scale in self.quantizer.scales]
        return self.followup_tokens(f_earlier, f_earlier)

    @torch.no_grad()
    def followup_latent(self, f_earlier: torch.Tensor | None, tokens: list[torch.Tensor]) -> torch.Tensor:
        """The latent (B, C, d, h, w) the decoder reads for a follow-up's tokens: their f_hat, on top of the
        earlier scan's latent for code "change"."""
        with full_precision(tokens[0].device):
            return self.with_earlier(f_earlier, self.quantizer.tokens_to_fhat(tokens))

    def with_earlier(self, f_earlier: torch.Tensor | None, f_hat: torch.Tensor) -> torch.Tensor:
        """The latent the decoder reads for a follow-up's f_hat: f_hat itself (code "scan"), or the change on top
        of the earlier scan's latent (code "change")."""
        return f_hat if self.config.code == "scan" else f_earlier + f_hat

    @torch.no_grad()
    def decode_latent(self, f_BCdhw: torch.Tensor) -> np.ndarray:
        """Latents decoded to volumes (B, D, H, W) in [0, 1], float32, on the CPU."""
        with full_precision(f_BCdhw.device):
            return self.decode(f_BCdhw)[:, 0].float().clamp(0, 1).cpu().numpy()

    def decode_unchanged(self, f_earlier: torch.Tensor) -> np.ndarray:
        """What a follow-up with no change decodes to, (B, D, H, W) as `decode_followup`: the earlier scan through
        the model's own encoder and decoder. With code "change" the zero change's f_hat is exactly zero, so it is
        the earlier latent decoded."""
        if self.config.code == "change":
            return self.decode_latent(f_earlier)
        return self.decode_followup(f_earlier, self.unchanged_tokens(f_earlier))

    def decode_followup(self, f_earlier: torch.Tensor | None, tokens: list[torch.Tensor]) -> np.ndarray:
        """A follow-up's tokens decoded (against the earlier scan's latent for code "change") to volumes
        (B, D, H, W) in [0, 1], float32, on the CPU."""
        return self.decode_latent(self.followup_latent(f_earlier, tokens))

    @torch.no_grad()
    def encode_scan(self, volume: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
        """A scan's token maps with code "scan", each (B, d, h, w) on this model's device: the one way the token
        cache and prediction encode a scan (`volume` as in `latent_scan`)."""
        return self.followup_tokens(None, self.latent_scan(volume))

    def decode_scan(self, tokens: list[torch.Tensor]) -> np.ndarray:
        """Token maps of code "scan" decoded to volumes (B, D, H, W) in [0, 1], float32, on the CPU (the
        counterpart of `encode_scan`)."""
        return self.decode_followup(None, tokens)

    @property
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def decode(self, f_hat_BCdhw: torch.Tensor) -> torch.Tensor:
        patches = self.decoder(self.post_quant_conv(f_hat_BCdhw))
        if self.shortcuts is not None:
            patches = patches + self.shortcuts[1](f_hat_BCdhw)
        return channels_to_space(patches, self.patch)

    @torch.no_grad()
    def decode_tokens(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        return self.decode(self.quantizer.tokens_to_fhat(tokens))


