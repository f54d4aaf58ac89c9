"""The template atlas: MNI152 2009a (shipped in the nilearn wheel) with its tissue maps and two located
structures. The synthetic cohort is built from it and the evaluation measures regional volumes in it.

Tissue maps: grey and white matter probabilities are nilearn's; CSF is what the brain mask holds beyond
them (mask - GM - WM, clipped to [0, 1]). Two structures are located from the template itself:

- Lateral ventricles: the CSF voxels (p > 0.5) inside a central box (|x| < 40, -75 < y < 45,
  -30 < z < 45 mm) form connected components; the ventricular system is the largest component that does
  not touch the box's faces (the sulcal and cisternal CSF components run out of the box). On the 2009a
  template this is a ~18 mL component centred near (0, -15, 14) mm.
- Hippocampi: an ellipsoid per hemisphere centred at (+-27, -22, -13) mm whose long axis runs from the
  head (anterior, inferior) to the tail (posterior, superior) along (0, -28, 18), semi-axes 22 x 8 x 6.5
  mm, weighted by the grey-matter probability (~3 mL each).

Each voxel's probabilities over CLASSES sum to the brain mask (1 inside, 0 outside).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from nilearn import datasets
from scipy import ndimage

# Label values are 1 + the index here; 0 is background. Volumes in truth.csv use the same names.
CLASSES = ("csf", "grey_matter", "white_matter", "ventricles", "hippocampus_left", "hippocampus_right")

_VENTRICLE_BOX_MM = ((-40, 40), (-75, 45), (-30, 45))
_HIPPOCAMPUS_CENTRE_MM = (27.0, -22.0, -13.0)
_HIPPOCAMPUS_AXIS = (0.0, -28.0, 18.0)
_HIPPOCAMPUS_SEMI_AXES_MM = (22.0, 8.0, 6.5)  # along the long axis, left-right, and the third axis


@dataclass(frozen=True)
class Anatomy:
    t1: np.ndarray  # (X, Y, Z) float32, template T1 intensities in [0, 1]
    probabilities: np.ndarray  # (len(CLASSES), X, Y, Z) float32
    affine: np.ndarray  # voxel -> MNI mm

    @property
    def voxel_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def volumes_ml(self) -> dict[str, float]:
        return {name: float(p.sum(dtype=np.float64)) * self.voxel_ml for name, p in zip(CLASSES, self.probabilities)}


@functools.lru_cache(maxsize=2)
def load_anatomy(spacing: int) -> Anatomy:
    """The template anatomy at 1 or 2 mm (nilearn's own resampled copies), read from the installed wheel."""
    if spacing not in (1, 2):
        raise ValueError(f"the synthetic cohort is made at 1 or 2 mm, not {spacing}")
    t1_img = datasets.load_mni152_template(resolution=spacing)
    gm = datasets.load_mni152_gm_template(resolution=spacing).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=spacing).get_fdata(dtype=np.float32)
    mask = datasets.load_mni152_brain_mask(resolution=spacing).get_fdata(dtype=np.float32)
    affine = t1_img.affine
    gm, wm = gm * mask, wm * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    mm = _world_coordinates(mask.shape, affine)
    ventricles = _ventricle_mask(csf, mm)
    hippocampi = [_hippocampus_mask(mm, side) for side in (-1.0, 1.0)]  # left is x < 0 in RAS
    hippocampus_gm = [gm * h for h in hippocampi]
    probabilities = np.stack([
        csf * ~ventricles,
        gm - hippocampus_gm[0] - hippocampus_gm[1],
        wm,
        csf * ventricles,
        *hippocampus_gm,
    ]).astype(np.float32)
    t1 = np.clip(t1_img.get_fdata(dtype=np.float32), 0.0, None) * mask
    return Anatomy(t1=t1, probabilities=probabilities, affine=affine)


def _world_coordinates(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape((3, *shape)).astype(np.float32)


def _ventricle_mask(csf: np.ndarray, mm: np.ndarray) -> np.ndarray:
    box = np.ones(csf.shape, dtype=bool)
    for axis, (low, high) in enumerate(_VENTRICLE_BOX_MM):
        box &= (mm[axis] > low) & (mm[axis] < high)
    labels, count = ndimage.label((csf > 0.5) & box)
    faces = ndimage.binary_dilation(~box) & box
    touching = set(np.unique(labels[faces]))
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    inside = [(size, k + 1) for k, size in enumerate(sizes) if k + 1 not in touching]
    if not inside:
        raise RuntimeError("no enclosed CSF component found in the template; the template files changed")
    return labels == max(inside)[1]


def _hippocampus_mask(mm: np.ndarray, side: float) -> np.ndarray:
    cx, cy, cz = _HIPPOCAMPUS_CENTRE_MM
    rel = mm - np.array([side * cx, cy, cz], dtype=np.float32)[:, None, None, None]
    long_axis = np.asarray(_HIPPOCAMPUS_AXIS) / np.linalg.norm(_HIPPOCAMPUS_AXIS)
    lateral = np.array([1.0, 0.0, 0.0])
    third = np.cross(long_axis, lateral)
    a, b, c = _HIPPOCAMPUS_SEMI_AXES_MM
    along = np.tensordot(long_axis, rel, axes=1)
    across = np.tensordot(lateral, rel, axes=1)
    other = np.tensordot(third, rel, axes=1)
    return (along / a) ** 2 + (across / b) ** 2 + (other / c) ** 2 <= 1.0
