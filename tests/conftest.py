from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import nibabel.tests
import numpy as np
import pandas as pd
import pytest
import torch
from filelock import FileLock

from neuroar.config import DEMO_SCAN_CODING
from neuroar.data.synth.cohort import SynthOptions, make_cohort

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # The test processes share the cores: each (and the demos and torchrun it starts) gets its share of threads,
    # or OpenMP's spinning threads of one process take the cores the other one needs.
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)


def run_neuroar(*args, cwd=None) -> subprocess.CompletedProcess:
    """The `neuroar` command in a process of its own, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "neuroar", *args], capture_output=True, text=True, cwd=cwd)


# The quick demo shrunk further (4 mm, a few training steps) so that the test checks every stage in a minute; its
# tokenizer codes the change with the shortcut, as the demo's, on 8x8x8 patches.
SMALL_DEMO = ["data.spacing=4", "data.shape=[40,48,40]", "tokenizer.downsample=8", "tokenizer.patch=8",
              "tokenizer.scales=[[1,1,1],[3,3,3],[5,6,5]]",
              "train_tokenizer.steps=4", "train_transformer.steps=4", "train_transformer.batch_size=2",
              "train_transformer.change_steps=10",
              "train_autoencoder.steps=3", "train_ldm.steps=4", "train_stargan.steps=4", "ldm.ddim_steps=3",
              "brain_age.steps=4"]


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


# A tiny run: 4 mm, 32^3, a 4x-downsampling scan-coding tokenizer with scales 1^3, 4^3, 8^3, an 8^3 autoencoder
# latent (both fold 2x2x2 patches into channels first, as the demo config does); seconds per training step.
TINY = [*DEMO_SCAN_CODING, "data.spacing=4", "data.shape=[32,32,32]", "tokenizer.downsample=4", "tokenizer.channels=8",
        "tokenizer.norm_groups=4", "tokenizer.latent_dim=8", "tokenizer.codebook_size=64",
        "tokenizer.scales=[[1,1,1],[4,4,4],[8,8,8]]", "train_tokenizer.batch_size=2", "train_tokenizer.lr=0.002",
        "train_tokenizer.log_every=1", "train_tokenizer.adversarial_start=3", "train_tokenizer.adversarial_weight=0.1",
        "data.split_fractions=[0.75,0.25,0]", "transformer.depth=1", "train_transformer.batch_size=2",
        "train_transformer.log_every=1", "train_transformer.warmup_steps=5", "sampling.samples=2",
        "autoencoder.channels=[8,8]", "autoencoder.latent_channels=2", "train_autoencoder.log_every=1",
        "ldm.channels=[16,32]", "ldm.attention_levels=[false,true]", "ldm.head_channels=16", "ldm.ddim_steps=5",
        "train_ldm.batch_size=2",
        "train_ldm.log_every=1", "stargan.channels=16", "stargan.res_blocks=1", "train_stargan.batch_size=2",
        "train_stargan.log_every=1"]


def ball(shift, seed, size: int = 32) -> np.ndarray:
    """An ellipsoidal head whose position shifts with `shift`, with seeded texture."""
    offset = np.indices((size,) * 3).astype(float) - size / 2 - np.array(shift)[:, None, None, None]
    inside = ((offset / np.array([10, 12, 9])[:, None, None, None]) ** 2).sum(0) < 1
    return (inside * (80 + 20 * np.random.default_rng(seed).random((size,) * 3))).astype(np.float32)


def make_tiny_run(root: Path) -> Path:
    """Eight scans (four subjects at ages 70 and 71) preprocessed into ROOT/run with the TINY config."""
    from neuroar.config import load_config
    from neuroar.pipeline import prepare_dataset

    rows = []
    for i in range(8):
        volume = ball((i % 3 - 1, i % 2, -(i % 2)), i)
        path = write_nifti(root / "in" / f"s{i}.nii.gz", volume, np.diag([4.0, 4.0, 4.0, 1.0]))
        rows.append(f"s{i // 2},{i % 2},{70 + i % 2},{path}")
    (root / "in" / "manifest.csv").write_text("subject_id,session_id,age,path\n" + "\n".join(rows) + "\n")
    config = load_config("demo", TINY + [f"data.cache_dir={root / 'cache'}"])
    prepare_dataset(root / "in" / "manifest.csv", config, root / "run", progress=False)
    return root / "run"


def make_tokenized_run(root: Path, overrides: tuple[str, ...] = ()) -> Path:
    """`make_tiny_run` with its tokenizer trained 15 steps (no adversarial term; `overrides` on top, kept in the
    run's config) and its tokens (or, for a change coder, latents) cached."""
    from neuroar.config import load_config
    from neuroar.data.tokens import tokenize_run
    from neuroar.train.tokenizer import train_tokenizer

    run = make_tiny_run(root)
    config = load_config(run / "config.yaml", ["train_tokenizer.steps=15", "train_tokenizer.val_every=100",
                                               "train_tokenizer.adversarial_weight=0", *overrides])
    train_tokenizer(run, config, progress=False)
    tokenize_run(run, config, progress=False)
    return run


COHORT_OPTIONS = SynthOptions(subjects=15, visits=4, seed=3, workers=2)


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A session fixture's folder, made by `make(folder)` once for the whole run: under pytest-xdist the test
    processes share one folder (the first makes it, under a file lock; the others wait and read it). Tests
    only read these folders."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the base folder every worker of this run shares
    folder, made = root / name, root / f"{name}.made"
    with FileLock(root / f"{name}.lock"):
        if not made.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            made.touch()
    return folder


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """A synthetic cohort (15 subjects x 4 visits at 2 mm) with its truth, made once per test session."""
    return made_once(tmp_path_factory, "cohort", lambda root: make_cohort(root, COHORT_OPTIONS, progress=False))


@pytest.fixture(scope="session")
def raw_cohort(tmp_path_factory):
    """One subject's two visits at 2 mm, clean and raw (raw/: a head, a scanner pose, a strong bias field)."""
    options = SynthOptions(subjects=1, visits=2, seed=5, workers=1, raw=True)
    return made_once(tmp_path_factory, "raw_cohort", lambda root: make_cohort(root, options, progress=False))


@pytest.fixture(scope="session")
def quick_demo_cohort(tmp_path_factory):
    """The quick demo's synthetic cohort, made once: a demo finds it up to date and skips the stage."""
    from neuroar.pipeline import demo_cohort_options

    options = demo_cohort_options(quick=True)
    return made_once(tmp_path_factory, "quick_demo_cohort", lambda root: make_cohort(root, options, progress=False))


def seed_results(names: tuple[str, str]) -> pd.DataFrame:
    """Brain-age results (results.csv) of four seeds, real and two augmented sets named `names`, the augmented
    rows in another seed order than real's. The seeds' spread is large and the augmented regressors are each a
    little worse than real's of the same seed: only seed-with-seed pairs show it."""
    real_mae, real_r2 = np.array([3.0, 5.0, 4.0, 6.5]), np.array([0.8, 0.5, 0.7, 0.3])
    rows = [{"training": "real", "seed": s, "training_scans": 6, "test_scans": 2, "mae": real_mae[s],
             "r2": real_r2[s]} for s in range(4)]
    for name, worse in zip(names, ([0.2, 0.25, 0.15, 0.22], [0.5, -0.1, 0.3, 0.05])):
        rows += [{"training": f"real + synthetic ({name})", "seed": s, "training_scans": 18, "test_scans": 2,
                  "mae": real_mae[s] + worse[s], "r2": real_r2[s] - worse[s] / 10} for s in (3, 1, 0, 2)]
    return pd.DataFrame(rows)


def pytest_collection_modifyitems(items):
    """Files with slow tests first (a stable sort): under pytest-xdist each process takes whole files, the next
    one when it is free, and a long file taken last would leave the other process idle at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


class OneByOne:
    """For a stand-in predictor: `Predictor.predict_scans` as its own `predict_preprocessed`, scan by scan."""

    def predict_scans(self, volumes_DHW, ages, target_ages, samples=None, seeds=None, diagnoses=None, batch=16):
        seeds = seeds or [0] * len(volumes_DHW)
        return [self.predict_preprocessed(volume_DHW, age, targets, samples, seed)
                for volume_DHW, age, targets, seed in zip(volumes_DHW, ages, target_ages, seeds)]
