"""NeuroAR on a change-coding token space: does the model learn the change its tokens carry?

    python benchmarks/change_neuroar.py runs/token_space/change-twice-dz1 --name dz1 [KEY=VALUE ...]
    python benchmarks/change_neuroar.py --name dz1-t1 --resample dz1 sampling.temperature=1.0
    -> benchmarks/CHANGE_NEUROAR.md (one row per model measured, kept across invocations) and
       benchmarks/results/change_neuroar.json

DESIGN is a run folder whose change-coding tokenizer `benchmarks/token_space.py` trained (its design's
overrides in its config.yaml). It is copied to OUT/NAME without evaluations, tokens or models; there the scans'
latents are cached, NeuroAR trains with the demo's transformer settings (`transformer.earlier=latent`, the two
20x24x22 scales through the convolutional head: `transformer.local_scales=2`, then the overrides given), and
`neuroar evaluate` scores it beside copy and the tokenizer-oracle on the test pairs. The question is the
verdict of DESIGN.md section 5: against copy, on the change of the ventricles and grey matter (r, error,
carried = mean predicted / mean true change), for "+detail" (earlier scan + decoded prediction - decoded "no
change") and the oracle (what the tokens carry at most). `--resample OLD` scores model OLD again, untrained,
with other sampling settings (`sampling.*`; `--split val` to choose them on the validation pairs).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

from neuroar.config import load_config, save_config
from neuroar.data.tokens import tokenize_run
from neuroar.evaluate.compare import evaluate_models
from neuroar.tables import markdown_table
from neuroar.train.transformer import train_transformer

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["transformer.earlier=latent", "transformer.local_scales=2"]
REGIONS = ("ventricles", "grey_matter")
# mean-change: in evaluations since it was added (the cohort's mean aging, no model)
OUTPUTS = ("copy", "tokenizer-oracle", "mean-change", "{name}+detail")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("design", type=Path, nargs="?", help="a run folder trained by benchmarks/token_space.py")
    parser.add_argument("--name", required=True, help="the model's name (its folder under --out)")
    parser.add_argument("overrides", nargs="*", help="NeuroAR's settings, e.g. train_transformer.steps=500")
    parser.add_argument("--resample", metavar="OLD", help="score model OLD (a row measured before) again with the "
                                                          "sampling.* overrides, without training")
    parser.add_argument("--split", default=None, help="the pairs scored (default: test)")
    parser.add_argument("--out", type=Path, default=Path("runs/change_neuroar"))
    parser.add_argument("--table", type=Path, default=ROOT / "benchmarks" / "CHANGE_NEUROAR.md")
    args = parser.parse_intermixed_args(argv)
    json_path = args.table.with_name("results") / "change_neuroar.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if args.design is not None and "=" in str(args.design):  # no DESIGN: the first override took its place
        args.overrides, args.design = [str(args.design), *args.overrides], None
    if args.resample:
        if args.design or any(not o.startswith("sampling.") for o in args.overrides):
            parser.error("--resample takes sampling.* overrides only, and no DESIGN")
        results[args.name] = {**results[args.resample], "resampled_from": args.resample,
                              **score(args.out / args.resample, f"evaluation-{args.name}", args.split, args.overrides)}
    elif args.design is None:
        parser.error("give DESIGN, or --resample OLD")
    else:
        results[args.name] = measure(args.design, args.out / args.name, args.overrides, args.split)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    _write(results, args.table)
    print(json.dumps(results[args.name]), flush=True)
    return 0


def measure(design: Path, run: Path, overrides: list[str], split: str | None = None) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(design, run, ignore=shutil.ignore_patterns("evaluation", "tokens", "neuroar*", "tensorboard"))
    config = load_config(run / "config.yaml", [*MODEL, *overrides])
    save_config(config, run / "config.yaml")
    tokenize_run(run, config, progress=False)
    start = time.perf_counter()
    train_transformer(run, config, progress=False)
    trained = time.perf_counter() - start
    row = {"design": str(design), "overrides": overrides, "steps": config.train_transformer.steps,
           "train_seconds": round(trained, 1)}
    return {**row, **score(run, "evaluation", split)}


def score(run: Path, folder: str, split: str | None, sampling: list[str] = ()) -> dict:
    """The outputs' PSNR and per-region change scores for model RUN, into RUN/FOLDER."""
    summary = evaluate_models([str(run)], run / folder, split=split, sweep_subjects=0, progress=False,
                              sampling=sampling).set_index("label")
    config = load_config(run / "config.yaml", list(sampling))
    row = {"pairs": int(summary.loc["copy", "pairs"]), "split": split or "test",
           "temperature": config.sampling.temperature, "codes": config.sampling.codes}
    for output in OUTPUTS:
        label = output.format(name=run.name)
        key = output.format(name="neuroar")
        if label not in summary.index:
            continue
        row[f"{key}_psnr"] = round(float(summary.loc[label, "psnr_mean"]), 2)
        for region in REGIONS:
            for column in ("change_r", "change_mae", "carried"):
                value = float(summary.loc[label, f"{region}_{column}"])
                row[f"{key}_{region}_{column}"] = None if math.isnan(value) else round(value, 3)  # copy's r
    return row


