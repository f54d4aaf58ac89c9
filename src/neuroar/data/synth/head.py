"""The synthetic brain as a scanner would see it: inside a head (skull and scalp), in a scanner's pose away
from MNI152 space, on the scanner's own grid. These are the raw scans of `SynthOptions.raw`, written beside
the clean ones with the truth a preprocessing pipeline is checked against: the brain mask on the raw grid
and the pose.

The head is a set of layers around the template's brain mask (smoothed, so the skull does not follow the
sulci), at distances and T1w intensities typical of an adult head. A subject's head is warped like its brain
(head size and deformation) and does not age: it is sampled at the subject's unaged coordinates.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from neuroar.data.atlas import load_anatomy

# Outer edge of each layer (mm from the brain mask's surface) and its intensity relative to white matter:
# inner table of the skull, diploe (marrow), outer table, muscle and galea, subcutaneous fat, skin.
LAYERS = ((2.0, 0.04), (5.0, 0.45), (7.0, 0.04), (9.0, 0.35), (13.0, 1.1), (14.5, 0.6))
# Where atrophy pulls the brain away from the template's mask, the gap holds CSF.
GAP_INTENSITY = 0.25
RAW_FOV_MM = (240.0, 240.0, 220.0)  # a head coil's field of view
# Scanner poses: rotations (degrees, per axis) and translations (mm) drawn from normal distributions.
POSE_DEGREES_SD = 6.0
POSE_MM_SD = 8.0
HEAD_CENTRE_MM = (0.0, -15.0, 20.0)  # the MNI point the scanner's isocentre sits near (the head's centre)


@functools.lru_cache(maxsize=2)
def head_layers(spacing: int) -> np.ndarray:
    """T1w intensities of everything but the brain on the template grid (template white matter is ~0.87)."""
    anatomy = load_anatomy(spacing)
    brain = ndimage.gaussian_filter(anatomy.probabilities.sum(axis=0), 4.0 / spacing) > 0.5
    outside_mm = ndimage.distance_transform_edt(~brain) * spacing
    intensity = np.where(brain, GAP_INTENSITY, 0.0)
    inner = 0.0
    for outer, value in LAYERS:
        intensity = np.where((outside_mm > inner) & (outside_mm <= outer), value, intensity)
        inner = outer
    return (0.87 * intensity).astype(np.float32)


def draw_pose(rng: np.random.Generator) -> np.ndarray:
    """A rigid 4x4 map from MNI world coordinates (mm) to the scanner's: the head tilted and shifted."""
    centre = np.asarray(HEAD_CENTRE_MM)
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_euler("XYZ", rng.normal(0.0, POSE_DEGREES_SD, 3), degrees=True).as_matrix()
    pose[:3, 3] = -pose[:3, :3] @ centre + rng.normal(0.0, POSE_MM_SD, 3)  # the head's centre near the isocentre
    return pose


def raw_grid(spacing: int) -> tuple[tuple[int, int, int], np.ndarray]:
    """The scanner's grid: the field of view centred on the isocentre, stored left-to-right flipped (LAS, as
    many converters write), so that reading it needs the affine."""
    shape = tuple(int(round(fov / spacing)) for fov in RAW_FOV_MM)
    affine = np.diag([-float(spacing), float(spacing), float(spacing), 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return shape, affine


def clean_voxels(pose: np.ndarray, shape: tuple[int, int, int], affine: np.ndarray,
                 clean_affine: np.ndarray) -> np.ndarray:
    """(3, X, Y, Z) coordinates on the clean (template-space) grid of every voxel of the raw grid."""
    to_clean = np.linalg.inv(clean_affine) @ np.linalg.inv(pose) @ affine
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    return (to_clean[:3, :3] @ ijk + to_clean[:3, 3:]).astype(np.float32).reshape((3, *shape))
