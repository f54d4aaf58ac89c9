"""Preprocessing: RAS orientation, isotropic resampling, crop/pad, robust [0, 1] intensities; and back.

Raw scans (`data.raw`) first lose their bias field and skull (raw.py) and are registered to MNI152
(registration.py); the brain mask and the bias field stay with the record, so that a prediction goes back
into the whole head. Registered scans carry quality checks (brain-mask volume, similarity to the template,
seconds per step) for the QC page (quality.py).

The forward path uses MONAI transforms on a MetaTensor, which carries the affine through every step, so
the preprocessed grid's affine is known in the input's world coordinates. Going back to the input's
space is then one resampling from that grid onto the input's grid (nibabel), with the intensity scaling
undone. Results are cached on disk, keyed by the input file's content and the preprocessing settings.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Orientation, ResizeWithPadOrCrop, Spacing
from nibabel.processing import resample_from_to
from nilearn.datasets import load_mni152_brain_mask
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.restoration import denoise_nl_means

from neuroar.config import DataConfig
from neuroar.data.nifti import read_volume, write_volume
from neuroar.data.raw import Head, extract_brain
from neuroar.data.registration import register_to_mni, template_similarity
from neuroar.errors import ImageError
from neuroar.files import sha256_file, sha256_json, write_json
from neuroar.parallel import in_processes
from neuroar.progress import Progress

# Bump when the preprocessing changes in a way that changes its output, so that caches are recomputed.
PREPROCESS_VERSION = 2


@dataclass(frozen=True)
class PreprocessRecord:
    """What is needed to map a preprocessed volume back onto its input."""

    affine: np.ndarray  # 4x4, preprocessed grid -> the input's world coordinates (mm)
    source_shape: tuple[int, int, int]
    source_affine: np.ndarray
    intensity_range: tuple[float, float]  # input intensities that were mapped to 0 and 1
    # Raw scans: what skull stripping took away. Held in memory for predictions; the cache keeps the mask only.
    head: Head | None = None
    # Registered scans: brain_mask_ml, template_similarity and seconds per step, for the QC page.
    checks: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"affine": self.affine.tolist(), "source_shape": list(self.source_shape),
                "source_affine": self.source_affine.tolist(), "intensity_range": list(self.intensity_range),
                "checks": self.checks}

    @classmethod
    def from_json(cls, obj: dict) -> PreprocessRecord:
        return cls(np.asarray(obj["affine"], dtype=float), tuple(obj["source_shape"]),
                   np.asarray(obj["source_affine"], dtype=float), tuple(obj["intensity_range"]),
                   checks=obj.get("checks", {}))


def preprocess_image(img: nib.Nifti1Image, config: DataConfig) -> tuple[np.ndarray, PreprocessRecord]:
    """Return the preprocessed volume (float32, config.shape, values in [0, 1]) and its record."""
    source = img
    head, checks = None, {}
    if config.raw:
        img, head, checks = extract_brain(img)
        checks["brain_mask_ml"] = float(head.brain_mask.sum()) * abs(np.linalg.det(source.affine[:3, :3])) / 1000
    if config.raw or config.register:
        start = time.perf_counter()
        img = register_to_mni(img)
        checks["seconds_register"] = time.perf_counter() - start
        checks["template_similarity"] = template_similarity(img)
    out_DHW, affine = to_grid(img, config, mode="bilinear")
    low, high = _robust_range(out_DHW, config.intensity_percentiles)
    scaled_DHW = np.clip((out_DHW - low) / (high - low), 0.0, 1.0).astype(np.float32)
    if config.denoise:
        scaled_DHW = denoise(scaled_DHW)
    record = PreprocessRecord(affine=affine, source_shape=tuple(source.shape[:3]),
                              source_affine=source.affine.astype(float), intensity_range=(low, high), head=head,
                              checks={k: round(float(v), 4) for k, v in checks.items()})
    return scaled_DHW, record


def denoise(volume_DHW: np.ndarray) -> np.ndarray:
    """Non-local means (scikit-image, 3x3x3 patches searched within 3 voxels) of a [0, 1] volume, with the noise
    level estimated from the volume itself: deterministic, so the same scan gives the same tokens on every path
    (ANTs' adaptive filter, run over several threads, gave the same scan back differently from run to run)."""
    sigma = noise_sigma(volume_DHW)
    if sigma == 0:
        return volume_DHW
    denoised = denoise_nl_means(volume_DHW, patch_size=3, patch_distance=3, h=0.8 * sigma, sigma=sigma,
                                fast_mode=True)
    return np.clip(denoised, 0.0, 1.0).astype(np.float32)


def noise_sigma(volume_DHW: np.ndarray) -> float:
    """The standard deviation of white noise in a volume, from the median absolute Laplacian over its non-zero
    voxels (Immerkaer 1996, in 3D: the 7-point Laplacian of unit white noise has variance 42), robust to edges."""
    laplacian = ndimage.laplace(volume_DHW.astype(np.float64))[volume_DHW > 0]
    if laplacian.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(laplacian - np.median(laplacian))) / np.sqrt(42))


