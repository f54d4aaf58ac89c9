"""The manifest: one row per scan, validated, with subject-level splits.

Columns: subject_id, session_id, age, path (required); sex, diagnosis, split (optional).
Every problem found is reported at once, each naming the file, the line and the fix.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from neuroar.data.nifti import read_header
from neuroar.errors import ImageError, ManifestError
from neuroar.files import atomic_path

REQUIRED = ("subject_id", "session_id", "age", "path")
OPTIONAL = ("sex", "diagnosis", "split")
SPLITS = ("train", "val", "test")
MAX_AGE = 120.0


def read_manifest(path: str | Path, check_files: bool = True) -> pd.DataFrame:
    """Read and validate a manifest CSV; relative image paths are resolved against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist; pass a CSV with columns "
                            f"{', '.join(REQUIRED)} (or a BIDS folder).")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise ManifestError(f"{path}: cannot be read as CSV ({err}); save it as comma-separated UTF-8 text "
                            f"with a header row {','.join(REQUIRED)}.") from None
    return validate_manifest(frame, source=str(path), root=path.parent, check_files=check_files)


def validate_manifest(frame: pd.DataFrame, source: str, root: Path | None = None,
                      check_files: bool = True) -> pd.DataFrame:
    """Check a table of scans and return it normalised (typed age, absolute paths, stripped text).

    Line numbers in messages count the CSV header as line 1.
    """
    frame = frame.reset_index(drop=True)
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in REQUIRED if c not in frame.columns]
    unknown = [c for c in frame.columns if c not in REQUIRED + OPTIONAL]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown column(s) {', '.join(map(repr, unknown))}")
        raise ManifestError(f"{source}: {'; '.join(parts)}. Columns must be {', '.join(REQUIRED)} and "
                            f"optionally {', '.join(OPTIONAL)}; rename or remove the others.")
    if frame.empty:
        raise ManifestError(f"{source}: has a header but no scans; add one row per scan.")
    frame = frame.astype(str).apply(lambda col: col.str.strip())
    problems: list[str] = []

    def line(i: int) -> str:
        return f"{source}, line {i + 2}"

    for i, row in frame.iterrows():
        for column in ("subject_id", "session_id", "path"):
            if not row[column]:
                problems.append(f"{line(i)}: empty {column}; fill it in or remove the row.")
    ages = pd.to_numeric(frame["age"], errors="coerce")
    for i, (text, age) in enumerate(zip(frame["age"], ages)):
        if not np.isfinite(age):
            problems.append(f"{line(i)}: age {text!r} is not a number; write the age in years, e.g. 71.5.")
        elif not 0 <= age <= MAX_AGE:
            problems.append(f"{line(i)}: age {age:g} is outside 0-{MAX_AGE:g} years; check its unit "
                            "(years, not months or days).")
    frame["age"] = ages

    duplicated = frame.duplicated(["subject_id", "session_id"], keep="first")
    for i in np.flatnonzero(duplicated):
        sub, ses = frame.loc[i, "subject_id"], frame.loc[i, "session_id"]
        first = int(np.flatnonzero((frame["subject_id"] == sub) & (frame["session_id"] == ses))[0])
        problems.append(f"{line(i)}: subject {sub!r} session {ses!r} also appears on line {first + 2}; "
                        "each (subject_id, session_id) must be unique.")

    if "split" in frame.columns:
        problems += _check_splits(frame, line)

    root = root or Path(".")
    texts = list(frame["path"])
    frame["path"] = [str((root / text).resolve()) if text else "" for text in texts]
    if check_files:
        for i, path in enumerate(frame["path"]):
            if path:
                try:
                    read_header(path)
                except ImageError as err:
                    problems.append(f"{line(i)}: {err}")

    if problems:
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ManifestError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(shown) + more)

    single = frame.groupby("subject_id")["session_id"].transform("size") == 1
    if single.any():
        names = sorted(frame.loc[single, "subject_id"].unique())
        warnings.warn(f"{source}: {len(names)} subject(s) have a single scan ({', '.join(names[:5])}"
                      f"{', ...' if len(names) > 5 else ''}); they are kept for prediction but form no "
                      "longitudinal pairs.", stacklevel=2)
    return frame.sort_values(["subject_id", "age"], kind="stable").reset_index(drop=True)


def _check_splits(frame: pd.DataFrame, line) -> list[str]:
    problems = []
    for i, split in enumerate(frame["split"]):
        if split and split not in SPLITS:
            problems.append(f"{line(i)}: split {split!r} is not one of {', '.join(SPLITS)}.")
    filled = frame["split"] != ""
    if filled.any() and not filled.all():
        i = int(np.flatnonzero(~filled)[0])
        problems.append(f"{line(i)}: split is empty while other rows have one; fill every row's split or "
                        "leave the column out to split automatically.")
    for subject, splits in frame[filled].groupby("subject_id")["split"]:
        if splits.nunique() > 1:
            rows = ", ".join(str(i + 2) for i in splits.index)
            problems.append(f"subject {subject!r} is in several splits ({', '.join(sorted(splits.unique()))}) "
                            f"on lines {rows}; splits are by subject, so give all its scans the same split.")
    return problems


def assign_splits(frame: pd.DataFrame, fractions: Sequence[float] = (0.7, 0.15, 0.15),
                  seed: int = 0) -> pd.DataFrame:
    """Give every subject one split, seeded and stratified by diagnosis; an existing split column is kept.

    Subjects are shuffled within their diagnosis group and laid out group after group; a sequence of
    splits that tracks the fractions as closely as whole subjects allow is then dealt along that list, so
    the totals match the fractions and every group is spread over the splits in proportion.
    """
    if "split" in frame.columns and (frame["split"] != "").all():
        return frame
    rng = np.random.default_rng(seed)
    groups = frame.get("diagnosis", pd.Series("", index=frame.index))
    subject_group = frame.assign(group=groups).groupby("subject_id")["group"].first()
    ordered: list[str] = []
    for _, subjects in subject_group.groupby(subject_group, sort=True):
        names = sorted(subjects.index)
        rng.shuffle(names)
        ordered += names
    split_of = dict(zip(ordered, _split_sequence(len(ordered), fractions)))
    return frame.assign(split=frame["subject_id"].map(split_of))


def _split_sequence(n: int, fractions: Sequence[float]) -> list[str]:
    """n splits dealt so that after every k of them each split's count is as close to k * fraction as
    possible (the split furthest below its share comes next)."""
    counts = np.zeros(len(SPLITS))
    sequence = []
    for k in range(1, n + 1):
        choice = int(np.argmax(np.asarray(fractions) * k - counts))
        counts[choice] += 1
        sequence.append(SPLITS[choice])
    return sequence


def write_manifest(frame: pd.DataFrame, path: str | Path) -> None:
    columns = [c for c in REQUIRED + OPTIONAL if c in frame.columns]
    extra = [c for c in frame.columns if c not in columns]
    with atomic_path(path) as tmp:
        frame[columns + extra].to_csv(tmp, index=False)
