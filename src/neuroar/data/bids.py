"""Discover T1-weighted scans in a BIDS folder and turn them into a manifest.

Images: sub-*/[ses-*/]anat/*_T1w.nii[.gz]. Ages: the `age` column of sub-*/sub-*_sessions.tsv for each
session, else the `age` column of participants.tsv (which suits single-session subjects). `sex` and
`diagnosis` (or `group`) come from participants.tsv when present.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pandas as pd

from neuroar.data.manifest import validate_manifest
from neuroar.errors import ManifestError

_T1W = re.compile(r"^(sub-[^_/]+)(?:_(ses-[^_/]+))?.*_T1w\.nii(\.gz)?$")


def discover_bids(root: str | Path, check_files: bool = True) -> pd.DataFrame:
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"BIDS folder {root} does not exist.")
    participants = _read_tsv(root / "participants.tsv", "participant_id")
    rows, problems = [], []
    seen: dict[tuple[str, str], Path] = {}
    for path in sorted(root.glob("sub-*/**/anat/*_T1w.nii*")):
        match = _T1W.match(path.name)
        if not match:
            continue
        subject, session = match.group(1), match.group(2) or "ses-1"
        if (subject, session) in seen:
            warnings.warn(f"{root}: several T1w files for {subject} {session}; using {seen[subject, session].name}"
                          f" and skipping {path.name}. Write a manifest CSV to choose another.", stacklevel=2)
            continue
        seen[subject, session] = path
        sessions = _read_tsv(root / subject / f"{subject}_sessions.tsv", "session_id")
        age = sessions.get(session, {}).get("age", "") or participants.get(subject, {}).get("age", "")
        if not age:
            problems.append(f"{path}: no age for {subject} {session}; add an `age` column to "
                            f"{root / subject / f'{subject}_sessions.tsv'} (or to participants.tsv "
                            "for single-session subjects).")
        info = participants.get(subject, {})
        rows.append({"subject_id": subject, "session_id": session, "age": age, "path": str(path),
                     "sex": info.get("sex", ""), "diagnosis": info.get("diagnosis", info.get("group", ""))})
    if problems:
        raise ManifestError(f"{root}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:20]))
    if not rows:
        raise ManifestError(f"{root}: no T1-weighted images found; expected files named "
                            "sub-<label>[/ses-<label>]/anat/sub-<label>[_ses-<label>]_T1w.nii.gz.")
    return validate_manifest(pd.DataFrame(rows), source=str(root), check_files=check_files)


def _read_tsv(path: Path, key: str) -> dict[str, dict[str, str]]:
    """Rows of a BIDS .tsv keyed by `key`; an absent file is an empty table ('n/a' reads as empty)."""
    if not path.is_file():
        return {}
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot be read as a tab-separated table ({err}).") from None
    if key not in table.columns:
        raise ManifestError(f"{path}: needs a `{key}` column; found {', '.join(table.columns)}.")
    table = table.replace("n/a", "")
    return {row[key]: row for row in table.to_dict("records")}
