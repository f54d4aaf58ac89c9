"""`neuroar evaluate`: every model on every held-out pair, the same way, with the trivial baselines beside.

Per pair (earlier -> later scan of a subject of the split) and output (forecasters.py: copy, tokenizer-copy,
the tokenizer-oracle, each model's outputs): PSNR, SSIM (3D, data range 1) and MAE inside MNI152's brain mask,
and per region the earlier scan's volume and the predicted and true change (both measured by
`volumes.regional_volumes`; predicted change = volume of the prediction - volume of the earlier scan).

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

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from neuroar.config import load_config
from neuroar.data.pairs import held_out_split
from neuroar.data.preprocess import load_preprocessed, template_brain_mask
from neuroar.errors import NeuroARError
from neuroar.evaluate.forecasters import TRIVIAL, Forecaster, ModelForecaster, Output, load_forecasters
from neuroar.evaluate.volumes import REGIONS, TemplateRegions, regional_volumes, template_regions
from neuroar.files import write_text
from neuroar.metrics import masked_mae, masked_psnr, masked_ssim
from neuroar.progress import Progress
from neuroar.runs import resolve_model
from neuroar.tables import markdown_table

IMAGE_METRICS = ("psnr", "ssim", "mae")
TESTED_METRICS = ("psnr", "ssim")  # tested against copy, beside each region's change error
COPY = Output("copy")
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
    chosen = region is None
    region = region or aging_region(per_pair)
    # A few subjects show the sweep's curves; all of them would cost nearly as much as the pairs themselves.
    swept = first_scans(run_dir, split, sorted(pairs["subject_id"].unique())[:sweep_subjects])
    models_only = [f for f in forecasters if isinstance(f, ModelForecaster)]
    sweep = age_sweep(models_only, swept, sweep_years, regions, region, seed, progress)
    summary = summarize(per_pair, sweep, region, seed)
    write_evaluation(Path(out_dir), per_pair, sweep, summary, split, chosen)
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
    """Every forecaster's outputs for every pair, one pair at a time (a split's predictions do not fit in memory
    at once). One prediction per earlier scan, at all its pairs' later ages: each target age draws the same
    random numbers however many ages are asked for, so this gives what predicting pair by pair gives, without
    predicting the earlier scan's own age ("aging") and encoding it again for every pair."""
    with Progress(total=len(pairs), desc="evaluate", unit="pair", enabled=progress) as bar:
        for earlier_path, group in pairs.groupby("earlier_path", sort=False):
            earlier_DHW = load_preprocessed(earlier_path)[0]
            later_DHWs = [load_preprocessed(path)[0] for path in group["later_path"]]
            first = group.iloc[0]
            outputs: dict[Output, list[np.ndarray]] = {}
            for forecaster in forecasters:
                outputs |= forecaster.predict(earlier_DHW, first["earlier_age"], list(group["later_age"]), seed,
                                              first.get("diagnosis"), later_DHWs)
            for i, (index, pair) in enumerate(group.iterrows()):
                yield PairPrediction(index, pair, earlier_DHW, later_DHWs[i],
                                     {output: volumes[i] for output, volumes in outputs.items()})
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
        for output, predicted_DHW in prediction.outputs.items():
            predicted = regional_volumes(predicted_DHW, regions)
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
                for target, predicted_DHW in zip(targets, predictions):
                    rows.append([output.label, output.model, output.variant, scan["subject_id"], scan["age"],
                                 target, target - scan["age"], region, start,
                                 regional_volumes(predicted_DHW, regions)[region]])
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


def plot_all(per_pair: pd.DataFrame, sweep: pd.DataFrame, region: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    labels = list(per_pair["label"].unique())
    figure = Figure(figsize=(4 * len(IMAGE_METRICS), 0.5 * len(labels) + 2.5), layout="constrained")
    for axis, metric in zip(figure.subplots(1, len(IMAGE_METRICS)), IMAGE_METRICS):
        axis.boxplot([per_pair.loc[per_pair["label"] == label, metric] for label in labels],
                     orientation="horizontal", tick_labels=labels)
        axis.set_xlabel(metric.upper())
    figure.savefig(folder / "metrics.png", dpi=100)

    figure = Figure(figsize=(4 * len(labels), 4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(labels), sharex=True, sharey=True))
    true = per_pair[f"true_change_{region}"]
    for axis, label in zip(axes, labels):
        group = per_pair[per_pair["label"] == label]
        axis.scatter(group[f"true_change_{region}"], group[f"predicted_change_{region}"], s=14)
        axis.plot([true.min(), true.max()], [true.min(), true.max()], color="grey", lw=1)
        axis.set_title(label, fontsize=9)
        axis.set_xlabel(f"true {_words(region)} change (mL)")
    axes[0].set_ylabel(f"predicted {_words(region)} change (mL)")
    figure.savefig(folder / "change.png", dpi=100)

    figure = Figure(figsize=(6, 4), layout="constrained")
    axis = figure.subplots()
    for label in labels:
        group = per_pair[per_pair["label"] == label]
        axis.scatter(group["years"], group["psnr"], s=12, label=label)
    axis.set_xlabel("years between scans")
    axis.set_ylabel("PSNR (dB)")
    axis.legend(fontsize=7)
    figure.savefig(folder / "psnr_vs_years.png", dpi=100)

    if len(sweep):
        swept = list(sweep["label"].unique())
        figure = Figure(figsize=(4 * len(swept), 4), layout="constrained")
        for axis, label in zip(np.atleast_1d(figure.subplots(1, len(swept), sharey=True)), swept):
            for _, group in sweep[sweep["label"] == label].groupby("subject_id"):
                axis.plot(np.r_[0, group["years"]], np.r_[group["volume_start"].iloc[0], group["volume"]],
                          marker="o", ms=3)
            axis.set_title(label, fontsize=9)
            axis.set_xlabel("years after the first scan")
        figure.axes[0].set_ylabel(f"predicted {_words(region)} volume (mL)")
        figure.savefig(folder / "age_sweep.png", dpi=100)
