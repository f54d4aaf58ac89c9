"""What a model or a stage's result was computed from: a data fingerprint, one hash per part, so that a run
resumes or skips work only on the same data and otherwise says what changed.

The parts: `scans` (every scan's subject, session, age, diagnosis and its preprocessed file, whose cache name
hashes the input file's content and the preprocessing settings), `split` (each subject's split) and `pairs`
(every pair of pairs.csv with its ages and split); cached tokens and latents add their own file's key. Every
checkpoint's JSON holds the fingerprint it was trained on under "data", every stage stamp the one it used.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from neuroar.checkpoint import read_meta
from neuroar.errors import NeuroARError
from neuroar.files import sha256_json

# What each part means, for the message that names what changed.
PARTS = {"scans": "the scans (their files, ages or preprocessing)", "split": "the subjects' split",
         "pairs": "the pairs", "tokens": "the cached tokens (another tokenizer or scans)",
         "latents": "the cached latents (another autoencoder or scans)"}


class StaleModelError(NeuroARError):
    """A model or result was computed from other data than the run now holds."""


def data_fingerprint(run_dir: str | Path) -> dict[str, str]:
    """The fingerprint of a prepared run's scans.csv and pairs.csv (not of tokens or latents)."""
    run_dir = Path(run_dir)
    for name in ("scans.csv", "pairs.csv"):
        if not (run_dir / name).is_file():
            raise NeuroARError(f"{run_dir / name} not found; run `neuroar preprocess MANIFEST --out {run_dir}` first.")
    scans = pd.read_csv(run_dir / "scans.csv", dtype=str, keep_default_na=False)
    pairs = pd.read_csv(run_dir / "pairs.csv", dtype=str, keep_default_na=False)
    diagnosis = scans["diagnosis"] if "diagnosis" in scans else pd.Series("", index=scans.index)
    scan_rows = sorted(zip(scans["subject_id"], scans["session_id"], scans["age"].map(_age), diagnosis,
                           scans["preprocessed"].map(lambda p: Path(p).name)))
    split_rows = sorted(set(zip(scans["subject_id"], scans["split"])))
    pair_rows = sorted(zip(pairs["subject_id"], pairs["earlier_session"], pairs["later_session"],
                           pairs["earlier_age"].map(_age), pairs["later_age"].map(_age), pairs["split"]))
    return {"scans": sha256_json(scan_rows), "split": sha256_json(split_rows), "pairs": sha256_json(pair_rows)}


def scan_fingerprint(run_dir: str | Path) -> dict[str, str]:
    """The parts that a tokenizer or autoencoder trains on: the scans and the split (not the pairs)."""
    fingerprint = data_fingerprint(run_dir)
    return {"scans": fingerprint["scans"], "split": fingerprint["split"]}


def check_fingerprint(what: str, recorded: dict[str, str] | None, current: dict[str, str], fix: str) -> None:
    """Refuse (StaleModelError) when `recorded` differs from `current` in any part `current` has; the message
    names `what`, the parts that changed and `fix`."""
    if recorded is None:
        raise StaleModelError(f"{what} records no data fingerprint (it was made by an older neuroar), so it "
                              f"cannot be told to fit this run's data. {fix}")
    changed = [PARTS.get(part, part) for part in current if recorded.get(part) != current[part]]
    if changed:
        raise StaleModelError(f"{what} was computed from other data than the run holds now: "
                              f"{', '.join(changed)} changed since. {fix}")


def check_model_fits_run(checkpoint: str | Path, run_dir: str | Path, fix: str | None = None) -> None:
    """Refuse a model (checkpoint stem, e.g. RUN/NAME/last) whose recorded data is not what its run holds now in
    the parts it recorded: its training subjects may now be test subjects, and its tokens or latents other ones.
    `fix` says how to retrain it (default: the commands that do)."""
    run_dir, checkpoint = Path(run_dir), Path(checkpoint)
    recorded = read_meta(checkpoint).get("data")
    current = {k: v for k, v in data_fingerprint(run_dir).items() if recorded is None or k in recorded}
    check_fingerprint(str(checkpoint), recorded, current, fix or (
        f"Retrain it (e.g. `neuroar train-ar --run {run_dir} --retrain`, `neuroar train-tokenizer --run {run_dir} "
        f"--retrain`, `neuroar train-baseline KIND --run {run_dir} --retrain`)."))


def _age(text: str) -> str:
    """Ages as written by pandas round-trip through float, so 71 and 71.0 are one age."""
    return repr(float(text))