def template_brain_mask(config: DataConfig) -> np.ndarray:
    """MNI152's brain mask (from the nilearn wheel) on the preprocessed grid of template-space inputs: the
    standard-space mask inside which image metrics are computed."""
    mask = load_mni152_brain_mask(resolution=1)
    mask_DHW, _ = to_grid(mask, dataclasses.replace(config, register=False), mode="nearest")
    return mask_DHW > 0.5


def to_grid(img: nib.Nifti1Image, config: DataConfig, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """RAS, isotropic `config.spacing`, centred crop/pad to `config.shape`; returns the volume and its affine."""
    data_DHW = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])
    transform = Compose([
        Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacing(pixdim=(config.spacing,) * 3, mode=mode, padding_mode="zeros"),
        ResizeWithPadOrCrop(spatial_size=config.shape),
    ])
    image = transform(MetaTensor(torch.from_numpy(data_DHW[None]), affine=torch.as_tensor(img.affine)))
    return image[0].numpy().astype(np.float32), image.affine.numpy().astype(float)


def to_input_space(volume_DHW: np.ndarray, record: PreprocessRecord, order: int = 1,
                   restore_intensity: bool = True) -> nib.Nifti1Image:
    """Map a volume on the preprocessed grid (a prediction, an uncertainty map) onto the input's grid.

    `order` is the spline order (0 for label maps). With `restore_intensity`, [0, 1] goes back to the
    input's intensity range, so that a prediction looks like the input in any viewer; a raw input's head
    (its bias field inside the brain, its own voxels outside the brain and beyond the preprocessed grid) comes
    back too. Without it (an uncertainty map) a raw input's volume is zero there.
    """
    volume = np.asarray(volume_DHW, dtype=np.float32)
    if restore_intensity:
        low, high = record.intensity_range
        volume = volume * (high - low) + low
    moved = resample_from_to(nib.Nifti1Image(volume, record.affine), (record.source_shape, record.source_affine),
                             order=order, mode="constant", cval=0.0)
    moved_XYZ = np.asarray(moved.dataobj, dtype=np.float32)
    if record.head is not None:
        covered = resample_from_to(nib.Nifti1Image(np.ones(volume.shape, np.float32), record.affine),
                                   (record.source_shape, record.source_affine), order=0, cval=0.0)
        inside = record.head.brain_mask & (np.asarray(covered.dataobj) > 0)
        moved_XYZ = (record.head.put_back(moved_XYZ, inside) if restore_intensity
                     else np.where(inside, moved_XYZ, 0.0).astype(np.float32))
    return nib.Nifti1Image(moved_XYZ, record.source_affine)


def with_change_in_input_space(change_DHW: np.ndarray, record: PreprocessRecord, input_XYZ: np.ndarray
                               ) -> nib.Nifti1Image:
    """The input scan plus a change predicted on the preprocessed grid: only the change is resampled onto the
    input's grid and scaled to its intensities (times a raw input's bias field), so the input keeps its own
    resolution and sharpness. Outside the preprocessed grid's reach, and outside a raw input's brain, the input
    is unchanged; the result stays within the input's intensity range."""
    low, high = record.intensity_range
    change_XYZ = np.asarray(to_input_space(change_DHW * (high - low), record, restore_intensity=False).dataobj,
                            dtype=np.float32)
    if record.head is not None:
        change_XYZ = change_XYZ * record.head.bias_field
    input_XYZ = np.asarray(input_XYZ, dtype=np.float32)
    return nib.Nifti1Image(np.clip(input_XYZ + change_XYZ, input_XYZ.min(), input_XYZ.max()), record.source_affine)


