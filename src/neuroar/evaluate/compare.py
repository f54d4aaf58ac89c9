"""`neuroar evaluate`: every model on every held-out pair, the same way, with the trivial baselines beside.

Per pair (earlier -> later scan of a subject of the split) and output (forecasters.py: copy, tokenizer-copy,
the tokenizer-oracle, each model's outputs): PSNR, SSIM (3D, data range 1) and MAE inside MNI152's brain mask,
and per region the earlier scan's volume and the predicted and true change (both measured by
`volumes.regional_volumes`; predicted change = volume of the prediction - volume of the earlier scan). Beside
them, where the run has training pairs, the volume trend (volume_trend.py): each region's change from the two ages
alone, no image, so no image metrics.

The headline is the cohort's own aging region: the one given, or else the candidate whose mean true change
over the evaluated pairs is largest relative to its mean volume (`aging_region`; measured on the synthetic
cohorts: ventricles in the elderly, +20 % against grey matter's -8 %; grey matter in adolescents, -5 % against
the hippocampus's -3 % and the ventricles' +2 %). White matter is no candidate: on a T1 its measured change
mirrors grey matter's (a grey/white boundary that moves counts in both; in adolescents +10 %), and the cohorts
set their aging on grey matter, deriving white matter's.

Summary per output: mean +- std and a bootstrap 95% CI of each image metric; a two-sided paired Wilcoxon test
against copy (what the user has without any model) on the same pairs, of PSNR, of SSIM and of each region's
absolute change error |predicted - true change|; per region the Pearson r and the mean absolute error of
predicted vs true change. An age sweep (the first scan of the split's first `sweep_subjects` subjects
predicted at several later ages) records the aging region's volume: does it move the way the region's true
change does (ventricles grow, grey matter shrinks) at every step?

One function per job: `load_pairs`, `predict_pairs` (the forecasts, pair by pair), `score_pairs`, `age_sweep`,
`summarize`, `write_evaluation` (OUT/pairs.csv, OUT/summary.csv, OUT/summary.md, OUT/sweep.csv and
OUT/figures/*.png); `evaluate_models` runs them in turn.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import stats

from neuroar.config import load_config
from neuroar.data.pairs import held_out_split
from neuroar.data.preprocess import load_preprocessed, template_brain_mask
from neuroar.errors import NeuroARError
from neuroar.evaluate.forecasters import (
    BASE,
    PLAIN,
    TRIVIAL,
    Forecaster,
    ModelForecaster,
    Output,
    load_forecasters,
    predict_many,
)
from neuroar.evaluate.volume_trend import VolumeTrend, run_volume_trend, trend_rows
from neuroar.evaluate.volumes import (
    REGIONS,
    TemplateRegions,
    regional_volumes,
    regional_volumes_many,
    template_regions,
)
from neuroar.files import write_text
from neuroar.metrics import masked_mae, masked_psnr, masked_ssim
from neuroar.progress import Progress
from neuroar.runs import MODEL_NAME, resolve_model
from neuroar.tables import markdown_table

IMAGE_METRICS = ("psnr", "ssim", "mae")
TESTED_METRICS = ("psnr", "ssim")  # tested against copy, beside each region's change error
COPY = Output("copy")
VOLUME_TREND = Output("volume-trend")  # no image: a region's change from the ages alone (volume_trend.py)
# Earlier scans predicted together (the baselines batch them: the LDM's 8x faster 16 at a time at 4 mm), as many as
# keep their pairs' outputs (up to ~70 volumes a scan) within a few hundred MB: 16 at 4 mm, 6 at 2 mm, 1 at 1 mm.
MAX_SCANS_AT_ONCE, VOXELS_AT_ONCE = 16, 2**22
AGING_CANDIDATES = ("ventricles", "grey_matter", "hippocampus", "whole_brain")  # see the module's text
# A predicted change whose spread over the pairs is under this share of the true change's is no change (a latent
# StarGAN that stays the identity moves volumes by decoding noise alone): its correlation with the truth is
# undefined. Relative, because regions' true changes differ by orders of magnitude (hippocampus vs grey matter).
NO_CHANGE_SHARE = 0.01


@dataclass(frozen=True)
class PairPrediction:
    """One evaluated pair (`pair`: its row of pairs.csv, `index`: its place among the evaluated pairs), both of
    its scans, and every output's prediction at its later age."""

    index: int
    pair: pd.Series
    earlier_DHW: np.ndarray
    later_DHW: np.ndarray
    outputs: dict[Output, np.ndarray]


