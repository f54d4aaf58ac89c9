"""Image metrics inside a mask, on volumes whose data range is [0, 1]."""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity


def masked_psnr(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray, data_range: float = 1.0) -> float:
    mse = float(np.mean((prediction[mask].astype(np.float64) - target[mask]) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def masked_ssim(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray, data_range: float = 1.0) -> float:
    """3D SSIM (scikit-image, 7-voxel Gaussian-weighted windows) averaged over the voxels of the mask."""
    _, ssim_map = structural_similarity(target.astype(np.float64), prediction.astype(np.float64),
                                        data_range=data_range, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, full=True)
    return float(ssim_map[mask].mean())


def masked_mae(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(prediction[mask].astype(np.float64) - target[mask]).mean())