def _write(results: dict, table: Path) -> None:
    lines = ["# NeuroAR on change-coding token spaces", "",
             "Written by `python benchmarks/change_neuroar.py DESIGN --name NAME [KEY=VALUE ...]` (see its docstring); "
             "numbers in results/change_neuroar.json. Test pairs of the demo's run; per region r with the true change, "
             "error (mL, mean absolute) and carried (mean predicted / mean true change). Copy has r undefined and "
             "carries 0 %: a model must beat its error. train s: NeuroAR's training, wall seconds where it ran (the "
             "first rows of 250 steps ran on one thread each, two at once; from demo-lw64 on beside other jobs; the "
             "others on two threads alone). A row's copy and oracle are its own run's: the demo-lw64 rows and after "
             "come from a later `neuroar demo` on another machine, the denoised rows score denoised follow-ups. T: the "
             "sampling temperature (rows before it was a column: 0.5, then the default); codes: `sampling.codes`, "
             "drawn tokens or each scale's expected code (one deterministic prediction); a row \"(model of OLD)\" "
             "scores the model of row OLD again with other sampling settings. split: the pairs scored "
             "(val: 42 pairs of other subjects, for choosing settings without looking at the test pairs). "
             "Rows study-adol-*: the study's adolescent cohort (`runs/study-dz0/adolescent`, 180 test pairs; grey "
             "matter is what ages there) on a token space of `TOKEN_SPACE_ADOLESCENT_STUDY.md`, NeuroAR 750 steps "
             "at batch 4 as the study's; study-adol-thrice at learning rate 0.001 (the study's: 0.003; "
             "token_space.py's base set 0.001 then, fixed since), beside another job; study-adol-four-books at the "
             "study's 0.003, alone (`transformer.local_scales=4`); study-adol-five-books on row five-books-2 (a cohort "
             "made anew, `runs/study/adolescent`) at 0.003 with `transformer.local_scales=5`, beside other jobs. The "
             "study's own NeuroAR on its two-stage space: "
             "+detail grey matter r 0.70, error 39.02 mL, PSNR 26.28 (`results/study/models.csv`).", ""]
    rows = []
    for name, row in results.items():
        for output in OUTPUTS:
            key = output.format(name="neuroar")
            label = output.format(name=name)
            if f"{key}_psnr" not in row:
                continue
            cells = [f"{_number(row[f'{key}_{r}_change_r'])} / {row[f'{key}_{r}_change_mae']:.2f} / "
                     f"{row[f'{key}_{r}_carried']:.0%}" for r in REGIONS]
            model = Path(row["design"]).name + (f" (model of {row['resampled_from']})" if "resampled_from" in row
                                                 else "")
            rows.append([label, model, row["steps"], f"{row['train_seconds']:.0f}", row.get("temperature", 0.5),
                         row.get("codes", "drawn"), row.get("split", "test"), f"{row[f'{key}_psnr']:.2f}", *cells])
    lines.append(markdown_table(["output", "token space", "NeuroAR steps", "train s", "T", "codes", "split", "PSNR",
                                 "ventricles r / error / carried", "grey matter r / error / carried"], rows))
    table.write_text("\n".join(lines) + "\n")


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
