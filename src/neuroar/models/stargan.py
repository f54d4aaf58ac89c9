"""The latent StarGAN baseline: a generator maps an earlier latent and a target age to a follow-up latent
(as a residual, so that the earlier scan's identity is the starting point); a discriminator judges latents
patch by patch and regresses their age."""

from __future__ import annotations

import torch
from torch import nn

from neuroar.config import StarGANConfig
from neuroar.models.conditioning import AgeEmbedding


class _ModulatedBlock(nn.Module):
    """Residual 3x3x3 block whose normalisation is scaled and shifted by the age condition (FiLM)."""

    def __init__(self, channels: int, condition: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(8, channels, affine=False), nn.GroupNorm(8, channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        self.film = nn.Linear(condition, 2 * channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, condition_BW: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(condition_BW)[:, :, None, None, None].chunk(2, 1)
        h = self.conv1(torch.nn.functional.silu(self.norm1(x) * (1 + scale) + shift))
        return x + self.conv2(torch.nn.functional.silu(self.norm2(h)))


class Generator(nn.Module):
    def __init__(self, config: StarGANConfig, latent_channels: int):
        super().__init__()
        self.ages = AgeEmbedding(config.channels)
        self.ages.dropped.requires_grad_(False)  # no age dropout (DDP needs every trainable parameter in each step)
        self.inp = nn.Conv3d(latent_channels, config.channels, 3, padding=1)
        self.blocks = nn.ModuleList(_ModulatedBlock(config.channels, config.channels)
                                    for _ in range(config.res_blocks))
        self.out = nn.Conv3d(config.channels, latent_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # starts as the identity map
        nn.init.zeros_(self.out.bias)

    def forward(self, earlier_BCDHW: torch.Tensor, earlier_age_B: torch.Tensor, target_age_B: torch.Tensor
                ) -> torch.Tensor:
        _, condition_BW = self.ages(earlier_age_B, target_age_B)
        h = self.inp(earlier_BCDHW)
        for block in self.blocks:
            h = block(h, condition_BW)
        return earlier_BCDHW + self.out(h)


class GeneratorPasses(nn.Module):
    """A training step's three generator passes in one forward (DistributedDataParallel needs one forward per
    backward): earlier -> target age, back to the earlier age (cycle), and at the earlier age (identity)."""

    def __init__(self, generator: Generator):
        super().__init__()
        self.generator = generator

    def forward(self, earlier_BCDHW: torch.Tensor, earlier_age_B: torch.Tensor, target_age_B: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fake = self.generator(earlier_BCDHW, earlier_age_B, target_age_B)
        return (fake, self.generator(fake, target_age_B, earlier_age_B),
                self.generator(earlier_BCDHW, earlier_age_B, earlier_age_B))


class Discriminator(nn.Module):
    """(patch realness logits (B, 1, d, h, w), age in years (B,)). Ages are regressed around `age_centre`."""

    def __init__(self, config: StarGANConfig, latent_channels: int, age_centre: float = 70.0):
        super().__init__()
        c = config.channels
        self.body = nn.Sequential(
            nn.Conv3d(latent_channels, c, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv3d(c, 2 * c, 4, stride=2, padding=1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2),
            nn.Conv3d(2 * c, 2 * c, 3, padding=1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2))
        self.adversarial = nn.Conv3d(2 * c, 1, 3, padding=1)
        self.age = nn.Linear(2 * c, 1)
        self.register_buffer("age_centre", torch.tensor(float(age_centre)))  # saved with the weights

    def forward(self, latent_BCDHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(latent_BCDHW)
        return self.adversarial(h), self.age_centre + 10.0 * self.age(h.mean((2, 3, 4)))[:, 0]
