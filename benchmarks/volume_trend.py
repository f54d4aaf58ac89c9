"""What the ages alone say of the volumes, beside the image forecasts of an evaluation already made.

    python benchmarks/volume_trend.py EVALUATION [EVALUATION ...] --run RUN
    -> benchmarks/VOLUME_TREND.md (one block per evaluation, kept across invocations) and
       benchmarks/results/volume_trend.json

The volume trend (`neuroar/evaluate/volume_trend.py`: per region, change = years x (a + b x centred earlier age),
fitted on RUN's training pairs) is in every evaluation `neuroar evaluate` writes; this adds it to EVALUATION's
per-pair table (an evaluation of RUN, from before the trend existed or not) without predicting anything again, and
tabulates the outputs a reader compares (copy, the tokenizer-oracle, the mean change, the trend, each model's
outputs): PSNR and, for the ventricles and grey matter, r / error (mL) / carried.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from neuroar.config import load_config
from neuroar.evaluate import compare
from neuroar.evaluate.volume_trend import run_volume_trend
from neuroar.evaluate.volumes import template_regions
from neuroar.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
REGIONS = ("ventricles", "grey_matter")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("evaluations", type=Path, nargs="+", help="evaluation folders of RUN (their pairs.csv)")
    parser.add_argument("--run", type=Path, required=True, help="the run the evaluations scored")
    parser.add_argument("--table", type=Path, default=ROOT / "benchmarks" / "VOLUME_TREND.md")
    args = parser.parse_args(argv)
    json_path = args.table.with_name("results") / "volume_trend.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    trend = run_volume_trend(args.run, template_regions(load_config(args.run / "config.yaml").data))
    if trend is None:
        raise SystemExit(f"{args.run} has no training pairs more than zero years apart: no trend to fit.")
    for evaluation in args.evaluations:
        per_pair = pd.read_csv(evaluation / "pairs.csv", dtype={"subject_id": str})
        per_pair = compare.with_volume_trend(per_pair[per_pair["label"] != compare.VOLUME_TREND.label], trend)
        summary = compare.summarize(per_pair, pd.DataFrame(columns=["label"]), "ventricles").set_index("label")
        labels = [label for label in per_pair["label"].unique()
                  if label in compare.compared_labels(per_pair) or summary.loc[label, "variant"] == "plain"]
        results[str(evaluation)] = {
            "run": str(args.run), "pairs": int(summary.loc["copy", "pairs"]),
            "trend": {region: list(rate) for region, rate in trend.rates.items()}, "mean_age": trend.mean_age,
            "outputs": {label: {column: _value(summary.loc[label, column]) for column in _columns()}
                        for label in labels if label != "tokenizer-copy"}}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    _write(results, args.table)
    return 0


def _columns() -> list[str]:
    return ["psnr_mean", *(f"{region}_{c}" for region in REGIONS for c in ("change_r", "change_mae", "carried"))]


def _value(value) -> float | None:
    return None if pd.isna(value) else round(float(value), 4)


def _write(results: dict, table: Path) -> None:
    lines = ["# The ages alone: the volume trend beside the image forecasts", "",
             "Written by `python benchmarks/volume_trend.py EVALUATION --run RUN` (see its docstring); numbers in "
             "results/volume_trend.json. The volume trend predicts each region's change as years x (a + b x (earlier "
             "age - mean earlier age)), a and b fitted per region on RUN's training pairs' measured volumes: no image, "
             "so no PSNR. Per output: PSNR (dB) and, per region, r with the true change / error (mL, mean absolute) / "
             "carried (mean predicted / mean true change).", ""]
    for evaluation, result in results.items():
        rows = []
        for label, values in result["outputs"].items():
            psnr = values["psnr_mean"]
            rows.append([label, "–" if psnr is None else f"{psnr:.2f}",
                         *(_cell(values, region) for region in REGIONS)])
        lines += [f"## {evaluation}", "", f"Run `{result['run']}`, {result['pairs']} pairs.", "",
                  markdown_table(["output", "PSNR", "ventricles r / error / carried",
                                  "grey matter r / error / carried"], rows), ""]
    table.write_text("\n".join(lines))


def _cell(values: dict, region: str) -> str:
    r, error, carried = (values[f"{region}_{c}"] for c in ("change_r", "change_mae", "carried"))
    return f"{'–' if r is None else f'{r:.2f}'} / {error:.2f} / {'–' if carried is None else f'{carried:.0%}'}"


if __name__ == "__main__":
    raise SystemExit(main())
