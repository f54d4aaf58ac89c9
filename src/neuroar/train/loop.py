"""What every trainer shares: the loop itself (resume, schedule, logs, validation, checkpoints), the
learning-rate schedule and the batch order, both functions of the step alone (so a run resumed from a
checkpoint continues exactly as if it had not stopped), the run's training scans, and mixed precision on
CUDA."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from neuroar.checkpoint import load_checkpoint, save_checkpoint
from neuroar.config import Config
from neuroar.data.preprocess import load_preprocessed
from neuroar.distributed import Context
from neuroar.errors import NeuroARError
from neuroar.progress import Progress
from neuroar.train.log import RunLog


def run_steps(run_dir: Path, name: str, config: Config, settings_name: str, checkpoint: Path,
              modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
              train_step: Callable[[int], dict[str, float]], validate: Callable[[], dict[str, float]], ctx: Context,
              meta: dict | None = None, check_resumed: Callable[[dict], None] | None = None,
              val_every: int | None = None, figures: Callable[[], dict[str, Figure]] | None = None,
              progress: bool = True) -> dict[str, float]:
    """Train from the last checkpoint (if any) to `config.<settings_name>.steps`; returns the last validation.

    Each step sets the modules to training mode and the learning rate of every optimizer, then calls
    `train_step(step)`, which does the step's work (micro-batches, backward, optimizer steps) and returns
    its losses; a non-finite loss stops training with the last good checkpoint kept. The main process alone
    shows the progress bar (desc `name`), logs to RUN/NAME_train.csv, validates every `val_every` steps (default:
    at the end) into RUN/NAME_val.csv (and TensorBoard, with `figures`), and writes checkpoints holding the
    step, the config, `meta` and the last validation. `check_resumed` may refuse a checkpoint's metadata."""
    settings = getattr(config, settings_name)
    start, metrics = 0, {}
    if checkpoint.with_suffix(".json").is_file():
        resumed = load_checkpoint(checkpoint, modules, optimizers, restore_rng=True)
        if check_resumed is not None:
            check_resumed(resumed)
        start, metrics = resumed["step"], resumed.get("validation", {})
    log = RunLog(run_dir, name, resume_step=start) if ctx.main else None
    bar = Progress(range(start, settings.steps), initial=start, total=settings.steps, desc=name, unit="step",
               enabled=progress and ctx.main)
    for step in bar:
        for module in modules.values():
            module.train()
        lr = learning_rate(step, settings.lr, settings.warmup_steps, settings.steps)
        set_learning_rate(list(optimizers.values()), lr)
        losses = train_step(step)
        for key, value in losses.items():
            if not math.isfinite(value):
                raise NeuroARError(f"{name} loss became {value} at step {step} ({key}); the last good checkpoint "
                                   f"({checkpoint}) is kept. Lower {settings_name}.lr and resume.")
        done = step + 1
        if log is None:
            continue
        bar.set_postfix({key: f"{value:.4f}" for key, value in list(losses.items())[:2]})
        if is_log_step(step, settings):
            log.log(done, {**losses, "lr": lr})
        if done % (val_every or settings.steps) == 0 or done == settings.steps:
            metrics = validate()
            log.log(done, metrics, kind="val")
            for tag, figure in (figures() if figures else {}).items():
                log.figure(tag, figure, done)
        if done % settings.checkpoint_every == 0 or done == settings.steps:
            resolved = config.to_dict()
            save_checkpoint(checkpoint, modules, optimizers, {
                "step": done, "config": resolved, "preprocessing": resolved["data"], **(meta or {}),
                "validation": metrics})
    if log is not None:
        log.close()
    ctx.barrier()
    return metrics


def is_log_step(step: int, settings) -> bool:
    """Whether the loop logs the training losses after `step` (0-based)."""
    return (step + 1) % settings.log_every == 0 or step + 1 == settings.steps


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
