"""Raw scanner T1w in: N4 bias-field correction (ANTs) and skull stripping (deepbet), before the affine
registration of registration.py (`pip install 'neuroar[raw]'`).

N4 runs first, on the whole head, because a strong bias field misleads a skull stripper; deepbet then
finds the brain in the corrected image. deepbet's two networks ship inside its wheel and are loaded from
there, as the installed package provides them: nothing is downloaded and no user path is read.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from neuroar.data.registration import ants_image
from neuroar.errors import ConfigError, ImageError

N4_MM = 2.0  # N4 fits its field on voxels no smaller than this (mm)


@dataclass(frozen=True)
class Head:
    """What raw preprocessing takes away from a scan, kept to put a prediction back into the whole head."""

    image: np.ndarray  # (X, Y, Z) the input's voxels
    brain_mask: np.ndarray  # (X, Y, Z) bool, the brain on the input's grid
    bias_field: np.ndarray  # (X, Y, Z) N4's multiplicative field: input = corrected * bias_field

    def put_back(self, brain: np.ndarray, covered: np.ndarray) -> np.ndarray:
        """A bias-corrected brain volume on the input's grid (a prediction) inside the head it came from: the
        bias field restored inside the brain mask where `covered` (the preprocessed grid reaches), the input's
        own voxels everywhere else."""
        return np.where(self.brain_mask & covered, brain * self.bias_field, self.image).astype(np.float32)


def extract_brain(img: nib.Nifti1Image) -> tuple[nib.Nifti1Image, Head, dict[str, float]]:
    """The bias-corrected brain (zero outside its mask) on the input's grid, the Head it was taken from, and
    the seconds each step took."""
    _deepbet()  # a missing package is reported before N4's seconds are spent
    image = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])
    start = time.perf_counter()
    corrected, field = n4_correct(image, img.affine)
    n4_done = time.perf_counter()
    mask = brain_mask(nib.Nifti1Image(corrected, img.affine))
    done = time.perf_counter()
    head = Head(image=image, brain_mask=mask, bias_field=field)
    brain = nib.Nifti1Image(np.where(mask, corrected, 0.0).astype(np.float32), img.affine)
    return brain, head, {"seconds_n4": n4_done - start, "seconds_skull_strip": done - n4_done}


def n4_correct(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """N4 bias-field correction with ANTs' defaults: the corrected image (same intensity scale) and the field
    (image = corrected * field). A bias field varies over centimetres, so it is fitted on the scan resampled to
    voxels of at least N4_MM and interpolated back. Measured on a 1 mm raw scan (240x240x220): 14.5 s against
    91.7 s at full size, corrected brain intensities equal to the full-size fit's up to a global factor 1.02
    (SD 1.5 %, r 0.998)."""
    ants = _ants()
    zoom = np.minimum(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)) / N4_MM, 1.0)
    coarse = ndimage.zoom(image, zoom, order=1) if (zoom < 1).any() else image
    coarse_affine = affine.copy()
    coarse_affine[:3, :3] = affine[:3, :3] * (np.array(image.shape) / np.array(coarse.shape))
    field = ants.n4_bias_field_correction(ants_image(ants, coarse, coarse_affine), return_bias_field=True)
    field = np.asarray(ants.to_nibabel_nifti(field).dataobj, dtype=np.float32)
    if field.shape != image.shape:
        field = ndimage.zoom(field, np.array(image.shape) / np.array(field.shape), order=1)
    field = np.maximum(field, 1e-3).astype(np.float32)
    return image / field, field


def brain_mask(img: nib.Nifti1Image) -> np.ndarray:
    """deepbet's brain mask (bool, on the image's grid); an image in which it finds no brain is an error."""
    try:
        _, mask, _ = _deepbet().run(img)
        mask = np.asarray(mask.dataobj).reshape(img.shape[:3]) > 0
    except (AssertionError, ValueError):  # deepbet asserts when its first network sees no head
        mask = np.zeros(img.shape[:3], dtype=bool)
    if not mask.any():
        raise ImageError("skull stripping (deepbet) found no brain; check that this is a T1-weighted scan of a "
                         "head. A scan that is already skull-stripped needs data.raw=false (with "
                         "data.register=true if it is not in MNI152 space).")
    return mask


@functools.lru_cache(maxsize=1)
def _deepbet():
    try:
        from deepbet import BrainExtraction
    except ImportError:
        raise ConfigError("data.raw=true needs deepbet and ANTs: pip install 'neuroar[raw]'.") from None
    with warnings.catch_warnings():  # deepbet's networks are TorchScript, which torch now calls deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        return BrainExtraction(no_gpu=not torch.cuda.is_available())


def _ants():
    try:
        import ants
    except ImportError:
        raise ConfigError("data.raw=true needs deepbet and ANTs: pip install 'neuroar[raw]'.") from None
    return ants
