"""`volume-trend`: each region's volume change predicted from the two ages alone, no image. Per region, fitted by
least squares on the training pairs' volumes (measured as every evaluated scan's are, `volumes.regional_volumes`):

    change = years x (a + b x (earlier age - the training pairs' mean earlier age))

a rate per year that changes linearly with age (the elderly's ventricles grow faster the older the subject), and
no change at zero years. It is the classical longitudinal reference, a trend of the volumes: what the ages NeuroAR
is conditioned on say of the volumes without any scan. A model of the images that does not beat it on a region's
change predicts that region no better than two numbers per region fitted on the training pairs. It has no image,
so no image metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from neuroar.data.preprocess import load_preprocessed
from neuroar.evaluate.volumes import REGIONS, TemplateRegions, regional_volumes_many

SCANS_AT_ONCE = 16  # measured together (faster); a few hundred MB at 1 mm


@dataclass(frozen=True)
class VolumeTrend:
    """Per region (a, b) of the module's formula, and the mean earlier age the ages are centred on."""

    rates: dict[str, tuple[float, float]]
    mean_age: float

    def change(self, region: str, earlier_age: np.ndarray, years: np.ndarray) -> np.ndarray:
        a, b = self.rates[region]
        return years * (a + b * (earlier_age - self.mean_age))


def fit_volume_trend(pairs: pd.DataFrame, volumes: dict[str, dict[str, float]]) -> VolumeTrend:
    """The trend over `pairs` (rows of pairs.csv), each scan's volumes per region in `volumes` by its path."""
    earlier_age = pairs["earlier_age"].to_numpy(dtype=float)
    years = (pairs["later_age"] - pairs["earlier_age"]).to_numpy(dtype=float)
    mean_age = float(earlier_age.mean())
    design = np.stack([years, years * (earlier_age - mean_age)], axis=1)
    rates = {}
    for region in REGIONS:
        change = np.array([volumes[later][region] - volumes[earlier][region]
                           for earlier, later in zip(pairs["earlier_path"], pairs["later_path"])])
        # Minimum-norm solution: with one earlier age (or one gap) the age term is undetermined and gets 0.
        a, b = np.linalg.lstsq(design, change, rcond=None)[0]
        rates[region] = (float(a), float(b))
    return VolumeTrend(rates, mean_age)


def run_volume_trend(run_dir: Path, regions: TemplateRegions) -> VolumeTrend | None:
    """The trend over the run's training pairs (None without any more than zero years apart)."""
    pairs = pd.read_csv(run_dir / "pairs.csv", dtype={"subject_id": str}, keep_default_na=False)
    pairs = pairs[pairs["split"] == "train"]
    if not (pairs["later_age"] > pairs["earlier_age"]).any():
        return None
    paths = list(pd.unique(pd.concat([pairs["earlier_path"], pairs["later_path"]])))
    volumes = {}
    for start in range(0, len(paths), SCANS_AT_ONCE):
        chunk = paths[start:start + SCANS_AT_ONCE]
        volumes |= dict(zip(chunk, regional_volumes_many([load_preprocessed(path)[0] for path in chunk], regions)))
    return fit_volume_trend(pairs, volumes)


def trend_rows(trend: VolumeTrend, per_pair: pd.DataFrame) -> pd.DataFrame:
    """The trend's rows in the columns of `per_pair` (`compare.score_pairs`' rows): each evaluated pair once, its
    truth and earlier volumes as scored there, the trend's predicted change, no image metrics; the caller names
    them (label, model, variant)."""
    rows = per_pair.drop_duplicates("pair").copy()
    rows[["psnr", "ssim", "mae"]] = np.nan
    for region in REGIONS:
        rows[f"predicted_change_{region}"] = trend.change(region, rows["earlier_age"].to_numpy(dtype=float),
                                                          rows["years"].to_numpy(dtype=float))
    return rows
