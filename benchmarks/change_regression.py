"""What a continuous change predictor delivers in a run's latent space: the change regressed, not coded in tokens.

    python benchmarks/change_regression.py runs/demo --steps 600 [--from-mean]
    -> benchmarks/CHANGE_REGRESSION.md and benchmarks/results/change_regression.json (one block per run, split and
       mode, kept across invocations)

A small 3D convolutional network reads the earlier scan's continuous latent (the run's change-coding tokenizer's
encoder) and the earlier age, and regresses the follow-up's latent change f(later) - f(earlier) per year of the
gap (so a zero-year gap predicts no change), by mean squared error on the run's training pairs. Its prediction
is decoded as the tokenizer-oracle's change is (earlier scan + dec(f_earlier + change) - dec(f_earlier)) and
scored on the pairs of --split beside copy, the tokenizer-oracle, the same oracle without quantization and
NeuroAR's "+detail" (the run's model, as the evaluation predicts it). The question it answers: does NeuroAR's
wrong-signed grey matter come from coding the finest change in tokens it cannot predict (CHANGE_SHAPE.md), or
would any predictor of the change from the earlier scan and ages spread it the same way?

With --from-mean the regressor starts at the cohort's mean latent change per year (models/mean_change.py, fitted on
the same training pairs; its last layer zero-initialised, its input and output scaled to the latents' spread) and
learns the subject's deviation from it, as NeuroAR's tokens do with `transformer.mean_change`; the mean change
alone and the volume trend (evaluate/volume_trend.py: the ages alone, no image) are scored beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from neuroar.config import load_config
from neuroar.data.preprocess import load_preprocessed
from neuroar.evaluate.volume_trend import run_volume_trend
from neuroar.evaluate.volumes import regional_volumes, template_regions
from neuroar.models.mean_change import fit_mean_change
from neuroar.predict import Predictor, with_change
from neuroar.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
REGIONS = ("ventricles", "grey_matter")


class ChangeRegressor(nn.Module):
    """The latent change per year (B, C, d, h, w) from the earlier latent and the earlier age."""

    def __init__(self, channels: int, width: int, base_Cdhw: torch.Tensor | None = None, scale: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv3d(channels + 1, width, 3, padding=1), nn.SiLU()]
        for _ in range(3):
            layers += [nn.Conv3d(width, width, 3, padding=1), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Conv3d(width, channels, 1))
        self.base_Cdhw, self.scale = base_Cdhw, scale
        if base_Cdhw is not None:  # start exactly at the mean change
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, f_BCdhw: torch.Tensor, age_B: torch.Tensor) -> torch.Tensor:
        age = age_B[:, None, None, None, None].expand(-1, 1, *f_BCdhw.shape[2:])
        rate = self.net(torch.cat([f_BCdhw / self.scale, age], 1))
        # From the mean: a deviation of a tenth of the latents' spread per year at the head's unit output.
        return rate if self.base_Cdhw is None else self.base_Cdhw + 0.1 * self.scale * rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder with a change-coding tokenizer and a NeuroAR model")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--split", default="val", help="the pairs scored (default: val)")
    parser.add_argument("--from-mean", action="store_true", help="start at the cohort's mean change (see above)")
    parser.add_argument("--table", type=Path, default=ROOT / "benchmarks" / "CHANGE_REGRESSION.md")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be at least 1")
    torch.manual_seed(0)
    config = load_config(args.run / "config.yaml")
    predictor = Predictor.from_checkpoint(args.run)
    tokenizer = predictor.tokenizer
    pairs = pd.read_csv(args.run / "pairs.csv", dtype={"subject_id": str}, keep_default_na=False)
    paths = sorted(set(pairs["earlier_path"]) | set(pairs["later_path"]))
    latents = {path: tokenizer.latent_scan(load_preprocessed(path)[0])[0] for path in paths}
    train = pairs[pairs["split"] == "train"].reset_index(drop=True)
    ages = train["earlier_age"].to_numpy()
    age_mean, age_std = float(ages.mean()), float(ages.std() or 1.0)
    base_Cdhw = scale = None
    if args.from_mean:
        stacked = torch.stack([latents[p] for p in paths])
        row = {path: i for i, path in enumerate(paths)}
        base_Cdhw = fit_mean_change(stacked, torch.tensor([row[p] for p in train["earlier_path"]]),
                                    torch.tensor([row[p] for p in train["later_path"]]),
                                    torch.tensor(train["years"].to_numpy(), dtype=torch.float32))
        scale = float(stacked.std())
    model = ChangeRegressor(config.tokenizer.latent_dim, args.width, base_Cdhw, scale or 1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    for _ in range(args.steps):
        batch = train.iloc[rng.integers(0, len(train), args.batch)]
        f_earlier = torch.stack([latents[p] for p in batch["earlier_path"]])
        change = torch.stack([latents[p] for p in batch["later_path"]]) - f_earlier
        years = torch.tensor(batch["years"].to_numpy(), dtype=torch.float32)[:, None, None, None, None]
        age = torch.tensor((batch["earlier_age"].to_numpy() - age_mean) / age_std, dtype=torch.float32)
        loss = nn.functional.mse_loss(years * model(f_earlier, age), change)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    trained = time.perf_counter() - start
    model.eval()
    regions = template_regions(config.data)
    trend = run_volume_trend(args.run, regions) if args.from_mean else None
    scored = pairs[pairs["split"] == args.split].reset_index(drop=True)
    changes: dict[str, list[list[float]]] = {}
    for _, pair in scored.iterrows():
        earlier_DHW, later_DHW = (load_preprocessed(pair[f"{w}_path"])[0] for w in ("earlier", "later"))
        f_earlier, f_later = latents[pair["earlier_path"]][None], latents[pair["later_path"]][None]
        unchanged_DHW = tokenizer.decode_unchanged(f_earlier)[0]
        age = torch.tensor([(pair["earlier_age"] - age_mean) / age_std], dtype=torch.float32)
        with torch.no_grad():
            regressed = pair["years"] * model(f_earlier, age)
        (_, _, detail_DHW), = predictor.predict_preprocessed(earlier_DHW, pair["earlier_age"], [pair["later_age"]])
        outputs = {
            "truth": later_DHW,
            "tokenizer-oracle": with_change(earlier_DHW, tokenizer.decode_followup(
                f_earlier, tokenizer.followup_tokens(f_earlier, f_later))[0], unchanged_DHW),
            "oracle without quantization": with_change(earlier_DHW, tokenizer.decode_latent(f_later)[0], unchanged_DHW),
            "NeuroAR +detail": detail_DHW,
            "regressed change": with_change(earlier_DHW, tokenizer.decode_latent(f_earlier + regressed)[0],
                                            unchanged_DHW),
        }
        if base_Cdhw is not None:
            outputs["mean change"] = with_change(earlier_DHW, tokenizer.decode_latent(
                f_earlier + pair["years"] * base_Cdhw)[0], unchanged_DHW)
        before = regional_volumes(earlier_DHW, regions)
        for label, volume_DHW in outputs.items():
            after = regional_volumes(volume_DHW, regions)
            changes.setdefault(label, []).append([after[r] - before[r] for r in REGIONS])
        if trend is not None:
            changes.setdefault("volume trend (no image)", []).append(
                [float(trend.change(r, np.array(pair["earlier_age"]), np.array(pair["years"]))) for r in REGIONS])
    results = {"run": str(args.run), "split": args.split, "pairs": len(scored), "steps": args.steps,
               "batch": args.batch, "width": args.width, "lr": args.lr, "from_mean": args.from_mean,
               "train_seconds": round(trained, 1), "final_loss": float(loss), "outputs": _scores(changes)}
    json_path = args.table.with_name("results") / "change_regression.json"
    every = json.loads(json_path.read_text()) if json_path.is_file() else {}
    mode = " from-mean" if args.from_mean else ""
    lr = "" if args.lr == 1e-3 else f", lr {args.lr:g}"
    batch = "" if args.batch == 8 else f", batch {args.batch}"
    every[f"{args.run} {args.split}{mode} width {args.width}, {args.steps} steps{batch}{lr}"] = results
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(every, indent=2) + "\n")
    args.table.write_text(_markdown(every))
    print(args.table.read_text())
    return 0


def _scores(changes: dict[str, list[list[float]]]) -> dict:
    truth = np.array(changes["truth"])
    scores = {}
    for label, values in changes.items():
        values = np.array(values)
        scores[label] = {region: {"r": round(float(np.corrcoef(values[:, i], truth[:, i])[0, 1]), 3),
                                  "error_ml": round(float(np.abs(values[:, i] - truth[:, i]).mean()), 2),
                                  "carried": round(float(values[:, i].mean() / truth[:, i].mean()), 3)}
                         for i, region in enumerate(REGIONS)}
    scores["copy"] = {region: {"r": None, "error_ml": round(float(np.abs(truth[:, i]).mean()), 2), "carried": 0.0}
                      for i, region in enumerate(REGIONS)}
    return scores


def _markdown(every: dict) -> str:
    lines = ["# A continuous change predictor in the token space's latent", "",
             "Written by `python benchmarks/change_regression.py RUN ...` (see its docstring; each block's command "
             "below); numbers in results/change_regression.json. Per region: r with the true change / error (mL, "
             "mean absolute) / carried (mean predicted / mean true change). Training seconds as they ran, several "
             "beside other jobs: compare them only where a block says it ran alone.", ""]
    for key, results in every.items():
        command = (f"python benchmarks/change_regression.py {results['run']} --steps {results['steps']} --batch "
                   f"{results['batch']} --width {results['width']} --lr {results.get('lr', 1e-3):g} --split "
                   f"{results['split']}"
                   + (" --from-mean" if results.get("from_mean") else ""))
        rows = [[label, *[f"{'–' if s[r]['r'] is None else format(s[r]['r'], '.2f')} / {s[r]['error_ml']:.2f} / "
                          f"{s[r]['carried']:.0%}" for r in REGIONS]]
                for label, s in results["outputs"].items() if label != "truth"]
        lines += [f"## {key}", "", f"`{command}`: {results['pairs']} {results['split']} pairs; the regressor trained "
                  f"{results['train_seconds']:.0f} s (2 cores).", "",
                  markdown_table(["output", "ventricles: r / error / carried", "grey matter: r / error / carried"],
                                 rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
