"""What every training loop shares: the learning-rate schedule and the batch order, both functions of the
step alone (so a run resumed from a checkpoint continues exactly as if it had not stopped), the run's
training scans, and mixed precision on CUDA."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pandas as pd
import torch

from neuroar.data.preprocess import load_preprocessed
from neuroar.errors import NeuroARError


def learning_rate(step: int, peak: float, warmup: int, steps: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to peak / 10 at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def batch_indices(count: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The items of a step's batch: epoch-wise seeded permutations of range(count)."""
    per_epoch = max(1, count // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[position * batch_size:(position + 1) * batch_size].tolist()


def set_learning_rate(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA; full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def split_scan_paths(run_dir: Path) -> tuple[list[str], list[str]]:
    """Preprocessed volumes of the run's training and validation scans."""
    table = Path(run_dir) / "scans.csv"
    if not table.is_file():
        raise NeuroARError(f"{table} not found; run `neuroar preprocess MANIFEST --out {run_dir}` first.")
    scans = pd.read_csv(table, keep_default_na=False)
    train = list(scans.loc[scans["split"] == "train", "preprocessed"])
    if not train:
        raise NeuroARError(f"{table} has no training scans; check the split column or data.split_fractions.")
    return train, list(scans.loc[scans["split"] == "val", "preprocessed"])


def volume_batch(paths: list[str], rows: list[int]) -> torch.Tensor:
    """The preprocessed volumes of the given rows, (B, 1, D, H, W)."""
    return torch.stack([torch.from_numpy(load_preprocessed(paths[i])[0])[None] for i in rows])
