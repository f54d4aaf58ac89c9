"""What every trainer shares: the loop itself (resume, schedule, logs, validation, checkpoints), the
learning-rate schedule and the batch order, both functions of the step alone (so a run resumed from a
checkpoint continues exactly as if it had not stopped), the run's training scans, and mixed precision on
CUDA."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from neuroar.checkpoint import load_checkpoint, read_meta, save_checkpoint
from neuroar.config import Config, save_config
from neuroar.data.fingerprint import StaleModelError, check_fingerprint
from neuroar.data.preprocess import load_preprocessed
from neuroar.distributed import Context
from neuroar.errors import NeuroARError
from neuroar.progress import Progress
from neuroar.train.log import LOG_KINDS, RunLog


def run_steps(run_dir: Path, name: str, config: Config, settings_name: str, checkpoint: Path,
              modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
              train_step: Callable[[int], dict[str, float]], validate: Callable[[], dict[str, float]], ctx: Context,
              fingerprint: dict[str, str], validated_on: str, retrain: bool = False, meta: dict | None = None,
              val_every: int | None = None, figures: Callable[[], dict[str, Figure]] | None = None,
              config_path: Path | None = None, progress: bool = True) -> dict[str, float]:
    """Train from the last checkpoint (if any) to `config.<settings_name>.steps`; returns the last validation.

    A checkpoint resumes only if it was trained on the same data (`fingerprint`, see data/fingerprint.py);
    otherwise this refuses, naming what changed, or with `retrain` sets the model's folder and logs aside
    (RUN/NAME.replaced-TIME) and starts anew. Then the config is written to `config_path` (if given).
    Each step sets the modules to training mode and the learning rate of every optimizer, then calls
    `train_step(step)`, which does the step's work (micro-batches, backward, optimizer steps) and returns
    its losses (averaged over processes, so that every rank sees the same values); a non-finite loss stops
    training with the last good checkpoint kept. The main process alone shows the progress bar (desc `name`),
    logs to RUN/NAME_train.csv, validates every `val_every` steps (default: at the end) into RUN/NAME_val.csv
    (with a `validated_on` column: "val", or "train" when the run has no validation split, which it also
    prints) and TensorBoard (with `figures`), and writes checkpoints holding the step, the config, the
    fingerprint under "data", `meta` and the last validation."""
    settings = getattr(config, settings_name)
    start, metrics = 0, {}
    if checkpoint.with_suffix(".json").is_file():
        check_trained_on(run_dir, name, checkpoint, fingerprint, retrain, ctx)  # may set it aside
    if checkpoint.with_suffix(".json").is_file():
        resumed = load_checkpoint(checkpoint, modules, optimizers, restore_rng=True)
        start, metrics = resumed["step"], resumed.get("validation", {})
    if config_path is not None and ctx.main:
        save_config(config, config_path)
    if validated_on != "val" and ctx.main:
        print(f"{name}: the run has no validation split; validating on {validated_on} data (logged as such in "
              f"{run_dir / name}_val.csv); set data.split_fractions to hold out validation subjects.")
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
            log.log(done, metrics, kind="val", text={"validated_on": validated_on})
            for tag, figure in (figures() if figures else {}).items():
                log.figure(tag, figure, done)
        if done % settings.checkpoint_every == 0 or done == settings.steps:
            resolved = config.to_dict()
            save_checkpoint(checkpoint, modules, optimizers, {
                "step": done, "config": resolved, "preprocessing": resolved["data"], "data": fingerprint,
                **(meta or {}), "validation": metrics})
    if log is not None:
        log.close()
    ctx.barrier()
    return metrics


def check_trained_on(run_dir: Path, name: str, checkpoint: Path, fingerprint: dict[str, str], retrain: bool,
                      ctx: Context) -> None:
    """Refuse a checkpoint trained on other data, or with `retrain` set its folder and logs aside."""
    aside = checkpoint.parent.with_name(f"{checkpoint.parent.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        check_fingerprint(str(checkpoint), read_meta(checkpoint).get("data"), fingerprint,
                          f"Re-run with --retrain (Python: retrain=True) to move it and its logs to "
                          f"{checkpoint.parent}.replaced-TIME and train anew, or use another run folder.")
    except StaleModelError as err:
        if not retrain:
            raise
        if ctx.main:
            print(f"{err}\n--retrain: moving it to {aside}")
            checkpoint.parent.rename(aside)
            for path in [run_dir / f"{name}_{kind}.csv" for kind in LOG_KINDS] + [run_dir / "tensorboard" / name]:
                if path.exists():
                    path.rename(aside / path.name)
        ctx.barrier()


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
