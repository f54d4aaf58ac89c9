"""Tokenizer fidelity per CPU-minute: variants of the run's tokenizer (by default the old architecture,
convolutions from the voxels, against the new, 2x2x2 patches folded into channels; `--variants` names others,
the quality levers), trained the same way on the same run for the same wall time.

Each variant trains in its own process, with the run's tokenizer config, batch and learning rate
(linear warm-up, then constant: a wall-time budget has no last step for a cosine to aim at), L1 weighted
by `train_tokenizer.brain_weight` + the vq loss. Every `--every` minutes of training (validation not
counted) it measures, on the held-out scans: PSNR inside the brain mask, and the share of equal tokens per
scale between two scans of the same subject against two scans of different subjects (a tokenizer that
keeps what copy keeps gives same-subject pairs far more equal tokens).

A variant is a name from VARIANTS or `name=override;override` (config overrides, e.g.
`big=tokenizer.codebook_size=4096`). Two overrides belong to this script: `adam.betas=B1,B2` sets Adam's betas
((0.5, 0.9) as the trainer's otherwise), and `quantize=false` (the variant `continuous`) skips quantization
altogether (f_hat = f, no vq loss): the fidelity the encoder and decoder reach without the quantizer, an upper
bound for every quantized variant.

Run: .venv/bin/python benchmarks/tokenizer_curve.py --run runs/ref120 [--minutes 12 --every 2 --scans 12]
     [--variants old new ...] [--name tokenizer_curve]
Writes benchmarks/results/NAME.csv, benchmarks/results/NAME.png and benchmarks/NAME.md (upper case).
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
VARIANTS = {"old": ["tokenizer.patch=1", "tokenizer.channels=8"], "new": [], "continuous": ["quantize=false"]}
SCRIPT_OVERRIDES = ("adam.betas=", "quantize=")
DEFAULT_VARIANTS = ["old", "new"]


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not overrides:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}: name one of {sorted(VARIANTS)} or write name=override;...")
        return name, VARIANTS[name]
    return name, overrides.split(";")


class Continuous(torch.nn.Module):
    """In place of the quantizer: f_hat = f, no loss, no tokens."""

    def forward(self, f_BCdhw: torch.Tensor):
        return f_BCdhw, [], f_BCdhw.new_zeros(()), {}


def train_curve(run_dir: Path, variant: str, minutes: float, every: float, scans: int) -> list[dict]:
    from neuroar.config import load_config
    from neuroar.data.preprocess import template_brain_mask
    from neuroar.models.tokenizer import MSVQVAE
    from neuroar.train.loop import batch_indices, split_scan_paths, volume_batch
    name, overrides = parse_variant(variant)
    betas = [tuple(map(float, o.split("=", 1)[1].split(","))) for o in overrides if o.startswith("adam.betas=")]
    continuous = "quantize=false" in overrides
    config = load_config(run_dir / "config.yaml", [o for o in overrides if not o.startswith(SCRIPT_OVERRIDES)])
    settings = config.train_tokenizer
    train_paths, _ = split_scan_paths(run_dir)
    held_out = _held_out(run_dir, scans)
    brain = template_brain_mask(config.data)
    brain_BDHW = torch.from_numpy(brain).float()[None, None]
    torch.manual_seed(config.seed)
    model = MSVQVAE(config.tokenizer)
    if continuous:
        model.quantizer = Continuous()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=betas[-1] if betas else (0.5, 0.9))
    rows, trained, step, next_check = [], 0.0, 0, 0.0
    while True:
        if trained >= next_check:
            rows.append({"variant": name, "minutes": trained / 60, "step": step,
                         **_measure(model, held_out, brain, tokens=not continuous)})
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
def _measure(model, held_out: pd.DataFrame, brain: np.ndarray, tokens: bool) -> dict[str, float]:
    """Held-out PSNR in the brain (through the tokens, or through f itself for `continuous`), code use, and the
    token agreement of same-subject against different-subject pairs."""
    from neuroar.data.preprocess import load_preprocessed
    from neuroar.metrics import masked_psnr

    model.eval()
    volumes = [torch.from_numpy(load_preprocessed(p)[0])[None, None] for p in held_out["preprocessed"]]
    if not tokens:
        psnr = [masked_psnr(model.decode(model.features(x)).clamp(0, 1)[0, 0].numpy(), x[0, 0].numpy(), brain)
                for x in volumes]
        return {"psnr_brain": float(np.mean(psnr))}
    token_maps = [model.encode_scan(x) for x in volumes]
    psnr = [masked_psnr(model.decode_tokens(t).clamp(0, 1)[0, 0].numpy(), x[0, 0].numpy(), brain)
            for x, t in zip(volumes, token_maps)]
    use = pd.DataFrame([model.quantizer.usage_stats(t) for t in token_maps]).mean()
    perplexity = {key: float(value) for key, value in use.items() if key.endswith("perplexity")}
    return {"psnr_brain": float(np.mean(psnr)), **perplexity, **_agreement(token_maps, held_out)}


def _agreement(tokens: list[list[torch.Tensor]], held_out: pd.DataFrame) -> dict[str, float]:
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


def markdown(curve: pd.DataFrame, variants: dict[str, list[str]], machine: dict, command: str) -> str:
    scales = sorted(int(c.rsplit("scale", 1)[1]) for c in curve if c.startswith("same_subject_scale"))
    described = "; ".join(f"{name}: {', '.join(overrides) or 'the run config'}" for name, overrides in variants.items())
    lines = ["# Tokenizer fidelity per CPU-minute", "",
             f"`{command}` on {machine['cpu_cores']} CPU cores ({machine['platform']}, torch {machine['torch']}), "
             f"{machine['date']}. Variants ({described}). Minutes of training, validation not counted; "
             "held-out PSNR inside the brain mask; token agreement = share of equal tokens per scale between two "
             "held-out scans of the same subject (s) and of different subjects (d). Raw: "
             f"`benchmarks/results/{machine['name']}.csv`, figure `benchmarks/results/{machine['name']}.png`.", "",
             "| variant | minutes | steps | PSNR in the brain (dB) | "
             + " | ".join(f"scale {k} s / d" for k in scales) + " |", "|---" * (4 + len(scales)) + "|"]
    for row in curve.to_dict("records"):
        agreement = [f"{row[f'same_subject_scale{k}']:.2f} / {row[f'different_subjects_scale{k}']:.2f}"
                     if pd.notna(row.get(f"same_subject_scale{k}")) else "-" for k in scales]
        lines.append(f"| {row['variant']} | {row['minutes']:.1f} | {row['step']} | {row['psnr_brain']:.2f} | "
                     + " | ".join(agreement) + " |")
    last = curve.sort_values("minutes").groupby("variant", sort=False).tail(1)
    lines += ["", "Last measurement: " + "; ".join(
        f"{row['variant']} {row['psnr_brain']:.2f} dB ({row['step']} steps)" for row in last.to_dict("records")) + "."]
    return "\n".join(lines) + "\n"


def plot(curve: pd.DataFrame, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    axis = figure.subplots()
    for variant, group in curve.groupby("variant", sort=False):
        axis.plot(group["minutes"], group["psnr_brain"], marker="o", label=variant)
    axis.set_xlabel("training minutes on this machine")
    axis.set_ylabel("held-out PSNR in the brain (dB)")
    axis.legend()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, required=True, help="a preprocessed run folder (its config and scans)")
    parser.add_argument("--minutes", type=float, default=12.0, help="training minutes per variant")
    parser.add_argument("--every", type=float, default=2.0, help="minutes between measurements")
    parser.add_argument("--scans", type=int, default=12, help="held-out scans measured")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        help=f"names from {sorted(VARIANTS)} or name=override;override")
    parser.add_argument("--name", default="tokenizer_curve", help="stem of the files written")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # a subprocess's one variant
    args = parser.parse_args()
    if args.variant:
        rows = train_curve(args.run, args.variant, args.minutes, args.every, args.scans)
        print(json.dumps(rows))
        return
    variants = dict(parse_variant(v) for v in args.variants)
    rows = []
    for variant in args.variants:
        done = subprocess.run([sys.executable, __file__, "--run", str(args.run), "--minutes", str(args.minutes),
                               "--every", str(args.every), "--scans", str(args.scans), "--variant", variant],
                              stdout=subprocess.PIPE, text=True, check=True)
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    curve = pd.DataFrame(rows)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    curve.to_csv(out / f"{args.name}.csv", index=False)
    plot(curve, out / f"{args.name}.png")
    machine = {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "name": args.name}
    quoted = " ".join(repr(v) if ";" in v or " " in v else v for v in args.variants)
    command = (f"benchmarks/tokenizer_curve.py --run {args.run} --minutes {args.minutes:g} --every {args.every:g} "
               f"--variants {quoted} --name {args.name}")
    (HERE / f"{args.name.upper()}.md").write_text(markdown(curve, variants, machine, command))
    print((HERE / f"{args.name.upper()}.md").read_text())


if __name__ == "__main__":
    main()
