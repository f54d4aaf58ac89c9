"""Stages chained into runs: the dataset a run trains on, and the end-to-end demo.

A run folder (runs/NAME/) holds the resolved config.yaml, the validated scans.csv (with splits and
preprocessed paths), pairs.csv, and what later stages add. Stages whose inputs did not change are skipped
when a run is repeated.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from neuroar.config import BASELINES, Config, load_config, save_config
from neuroar.data.fingerprint import data_fingerprint
from neuroar.data.manifest import assign_splits, write_manifest
from neuroar.data.pairs import held_out_split, longitudinal_pairs
from neuroar.data.preprocess import load_preprocessed, preprocess_scans
from neuroar.data.quality import write_qc_page
from neuroar.data.scans import read_scans
from neuroar.data.synth.cohort import SynthOptions, make_cohort
from neuroar.files import atomic_path, sha256_json, write_json, write_text
from neuroar.tables import markdown_table


@dataclass
class Dataset:
    scans: pd.DataFrame  # one row per scan, with `split` and `preprocessed`
    pairs: pd.DataFrame  # one row per (earlier, later) pair, paths to preprocessed volumes
    qc: tuple[int, Path] | None = None  # registered scans: how many the QC page flagged, and the page

    def summary(self) -> str:
        rows = []
        for split in ("train", "val", "test"):
            scans = self.scans[self.scans["split"] == split]
            pairs = self.pairs[self.pairs["split"] == split] if "split" in self.pairs else self.pairs.iloc[:0]
            years = f"{pairs['years'].min():.1f}-{pairs['years'].max():.1f}" if len(pairs) else "-"
            rows.append([split, scans["subject_id"].nunique(), len(scans), len(pairs), years])
        lines = [markdown_table(["split", "subjects", "scans", "pairs", "years between scans"], rows)]
        if "diagnosis" in self.scans and (self.scans["diagnosis"] != "").any():
            counts = self.scans.groupby("diagnosis")["subject_id"].nunique()
            lines.append("\nsubjects per diagnosis: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if self.qc is not None:
            lines.append(f"\nQC: {self.qc[0]} of {len(self.scans)} scans flagged; see {self.qc[1]}")
        return "\n".join(lines)


def prepare_dataset(source: str | Path, config: Config, out_dir: str | Path, progress: bool = True) -> Dataset:
    """Validate the scans (manifest CSV or BIDS folder), split subjects, preprocess, and form the pairs."""
    out_dir = Path(out_dir)
    scans = read_scans(source)
    scans = assign_splits(scans, config.data.split_fractions, seed=config.seed)
    scans = preprocess_scans(scans, config.data, progress=progress)
    pairs = longitudinal_pairs(scans, column="preprocessed")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / "config.yaml")
    write_manifest(scans, out_dir / "scans.csv")
    with atomic_path(out_dir / "pairs.csv") as tmp:
        pairs.to_csv(tmp, index=False)
    qc = None
    if config.data.raw or config.data.register:
        page = out_dir / "qc" / "index.html"
        qc = (write_qc_page(scans, config.data, page.parent), page)
    return Dataset(scans=scans, pairs=pairs, qc=qc)


# --quick: a smaller cohort and shorter training, for a first look in under 4 minutes on 2 cores (NeuroAR at batch
# 4: its 70 steps at the demo's batch 8 took 166 s of the 333 measured with them).
QUICK = ["train_tokenizer.steps=200", "train_tokenizer.val_every=200", "train_transformer.steps=70",
         "train_transformer.change_steps=300",
         "train_transformer.batch_size=4", "train_transformer.val_every=35", "train_autoencoder.steps=50",
         "train_ldm.steps=40", "train_stargan.steps=20", "ldm.ddim_steps=10", "brain_age.seeds=2", "brain_age.steps=60"]


# Each baseline's stage, as summaries and the study's machine.json name it.
BASELINE_STAGES = {"ldm": "LDM", "stargan": "latent StarGAN"}


def run_demo(out_dir: str | Path = "runs/demo", quick: bool = False, seed: int = 0, overrides: Sequence[str] = (),
             retrain: bool = False) -> Path:
    """Synthetic cohort -> preprocessing -> tokenizer -> tokens -> NeuroAR -> evaluation -> brain age -> report
    and summary (`run_cohort`), on the demo's cohort and config (no baselines unless `overrides` name them:
    "baselines=[ldm,stargan]"). Models in `out_dir` trained on other data are refused, or with `retrain` set
    aside and trained anew."""
    out_dir = Path(out_dir)
    config = load_config("demo", [f"seed={seed}", f"data.cache_dir={out_dir / 'cache'}", *(QUICK if quick else []),
                                  *overrides])
    dataset, timings = run_cohort(out_dir, config, demo_cohort_options(quick, seed), retrain=retrain)
    report = _demo_summary(dataset, out_dir / "cohort", out_dir, timings)
    write_text(out_dir / "summary.md", report)
    print(report)
    return out_dir


def run_cohort(out_dir: Path, config: Config, options: SynthOptions, variants: dict[str, Sequence[str]] | None = None,
               retrain: bool = False, on_stage: Callable[[str, float], None] | None = None
               ) -> tuple[Dataset, dict[str, float]]:
    """Every stage on a synthetic cohort into one run folder: the cohort (OUT/cohort), preprocessing, tokenizer,
    tokens, NeuroAR, each of `variants` (more NeuroAR models on the same tokens, name -> config overrides, e.g.
    an ablation), the config's baselines (their autoencoder and latents first), the evaluation of all of them,
    the brain-age experiment (with every model's synthetic scans) and the report. Returns the dataset and each
    stage's seconds; `on_stage(name, seconds)` is called as each stage ends, or stops on an error or an interrupt.

    Every stage resumes: the cohort is kept when its options did not change, preprocessing, tokens and
    latents are cached by content, training continues from its last checkpoint (a finished run is not
    retrained), and the evaluation and brain-age experiment are skipped while their models and data are
    unchanged. A model trained on other data (scans, split, pairs) is refused, or with `retrain` set aside
    and trained anew."""
    from neuroar.config import config_from_dict
    from neuroar.data.latents import encode_run
    from neuroar.data.tokens import tokenize_run
    from neuroar.train.autoencoder import train_autoencoder
    from neuroar.train.baselines import train_baseline
    from neuroar.train.tokenizer import train_tokenizer
    from neuroar.train.transformer import train_transformer

    variants = variants or {}
    timings: dict[str, float] = {}

    def stage(name: str, work):
        print(f"== {name}")
        start = time.perf_counter()
        try:
            return work()
        finally:
            timings[name] = time.perf_counter() - start
            if on_stage:
                on_stage(name, timings[name])

    cohort_dir = out_dir / "cohort"

    def cohort() -> None:
        if _cohort_options(cohort_dir) == asdict(options):
            print(f"{cohort_dir} is up to date, skipped")
        else:
            make_cohort(cohort_dir, options)

    stage("synthetic cohort", cohort)
    dataset = stage("validate, split, preprocess", lambda: prepare_dataset(cohort_dir / "manifest.csv", config,
                                                                          out_dir))
    stage("tokenizer", lambda: train_tokenizer(out_dir, config, retrain=retrain))
    stage("tokens", lambda: tokenize_run(out_dir, config))
    stage("NeuroAR", lambda: train_transformer(out_dir, config, retrain=retrain))
    for name, overrides in variants.items():
        variant = config_from_dict(config.to_dict(), f"variant {name}", overrides)
        stage(f"NeuroAR {name}", functools.partial(train_transformer, out_dir, variant, name=name, retrain=retrain))
    if config.baselines:
        stage("autoencoder and latents", lambda: (train_autoencoder(out_dir, config, retrain=retrain),
                                                  encode_run(out_dir, config)))
    for kind in config.baselines:
        stage(BASELINE_STAGES[kind], functools.partial(train_baseline, out_dir, config, kind, retrain=retrain))
    stage("evaluation", lambda: evaluate_run(out_dir, config.seed, list(variants), config.baselines))
    stage("brain age", lambda: brain_age_run(out_dir, config))
    stage("report", lambda: print(f"report: {report_run(out_dir, config.seed)}"))
    return dataset, timings


# Bump when the evaluation's tables change, so that an older RUN/evaluation is redone rather than read.
EVALUATION_FORMAT = 2


def evaluate_run(run_dir: Path, seed: int = 0, variants: Sequence[str] = (), baselines: Sequence[str] = BASELINES
                 ) -> Path:
    """Evaluate a run's NeuroAR model, the NeuroAR models named `variants` (RUN/NAME) and the `baselines` it
    trained on its test split (or val, when there is no test split) into RUN/evaluation, unless that was
    already done for the same checkpoints."""
    from neuroar.evaluate.compare import evaluate_models

    out = run_dir / "evaluation"
    pairs = pd.read_csv(run_dir / "pairs.csv", keep_default_na=False)
    split = held_out_split(pairs)
    models = [run_dir, *(run_dir / name for name in variants), *_trained(run_dir, baselines)]
    inputs = {"split": split, "seed": seed, "data": data_fingerprint(run_dir), "models": _checkpoints(run_dir, models),
              "format": EVALUATION_FORMAT}
    if _up_to_date(out, inputs):
        return out
    evaluate_models([str(m) for m in models], out, split=split, seed=seed)
    _stamp(out, inputs)
    return out


def brain_age_run(run_dir: Path, config: Config) -> Path:
    """The brain-age experiment with the synthetic scans of the run's NeuroAR model and of the config's baselines
    (those trained) into RUN/brain_age, unless already done for the same models and settings."""
    from neuroar.evaluate.brain_age import run_brain_age

    out = run_dir / "brain_age"
    models = [run_dir, *_trained(run_dir, config.baselines)]
    inputs = {"brain_age": asdict(config.brain_age), "data": data_fingerprint(run_dir),
              "models": _checkpoints(run_dir, models)}
    if not _up_to_date(out, inputs):
        run_brain_age(run_dir, config, models, out_dir=out)
        _stamp(out, inputs)
    return out


# Bump when the report's content changes, so that an older RUN/report.html is rebuilt rather than kept.
REPORT_FORMAT = 1


def report_run(run_dir: Path, seed: int = 0) -> Path:
    """RUN/report.html, unless it was already built from the same evaluation and brain-age results (their stamps
    name the checkpoints and data) with the same seed."""
    from neuroar.report import build_report

    out = run_dir / "report.html"
    stamps = {name: (run_dir / name / "stamp.json").read_text() if (run_dir / name / "stamp.json").is_file() else None
              for name in ("evaluation", "brain_age")}
    inputs = {**stamps, "seed": seed, "format": REPORT_FORMAT}
    stamp = run_dir / "report.stamp.json"
    if not _up_to_date(out, inputs, stamp):
        build_report(run_dir, seed=seed)
        _stamp(out, inputs, stamp)
    return out


def _trained(run_dir: Path, baselines: Sequence[str]) -> list[Path]:
    return [run_dir / kind for kind in baselines if (run_dir / kind / "last.json").is_file()]


def _checkpoints(run_dir: Path, models: Sequence[Path]) -> list[dict]:
    """The checkpoint records (step, weights file, config) of the tokenizer and the given models."""
    from neuroar.runs import resolve_model, tokenizer_checkpoint

    stems = [tokenizer_checkpoint(run_dir), *(Path.joinpath(*resolve_model(m)) / "last" for m in models)]
    return [json.loads(stem.with_suffix(".json").read_text()) for stem in stems]


def _up_to_date(out: Path, inputs: dict, stamp: Path | None = None) -> bool:
    """Whether OUT exists and was made from `inputs` (recorded in `stamp`, by default OUT/stamp.json)."""
    stamp = stamp or out / "stamp.json"
    if out.exists() and stamp.is_file() and json.loads(stamp.read_text()).get("stamp") == sha256_json(inputs):
        print(f"{out} is up to date, skipped")
        return True
    return False


def _stamp(out: Path, inputs: dict, stamp: Path | None = None) -> None:
    write_json(stamp or out / "stamp.json", {"stamp": sha256_json(inputs)})


def demo_cohort_options(quick: bool = False, seed: int = 0) -> SynthOptions:
    """The demo's synthetic cohort. 48 subjects x 4 visits: ~200 training pairs (with 30 subjects, ~130 pairs,
    NeuroAR overfitted before it learned the change: measured) and ~40 test pairs."""
    return SynthOptions(subjects=10 if quick else 48, visits=3 if quick else 4, seed=seed)


def _cohort_options(cohort_dir: Path) -> dict | None:
    """The options of the finished cohort in `cohort_dir`; None where there is none or its synthesis stopped
    half-way (cohorts written before the "finished" mark wrote synth.json last)."""
    meta = cohort_dir / "synth.json"
    if not (meta.is_file() and (cohort_dir / "manifest.csv").is_file()):
        return None
    written = json.loads(meta.read_text())
    return written.get("options") if written.get("finished", True) else None


def _demo_summary(dataset: Dataset, cohort_dir: Path, run_dir: Path, timings: dict[str, float]) -> str:
    truth = pd.read_csv(cohort_dir / "truth.csv").merge(dataset.scans[["subject_id", "session_id", "diagnosis"]],
                                                         on=["subject_id", "session_id"])
    truth["hippocampus"] = truth["hippocampus_left"] + truth["hippocampus_right"]
    rates = []
    for (_, group), visits in truth.sort_values("age").groupby(["subject_id", "diagnosis"]):
        years = visits["age"].iloc[-1] - visits["age"].iloc[0]
        change = {k: 100 * np.log(visits[k].iloc[-1] / visits[k].iloc[0]) / years
                  for k in ("ventricles", "hippocampus", "grey_matter", "whole_brain")}
        rates.append({"diagnosis": group, **change})
    table = pd.DataFrame(rates).groupby("diagnosis").mean().round(2)
    volume, _ = load_preprocessed(dataset.scans["preprocessed"].iloc[0])
    lines = [
        "# neuroar demo",
        "",
        "## Data",
        dataset.summary(),
        "",
        f"Preprocessed volumes: {volume.shape}, intensities {volume.min():.2f}-{volume.max():.2f}.",
        "",
        "## True annual % volume change in the synthetic cohort (mean per group)",
        markdown_table([table.index.name or "", *table.columns],
                       [[i, *(f"{v:+.2f}" for v in row)] for i, row in zip(table.index, table.to_numpy())]),
        "",
        "## NeuroAR against copying the earlier scan's tokens",
        versus_copy(run_dir),
        "",
        "## Evaluation",
        (run_dir / "evaluation" / "summary.md").read_text().replace("# Evaluation", "Evaluation", 1),
        "## Brain age",
        (run_dir / "brain_age" / "summary.md").read_text().replace("# Brain age", "Brain age", 1),
        "## Stage times",
        *[f"- {stage}: {seconds:.1f} s" for stage, seconds in timings.items()],
        "",
    ]
    return "\n".join(lines)


def versus_copy(run_dir: Path) -> str:
    """The last validation of RUN/neuroar: per scale, teacher-forced accuracy against copying the earlier scan's
    tokens, and whether the gain is more than two standard errors (over pairs) from zero."""
    last = pd.read_csv(run_dir / "neuroar_val.csv").iloc[-1]
    lines = [f"Validation pairs at step {int(last['step'])}, teacher-forced; gain = model - copy, +- 2 standard "
             "errors over pairs.", ""]
    config = run_dir / "config.yaml"
    if config.is_file() and load_config(config).tokenizer.code == "change":
        lines[0] += (" The tokens code the change, and where a change is uncertain its most likely token stays "
                     "\"no change\": accuracy barely moves even when the sampled change is right. The evaluation's "
                     "change columns below say what the model learned.")
        transformer = load_config(config).transformer
        if transformer.change_width:
            lines[0] += (" They code it against the scan's own expected aging (the cohort's mean change plus the "
                         "change regressor's deviation from it, `transformer.change_width`): here \"copy\" is that "
                         "expected change, not the earlier scan; the evaluation's +base row scores it alone.")
        elif transformer.mean_change:
            lines[0] += (" They code it against the cohort's mean aging (`transformer.mean_change`): here \"copy\" "
                         "is the cohort's mean change, not the earlier scan.")
    rows = []
    k = 0
    while f"scale{k}_accuracy" in last:
        gain, margin = last[f"scale{k}_accuracy"] - last[f"scale{k}_copy_accuracy"], 2 * last[f"scale{k}_gain_se"]
        verdict = ("above copy" if gain - margin > 0 else "below copy" if gain + margin < 0
                   else "equal to copy" if margin == 0 and gain == 0 else "not distinguishable from copy")
        rows.append([k, f"{last[f'scale{k}_accuracy']:.3f}", f"{last[f'scale{k}_copy_accuracy']:.3f}",
                     f"{gain:+.3f} +- {margin:.3f}", verdict])
        k += 1
    return "\n".join([*lines, markdown_table(["scale", "NeuroAR", "copy", "gain", "verdict"], rows)])

