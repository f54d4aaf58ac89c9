"""Figures of the synthetic cohort: true volume trajectories by group, and one subject's visits."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from neuroar.files import atomic_path

_PANELS = {"ventricles": "Lateral ventricles", "hippocampus": "Hippocampus (L + R)",
           "grey_matter": "Grey matter", "whole_brain": "Whole brain"}


def plot_trajectories(truth: pd.DataFrame, path: Path) -> None:
    """True volume against age, one line per subject, coloured by group (a volume per panel)."""
    truth = truth.assign(hippocampus=truth["hippocampus_left"] + truth["hippocampus_right"])
    groups = sorted(truth["diagnosis"].unique(), key=lambda g: ["CN", "MCI", "AD"].index(g) if g in
                    ("CN", "MCI", "AD") else 9)
    colours = dict(zip(groups, colormaps["tab10"].colors))
    fig = Figure(figsize=(4 * len(_PANELS), 3.4), layout="constrained")
    axes = fig.subplots(1, len(_PANELS))
    for ax, (column, title) in zip(axes, _PANELS.items()):
        for (_, group), visits in truth.groupby(["subject_id", "diagnosis"]):
            ax.plot(visits["age"], visits[column], "-o", ms=3, lw=1, color=colours[group], alpha=0.7)
        ax.set(title=title, xlabel="age (years)", ylabel="true volume (mL)")
    for group in groups:
        axes[0].plot([], [], "-o", color=colours[group], label=group)
    axes[0].legend(frameon=False)
    _save(fig, path)


def plot_montage(manifest: pd.DataFrame, root: Path, path: Path) -> None:
    """One subject (the one followed longest): axial and coronal slices of every visit and the change
    from the first visit."""
    span = manifest.groupby("subject_id")["age"].agg(lambda a: a.max() - a.min())
    visits = manifest[manifest["subject_id"] == span.idxmax()].sort_values("age")
    images = [nib.load(root / p).get_fdata(dtype=np.float32) for p in visits["path"]]
    labels = [nib.load(root / str(p).replace("_T1w", "_dseg")).get_fdata(dtype=np.float32) for p in visits["path"]]
    affine = nib.load(root / visits["path"].iloc[0]).affine
    ijk = np.linalg.inv(affine) @ np.array([0.0, -20.0, 12.0, 1.0])  # through ventricles and hippocampi
    x, y, z = (int(round(v)) for v in ijk[:3])
    vmax = float(np.percentile(images[0], 99.5))
    fig = Figure(figsize=(2.6 * len(images), 8), layout="constrained")
    axes = fig.subplots(3, len(images), squeeze=False)
    for k, (image, label, age) in enumerate(zip(images, labels, visits["age"])):
        axes[0, k].imshow(image[:, :, z].T, cmap="gray", origin="lower", vmin=0, vmax=vmax)
        axes[0, k].contour(label[:, :, z].T == 4, levels=[0.5], colors="tab:orange", linewidths=0.7)
        axes[0, k].set_title(f"{visits['session_id'].iloc[k]}, age {age:.1f}")
        axes[1, k].imshow(image[:, y, :].T, cmap="gray", origin="lower", vmin=0, vmax=vmax)
        axes[1, k].contour(label[:, y, :].T >= 5, levels=[0.5], colors="tab:red", linewidths=0.7)
        change = image[:, y, :] - images[0][:, y, :]
        axes[2, k].imshow(change.T, cmap="RdBu_r", origin="lower", vmin=-0.4 * vmax, vmax=0.4 * vmax)
    axes[0, 0].set_ylabel("axial (ventricles)")
    axes[1, 0].set_ylabel("coronal (hippocampi)")
    axes[2, 0].set_ylabel("coronal change from first visit")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{visits['subject_id'].iloc[0]} ({visits['diagnosis'].iloc[0]})")
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
