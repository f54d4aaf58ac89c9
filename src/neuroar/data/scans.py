"""One entry point for the user's scans: a manifest CSV or a BIDS folder."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from neuroar.data.bids import discover_bids
from neuroar.data.manifest import read_manifest


def read_scans(source: str | Path, check_files: bool = True) -> pd.DataFrame:
    """A validated table of scans from a manifest CSV, or from a BIDS folder when `source` is a folder."""
    source = Path(source)
    if source.is_dir():
        return discover_bids(source, check_files=check_files)
    return read_manifest(source, check_files=check_files)
