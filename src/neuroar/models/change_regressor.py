"""A subject's own aging in a change-coding tokenizer's latent space: a small 3D convolutional network that reads
the earlier scan's continuous latent and age and regresses the latent change per year of the gap as a deviation
from the cohort's mean change (models/mean_change.py), by mean squared error on the training pairs.

The mean change is a voxel-wise average over subjects whose ventricles and sulci lie in different places: a
blurred change that, decoded, carries about a third of the ventricles' growth. Where a subject's boundaries lie
is in its own latent, so a network that reads it can put the change there (benchmarks/CHANGE_REGRESSION.md).
With `transformer.change_width` NeuroAR codes its tokens against the earlier latent advanced by this prediction
(`NeuroAR.change_base`), so that they code only what it leaves.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from neuroar.progress import Progress


class ChangeRegressor(nn.Module):
    """The deviation (B, C, d, h, w) of a scan's latent change per year from the cohort's mean change. Its last
    layer starts at zero, so an untrained regressor predicts the mean change alone."""

    def __init__(self, latent_dim: int, width: int, layers: int = 4):
        super().__init__()
        convs: list[nn.Module] = []
        for i in range(layers):
            convs += [nn.Conv3d(latent_dim + 1 if i == 0 else width, width, 3, padding=1), nn.SiLU()]
        self.net = nn.Sequential(*convs, nn.Conv3d(width, latent_dim, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        # Set by `fit`, saved with the weights: the latents' spread and the training ages' centre and spread.
        self.register_buffer("latent_scale", torch.ones(()))
        self.register_buffer("age_center", torch.zeros(()))
        self.register_buffer("age_scale", torch.ones(()))

    def forward(self, f_earlier_BCdhw: torch.Tensor, earlier_age_B: torch.Tensor) -> torch.Tensor:
        age_B = (earlier_age_B.to(f_earlier_BCdhw) - self.age_center) / self.age_scale
        age_B1dhw = age_B[:, None, None, None, None].expand(-1, 1, *f_earlier_BCdhw.shape[2:])
        unit_BCdhw = self.net(torch.cat([f_earlier_BCdhw / self.latent_scale, age_B1dhw], 1))
        # A unit output is a deviation of a tenth of the latents' spread per year: a step of the same size for
        # every cohort and latent scale.
        return 0.1 * self.latent_scale * unit_BCdhw

    def fit(self, latents_NCdhw: torch.Tensor, earlier_P: torch.Tensor, later_P: torch.Tensor, years_P: torch.Tensor,
            earlier_age_P: torch.Tensor, mean_change_Cdhw: torch.Tensor, steps: int, batch_size: int, lr: float,
            seed: int, progress: bool = True) -> dict[str, float]:
        """Train on the pairs (rows `later_P` against rows `earlier_P` of the latents): the earlier latent
        advanced by (mean change + deviation) x years against the later latent, by AdamW with a cosine schedule.
        Pairs zero years apart say nothing about a rate and are left out. Leaves the weights frozen. Returns the
        last steps' mean squared error beside the mean change's alone on the same pairs."""
        device = self.latent_scale.device
        keep = years_P != 0
        earlier_P, later_P, years_P, earlier_age_P = (t[keep] for t in (earlier_P, later_P, years_P, earlier_age_P))
        self.latent_scale.fill_(float(latents_NCdhw.std()))
        self.age_center.fill_(float(earlier_age_P.mean()))
        self.age_scale.fill_(float(earlier_age_P.std()) if len(earlier_age_P) > 1 else 1.0)
        self.age_scale.clamp_(min=1e-3)
        self.net.requires_grad_(True)
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        rng = np.random.default_rng(seed)
        self.train()
        losses, mean_losses = [], []
        for _ in Progress(range(steps), desc="change regressor", unit="step", enabled=progress):
            rows = torch.from_numpy(rng.integers(0, len(earlier_P), batch_size))
            f_earlier = latents_NCdhw[earlier_P[rows]].to(device)
            years = years_P[rows].to(device)[:, None, None, None, None]
            change = latents_NCdhw[later_P[rows]].to(device) - f_earlier - years * mean_change_Cdhw.to(device)
            loss = F.mse_loss(years * self(f_earlier, earlier_age_P[rows].to(device)), change)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            mean_losses.append(change.square().mean().item())
        self.eval().requires_grad_(False)  # fixed from here: what the tokens are coded against
        last = max(1, steps // 10)
        return {"mse": float(np.mean(losses[-last:])), "mean_change_mse": float(np.mean(mean_losses[-last:]))}
