"""The cohort's mean aging in a change-coding tokenizer's latent space: per latent voxel and channel, the training
pairs' latent change per year of their gap, fitted by least squares through the origin (a gap of zero years
changes nothing):

    g = sum_p years_p * (f_later_p - f_earlier_p) / sum_p years_p^2

It is what a model that knows only the cohort's average aging predicts (the earlier latent advanced by g x years),
and with `transformer.mean_change` the base NeuroAR's change tokens are coded against, so that they code a pair's
deviation from the cohort's mean aging rather than all of its change.
"""

from __future__ import annotations

import torch

from neuroar.errors import NeuroARError


def fit_mean_change(latents_NCdhw: torch.Tensor, earlier_P: torch.Tensor, later_P: torch.Tensor,
                    years_P: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """g (C, d, h, w) over the pairs (rows `later_P` against rows `earlier_P` of the latents, `years_P` apart)."""
    years_P = years_P.to(latents_NCdhw)
    denominator = float((years_P ** 2).sum())
    if denominator == 0:
        raise NeuroARError("the cohort's mean change needs training pairs more than zero years apart.")
    total_Cdhw = torch.zeros_like(latents_NCdhw[0])
    for start in range(0, len(earlier_P), chunk):
        part = slice(start, start + chunk)
        change_PCdhw = latents_NCdhw[later_P[part]] - latents_NCdhw[earlier_P[part]]
        total_Cdhw += torch.einsum("p,p...->...", years_P[part], change_PCdhw)
    return total_Cdhw / denominator


def advance(f_earlier_BCdhw: torch.Tensor, years_B: torch.Tensor, rate_Cdhw: torch.Tensor) -> torch.Tensor:
    """The earlier latents advanced over each one's years by a change per year: the mean change (C, d, h, w), or
    one per scan (B, C, d, h, w)."""
    return f_earlier_BCdhw + years_B.to(f_earlier_BCdhw)[:, None, None, None, None] * rate_Cdhw