def _robust_range(volume: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """The background level (low percentile of all voxels) and the bright end of the head (high
    percentile of the voxels above an Otsu threshold, which separates air from head or brain).

    Taking the low end from the background keeps air at 0 and makes the scaling invertible inside the
    head; the high percentile ignores the few hyperintense voxels (vessels, fat) that a max would follow.
    """
    if float(volume.max()) <= float(volume.min()):
        raise ImageError("the image is constant after resampling; it holds no anatomy to preprocess.")
    head = volume[volume > threshold_otsu(volume)]
    low = float(np.percentile(volume, percentiles[0]))
    high = float(np.percentile(head, percentiles[1]))
    if high <= low:
        low, high = float(volume.min()), float(volume.max())
    return low, high


def cache_key(image_path: str | Path, config: DataConfig) -> str:
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("cache_dir", "split_fractions")}
    if not settings["denoise"]:  # keys from before the setting existed stay valid, and so do their runs' models
        del settings["denoise"]
    return sha256_json({"file": sha256_file(image_path), "settings": settings, "version": PREPROCESS_VERSION})


def preprocess_file(image_path: str | Path, config: DataConfig) -> Path:
    """Preprocess one file into the cache (if not there yet) and return the cached volume's path."""
    key = cache_key(image_path, config)
    out = Path(config.cache_dir) / key[:2] / f"{key}.nii"
    sidecar = out.with_suffix(".json")
    if sidecar.is_file() and out.is_file():  # the sidecar is written last, so its presence means complete
        return out
    source = read_volume(image_path)
    try:
        volume, record = preprocess_image(source, config)
    except ImageError as err:  # name the file, as reading errors do
        raise ImageError(f"{image_path}: {err}") from None
    write_volume(out, volume, record.affine)
    if record.head is not None:
        write_volume(brain_mask_path(out), record.head.brain_mask.astype(np.uint8), source.affine)
    write_json(sidecar, {"source": str(image_path), "version": PREPROCESS_VERSION, **record.to_json()})
    return out


def brain_mask_path(preprocessed: str | Path) -> Path:
    """Where the cache keeps a raw scan's brain mask (on the input's grid)."""
    preprocessed = Path(preprocessed)
    return preprocessed.with_name(preprocessed.stem + "_brain_mask.nii.gz")


def load_preprocessed(path: str | Path) -> tuple[np.ndarray, PreprocessRecord]:
    path = Path(path)
    record = PreprocessRecord.from_json(json.loads(path.with_suffix(".json").read_text()))
    return np.asarray(nib.load(path).dataobj, dtype=np.float32), record


def preprocess_scans(scans: pd.DataFrame, config: DataConfig, progress: bool = True, workers: int = 0
                     ) -> pd.DataFrame:
    """Preprocess every scan of a manifest; returns it with a `preprocessed` column of cached paths.

    Scans are preprocessed in `workers` processes (0: one per CPU core), as `neuroar synth` makes subjects:
    denoising or the raw path's registration keep a core busy per scan. All unreadable
    or invalid images are reported together, each with its manifest row.
    """
    rows = list(scans.itertuples())
    outcomes = list(Progress(in_processes(_preprocess_or_problem, [(row.path, config) for row in rows], workers),
                             total=len(rows), desc="preprocess", unit="scan", enabled=progress))
    problems = [f"subject {row.subject_id} session {row.session_id}: {problem}"
                for row, (_, problem) in zip(rows, outcomes) if problem is not None]
    if problems:
        raise ImageError(f"{len(problems)} scan(s) could not be preprocessed:\n  " + "\n  ".join(problems[:20]))
    return scans.assign(preprocessed=[path for path, _ in outcomes])


def _preprocess_or_problem(image_path: str | Path, config: DataConfig) -> tuple[str, str | None]:
    """(the cached path, None), or ("", what is wrong with the image)."""
    try:
        return str(preprocess_file(image_path, config)), None
    except ImageError as err:
        return "", str(err)