def evaluate_models(models: Sequence[str], out_dir: str | Path, run_dir: str | Path | None = None,
                    split: str | None = None, samples: int | None = None, seed: int = 0,
                    sweep_years: Sequence[float] = (1, 2, 4, 6, 8), progress: bool = True,
                    sampling: Sequence[str] = (), subjects: int | None = None,
                    sweep_subjects: int | None = 10, region: str | None = None) -> pd.DataFrame:
    """Evaluate on `split` (default: test, else val; its first `subjects` subjects, or all) and write everything
    to `out_dir`; returns the summary table. `region`: the aging region of the headline and the age sweep
    (default: chosen from the evaluated pairs' true changes, `aging_region`)."""
    if region is not None and region not in REGIONS:
        raise NeuroARError(f"region {region!r} is not one of {', '.join(REGIONS)}.")
    trained = [m for m in models if m not in TRIVIAL]
    if run_dir is None:
        if not trained:
            raise NeuroARError("give a trained model folder, or --run RUN to evaluate only the trivial baselines.")
        run_dir = resolve_model(trained[0])[0]
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    pairs, split = load_pairs(run_dir, split, subjects)
    brain, regions = template_brain_mask(config.data), template_regions(config.data)
    forecasters = load_forecasters(trained, run_dir, config, samples, sampling)
    per_pair = score_pairs(predict_pairs(forecasters, pairs, seed, progress), brain, regions)
    trend = run_volume_trend(run_dir, regions)
    if trend is not None:
        per_pair = with_volume_trend(per_pair, trend)
    chosen = region is None
    region = region or aging_region(per_pair)
    # A few subjects show the sweep's curves; all of them would cost nearly as much as the pairs themselves.
    swept = first_scans(run_dir, split, sorted(pairs["subject_id"].unique())[:sweep_subjects])
    models_only = [f for f in forecasters if isinstance(f, ModelForecaster)]
    sweep = age_sweep(models_only, swept, sweep_years, regions, region, seed, progress)
    summary = summarize(per_pair, sweep, region, seed)
    # pairs.csv and the figures carry each subject's diagnosis where the cohort has several (points coloured by it).
    write_evaluation(Path(out_dir), with_diagnosis(per_pair, run_dir), sweep, summary, split, chosen)
    return summary


def load_pairs(run_dir: Path, split: str | None = None, subjects: int | None = None) -> tuple[pd.DataFrame, str]:
    """The run's pairs of `split` (default: `held_out_split`), of its first `subjects` subjects or all; and the
    split."""
    pairs = pd.read_csv(run_dir / "pairs.csv", dtype={"subject_id": str}, keep_default_na=False)
    split = split or held_out_split(pairs)
    pairs = pairs[pairs["split"] == split].reset_index(drop=True)
    if pairs.empty:
        raise NeuroARError(f"{run_dir}/pairs.csv has no pairs in the {split!r} split; choose another --split.")
    if subjects is not None:
        chosen = sorted(pairs["subject_id"].unique())[:subjects]
        pairs = pairs[pairs["subject_id"].isin(chosen)].reset_index(drop=True)
    return pairs, split


def first_scans(run_dir: Path, split: str, subjects: Sequence[str]) -> pd.DataFrame:
    """Each given subject's first scan of the split (rows of scans.csv)."""
    scans = pd.read_csv(run_dir / "scans.csv", dtype={"subject_id": str}, keep_default_na=False)
    scans = scans[(scans["split"] == split) & scans["subject_id"].isin(subjects)]
    return scans.sort_values("age", kind="stable").groupby("subject_id").head(1)


