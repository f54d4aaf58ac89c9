"""Tokenizer fidelity per CPU-minute: the old architecture (convolutions from the voxels) against the new
(2x2x2 patches folded into channels), trained the same way on the same run for the same wall time.

Each architecture trains in its own process, with the run's tokenizer config, batch and learning rate
(linear warm-up, then constant: a wall-time budget has no last step for a cosine to aim at), L1 weighted
by `train_tokenizer.brain_weight` + the vq loss. Every `--every` minutes of training (validation not
counted) it measures, on the held-out scans: PSNR inside the brain mask, and the share of equal tokens per
scale between two scans of the same subject against two scans of different subjects (a tokenizer that
keeps what copy keeps gives same-subject pairs far more equal tokens).

Run: .venv/bin/python benchmarks/tokenizer_curve.py --run runs/ref120 [--minutes 12 --every 2 --scans 12]
Writes benchmarks/results/tokenizer_curve.csv, benchmarks/results/tokenizer_curve.png and
benchmarks/TOKENIZER_CURVE.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

HERE = Path(__file__).parent
ARCHITECTURES = {"old": ["tokenizer.patch=1", "tokenizer.channels=8"], "new": []}


def train_curve(run_dir: Path, architecture: str, minutes: float, every: float, scans: int) -> list[dict]:
    from neuroar.config import load_config
    from neuroar.data.preprocess import template_brain_mask
    from neuroar.models.tokenizer import MSVQVAE
    from neuroar.train.loop import batch_indices, split_scan_paths, volume_batch
    from neuroar.train.tokenizer import validate

    config = load_config(run_dir / "config.yaml", ARCHITECTURES[architecture])
    settings = config.train_tokenizer
    train_paths, _ = split_scan_paths(run_dir)
    held_out = _held_out(run_dir, scans)
    brain = template_brain_mask(config.data)
    brain_BDHW = torch.from_numpy(brain).float()[None, None]
    torch.manual_seed(config.seed)
    model = MSVQVAE(config.tokenizer)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=(0.5, 0.9))
    rows, trained, step, next_check = [], 0.0, 0, 0.0
    while True:
        if trained >= next_check:
            metrics = validate(model, list(held_out["preprocessed"]), torch.device("cpu"), brain)
            rows.append({"architecture": architecture, "minutes": trained / 60, "step": step,
                         "psnr_brain": metrics["psnr_brain"], **_agreement(model, held_out)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            next_check += every * 60
            if trained >= minutes * 60:
                return rows
        start = time.perf_counter()
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * min(1.0, (step + 1) / settings.warmup_steps)
        x = volume_batch(train_paths, batch_indices(len(train_paths), step, settings.batch_size, config.seed))
        reconstruction, vq_loss, _ = model(x)
        loss = ((1.0 + settings.brain_weight * brain_BDHW) * (reconstruction - x).abs()).mean() + vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        trained += time.perf_counter() - start


def _held_out(run_dir: Path, scans: int) -> pd.DataFrame:
    """The first scans of the validation split, whole subjects (at least two scans each)."""
    table = pd.read_csv(run_dir / "scans.csv", dtype={"subject_id": str}, keep_default_na=False)
    val = table[table["split"] == "val"].sort_values(["subject_id", "age"])
    val = val[val.groupby("subject_id")["subject_id"].transform("size") >= 2]
    return val.head(scans).reset_index(drop=True)


@torch.no_grad()
def _agreement(model, held_out: pd.DataFrame) -> dict[str, float]:
    from neuroar.data.preprocess import load_preprocessed

    model.eval()
    tokens = [model.tokenize(torch.from_numpy(load_preprocessed(p)[0])[None, None]) for p in held_out["preprocessed"]]
    subjects = held_out["subject_id"].to_numpy()
    same, other = [], []
    for i, j in itertools.combinations(range(len(tokens)), 2):
        equal = [float((a == b).float().mean()) for a, b in zip(tokens[i], tokens[j])]
        (same if subjects[i] == subjects[j] else other).append(equal)
    result = {}
    for name, values in (("same_subject", same), ("different_subjects", other)):
        for k, share in enumerate(np.mean(values, 0) if values else []):
            result[f"{name}_scale{k}"] = float(share)
    return result


def markdown(curve: pd.DataFrame, machine: dict, command: str) -> str:
    last = curve.sort_values("minutes").groupby("architecture").tail(1).set_index("architecture")
    scales = sorted(int(c.rsplit("scale", 1)[1]) for c in curve if c.startswith("same_subject_scale"))
    lines = ["# Tokenizer fidelity per CPU-minute", "",
             f"`{command}` on {machine['cpu_cores']} CPU cores ({machine['platform']}, torch {machine['torch']}), "
             f"{machine['date']}. Old: convolutions from the voxels ({', '.join(ARCHITECTURES['old'])}); new: the "
             "run's config (2x2x2 patches folded into channels). Minutes of training, validation not counted; "
             "held-out PSNR inside the brain mask; token agreement = share of equal tokens per scale between two "
             "held-out scans of the same subject (s) and of different subjects (d). Raw: "
             "`benchmarks/results/tokenizer_curve.csv`, figure `benchmarks/results/tokenizer_curve.png`.", "",
             "| architecture | minutes | steps | PSNR in the brain (dB) | "
             + " | ".join(f"scale {k} s / d" for k in scales) + " |", "|---" * (4 + len(scales)) + "|"]
    for row in curve.to_dict("records"):
        agreement = [f"{row[f'same_subject_scale{k}']:.2f} / {row[f'different_subjects_scale{k}']:.2f}"
                     for k in scales]
        lines.append(f"| {row['architecture']} | {row['minutes']:.1f} | {row['step']} | {row['psnr_brain']:.2f} | "
                     + " | ".join(agreement) + " |")
    if {"old", "new"} <= set(last.index):
        lines += ["", f"After {last.loc['new', 'minutes']:.0f} minutes: new {last.loc['new', 'psnr_brain']:.2f} dB "
                  f"({last.loc['new', 'step']} steps) against old {last.loc['old', 'psnr_brain']:.2f} dB "
                  f"({last.loc['old', 'step']} steps)."]
    return "\n".join(lines) + "\n"


def plot(curve: pd.DataFrame, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    axis = figure.subplots()
    for architecture, group in curve.groupby("architecture"):
        axis.plot(group["minutes"], group["psnr_brain"], marker="o", label=architecture)
    axis.set_xlabel("training minutes on this machine")
    axis.set_ylabel("held-out PSNR in the brain (dB)")
    axis.legend()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, required=True, help="a preprocessed run folder (its config and scans)")
    parser.add_argument("--minutes", type=float, default=12.0, help="training minutes per architecture")
    parser.add_argument("--every", type=float, default=2.0, help="minutes between measurements")
    parser.add_argument("--scans", type=int, default=12, help="held-out scans measured")
    parser.add_argument("--architecture", choices=list(ARCHITECTURES), help=argparse.SUPPRESS)  # a subprocess's
    args = parser.parse_args()
    if args.architecture:
        rows = train_curve(args.run, args.architecture, args.minutes, args.every, args.scans)
        print(json.dumps(rows))
        return
    rows = []
    for architecture in ARCHITECTURES:
        done = subprocess.run([sys.executable, __file__, "--run", str(args.run), "--minutes", str(args.minutes),
                               "--every", str(args.every), "--scans", str(args.scans), "--architecture",
                               architecture], capture_output=True, text=True, check=True)
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    curve = pd.DataFrame(rows)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    curve.to_csv(out / "tokenizer_curve.csv", index=False)
    plot(curve, out / "tokenizer_curve.png")
    machine = {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d")}
    command = f"benchmarks/tokenizer_curve.py --run {args.run} --minutes {args.minutes:g} --every {args.every:g}"
    (HERE / "TOKENIZER_CURVE.md").write_text(markdown(curve, machine, command))
    print((HERE / "TOKENIZER_CURVE.md").read_text())


if __name__ == "__main__":
    main()
