"""Reading and writing NIfTI volumes, with the checks every input goes through."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from neuroar.errors import ImageError
from neuroar.files import atomic_path


def read_header(path: str | Path) -> nib.Nifti1Image:
    """Open an image lazily (header only) and check that it exists, is readable and is 3D."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found; check the path (relative paths in a manifest are "
                         "relative to the manifest's folder).")
    try:
        img = nib.load(path)
    except Exception as err:  # nibabel raises many types for corrupt or foreign files
        raise ImageError(f"{path}: cannot be read as NIfTI ({err}); convert it to .nii or .nii.gz "
                         "(e.g. with dcm2niix).") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageError(f"{path}: is a {type(img).__name__}, not NIfTI; convert it to .nii or .nii.gz.")
    shape = img.shape
    if len(shape) != 3 and not (len(shape) > 3 and all(s == 1 for s in shape[3:])):
        raise ImageError(f"{path}: image has shape {shape}, but a single 3D T1-weighted volume is needed; "
                         "extract one volume (e.g. `fslroi in out 0 1`) or average them first.")
    return img


def read_volume(path: str | Path) -> nib.Nifti1Image:
    """Load a 3D volume as float32 in memory, refusing NaN or infinite voxels."""
    img = read_header(path)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])
    except Exception as err:
        raise ImageError(f"{path}: the voxel data cannot be read ({err}); the file may be truncated.") from None
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise ImageError(f"{path}: {bad} voxels are NaN or infinite; fix the file (e.g. replace them with 0 "
                         "using `fslmaths in -nan out`) before using it.")
    return nib.Nifti1Image(data, img.affine, _header_3d(img))


def write_volume(path: str | Path, data: np.ndarray, affine: np.ndarray,
                 header: nib.Nifti1Header | None = None) -> None:
    """Write a volume atomically; `header` (e.g. the input's) keeps units and qform/sform codes."""
    img = nib.Nifti1Image(np.asarray(data), affine, header.copy() if header is not None else None)
    img.set_data_dtype(np.asarray(data).dtype)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _header_3d(img: nib.Nifti1Image) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_qform(img.affine, int(img.header["qform_code"]) or 1)
    header.set_sform(img.affine, int(img.header["sform_code"]) or 1)
    return header