def predict_pairs(forecasters: Sequence[Forecaster], pairs: pd.DataFrame, seed: int = 0, progress: bool = True
                  ) -> Iterator[PairPrediction]:
    """Every forecaster's outputs for every pair, a few earlier scans at a time (a split's predictions do not fit
    in memory at once). One prediction per earlier scan, at all its pairs' later ages: each target age
    draws the same random numbers however many ages are asked for, so this gives what predicting pair by pair
    gives, without predicting the earlier scan's own age ("aging") and encoding it again for every pair."""
    groups = [group for _, group in pairs.groupby("earlier_path", sort=False)]
    voxels = math.prod(nib.load(groups[0].iloc[0]["earlier_path"]).shape) if groups else 1
    at_once = max(1, min(MAX_SCANS_AT_ONCE, VOXELS_AT_ONCE // voxels))
    with Progress(total=len(pairs), desc="evaluate", unit="pair", enabled=progress) as bar:
        for start in range(0, len(groups), at_once):
            chunk = groups[start:start + at_once]
            earlier_DHWs = [load_preprocessed(group.iloc[0]["earlier_path"])[0] for group in chunk]
            later_DHWs = [[load_preprocessed(path)[0] for path in group["later_path"]] for group in chunk]
            scans = [(earlier_DHW, group.iloc[0]["earlier_age"], list(group["later_age"]),
                      group.iloc[0].get("diagnosis")) for earlier_DHW, group in zip(earlier_DHWs, chunk)]
            outputs: list[dict[Output, list[np.ndarray]]] = [{} for _ in chunk]
            for forecaster in forecasters:
                for mine, theirs in zip(outputs, predict_many(forecaster, scans, seed, later_DHWs)):
                    mine |= theirs
            for group, earlier_DHW, laters, scan_outputs in zip(chunk, earlier_DHWs, later_DHWs, outputs):
                for i, (index, pair) in enumerate(group.iterrows()):
                    yield PairPrediction(index, pair, earlier_DHW, laters[i],
                                         {output: volumes[i] for output, volumes in scan_outputs.items()})
                    bar.update()


def score_pairs(predictions: Iterable[PairPrediction], brain: np.ndarray, regions: TemplateRegions
                ) -> pd.DataFrame:
    """One row per pair and output (pairs in their order): image metrics against the later scan, and per region
    the earlier volume and the true and predicted change."""
    measured: dict[str, dict[str, float]] = {}

    def volumes_of(path: str, volume_DHW: np.ndarray) -> dict[str, float]:
        if path not in measured:
            measured[path] = regional_volumes(volume_DHW, regions)
        return measured[path]

    rows = []
    for prediction in predictions:
        pair, later_DHW = prediction.pair, prediction.later_DHW
        before = volumes_of(pair["earlier_path"], prediction.earlier_DHW)
        after = volumes_of(pair["later_path"], later_DHW)
        outputs = prediction.outputs  # measured together: faster (volumes.regional_volumes_many)
        for (output, predicted_DHW), predicted in zip(outputs.items(),
                                                      regional_volumes_many(list(outputs.values()), regions)):
            rows.append({"label": output.label, "model": output.model, "variant": output.variant,
                         "pair": prediction.index, "subject_id": pair["subject_id"],
                         "earlier_age": pair["earlier_age"], "later_age": pair["later_age"], "years": pair["years"],
                         "psnr": masked_psnr(predicted_DHW, later_DHW, brain),
                         "ssim": masked_ssim(predicted_DHW, later_DHW, brain),
                         "mae": masked_mae(predicted_DHW, later_DHW, brain),
                         **{f"earlier_volume_{r}": before[r] for r in REGIONS},
                         **{f"true_change_{r}": after[r] - before[r] for r in REGIONS},
                         **{f"predicted_change_{r}": predicted[r] - before[r] for r in REGIONS}})
    return pd.DataFrame(rows).sort_values("pair", kind="stable", ignore_index=True)


def with_volume_trend(per_pair: pd.DataFrame, trend: VolumeTrend) -> pd.DataFrame:
    """`per_pair` with the volume trend's rows, each pair's after its trivial baselines' (the tables' order)."""
    rows = trend_rows(trend, per_pair).assign(label=VOLUME_TREND.label, model=VOLUME_TREND.model,
                                              variant=VOLUME_TREND.variant)
    labels = list(per_pair["label"].unique())
    trivial = [i for i, model in enumerate(per_pair.drop_duplicates("label")["model"]) if model in TRIVIAL]
    labels.insert(trivial[-1] + 1 if trivial else 0, VOLUME_TREND.label)
    rank = {label: i for i, label in enumerate(labels)}
    both = pd.concat([per_pair, rows], ignore_index=True)
    return both.sort_values(["pair", "label"], key=lambda c: c.map(rank) if c.name == "label" else c,
                            kind="stable", ignore_index=True)


def aging_region_scores(per_pair: pd.DataFrame) -> pd.Series:
    """Per candidate region (AGING_CANDIDATES): the mean true change over the evaluated pairs, in % of its mean
    volume in their earlier scans."""
    pairs = per_pair.drop_duplicates("pair")
    return pd.Series({r: 100 * pairs[f"true_change_{r}"].mean() / pairs[f"earlier_volume_{r}"].mean()
                      for r in AGING_CANDIDATES})


def aging_region(per_pair: pd.DataFrame) -> str:
    """The cohort's aging region: the candidate whose true change is largest relative to its volume."""
    return str(aging_region_scores(per_pair).abs().idxmax())


def age_sweep(forecasters: Sequence[Forecaster], scans: pd.DataFrame, years: Sequence[float],
              regions: TemplateRegions, region: str, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Each scan (rows of scans.csv) predicted at its age + each of `years`: `region`'s volume per output and
    age (`volume`), beside the scan's own (`volume_start`)."""
    columns = ["label", "model", "variant", "subject_id", "age", "target_age", "years", "region", "volume_start",
               "volume"]
    rows = []
    for scan in Progress(scans.to_dict("records"), desc="age sweep", unit="subject",
                         enabled=progress and bool(forecasters)):
        volume_DHW = load_preprocessed(scan["preprocessed"])[0]
        start = regional_volumes(volume_DHW, regions)[region]
        targets = [scan["age"] + y for y in years]
        for forecaster in forecasters:
            for output, predictions in forecaster.predict(volume_DHW, scan["age"], targets, seed,
                                                          scan.get("diagnosis")).items():
                for target, predicted in zip(targets, regional_volumes_many(predictions, regions)):
                    rows.append([output.label, output.model, output.variant, scan["subject_id"], scan["age"],
                                 target, target - scan["age"], region, start, predicted[region]])
    return pd.DataFrame(rows, columns=columns)


def summarize(per_pair: pd.DataFrame, sweep: pd.DataFrame, region: str, seed: int = 0) -> pd.DataFrame:
    """One row per output (in per_pair's order): image metrics, their p against copy, per region the change's r,
    MAE (and its p against copy), mean and spread beside the truth's; `region` the aging region, and the share
    of swept subjects whose `region` moves in the direction of its true change at every step."""
    copy = per_pair[per_pair["label"] == COPY.label].set_index("pair")
    direction = np.sign(per_pair[f"true_change_{region}"].mean())
    rows = []
    for label, group in per_pair.groupby("label", sort=False):
        group = group.set_index("pair")
        tested = label != COPY.label  # copy's own row: no test against itself
        row: dict[str, object] = {"label": label, "model": group["model"].iloc[0], "variant": group["variant"].iloc[0],
                                  "pairs": len(group), "region": region}
        for metric in IMAGE_METRICS:
            values = group[metric].to_numpy(dtype=float)
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(values)
            row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = bootstrap_ci(values, seed)
            if metric in TESTED_METRICS:
                row[f"{metric}_p_vs_copy"] = paired_wilcoxon(group[metric], copy[metric]) if tested else np.nan
        for r in REGIONS:
            predicted, true = group[f"predicted_change_{r}"], group[f"true_change_{r}"]
            error = (predicted - true).abs()
            row[f"{r}_change_r"] = pearson(predicted, true)
            row[f"{r}_change_mae"] = float(error.mean())
            copy_error = (copy[f"predicted_change_{r}"] - copy[f"true_change_{r}"]).abs()
            row[f"{r}_change_mae_p_vs_copy"] = paired_wilcoxon(error, copy_error) if tested else np.nan
            # Mean and spread beside the truth's: a change that is sampling noise has a wide spread around 0.
            row[f"{r}_change_mean"], row[f"{r}_change_std"] = mean_std(predicted.to_numpy(dtype=float))
            row[f"{r}_true_change_mean"], row[f"{r}_true_change_std"] = mean_std(true.to_numpy(dtype=float))
            row[f"{r}_carried"] = carried(predicted, true)
        mine = sweep[sweep["label"] == label]
        row["sweep_monotonic"] = monotonic_share(mine, direction) if len(mine) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def carried(predicted: pd.Series, true: pd.Series) -> float:
    """The share of the true mean change that an output's mean change carries (the tokenizer-oracle's is the
    yardstick of a token space, DESIGN.md section 5); NaN where the truth's mean is no change."""
    if abs(true.mean()) <= NO_CHANGE_SHARE * true.std(ddof=0):
        return np.nan
    return float(predicted.mean() / true.mean())


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def bootstrap_ci(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    if np.isnan(values).all():  # an output without this metric (the volume trend has no image)
        return np.nan, np.nan
    if len(values) < 2 or np.ptp(values) == 0:
        return float(values.mean()), float(values.mean())
    result = stats.bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=2000,
                             random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_wilcoxon(values: pd.Series, reference: pd.Series) -> float:
    """Two-sided p of a paired Wilcoxon signed-rank test of `values` against `reference`, paired by index (the
    pair); NaN without two pairs that differ."""
    values, reference = values.align(reference, join="inner")
    a, b = values.to_numpy(dtype=float), reference.to_numpy(dtype=float)
    if len(a) < 2 or np.all(a == b) or not np.isfinite(a - b).all():
        return np.nan
    return float(stats.wilcoxon(a, b).pvalue)


def pearson(predicted: pd.Series, true: pd.Series) -> float:
    """Pearson r of predicted and true change; NaN when either does not vary (the predicted change's spread under
    NO_CHANGE_SHARE of the truth's) or for under three pairs."""
    spread, true_spread = np.std(predicted.to_numpy(dtype=float)), np.std(true.to_numpy(dtype=float))
    if len(predicted) < 3 or true_spread == 0 or spread < NO_CHANGE_SHARE * true_spread:
        return np.nan
    return float(stats.pearsonr(predicted, true).statistic)


def monotonic_share(sweep: pd.DataFrame, direction: float) -> float:
    """Share of subjects whose predicted volume moves in `direction` (+1 grows, -1 shrinks) at every step of the
    sweep; NaN without a direction."""
    if direction == 0:
        return np.nan
    moving = [bool(np.all(direction * np.diff(g.sort_values("target_age")["volume"].to_numpy()) > 0))
              for _, g in sweep.groupby("subject_id")]
    return float(np.mean(moving))


def write_evaluation(out_dir: Path, per_pair: pd.DataFrame, sweep: pd.DataFrame, summary: pd.DataFrame, split: str,
                     chosen: bool = True) -> None:
    """OUT/pairs.csv, sweep.csv, summary.csv, summary.md and figures/*.png; `chosen`: whether the summary's
    region was chosen by `aging_region` (and summary.md says so) or given."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "pairs.csv", per_pair.to_csv(index=False))
    write_text(out_dir / "sweep.csv", sweep.to_csv(index=False))
    write_text(out_dir / "summary.csv", summary.to_csv(index=False))
    write_text(out_dir / "summary.md", summary_markdown(summary, per_pair, split, chosen))
    plot_all(per_pair, sweep, str(summary["region"].iloc[0]), out_dir / "figures")


def _words(region: str) -> str:
    return region.replace("_", " ")


def summary_markdown(summary: pd.DataFrame, per_pair: pd.DataFrame, split: str, chosen: bool = True) -> str:
    """The summary's tables, with what they compare against and how the aging region was chosen (`chosen`) or
    that it was given."""
    def cell(row, metric, digits):
        if np.isnan(row[f"{metric}_mean"]):  # the volume trend: no image
            return "–"
        return (f"{row[f'{metric}_mean']:.{digits}f} ± {row[f'{metric}_std']:.{digits}f} "
                f"[{row[f'{metric}_ci_low']:.{digits}f}, {row[f'{metric}_ci_high']:.{digits}f}]")

    def number(value, digits=2):
        return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"

    def percent(value):
        return "–" if value is None or not np.isfinite(value) else f"{value:.0%}"

    first = summary.iloc[0]
    region = str(first["region"])
    name = _words(region)
    if not chosen:
        choice = f"Aging region: {name} (given)."
    else:
        scores = aging_region_scores(per_pair)
        choice = (f"Aging region: {name}, the region whose mean true change over these pairs is largest relative "
                  "to its volume (" + ", ".join(f"{_words(r)} {v:+.1f} %" for r, v in scores.items())
                  + "; white matter is no candidate: its measured change mirrors grey matter's).")
    true_mean = first[f"{region}_true_change_mean"]
    lines = [f"# Evaluation on the {split} split", "",
             f"{per_pair['subject_id'].nunique()} subjects, {first['pairs']} pairs, "
             f"{per_pair['years'].min():.1f}-{per_pair['years'].max():.1f} years apart. {choice} Image metrics inside "
             "the MNI152 brain mask, data range 1: mean ± std [bootstrap 95% CI]. p vs copy: two-sided paired "
             "Wilcoxon signed-rank test against copy (the earlier scan as the follow-up) on the same pairs, of PSNR, "
             f"of SSIM and of the absolute error of the predicted {name} change (– for copy itself). "
             f"{name.capitalize()} change: Pearson r (– where the predicted change's spread is under "
             f"{NO_CHANGE_SHARE:.0%} of the true change's) and mean absolute error (mL) of predicted vs true change, "
             "the predicted change's mean ± std over pairs (true: "
             f"{true_mean:+.2f} ± {first[f'{region}_true_change_std']:.2f} mL) and the share of the true mean "
             "change it carries. Sweep: share of subjects whose "
             f"predicted {name} {'grows' if true_mean >= 0 else 'shrinks'} at every step, as its true change does.",
             ""]
    header = ["model", "PSNR (dB)", "p vs copy", "SSIM", "p vs copy", "MAE", f"{name} change r",
              f"{name} change MAE (mL)", "p vs copy", f"{name} change (mL)", "carried", "sweep monotonic"]
    rows = [[row["label"], cell(row, "psnr", 2), number(row["psnr_p_vs_copy"], 3), cell(row, "ssim", 3),
             number(row["ssim_p_vs_copy"], 3), cell(row, "mae", 4), number(row[f"{region}_change_r"]),
             number(row[f"{region}_change_mae"]), number(row[f"{region}_change_mae_p_vs_copy"], 3),
             f"{row[f'{region}_change_mean']:+.2f} ± {row[f'{region}_change_std']:.2f}",
             percent(row[f"{region}_carried"]), number(row["sweep_monotonic"])]
            for row in summary.to_dict("records")]
    lines += [markdown_table(header, rows), "", "Volume change per region: Pearson r (MAE in mL) of predicted vs true "
              "change, and the share of the true mean change carried.", ""]
    rows = [[row["label"], *(f"{number(row[f'{r}_change_r'])} ({number(row[f'{r}_change_mae'])}) "
                             f"{percent(row[f'{r}_carried'])}" for r in REGIONS)]
            for row in summary.to_dict("records")]
    lines.append(markdown_table(["model", *REGIONS], rows))
    return "\n".join(lines) + "\n"


# Figures: one panel per output a reader compares (`compared_labels`), on a grid of at most FIGURE_COLUMNS columns
# sized for a page's width at FIGURE_DPI, fonts of FONT points, readable names (`display_names`), and points or
# lines coloured by diagnosis where the cohort has several (a `diagnosis` column, `with_diagnosis`).
FIGURE_COLUMNS = 4
FIGURE_DPI = 100
PANEL_INCHES = 3.0
FONT = 11
PANEL_TITLE_CHARACTERS = 28  # at FONT, about PANEL_INCHES wide
MODEL_NAMES = {MODEL_NAME: "NeuroAR", "ldm": "LDM", "stargan": "StarGAN",
               # the study's NeuroAR models beside the main one (study.variants)
               "no-earlier": "NeuroAR, no earlier scan", "diagnosis": "NeuroAR with diagnosis"}
CHANGE_VARIANTS = ("aging", "detail")  # a trained model's outputs that a reader compares, in this order
DIAGNOSIS_COLOURS = ("#0072B2", "#E69F00", "#D55E00", "#009E73", "#CC79A7", "#56B4E9")  # Okabe-Ito
COPY_COLOUR = "#999999"


def compared_labels(per_pair: pd.DataFrame) -> list[str]:
    """The outputs a reader compares: copy, the tokenizer-oracle, the cohort's mean change, the volume trend and
    each trained model's change outputs (its change base where it has one, +aging, then +detail), in the
    evaluation's order. The others (tokenizer-copy, a model's decoded prediction) are in the full tables."""
    outputs = per_pair.drop_duplicates("label")
    models = list(outputs["model"].unique())
    chosen = [(models.index(model), CHANGE_VARIANTS.index(variant) if variant in CHANGE_VARIANTS else -1, label)
              for label, model, variant in outputs[["label", "model", "variant"]].itertuples(index=False)
              if model in (COPY.model, "tokenizer-oracle", "mean-change", VOLUME_TREND.model)
              or (model not in TRIVIAL and variant in (BASE, *CHANGE_VARIANTS))]
    return [label for *_, label in sorted(chosen)]


def display_names(per_pair: pd.DataFrame) -> dict[str, str]:
    """Each output's name for a reader: "RUN+aging" -> "NeuroAR (+aging)", "RUN/ldm+detail" -> "LDM (+detail)",
    "RUN/NAME" (another NeuroAR model) -> MODEL_NAMES[NAME] or "NeuroAR NAME"; the run's name stays only where
    the outputs of several runs are compared."""
    outputs = per_pair.drop_duplicates("label")
    runs = {model.split("/")[0] for model in outputs["model"] if model not in TRIVIAL}
    names = {}
    for label, model, variant in outputs[["label", "model", "variant"]].itertuples(index=False):
        name = model
        if model not in TRIVIAL:
            run, _, folder = model.partition("/")
            name = MODEL_NAMES.get(folder or MODEL_NAME, f"NeuroAR {folder}")
            name = f"{run}: {name}" if len(runs) > 1 else name
        names[label] = name if variant == PLAIN else f"{name} (+{variant})"
    return names


def with_diagnosis(frame: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    """`frame` (rows with a subject_id) with a `diagnosis` column: each subject's diagnosis at its first scan
    (RUN/scans.csv), a categorical with the diagnoses in the order they first appear there; `frame` unchanged where the
    scans have fewer than two diagnoses."""
    scans = pd.read_csv(run_dir / "scans.csv", dtype={"subject_id": str}, keep_default_na=False)
    if "diagnosis" not in scans or scans["diagnosis"].replace("", np.nan).nunique() < 2:
        return frame
    first = scans.sort_values("age", kind="stable").drop_duplicates("subject_id").set_index("subject_id")["diagnosis"]
    order = [d for d in scans["diagnosis"].unique() if d]
    return frame.assign(diagnosis=pd.Categorical(frame["subject_id"].astype(str).map(first), categories=order))


FIGURES = ("change", "age_sweep", "psnr_vs_years", "metrics", "change_all")  # FOLDER/NAME.png, see `plot_all`


def plot_all(per_pair: pd.DataFrame, sweep: pd.DataFrame, region: str, folder: Path) -> None:
    """FOLDER/metrics.png, change.png, psnr_vs_years.png and (with a sweep) age_sweep.png of the compared outputs
    (the image metrics' of those with an image), and change_all.png of every output; the report shows these
    files."""
    folder.mkdir(parents=True, exist_ok=True)
    labels, names = compared_labels(per_pair), display_names(per_pair)
    imaged = [label for label in labels if per_pair.loc[per_pair["label"] == label, "psnr"].notna().any()]
    figures = {"metrics": metrics_figure(per_pair, imaged, names),
               "change": change_figure(per_pair, region, labels, names),
               "psnr_vs_years": psnr_figure(per_pair, imaged, names),
               "change_all": change_figure(per_pair, region, list(per_pair["label"].unique()), names)}
    if len(sweep):
        figures["age_sweep"] = sweep_figure(sweep, per_pair, region, labels, names)
    for name, figure in figures.items():
        figure.savefig(folder / f"{name}.png", dpi=FIGURE_DPI)


def _grid(panels: int, height: float = PANEL_INCHES) -> tuple[Figure, list]:
    """A figure of `panels` panels, FIGURE_COLUMNS to a row, and its panels (the grid's unused cells hidden). The
    panels share their axes' ranges, so only the outer ones carry tick labels: the left column's y labels and each
    column's lowest panel's x labels."""
    columns = max(1, min(FIGURE_COLUMNS, panels))
    rows = -(-max(panels, 1) // columns)
    figure = Figure(figsize=(PANEL_INCHES * columns + 0.8, height * rows + 1.0), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True).ravel())
    for index, axis in enumerate(axes):
        axis.set_visible(index < panels)
        axis.tick_params(labelsize=FONT - 1, labelleft=index % columns == 0, labelbottom=index + columns >= panels)
    return figure, axes[:panels]


def _panel_name(name: str) -> str:
    """`name` on lines of at most a panel's width (the layout does not keep titles apart)."""
    return textwrap.fill(name, PANEL_TITLE_CHARACTERS)


def _diagnosis_groups(frame: pd.DataFrame) -> list[tuple[str | None, str, pd.Series]]:
    """(diagnosis, colour, rows) per diagnosis of `frame` (rows of none: "unknown", grey), or one group of every
    row where it has no `diagnosis` column."""
    if "diagnosis" not in frame:
        return [(None, DIAGNOSIS_COLOURS[0], pd.Series(True, index=frame.index))]
    groups = [(d, DIAGNOSIS_COLOURS[i % len(DIAGNOSIS_COLOURS)], frame["diagnosis"] == d)
              for i, d in enumerate(frame["diagnosis"].cat.categories)]
    unknown = frame["diagnosis"].isna()
    return groups + ([("unknown", COPY_COLOUR, unknown)] if unknown.any() else [])


def _legend(figure: Figure, frame: pd.DataFrame, lines: bool = False, extra: Sequence[Line2D] = ()) -> None:
    """Right of the panels: the colours of `_diagnosis_groups` as points (or `lines`), where `frame` has
    diagnoses, then `extra`."""
    groups = _diagnosis_groups(frame)
    handles = [] if groups[0][0] is None else [
        Line2D([], [], color=colour, marker="o", ls="-" if lines else "none", label=d) for d, colour, _ in groups]
    figure.legend(handles=[*handles, *extra], loc="outside right center", fontsize=FONT)


def truth_limits(values: pd.Series) -> tuple[float, float]:
    """The range of the true changes with 0 in it, padded by 8 %."""
    low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    pad = 0.08 * (high - low) or 1.0
    return low - pad, high + pad


def change_figure(per_pair: pd.DataFrame, region: str, labels: Sequence[str], names: dict[str, str],
                  title: str | None = None) -> Figure:
    """Predicted against true change of `region` per pair, one panel per output of `labels`, with the diagonal
    y = x and copy's no change (y = 0). Every panel has the same ranges: the truth's (`truth_limits`) across,
    and symmetric about 0 to the truth's largest magnitude up, so that a change in the wrong direction shows and
    one output's outliers do not flatten the others: a prediction beyond the range is drawn on its border as a
    triangle, and the panel says how many there are and how far the farthest goes."""
    true_column, predicted_column = f"true_change_{region}", f"predicted_change_{region}"
    x_low, x_high = truth_limits(per_pair[true_column])
    high = max(-x_low, x_high)
    low = -high
    figure, axes = _grid(len(labels))
    for axis, label in zip(axes, labels):
        group = per_pair[per_pair["label"] == label]
        truth, predicted = group[true_column], group[predicted_column]
        for _, colour, rows in _diagnosis_groups(group):
            y = predicted[rows].clip(low, high)
            inside = predicted[rows].between(low, high)
            axis.scatter(truth[rows][inside], y[inside], s=18, color=colour, alpha=0.8, linewidths=0)
            for beyond, marker in ((predicted[rows] > high, "^"), (predicted[rows] < low, "v")):
                axis.scatter(truth[rows][beyond], y[beyond], s=40, color=colour, marker=marker, linewidths=0)
        axis.axline((0, 0), slope=1, color="black", lw=0.8)
        axis.axhline(0, color=COPY_COLOUR, lw=0.8, ls=":")
        axis.set_xlim(x_low, x_high)
        axis.set_ylim(low, high)
        axis.set_box_aspect(1)
        # On a square panel the diagonal rises at atan(x range / y range); labelled where the truth reaches farthest.
        at = 0.85 * (x_high if x_high >= -x_low else x_low)
        angle = np.degrees(np.arctan((x_high - x_low) / (high - low)))
        axis.text(at, at, "y = x", rotation=angle, rotation_mode="anchor", ha="right" if at > 0 else "left",
                  va="bottom", fontsize=FONT - 1)
        error = (predicted - truth).abs().mean()
        r = pearson(predicted, truth)
        lines = [_panel_name(names[label]), (f"no change, MAE {error:.2f} mL" if label == COPY.label else
                                f"r {'–' if np.isnan(r) else f'{r:.2f}'}, MAE {error:.2f} mL")]
        outside = ~predicted.between(low, high)
        if outside.any():
            extreme = predicted[outside].abs().idxmax()
            lines.append(f"{outside.sum()} beyond the range, to {predicted[extreme]:+.0f} mL")
        axis.set_title("\n".join(lines), fontsize=FONT)
    figure.supxlabel(f"true {_words(region)} change (mL)", fontsize=FONT + 1)
    figure.supylabel(f"predicted {_words(region)} change (mL)", fontsize=FONT + 1)
    if title:
        figure.suptitle(title, fontsize=FONT + 2)
    _legend(figure, per_pair, extra=[Line2D([], [], color=COPY_COLOUR, lw=0.8, ls=":", label="no change")])
    return figure


def psnr_figure(per_pair: pd.DataFrame, labels: Sequence[str], names: dict[str, str]) -> Figure:
    """PSNR against the years between the scans, one panel per output of `labels` on one range, copy's pairs in
    grey behind each."""
    psnr = _finite(per_pair.loc[per_pair["label"].isin(labels), "psnr"])  # identical scans: infinite, not drawn
    spread = psnr.max() - psnr.min() if len(psnr) else 0.0
    limits = (psnr.min() - 0.05 * spread - 0.1, psnr.max() + 0.05 * spread + 0.1) if len(psnr) else (0.0, 1.0)
    copy = per_pair[per_pair["label"] == COPY.label]
    figure, axes = _grid(len(labels), height=2.6)
    for axis, label in zip(axes, labels):
        group = per_pair[per_pair["label"] == label]
        if label != COPY.label:
            axis.scatter(copy["years"], copy["psnr"], s=10, color=COPY_COLOUR, alpha=0.6, linewidths=0)
        axis.scatter(group["years"], group["psnr"], s=14, color=DIAGNOSIS_COLOURS[0], linewidths=0)
        axis.set_ylim(*limits)
        axis.set_title(f"{_panel_name(names[label])}\nmean {group['psnr'].mean():.2f} dB", fontsize=FONT)
    figure.supxlabel("years between the scans", fontsize=FONT + 1)
    figure.supylabel("PSNR in the brain (dB)", fontsize=FONT + 1)
    if len(copy):
        _legend(figure, pd.DataFrame(), extra=[Line2D([], [], color=COPY_COLOUR, marker="o", ls="none", label="copy")])
    return figure


def _finite(values: pd.Series) -> pd.Series:
    return values[np.isfinite(values)]


def metrics_figure(per_pair: pd.DataFrame, labels: Sequence[str], names: dict[str, str]) -> Figure:
    """PSNR, SSIM and MAE in the brain per output of `labels` (first at the top), copy's median dashed."""
    figure = Figure(figsize=(4 * len(IMAGE_METRICS), 0.4 * len(labels) + 1.4), layout="constrained")
    axes = figure.subplots(1, len(IMAGE_METRICS), sharey=True)
    units = {"psnr": "PSNR in the brain (dB)", "ssim": "SSIM in the brain", "mae": "MAE in the brain (intensity, 0-1)"}
    copy = per_pair[per_pair["label"] == COPY.label]
    for axis, metric in zip(axes, IMAGE_METRICS):
        axis.boxplot([_finite(per_pair.loc[per_pair["label"] == label, metric]) for label in labels][::-1],
                     orientation="horizontal", tick_labels=[names[label] for label in labels][::-1])
        if len(copy):
            axis.axvline(copy[metric].median(), color=COPY_COLOUR, ls="--", lw=1)
        axis.set_xlabel(units[metric], fontsize=FONT + 1)
        axis.tick_params(labelsize=FONT)
    return figure


def sweep_figure(sweep: pd.DataFrame, per_pair: pd.DataFrame, region: str, labels: Sequence[str],
                 names: dict[str, str]) -> Figure:
    """Each swept subject's predicted change of `region` since its first scan against the years, one panel per
    output of `labels` that was swept, beside the truth's mean rate over the pairs (the least-squares line
    through 0 of true change against years); every panel on the range of that line, symmetric about 0."""
    swept = [label for label in labels if label in set(sweep["label"])]
    pairs = per_pair.drop_duplicates("pair")
    true, years = pairs[f"true_change_{region}"].to_numpy(dtype=float), pairs["years"].to_numpy(dtype=float)
    rate = float(true @ years / (years @ years))
    last = float(sweep["years"].max())
    reach = 1.5 * abs(rate) * last or float((sweep["volume"] - sweep["volume_start"]).abs().max()) or 1.0
    direction = np.sign(true.mean())
    figure, axes = _grid(len(swept), height=2.8)
    for axis, label in zip(axes, swept):
        mine = sweep[sweep["label"] == label]
        for _, colour, rows in _diagnosis_groups(mine):
            for _, subject in mine[rows].groupby("subject_id"):
                subject = subject.sort_values("years")
                axis.plot(np.r_[0, subject["years"]], np.r_[0, subject["volume"] - subject["volume_start"]],
                          color=colour, marker="o", ms=3, lw=1)
        axis.plot([0, last], [0, rate * last], color="black", ls="--", lw=1)
        axis.axhline(0, color=COPY_COLOUR, lw=0.8, ls=":")
        axis.set_ylim(-reach, reach)
        subjects = mine["subject_id"].nunique()
        moving = round(monotonic_share(mine, direction) * subjects) if direction else 0
        verb = "grow" if direction >= 0 else "shrink"
        axis.set_title(f"{_panel_name(names[label])}\n{moving} of {subjects} {verb} at every step", fontsize=FONT)
    figure.supxlabel("years after the first scan", fontsize=FONT + 1)
    figure.supylabel(f"predicted {_words(region)} change (mL)", fontsize=FONT + 1)
    _legend(figure, sweep, lines=True, extra=[Line2D([], [], color="black", ls="--", label="truth's mean rate")])
    return figure
