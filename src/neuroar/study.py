"""`neuroar study`: the paper's study on two synthetic cohorts, elderly (CN / MCI / AD, 55-90 years) and
adolescent (9-16 years), each run end to end by `pipeline.run_cohort` into OUT/COHORT (resumable stage by stage),
then both cohorts' results side by side in OUT/results:

    models.csv     per cohort and model: PSNR, SSIM (mean, std), and the change r / MAE / mean of the cohort's
                   aging region (ventricles in the elderly, grey matter in adolescents) beside the truth's, and
                   the share of the true mean change carried
    COHORT_pairs.csv  per test pair and model: what models.csv is computed from
    brain_age.csv  per cohort and training set (real; real + each model's synthetic scans: NeuroAR, LDM,
                   StarGAN): MAE and R2 over seeds (mean, std) and a paired t-test against real alone, seed
                   with seed: raw p, and (columns METRIC_p_vs_real_holm) Holm-Bonferroni-adjusted over every
                   test of the file, both cohorts' (evaluate/brain_age.py)
    machine.json   per cohort: the command and machine that ran it and the seconds each stage took
    seeds.csv      per cohort and output of the main NeuroAR model (plain, +base, +detail, +aging): mean and std over
                   its training seeds of PSNR and the change r / MAE / carried (`--seeds`; models.csv has each seed)
    results.md     the tables, per cohort with the command, seed, machine and stage times that made them
    COHORT_change.png  predicted against true change of the cohort's aging region, per model, over the test pairs

A study may run its cohorts one invocation at a time (`--cohorts elderly`, later `--cohorts adolescent`, on the
same OUT): OUT/results keeps the rows of the cohorts an invocation did not run.

Each cohort's OUT/COHORT/stage_seconds.json sums each stage's seconds over every invocation, written as each stage
ends: a re-run that skips what is done adds seconds, not replaces the cost by them, and a study run in pieces (a
stage interrupted by Ctrl-C adds the seconds it ran, and its training resumes from its last checkpoint) costs what
it took, a little more than one run at once. A process killed outright loses its unfinished stage's seconds.

Per cohort: NeuroAR, the same model trained again with other seeds (`seeds`: seed-K, other initial weights, batch
order and change regressor on the same data and tokens, so that its spread is part of the result), its ablation
without the earlier scan, NeuroAR conditioned on diagnosis as well (in a cohort with more than one diagnosis),
LDM, latent StarGAN, copy, tokenizer-copy and the tokenizer-oracle, all on the same pairs. The models are the
demo's (4 mm); the cohorts are three times the demo's and the training longer (`STUDY`).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from neuroar import __version__
from neuroar.config import load_config
from neuroar.data.synth.aging import COHORTS
from neuroar.data.synth.cohort import SynthOptions
from neuroar.errors import NeuroARError
from neuroar.evaluate import compare
from neuroar.evaluate.brain_age import compare_with_real, holm_adjusted
from neuroar.files import write_json, write_text
from neuroar.pipeline import run_cohort
from neuroar.tables import markdown_table

# The demo config with both baselines (the demo trains none) and the training more subjects carry: NeuroAR 375
# steps, 3x the demo's (coded against its change regressor, its teacher-forced validation loss on the study's
# cohorts was 4.584 / 4.349 at step 375 and 4.564 / 4.340 at 750, elderly / adolescent, its gain over copy the same:
# runs/study/COHORT/rg16_val.csv, benchmarks/CHANGE_REGRESSOR.md);
# the baselines' autoencoder as long as the tokenizer (after the demo's 300 steps it decoded at 15.8 dB in the brain
# against the tokenizer's 21.7, which bounded the baselines' plain outputs); longer baselines (the StarGAN's
# generator, zero-initialised to the identity, had barely moved after 300 steps: validation latent error 0.97x
# copy's on the elderly cohort's 180 pairs, 0.76x after 1000, 0.59x after 2000, while its loss weights changed that
# by under 0.03x); the LDM diffusing the change from the earlier latent (`ldm.target=change`: one that has learnt
# little stays near the earlier scan, where the paper's kind, diffusing the follow-up from noise, scattered far from
# it: docs/study.md); brain age over 5 seeds with a regressor trained longer; and a fifth of the subjects held out
# for testing (30 of 150). The token space: the demo's change coding with five stages at 20x24x22 instead of two and
# one codebook per scale ("five-books", benchmarks/TOKEN_SPACE_ADOLESCENT_STUDY.md): its oracle carried 91-93 % of the
# adolescents' grey-matter loss (r 0.99) where the demo's carried 71-73 % (r 0.95-0.96), the elderly's ventricles
# 99 % (TOKEN_SPACE_ELDERLY_STUDY.md); NeuroAR predicts the five from its convolutional head (`local_scales`).
STUDY = ["tokenizer.scales=[[1,1,1],[3,4,3],[5,6,6],[10,12,11],[20,24,22],[20,24,22],[20,24,22],[20,24,22],[20,24,22]]",
         "tokenizer.codebook_per_scale=true", "transformer.local_scales=5", "baselines=[ldm,stargan]",
         "data.split_fractions=[0.6,0.2,0.2]", "train_transformer.steps=375",
         "train_transformer.val_every=375", "train_transformer.checkpoint_every=125", "train_autoencoder.steps=2400",
         "train_ldm.steps=600", "ldm.target=change", "train_stargan.steps=2000", "brain_age.seeds=5",
         "brain_age.steps=300"]
CHANGE_REGION = {"elderly": "ventricles", "adolescent": "grey_matter"}  # where each cohort's aging shows most
SEED_MODEL = r"seed-\d+"  # the main NeuroAR model trained again with another seed (`seed_model`)


def variants(cohort: str, seed: int = 0, seeds: int = 1) -> dict[str, list[str]]:
    """The NeuroAR models trained beside the main one (of `seed`): the main one again with the next `seeds` - 1
    seeds, the ablation without the earlier scan and, where the cohort has several diagnoses, the model
    conditioned on them."""
    groups = list(COHORTS[cohort].groups)
    chosen = {seed_model(seed + k): [f"seed={seed + k}"] for k in range(1, seeds)}
    chosen["no-earlier"] = ["transformer.earlier=none"]
    if len(groups) > 1:
        chosen["diagnosis"] = [f"transformer.diagnoses=[{','.join(groups)}]"]
    return chosen


def seed_model(seed: int) -> str:
    """The folder (and models.csv name) of the main NeuroAR model trained again with `seed`."""
    return f"seed-{seed}"  # matches SEED_MODEL


def run_study(out_dir: str | Path = "runs/study", cohorts: Sequence[str] = tuple(CHANGE_REGION), subjects: int = 150,
              visits: int = 4, seed: int = 0, overrides: Sequence[str] = (), retrain: bool = False, seeds: int = 1
              ) -> Path:
    """Run every cohort, then write OUT/results; returns OUT/results/results.md. The main NeuroAR model is
    trained with `seeds` seeds (`seed`, `seed` + 1, ...). Models trained on other data are refused, or with
    `retrain` set aside and trained anew."""
    if seeds < 1:
        raise NeuroARError(f"--seeds must be at least 1 (the main model), not {seeds}")
    out_dir = Path(out_dir)
    for cohort in cohorts:
        run_dir = out_dir / cohort
        config = load_config("demo", [f"seed={seed}", f"data.cache_dir={run_dir / 'cache'}", *STUDY, *overrides])
        options = SynthOptions(subjects=subjects, visits=visits, cohort=cohort, seed=seed)
        run_cohort(run_dir, config, options, variants(cohort, seed, seeds), retrain=retrain,
                   on_stage=functools.partial(_add_stage_seconds, run_dir))
    command = ["neuroar", "study", "--out", str(out_dir), "--cohorts", *cohorts, "--subjects", str(subjects),
               "--visits", str(visits), "--seed", str(seed), *(["--seeds", str(seeds)] if seeds > 1 else []),
               *overrides]
    return write_results(out_dir, cohorts, " ".join(command))


def write_results(out_dir: Path, cohorts: Sequence[str], command: str) -> Path:
    """Write OUT/results for `cohorts` from their run folders, keeping what it holds of other cohorts (run by
    another invocation, perhaps on another machine), so that the cohorts can be run one at a time."""
    results = out_dir / "results"
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpu_cores": os.cpu_count(),
               "torch": torch.__version__, "neuroar": __version__, "commit": source_commit()}
    runs = _read_json(results / "machine.json").get("cohorts", {})
    runs |= {cohort: {"command": command, "machine": machine, "stage_seconds": _stage_seconds(out_dir / cohort)}
             for cohort in cohorts}
    order = [cohort for cohort in CHANGE_REGION if cohort in runs]
    models = _merge(results / "models.csv", [model_table(out_dir / cohort, cohort) for cohort in cohorts], order)
    brain_age = holm_adjusted(_merge(results / "brain_age.csv",
                                     [brain_age_table(out_dir / cohort, cohort) for cohort in cohorts], order))
    write_text(results / "models.csv", models.to_csv(index=False))
    write_text(results / "brain_age.csv", brain_age.to_csv(index=False))
    spread = seed_table(models)
    write_text(results / "seeds.csv", spread.to_csv(index=False))
    for cohort in cohorts:
        change_figure(out_dir / cohort, cohort).savefig(results / f"{cohort}_change.png", dpi=compare.FIGURE_DPI)
        pairs = pair_table(out_dir / cohort).to_csv(index=False, float_format="%.6g")  # 6 digits: half the size
        write_text(results / f"{cohort}_pairs.csv", pairs)
    write_json(results / "machine.json", {"cohorts": {cohort: runs[cohort] for cohort in order}})
    lines = ["# neuroar study", ""]
    for cohort in order:
        run, region = runs[cohort], CHANGE_REGION[cohort]
        seconds = run["stage_seconds"]
        lines += [f"## {cohort}", "", f"`{run['command']}`", "", f"Machine: {json.dumps(run['machine'])}", "",
                  _markdown(models[models["cohort"] == cohort].drop(columns="cohort")), "",
                  f"Change: predicted against true change of the {region.replace('_', ' ')} (mL) over the test pairs.",
                  "", *_seed_lines(spread[spread["cohort"] == cohort].drop(columns="cohort")),
                  _markdown(brain_age[brain_age["cohort"] == cohort].drop(columns="cohort")), "",
                  "Seconds per stage, longest first (summed over the invocations that ran the cohort; "
                  f"{sum(seconds.values()) / 60:.0f} min in all): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])), ""]
    write_text(results / "results.md", "\n".join(lines))
    return results / "results.md"


def _merge(path: Path, tables: list[pd.DataFrame], order: list[str]) -> pd.DataFrame:
    """The new cohorts' rows in place of the file's rows of those cohorts; cohorts in `order`."""
    fresh = pd.concat(tables, ignore_index=True)
    if path.is_file():
        kept = pd.read_csv(path)
        fresh = pd.concat([kept[~kept["cohort"].isin(fresh["cohort"])], fresh], ignore_index=True)
    rank = {cohort: i for i, cohort in enumerate(order)}
    return fresh.sort_values("cohort", key=lambda c: c.map(rank), kind="stable", ignore_index=True)


def source_commit() -> str | None:
    """The git commit neuroar runs from ("+changes" when its files differ from it), or None outside a checkout
    (an installed wheel): which version of the code a result came from."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "."],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _stage_seconds(run_dir: Path) -> dict[str, float]:
    return _read_json(run_dir / "stage_seconds.json")


