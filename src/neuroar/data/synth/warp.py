"""Linear interpolation of volumes at voxel coordinates: every warp of the synthetic cohort.

scipy's `ndimage.map_coordinates(order=1, mode="grid-constant" or "nearest")` computes the same values (to float
rounding) one volume at a time; torch's grid_sample samples all of a subject's maps in one pass, about 3x faster
on a CPU core (7 maps of a 2 mm volume: 0.12 s against 0.35 s), and the warps were most of the cohort's time."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F


def sample(volumes: np.ndarray, coords: np.ndarray, outside: Literal["zero", "nearest"] = "zero") -> np.ndarray:
    """`volumes` (C, D, H, W) or (D, H, W), linearly interpolated at voxel coordinates `coords` (3, ...);
    returns (C, ...) or (...). Outside the volume: zero (blending towards it within one voxel of the edge),
    or the nearest edge value."""
    single = volumes.ndim == 3
    volumes_CDHW = torch.from_numpy(np.ascontiguousarray(volumes[None] if single else volumes))
    coords_3M = torch.from_numpy(coords.reshape(3, -1))
    # grid_sample wants (x, y, z) = (W, H, D) order in [-1, 1], corners aligned with the first and last voxels.
    grid_M3 = torch.empty(coords_3M.shape[1], 3, dtype=volumes_CDHW.dtype)
    for axis, size in enumerate(volumes_CDHW.shape[1:]):
        torch.add(coords_3M[axis] * (2.0 / (size - 1)), -1.0, out=grid_M3[:, 2 - axis])
    values_CM = F.grid_sample(volumes_CDHW[None], grid_M3[None, None, None], mode="bilinear",
                              padding_mode="zeros" if outside == "zero" else "border", align_corners=True)[0, :, 0, 0]
    values = values_CM.numpy().reshape(len(volumes_CDHW), *coords.shape[1:])
    return values[0] if single else values
