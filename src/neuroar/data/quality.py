"""Quality control of registered (and raw) scans: a figure per scan and a page that lists every scan.

The figure shows three planes through the input as it was read, the brain mask's outline on it (raw scans),
and the registered brain with the template's outline over it. The page flags a scan whose brain mask holds
an implausible volume or whose registered brain correlates poorly with the template: the two ways this
pipeline fails silently (a mask that cut into the brain or kept the scalp; a registration that converged on
the wrong pose).
"""

from __future__ import annotations

import functools
import html
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from nilearn.datasets import load_mni152_template

from neuroar.config import DataConfig
from neuroar.data.nifti import read_volume
from neuroar.data.preprocess import brain_mask_path, load_preprocessed, to_grid
from neuroar.files import atomic_path, write_text

# Adult and adolescent intracranial volumes span ~1.1-1.9 L; the synthetic cohort's masks (MNI152's generous
# 1.88 L mask, scaled per subject) reach 2.5 L. Outside this range a mask lost brain or kept scalp.
BRAIN_MASK_ML = (800.0, 2600.0)
# Registered synthetic scans correlate 0.56-0.84 with the template inside its mask (2 mm scans against the
# 1 mm template; benchmarks/RAW_PREPROCESSING.md); a scan whose registration is 5 degrees or 5 mm off loses
# ~0.15, 10 mm off ~0.3: the threshold catches misses of about a centimetre.
MIN_TEMPLATE_SIMILARITY = 0.5


def flags(checks: dict[str, float]) -> list[str]:
    """Why a scan's checks are implausible (empty when they are not)."""
    found = []
    if "brain_mask_ml" in checks and not BRAIN_MASK_ML[0] <= checks["brain_mask_ml"] <= BRAIN_MASK_ML[1]:
        found.append(f"brain mask {checks['brain_mask_ml']:.0f} mL (plausible {BRAIN_MASK_ML[0]:.0f}-"
                     f"{BRAIN_MASK_ML[1]:.0f})")
    if "template_similarity" in checks and checks["template_similarity"] < MIN_TEMPLATE_SIMILARITY:
        found.append(f"similarity to the template {checks['template_similarity']:.2f} (< {MIN_TEMPLATE_SIMILARITY})")
    return found


def plot_scan_check(source: str | Path, preprocessed: str | Path, config: DataConfig, path: Path) -> None:
    """Rows: the input, its brain mask's outline (raw scans), the registered brain under the template's outline;
    columns: sagittal, coronal, axial planes through the middle."""
    canonical = nib.as_closest_canonical(read_volume(source))  # RAS, so that every row reads the same way
    image = np.asarray(canonical.dataobj, dtype=np.float32)
    rows = [("input", image, None)]
    mask_file = brain_mask_path(Path(preprocessed))
    if mask_file.is_file():
        rows.append(("brain mask", image, np.asarray(nib.as_closest_canonical(nib.load(mask_file)).dataobj) > 0))
    rows.append(("registered, template outline", load_preprocessed(preprocessed)[0], _template_on_grid(config)))
    fig = Figure(figsize=(7.5, 2.5 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for (title, volume, outline), row_axes in zip(rows, axes):
        vmax = float(np.percentile(volume, 99.5)) or 1.0
        for axis, ax in enumerate(row_axes):
            centre = volume.shape[axis] // 2
            ax.imshow(np.take(volume, centre, axis).T, cmap="gray", origin="lower", vmin=0, vmax=vmax)
            if outline is not None:
                ax.contour(np.take(outline, centre, axis).T.astype(np.float32), levels=[0.5], colors="tab:red",
                           linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
        row_axes[0].set_ylabel(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=70, format="png")


@functools.lru_cache(maxsize=2)
def _template_on_grid_cached(spacing: float, shape: tuple[int, int, int]) -> np.ndarray:
    template = load_mni152_template(resolution=1)
    grid, _ = to_grid(template, DataConfig(spacing=spacing, shape=shape), mode="bilinear")
    # The boundary between grey and white matter: the template's most telling outline.
    return grid > 0.6 * float(grid.max())


def _template_on_grid(config: DataConfig) -> np.ndarray:
    return _template_on_grid_cached(config.spacing, tuple(config.shape))


def write_qc_page(scans: pd.DataFrame, config: DataConfig, out_dir: str | Path) -> int:
    """OUT/index.html: every scan's checks, flags and QC figure (drawn once into the cache, copied beside the
    page); returns the number of scans flagged. `scans` needs `preprocessed` (cached paths) beside `path`."""
    out_dir = Path(out_dir)
    rows, flagged = [], 0
    for scan in scans.itertuples():
        preprocessed = Path(scan.preprocessed)
        checks = json.loads(preprocessed.with_suffix(".json").read_text()).get("checks", {})
        found = flags(checks)
        flagged += bool(found)
        name = f"{scan.subject_id}_{scan.session_id}.png"
        figure = preprocessed.with_name(preprocessed.stem + "_qc.png")
        if not figure.is_file():
            plot_scan_check(scan.path, preprocessed, config, figure)
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure, out_dir / name)
        seconds = " / ".join(f"{checks[k]:.1f}" for k in ("seconds_n4", "seconds_skull_strip", "seconds_register")
                             if k in checks)
        cells = [scan.subject_id, scan.session_id, str(scan.path), _number(checks.get("brain_mask_ml"), "{:.0f}"),
                 _number(checks.get("template_similarity"), "{:.3f}"), seconds, "; ".join(found) or "ok"]
        rows.append(f"<tr class='{'flag' if found else 'ok'}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                    + f"<td><a href='{html.escape(name)}'><img src='{html.escape(name)}' height='180'></a></td></tr>")
    header = ("subject", "session", "input", "brain mask (mL)", "similarity to template", "seconds (N4 / strip / "
              "register)", "flag", "figure")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>neuroar preprocessing QC</title><style>"
            "body{font-family:sans-serif} td,th{padding:2px 8px;border-bottom:1px solid #ddd} "
            "tr.flag{background:#fdd}</style></head><body>"
            f"<h1>Preprocessing QC</h1><p>{flagged} of {len(scans)} scans flagged: brain mask outside "
            f"{BRAIN_MASK_ML[0]:.0f}-{BRAIN_MASK_ML[1]:.0f} mL or similarity to the MNI152 template below "
            f"{MIN_TEMPLATE_SIMILARITY}. Look at every flagged scan's figure before training on it.</p><table><tr>"
            + "".join(f"<th>{h}</th>" for h in header) + "</tr>" + "\n".join(rows) + "</table></body></html>")
    write_text(out_dir / "index.html", page)
    return flagged


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)