def _add_stage_seconds(run_dir: Path, stage: str, seconds: float) -> None:
    spent = _stage_seconds(run_dir)
    write_json(run_dir / "stage_seconds.json", spent | {stage: spent.get(stage, 0.0) + seconds})


def model_table(run_dir: Path, cohort: str) -> pd.DataFrame:
    """One row per evaluated model of a cohort's run: image metrics and the change of its aging region."""
    summary = pd.read_csv(run_dir / "evaluation" / "summary.csv")
    region = CHANGE_REGION[cohort]
    columns = {"label": "model", "pairs": "pairs", "psnr_mean": "psnr", "psnr_std": "psnr_std", "ssim_mean": "ssim",
               "ssim_std": "ssim_std", f"{region}_change_r": "change_r", f"{region}_change_mae": "change_mae",
               f"{region}_change_mean": "change_mean", f"{region}_true_change_mean": "true_change_mean",
               f"{region}_carried": "carried"}
    table = summary[list(columns)].rename(columns=columns)
    table["model"] = [_model_name(name, run_dir.name) for name in table["model"]]
    return table.assign(cohort=cohort)[["cohort", *table.columns]]


def pair_table(run_dir: Path) -> pd.DataFrame:
    """Per test pair and model (named as in models.csv): the pair, its image metrics, and per region the earlier
    volume and the true and predicted change (mL), from which every number of models.csv can be recomputed."""
    per_pair = compare.with_diagnosis(pd.read_csv(run_dir / "evaluation" / "pairs.csv", dtype={"subject_id": str}),
                                      run_dir)
    table = per_pair.drop(columns=["label", "model", "variant"])
    table.insert(0, "model", [_model_name(name, run_dir.name) for name in per_pair["label"]])
    return table


