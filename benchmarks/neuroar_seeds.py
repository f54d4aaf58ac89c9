"""How much of a NeuroAR result is its training seed: a run's main model beside the same model trained again.

    python benchmarks/neuroar_seeds.py RUN --seeds 1 2
    -> benchmarks/NEUROAR_SEEDS.md (one block per run, kept across invocations) and
       benchmarks/results/neuroar_seeds.json

RUN is a finished run (`neuroar demo`'s, or one cohort of `neuroar study`, e.g. runs/study/elderly). Each seed K
trains RUN/seed-K with RUN's config and `seed=K`: other initial weights and batch order, the same split, pairs
and tokens. They are scored as RUN's own evaluation scored its main model (RUN/evaluation: the same split, pairs
and sampling seed), and seed 0 is that main model, read from RUN/evaluation. Per seed and output (plain, +detail,
+aging): PSNR and the change of the ventricles and of grey matter (r, error, carried), then mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from neuroar.config import load_config
from neuroar.data.pairs import held_out_split
from neuroar.evaluate.compare import evaluate_models
from neuroar.evaluate.forecasters import TRIVIAL
from neuroar.tables import markdown_table
from neuroar.train.transformer import train_transformer

ROOT = Path(__file__).resolve().parents[1]
REGIONS = ("ventricles", "grey_matter")
VARIANTS = ("plain", "detail", "aging")
COLUMNS = ["psnr_mean", *(f"{region}_{column}" for region in REGIONS for column in ("change_r", "change_mae",
                                                                                     "carried"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run with its evaluation (RUN/evaluation/summary.csv)")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="the seeds trained beside seed 0")
    parser.add_argument("--table", type=Path, default=ROOT / "benchmarks" / "NEUROAR_SEEDS.md")
    args = parser.parse_args(argv)
    json_path = args.table.with_name("results") / "neuroar_seeds.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    results[str(args.run)] = measure(args.run, args.seeds)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    _write(results, args.table)
    return 0


def measure(run: Path, seeds: list[int]) -> dict:
    """Train RUN/seed-K for each of `seeds`, score them, and return every seed's rows (seed 0 from RUN's own
    evaluation) with the training seconds."""
    main_summary = pd.read_csv(run / "evaluation" / "summary.csv")
    config = load_config(run / "config.yaml")
    seconds = {}
    for seed in seeds:
        start = time.perf_counter()
        train_transformer(run, load_config(run / "config.yaml", [f"seed={seed}"]), progress=False,
                          name=f"seed-{seed}")
        seconds[seed] = round(time.perf_counter() - start, 1)
    split = held_out_split(pd.read_csv(run / "pairs.csv", keep_default_na=False))  # as RUN/evaluation's
    summary = evaluate_models([str(run / f"seed-{seed}") for seed in seeds], run / "evaluation-seeds",
                              split=split, seed=config.seed, sweep_subjects=0, progress=False)
    # The main model is named after RUN's folder as it was when evaluated; the seeds after RUN's folder now.
    main_model = [m for m in main_summary["model"].unique() if "/" not in m and m not in TRIVIAL]
    seeded = {m.split("/")[-1]: m for m in summary["model"].unique()}
    rows = [_rows(main_summary, main_model[0], 0)] + [_rows(summary, seeded[f"seed-{seed}"], seed) for seed in seeds]
    return {"pairs": int(main_summary.set_index("label").loc["copy", "pairs"]),
            "copy": {c: _value(main_summary.set_index("label").loc["copy", c]) for c in COLUMNS},
            "train_seconds": seconds, "seeds": [row for block in rows for row in block]}


def _rows(summary: pd.DataFrame, model: str, seed: int) -> list[dict]:
    mine = summary[summary["model"] == model].set_index("variant")
    if mine.empty:
        raise SystemExit(f"no model {model!r} in the evaluation (models: {sorted(summary['model'].unique())})")
    return [{"seed": seed, "variant": variant, **{c: _value(mine.loc[variant, c]) for c in COLUMNS}}
            for variant in VARIANTS]


def _value(value) -> float | None:
    return None if pd.isna(value) else round(float(value), 4)


def _write(results: dict, table: Path) -> None:
    lines = ["# NeuroAR over training seeds", "",
             "Written by `python benchmarks/neuroar_seeds.py RUN --seeds 1 2` (see its docstring); numbers in "
             "results/neuroar_seeds.json. Seed 0 is the run's main model as its own evaluation scored it; the other "
             "seeds are the same model trained again with `seed=K` (other initial weights and batch order; the same "
             "split, pairs, tokens and sampling seed). Per output: PSNR (dB) and, per region, r with the true change "
             "/ error (mL, mean absolute) / carried (mean predicted / mean true change). Copy's error is the bar.", ""]
    for run, result in results.items():
        frame = pd.DataFrame(result["seeds"])
        copy = result["copy"]
        lines += [f"## {run}", "",
                  f"{result['pairs']} test pairs; copy: PSNR {copy['psnr_mean']:.2f}, ventricles error "
                  f"{copy['ventricles_change_mae']:.2f} mL, grey matter error {copy['grey_matter_change_mae']:.2f} mL. "
                  "Training seconds: " + ", ".join(f"seed {k} {v:.0f}" for k, v in result["train_seconds"].items())
                  + "." + (f" {result['note']}" if "note" in result else ""), ""]  # a note added to the json by hand
        rows = []
        for variant in VARIANTS:
            mine = frame[frame["variant"] == variant].sort_values("seed")
            for _, row in mine.iterrows():
                rows.append([f"{variant}", str(int(row["seed"])), f"{row['psnr_mean']:.2f}",
                             *(_cell(row, region) for region in REGIONS)])
            rows.append([f"**{variant}**", f"**mean ± std of {len(mine)}**", _spread(mine["psnr_mean"], "{:.2f}"),
                         *(" / ".join([_spread(mine[f"{region}_change_r"], "{:.2f}"),
                                       _spread(mine[f"{region}_change_mae"], "{:.2f}"),
                                       _spread(100 * mine[f"{region}_carried"], "{:.0f} %")])
                           for region in REGIONS)])
        lines += [markdown_table(["output", "seed", "PSNR", "ventricles r / error / carried",
                                  "grey matter r / error / carried"], rows), ""]
    table.write_text("\n".join(lines))


def _cell(row: pd.Series, region: str) -> str:
    r = row[f"{region}_change_r"]
    return (f"{'–' if pd.isna(r) else f'{r:.2f}'} / {row[f'{region}_change_mae']:.2f} / "
            f"{row[f'{region}_carried']:.0%}")


def _spread(values: pd.Series, form: str) -> str:
    values = values.dropna().to_numpy(dtype=float)
    if not len(values):
        return "–"
    std = values.std(ddof=1) if len(values) > 1 else float("nan")
    return f"{form.format(values.mean())} ± {form.format(std).replace(' %', '')}"


if __name__ == "__main__":
    raise SystemExit(main())
