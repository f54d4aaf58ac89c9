"""The baselines' networks as one interface: build the modules of a kind, predict a follow-up latent."""

from __future__ import annotations

import torch
from torch import nn

from neuroar.config import BASELINES, Config
from neuroar.errors import NeuroARError
from neuroar.models.ldm import LatentDiffusion
from neuroar.models.stargan import Discriminator, Generator


def build_baseline(kind: str, config: Config, age_centre: float = 70.0) -> dict[str, nn.Module]:
    """The modules of a baseline; "model" is the one that predicts."""
    channels = config.autoencoder.latent_channels
    if kind == "ldm":
        return {"model": LatentDiffusion(config.ldm, channels, config.autoencoder.norm_groups)}
    if kind == "stargan":
        return {"model": Generator(config.stargan, channels),
                "discriminator": Discriminator(config.stargan, channels, age_centre)}
    raise NeuroARError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}.")


def predict_latent(kind: str, model: nn.Module, earlier_BCDHW: torch.Tensor, earlier_age_B: torch.Tensor,
                   target_age_B: torch.Tensor, noise_BCDHW: torch.Tensor | None = None) -> torch.Tensor:
    """Follow-up latents (scaled) of a trained baseline's "model" module; the LDM starts from `noise_BCDHW`
    (default: fresh Gaussian noise)."""
    if kind == "ldm":
        return model.sample(earlier_BCDHW, earlier_age_B, target_age_B, noise_BCDHW)
    return model(earlier_BCDHW, earlier_age_B, target_age_B)