def seed_table(models: pd.DataFrame) -> pd.DataFrame:
    """Per cohort and output of the main NeuroAR model (plain, +base, +detail, +aging): how many seeds it was
    trained with, and the mean and std over them of PSNR and the change r / MAE / carried, beside copy's MAE."""
    parts = models["model"].str.partition("+")  # NAME+OUTPUT: columns NAME, "+", OUTPUT
    model, output = parts[0], parts[2].replace("", "plain")
    mine = models.assign(output=output)[(model == "neuroar") | model.str.fullmatch(SEED_MODEL)]
    copy = models[models["model"] == "copy"].set_index("cohort")["change_mae"].rename("copy_change_mae")
    metrics = ["psnr", "change_r", "change_mae", "carried"]
    table = mine.groupby(["cohort", "output"], sort=False)[metrics].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    seeds = mine.groupby(["cohort", "output"], sort=False).size().rename("seeds")
    return pd.concat([seeds, table], axis=1).reset_index().join(copy, on="cohort")


def _seed_lines(spread: pd.DataFrame) -> list[str]:
    """results.md's lines for a cohort's seed table: none when the main model was trained with one seed."""
    if spread.empty or spread["seeds"].max() < 2:
        return []
    rows = [[row.output, str(row.seeds), *(f"{getattr(row, f'{m}_mean'):.2f} ± {getattr(row, f'{m}_std'):.2f}"
                                           for m in ("psnr", "change_r", "change_mae")),
             f"{100 * row.carried_mean:.0f} ± {100 * row.carried_std:.0f} %", f"{row.copy_change_mae:.2f}"]
            for row in spread.itertuples(index=False)]
    return ["The main NeuroAR model over its training seeds (mean ± std; each seed's rows above):", "",
            markdown_table(["output", "seeds", "psnr", "change_r", "change_mae", "carried", "copy's change_mae"],
                           rows), ""]


