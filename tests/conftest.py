from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import nibabel.tests
import numpy as np
import pytest

NIBABEL_DATA = Path(os.path.dirname(nibabel.tests.__file__)) / "data"


@pytest.fixture
def nibabel_data() -> Path:
    """NIfTI files written by other software, shipped with nibabel's own tests."""
    return NIBABEL_DATA


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
    return path


def blob_volume(shape=(24, 28, 20), seed: int = 0) -> np.ndarray:
    """A smooth bright ellipsoid on a dark background: a stand-in head that preprocessing can scale."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    radius = np.array(shape) / 3
    inside = (((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(0) < 1
    return (inside * (100 + 20 * rng.random(shape))).astype(np.float32)
