"""The ages as a model sees them, shared by NeuroAR and the baselines."""

from __future__ import annotations

import math

import torch
from torch import nn

AGE_TOKENS = 3  # earlier age, target age, years between


class AgeEmbedding(nn.Module):
    """Ages in years -> three age tokens (B, 3, W) for cross-attention and one condition vector (B, W) for
    AdaLN. Sinusoids with periods from half a year to two centuries resolve both the gap and the age."""

    def __init__(self, width: int, frequencies: int = 32):
        super().__init__()
        periods = torch.logspace(math.log10(0.5), math.log10(200.0), frequencies)
        self.register_buffer("omega", 2 * math.pi / periods, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * frequencies, width), nn.SiLU(), nn.Linear(width, width))
        self.kind = nn.Parameter(torch.randn(AGE_TOKENS, width) * 0.02)
        self.dropped = nn.Parameter(torch.randn(AGE_TOKENS, width) * 0.02)  # the "no age" condition
        self.pool = nn.Sequential(nn.SiLU(), nn.Linear(AGE_TOKENS * width, width))

    def forward(self, earlier_age_B: torch.Tensor, target_age_B: torch.Tensor, drop_B: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        ages_B3 = torch.stack([earlier_age_B, target_age_B, target_age_B - earlier_age_B], 1).to(self.omega.dtype)
        phase_B3F = ages_B3[..., None] * self.omega
        tokens_B3W = self.mlp(torch.cat([phase_B3F.sin(), phase_B3F.cos()], -1)) + self.kind
        if drop_B is not None:
            tokens_B3W = torch.where(drop_B[:, None, None], self.dropped.expand_as(tokens_B3W), tokens_B3W)
        return tokens_B3W, self.pool(tokens_B3W.flatten(1))