def change_figure(run_dir: Path, cohort: str) -> Figure:
    """Predicted against true change of the cohort's aging region over the test pairs, one panel per output a
    reader compares (copy, the tokenizer-oracle, each model's +aging and +detail), coloured by diagnosis where
    the cohort has several: the evaluation's change figure."""
    per_pair = compare.with_diagnosis(pd.read_csv(run_dir / "evaluation" / "pairs.csv", dtype={"subject_id": str}),
                                      run_dir)
    per_pair = per_pair[~per_pair["model"].str.split("/").str[-1].str.fullmatch(SEED_MODEL)]  # one panel per model
    return compare.change_figure(per_pair, CHANGE_REGION[cohort], compare.compared_labels(per_pair),
                                 compare.display_names(per_pair), f"{cohort}: {per_pair['pair'].nunique()} test pairs")


def _model_name(name: str, run: str) -> str:
    """The evaluation's names without the run's: RUN -> neuroar, RUN+aging -> neuroar+aging, RUN/ldm -> ldm."""
    if name.startswith(f"{run}/"):
        return name.removeprefix(f"{run}/")
    if name == run or name.startswith(f"{run}+"):
        return "neuroar" + name.removeprefix(run)
    return name


def brain_age_table(run_dir: Path, cohort: str) -> pd.DataFrame:
    """Per training set: MAE and R2 over seeds, and the paired t-test of each set against real scans alone (raw
    p; `run_study` adjusts them over every cohort's tests)."""
    table = compare_with_real(pd.read_csv(run_dir / "brain_age" / "results.csv"))
    table.insert(0, "cohort", cohort)
    return table


def _markdown(table: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return "–" if np.isnan(value) else f"{value:.4g}"  # NaN: no such measure (the volume trend's image)
        return str(value)

    return markdown_table(list(table.columns), [[cell(v) for v in row] for row in table.itertuples(index=False)])
