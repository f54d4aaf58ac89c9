"""Longitudinal pairs: every (earlier, later) pair of scans of one subject, with both ages."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset

from neuroar.data.preprocess import load_preprocessed

PAIR_COLUMNS = ["subject_id", "earlier_session", "later_session", "earlier_age", "later_age", "years",
                "earlier_path", "later_path"]


def held_out_split(table: pd.DataFrame) -> str:
    """The split that evaluation holds out, from a table with a `split` column (scans or pairs): test, or val
    when the run has no test split."""
    return "test" if (table["split"] == "test").any() else "val"


def longitudinal_pairs(scans: pd.DataFrame, split: str | None = None, column: str = "path") -> pd.DataFrame:
    """All ordered pairs of scans of each subject with a strictly later age.

    `column` picks which image path to carry (`path` for raw inputs, `preprocessed` for cached volumes).
    Scans at the same age form no pair: with zero years between them there is no aging to predict.
    """
    if split is not None:
        scans = scans[scans["split"] == split]
    extra = [c for c in ("diagnosis", "split") if c in scans.columns]
    rows = []
    for subject, visits in scans.sort_values("age", kind="stable").groupby("subject_id", sort=True):
        visits = visits.to_dict("records")
        for i, earlier in enumerate(visits):
            for later in visits[i + 1:]:
                if later["age"] <= earlier["age"]:
                    continue
                rows.append({"subject_id": subject, "earlier_session": earlier["session_id"],
                             "later_session": later["session_id"], "earlier_age": earlier["age"],
                             "later_age": later["age"], "years": later["age"] - earlier["age"],
                             "earlier_path": earlier[column], "later_path": later[column],
                             **{c: earlier[c] for c in extra}})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS + extra)


class PairDataset(Dataset):
    """Preprocessed (earlier, later) volumes with their ages, from a table made by `longitudinal_pairs`
    with `column="preprocessed"`."""

    def __init__(self, pairs: pd.DataFrame):
        self.pairs = pairs.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.pairs.iloc[index]
        earlier_DHW, _ = load_preprocessed(row["earlier_path"])
        later_DHW, _ = load_preprocessed(row["later_path"])
        return {"earlier": torch.from_numpy(earlier_DHW)[None], "later": torch.from_numpy(later_DHW)[None],
                "earlier_age": torch.tensor(row["earlier_age"], dtype=torch.float32),
                "later_age": torch.tensor(row["later_age"], dtype=torch.float32)}


def token_pairs(run_dir: str | Path, scans: pd.DataFrame, split: str) -> pd.DataFrame:
    """The run's pairs of one split, with the row of each scan in the token table."""
    pairs = pd.read_csv(Path(run_dir) / "pairs.csv", dtype={"subject_id": str, "earlier_session": str,
                                                      "later_session": str}, keep_default_na=False)
    row = {(str(s), str(t)): i for i, (s, t) in enumerate(zip(scans["subject_id"], scans["session_id"]))}
    pairs = pairs[pairs["split"] == split].reset_index(drop=True)
    pairs["earlier_index"] = [row[(s, t)] for s, t in zip(pairs["subject_id"], pairs["earlier_session"])]
    pairs["later_index"] = [row[(s, t)] for s, t in zip(pairs["subject_id"], pairs["later_session"])]
    return pairs
