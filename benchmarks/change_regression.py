"""What a continuous change predictor delivers in a run's latent space: the change regressed, not coded in tokens.

    python benchmarks/change_regression.py runs/demo --steps 600
    -> benchmarks/CHANGE_REGRESSION.md and benchmarks/results/change_regression.json (the last invocation)

A small 3D convolutional network reads the earlier scan's continuous latent (the run's change-coding tokenizer's
encoder) and the earlier age, and regresses the follow-up's latent change f(later) - f(earlier) per year of the
gap (so a zero-year gap predicts no change), by mean squared error on the run's training pairs. Its prediction
is decoded as the tokenizer-oracle's change is (earlier scan + dec(f_earlier + change) - dec(f_earlier)) and
scored on the pairs of --split beside copy, the tokenizer-oracle, the same oracle without quantization and
NeuroAR's "+detail" (the run's model, as the evaluation predicts it). The question it answers: does NeuroAR's
wrong-signed grey matter come from coding the finest change in tokens it cannot predict (CHANGE_SHAPE.md), or
would any predictor of the change from the earlier scan and ages spread it the same way?
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
from neuroar.evaluate.volumes import regional_volumes, template_regions
from neuroar.predict import Predictor, with_change
from neuroar.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
REGIONS = ("ventricles", "grey_matter")


class ChangeRegressor(nn.Module):
    """The latent change per year (B, C, d, h, w) from the earlier latent and the earlier age."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv3d(channels + 1, width, 3, padding=1), nn.SiLU()]
        for _ in range(3):
            layers += [nn.Conv3d(width, width, 3, padding=1), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Conv3d(width, channels, 1))

    def forward(self, f_BCdhw: torch.Tensor, age_B: torch.Tensor) -> torch.Tensor:
        age = age_B[:, None, None, None, None].expand(-1, 1, *f_BCdhw.shape[2:])
        return self.net(torch.cat([f_BCdhw, age], 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder with a change-coding tokenizer and a NeuroAR model")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--split", default="val", help="the pairs scored (default: val)")
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
    model = ChangeRegressor(config.tokenizer.latent_dim, args.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
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
        before = regional_volumes(earlier_DHW, regions)
        for label, volume_DHW in outputs.items():
            after = regional_volumes(volume_DHW, regions)
            changes.setdefault(label, []).append([after[r] - before[r] for r in REGIONS])
    results = {"run": str(args.run), "split": args.split, "pairs": len(scored), "steps": args.steps,
               "batch": args.batch, "width": args.width, "train_seconds": round(trained, 1),
               "final_loss": float(loss), "outputs": _scores(changes)}
    json_path = args.table.with_name("results") / "change_regression.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    args.table.write_text(_markdown(results))
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


def _markdown(results: dict) -> str:
    command = (f"python benchmarks/change_regression.py {results['run']} --steps {results['steps']} --batch "
               f"{results['batch']} --width {results['width']} --split {results['split']}")
    lines = ["# A continuous change predictor in the token space's latent", "",
             f"Written by `{command}` (see its docstring); numbers in results/change_regression.json. "
             f"{results['pairs']} {results['split']} pairs; the regressor trained {results['train_seconds']:.0f} s "
             "(2 cores). Per region: r with the true change / error (mL, mean absolute) / carried (mean predicted "
             "/ mean true change).", ""]
    rows = [[label, *[f"{'–' if s[r]['r'] is None else format(s[r]['r'], '.2f')} / {s[r]['error_ml']:.2f} / "
                      f"{s[r]['carried']:.0%}" for r in REGIONS]]
            for label, s in results["outputs"].items() if label != "truth"]
    lines += [markdown_table(["output", "ventricles: r / error / carried", "grey matter: r / error / carried"], rows),
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
