"""Stages chained into runs: the dataset a run trains on, and the end-to-end demo.

A run folder (runs/NAME/) holds the resolved config.yaml, the validated scans.csv (with splits and
preprocessed paths), pairs.csv, and what later stages add. Stages whose inputs did not change are skipped
when a run is repeated.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from neuroar.config import Config, load_config, save_config
from neuroar.data.manifest import assign_splits, write_manifest
from neuroar.data.pairs import longitudinal_pairs
from neuroar.data.preprocess import load_preprocessed, preprocess_scans
from neuroar.data.scans import read_scans
from neuroar.files import atomic_path, write_text


@dataclass
class Dataset:
    scans: pd.DataFrame  # one row per scan, with `split` and `preprocessed`
    pairs: pd.DataFrame  # one row per (earlier, later) pair, paths to preprocessed volumes

    def summary(self) -> str:
        lines = ["| split | subjects | scans | pairs | years between scans |", "|---|---|---|---|---|"]
        for split in ("train", "val", "test"):
            scans = self.scans[self.scans["split"] == split]
            pairs = self.pairs[self.pairs["split"] == split] if "split" in self.pairs else self.pairs.iloc[:0]
            years = f"{pairs['years'].min():.1f}-{pairs['years'].max():.1f}" if len(pairs) else "-"
            lines.append(f"| {split} | {scans['subject_id'].nunique()} | {len(scans)} | {len(pairs)} | {years} |")
        if "diagnosis" in self.scans and (self.scans["diagnosis"] != "").any():
            counts = self.scans.groupby("diagnosis")["subject_id"].nunique()
            lines.append("\nsubjects per diagnosis: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
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
    return Dataset(scans=scans, pairs=pairs)


def run_demo(out_dir: str | Path = "runs/demo", quick: bool = False, seed: int = 0) -> Path:
    """Synthetic cohort -> validation, splits and preprocessing -> pairs -> summary (grows with the project)."""
    from neuroar.data.synth.cohort import SynthOptions, make_cohort

    out_dir = Path(out_dir)
    config = load_config("demo", [f"seed={seed}", f"data.cache_dir={out_dir / 'cache'}"])
    options = SynthOptions(subjects=8 if quick else 24, visits=3, seed=seed)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    cohort_dir = out_dir / "cohort"
    if _cohort_options(cohort_dir) == asdict(options):
        print(f"cohort: {cohort_dir} is up to date, skipped")
    else:
        make_cohort(cohort_dir, options)
    timings["synthetic cohort"] = time.perf_counter() - start

    start = time.perf_counter()
    dataset = prepare_dataset(cohort_dir / "manifest.csv", config, out_dir)
    timings["validate, split, preprocess"] = time.perf_counter() - start

    report = _demo_summary(dataset, cohort_dir, timings)
    write_text(out_dir / "summary.md", report)
    print(report)
    return out_dir


def _cohort_options(cohort_dir: Path) -> dict | None:
    meta = cohort_dir / "synth.json"
    if not (meta.is_file() and (cohort_dir / "manifest.csv").is_file()):
        return None
    return json.loads(meta.read_text()).get("options")


def _demo_summary(dataset: Dataset, cohort_dir: Path, timings: dict[str, float]) -> str:
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
        _markdown(table),
        "",
        "## Stage times",
        *[f"- {stage}: {seconds:.1f} s" for stage, seconds in timings.items()],
        "",
    ]
    return "\n".join(lines)


def _markdown(table: pd.DataFrame) -> str:
    header = [table.index.name or "", *table.columns]
    rows = [[str(i), *(f"{v:+.2f}" for v in row)] for i, row in zip(table.index, table.to_numpy())]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])
