"""An SFCN-style brain-age regressor (Peng et al. 2021, "Accurate brain age prediction with lightweight
deep neural networks"): 3x3x3 conv + BatchNorm + ReLU + max-pool blocks, a 1x1x1 conv, global average
pooling, dropout and a 1x1x1 conv to age bins. Trained with the KL divergence to a Gaussian soft label;
the predicted age is the expectation over the bins."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SFCN(nn.Module):
    def __init__(self, channels: tuple[int, ...], bin_centres: torch.Tensor, dropout: float = 0.5):
        super().__init__()
        blocks, previous = [], 1
        for width in channels:
            blocks += [nn.Conv3d(previous, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU(),
                       nn.MaxPool3d(2, ceil_mode=True)]
            previous = width
        self.features = nn.Sequential(*blocks, nn.Conv3d(previous, previous, 1), nn.BatchNorm3d(previous),
                                      nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Conv3d(previous, len(bin_centres), 1))
        self.register_buffer("bin_centres", bin_centres.float())

    def forward(self, x_B1DHW: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the age bins, (B, bins)."""
        pooled = self.features(x_B1DHW).mean((2, 3, 4), keepdim=True)
        return F.log_softmax(self.head(pooled).flatten(1), 1)

    def soft_labels(self, age_B: torch.Tensor, sigma: float) -> torch.Tensor:
        """Gaussian soft labels over the bins, (B, bins), each summing to 1."""
        logits = -0.5 * ((self.bin_centres[None] - age_B[:, None]) / sigma) ** 2
        return torch.softmax(logits, 1)

    def age(self, log_probs_BK: torch.Tensor) -> torch.Tensor:
        return (log_probs_BK.exp() * self.bin_centres).sum(1)
