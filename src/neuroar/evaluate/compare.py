"""`neuroar evaluate`: every model on every held-out pair, the same way, with the trivial baselines beside.

Per pair (earlier -> later scan of a subject of the split) and model output (with the tokenizer-oracle, the
bound that the tokenizer sets on every token model): PSNR, SSIM (3D, data range 1)
and MAE inside MNI152's brain mask, and the predicted and true change of each region's volume (both
measured by `volumes.regional_volumes`, predicted change = volume of the prediction - volume of the earlier
scan). Summary per model: mean +- std and a bootstrap 95% CI of the mean for each image metric, a paired
Wilcoxon test against the reference model (the first NeuroAR model), and per region the Pearson r and the
mean absolute error of predicted vs true change. An age sweep (the first scan of the split's first
`sweep_subjects` subjects predicted at several later ages) shows whether predicted ventricles grow monotonically.
Writes OUT/pairs.csv, OUT/summary.csv, OUT/summary.md, OUT/sweep.csv and OUT/figures/*.png.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from neuroar.config import load_config
from neuroar.data.preprocess import load_preprocessed, template_brain_mask
from neuroar.errors import NeuroARError
from neuroar.evaluate.forecasters import TRIVIAL, ModelForecaster, TokenizerCopy, load_forecasters
from neuroar.evaluate.volumes import REGIONS, regional_volumes, template_regions
from neuroar.files import write_text
from neuroar.metrics import masked_mae, masked_psnr, masked_ssim
from neuroar.progress import Progress
from neuroar.runs import resolve_model

IMAGE_METRICS = ("psnr", "ssim", "mae")
# Predicted changes that all lie within this many mL of each other are no change (a latent StarGAN that stays
# the identity moves volumes by ~0.01 mL through decoding noise): their correlation with the truth is undefined.
NO_CHANGE_ML = 0.05


def evaluate_models(models: Sequence[str], out_dir: str | Path, run_dir: str | Path | None = None,
                    split: str = "test", samples: int | None = None, seed: int = 0,
                    sweep_years: Sequence[float] = (1, 2, 4, 6, 8), progress: bool = True,
                    sampling: Sequence[str] = (), subjects: int | None = None,
                    sweep_subjects: int | None = 10) -> pd.DataFrame:
    """Evaluate and write everything to `out_dir` (on the split's first `subjects` subjects, or all); returns
    the summary table."""
    trained = [m for m in models if m not in TRIVIAL]
    if run_dir is None:
        if not trained:
            raise NeuroARError("give a trained model folder, or --run RUN to evaluate only the trivial baselines.")
        run_dir = resolve_model(trained[0])[0]
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = load_config(run_dir / "config.yaml")
    pairs = pd.read_csv(run_dir / "pairs.csv", dtype={"subject_id": str}, keep_default_na=False)
    pairs = pairs[pairs["split"] == split].reset_index(drop=True)
    if pairs.empty:
        raise NeuroARError(f"{run_dir}/pairs.csv has no pairs in the {split!r} split; choose another --split.")
    if subjects is not None:
        chosen = sorted(pairs["subject_id"].unique())[:subjects]
        pairs = pairs[pairs["subject_id"].isin(chosen)].reset_index(drop=True)
    brain, regions = template_brain_mask(config.data), template_regions(config.data)
    forecasters = load_forecasters(trained, run_dir, config, samples, sampling)
    measured: dict[str, dict[str, float]] = {}

    def volumes_of(path: str, volume_DHW: np.ndarray) -> dict[str, float]:
        if path not in measured:
            measured[path] = regional_volumes(volume_DHW, regions)
        return measured[path]

    # One prediction per earlier scan, at all its pairs' later ages: each target age draws the same random numbers
    # however many ages are asked for, so this gives what predicting pair by pair gives, without sampling the
    # earlier scan's own age (+aging) and encoding it again for every pair.
    rows_of_pair: dict[int, list[dict]] = {}
    with Progress(total=len(pairs), desc=f"evaluate {split}", unit="pair", enabled=progress) as bar:
        for earlier_path, group in pairs.groupby("earlier_path", sort=False):
            earlier_DHW = load_preprocessed(earlier_path)[0]
            later_DHWs = [load_preprocessed(path)[0] for path in group["later_path"]]
            before = volumes_of(earlier_path, earlier_DHW)
            predictions: dict[str, list[np.ndarray]] = {}
            for forecaster in forecasters:
                predictions |= forecaster.predict(earlier_DHW, group["earlier_age"].iloc[0],
                                                  list(group["later_age"]), seed, group.iloc[0].get("diagnosis"))
                if isinstance(forecaster, TokenizerCopy):
                    copies = predictions["tokenizer-copy"]
                    predictions["tokenizer-oracle"] = [forecaster.oracle(earlier_DHW, later_DHW, copy_DHW)
                                                       for later_DHW, copy_DHW in zip(later_DHWs, copies)]
            for i, (index, pair) in enumerate(group.iterrows()):
                after = volumes_of(pair["later_path"], later_DHWs[i])
                rows_of_pair[index] = [_pair_row(name, outputs[i], pair, later_DHWs[i], before, after, brain, regions)
                                       for name, outputs in predictions.items()]
                bar.update()
    rows = [row for index in sorted(rows_of_pair) for row in rows_of_pair[index]]
    per_pair = pd.DataFrame(rows)
    reference = next((n for n in per_pair["model"].unique() if n not in TRIVIAL and "+" not in n), None)
    models_only = [f for f in forecasters if isinstance(f, ModelForecaster)]
    # A few subjects show the sweep's curves; all of them would cost nearly as much as the pairs themselves.
    swept = sorted(pairs["subject_id"].unique())[:sweep_subjects]
    sweep = age_sweep(models_only, run_dir, split, sweep_years, regions, seed, progress, set(swept))
    summary = summarize(per_pair, reference, sweep, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "pairs.csv", per_pair.to_csv(index=False))
    write_text(out_dir / "sweep.csv", sweep.to_csv(index=False))
    write_text(out_dir / "summary.csv", summary.to_csv(index=False))
    write_text(out_dir / "summary.md", summary_markdown(summary, per_pair, split, reference))
    plot_all(per_pair, sweep, out_dir / "figures")
    return summary


def _pair_row(name: str, predicted_DHW: np.ndarray, pair: pd.Series, later_DHW: np.ndarray,
              before: dict[str, float], after: dict[str, float], brain: np.ndarray, regions) -> dict:
    predicted = regional_volumes(predicted_DHW, regions)
    return {"model": name, "subject_id": pair["subject_id"], "earlier_age": pair["earlier_age"],
            "later_age": pair["later_age"], "years": pair["years"],
            "psnr": masked_psnr(predicted_DHW, later_DHW, brain), "ssim": masked_ssim(predicted_DHW, later_DHW, brain),
            "mae": masked_mae(predicted_DHW, later_DHW, brain),
            **{f"true_change_{r}": after[r] - before[r] for r in REGIONS},
            **{f"predicted_change_{r}": predicted[r] - before[r] for r in REGIONS}}


def age_sweep(forecasters, run_dir: Path, split: str, years: Sequence[float], regions, seed: int,
              progress: bool, subjects: set[str]) -> pd.DataFrame:
    """Each given subject's first scan of the split predicted at first age + `years`: ventricle volume per age."""
    scans = pd.read_csv(run_dir / "scans.csv", dtype={"subject_id": str}, keep_default_na=False)
    scans = scans[(scans["split"] == split) & scans["subject_id"].isin(subjects)]
    firsts = scans.sort_values("age").groupby("subject_id").head(1)
    rows = []
    for scan in Progress(firsts.to_dict("records"), desc="age sweep", unit="subject",
                         enabled=progress and bool(forecasters)):
        volume_DHW = load_preprocessed(scan["preprocessed"])[0]
        start = regional_volumes(volume_DHW, regions)["ventricles"]
        targets = [scan["age"] + y for y in years]
        for forecaster in forecasters:
            for name, predictions in forecaster.predict(volume_DHW, scan["age"], targets, seed,
                                                        scan.get("diagnosis")).items():
                for target, predicted_DHW in zip(targets, predictions):
                    rows.append({"model": name, "subject_id": scan["subject_id"], "age": scan["age"],
                                 "target_age": target, "years": target - scan["age"], "ventricles_start": start,
                                 "ventricles": regional_volumes(predicted_DHW, regions)["ventricles"]})
    return pd.DataFrame(rows, columns=["model", "subject_id", "age", "target_age", "years", "ventricles_start",
                                       "ventricles"])


def summarize(per_pair: pd.DataFrame, reference: str | None, sweep: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    rows = []
    for name, group in per_pair.groupby("model", sort=False):
        row: dict[str, object] = {"model": name, "pairs": len(group)}
        for metric in IMAGE_METRICS:
            values = group[metric].to_numpy(dtype=float)
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(values)
            row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = bootstrap_ci(values, seed)
            row[f"{metric}_p_vs_reference"] = paired_wilcoxon(per_pair, name, reference, metric)
        for region in REGIONS:
            predicted, true = group[f"predicted_change_{region}"], group[f"true_change_{region}"]
            row[f"{region}_change_r"] = pearson(predicted, true)
            row[f"{region}_change_mae"] = float((predicted - true).abs().mean())
            # Mean and spread beside the truth's: a change that is sampling noise has a wide spread around 0.
            row[f"{region}_change_mean"], row[f"{region}_change_std"] = mean_std(predicted.to_numpy(dtype=float))
            row[f"{region}_true_change_mean"], row[f"{region}_true_change_std"] = mean_std(true.to_numpy(dtype=float))
        mine = sweep[sweep["model"] == name]
        row["sweep_monotonic"] = monotonic_share(mine) if len(mine) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def bootstrap_ci(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    if len(values) < 2 or np.ptp(values) == 0:
        return float(values.mean()), float(values.mean())
    result = stats.bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=2000,
                             random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_wilcoxon(per_pair: pd.DataFrame, name: str, reference: str | None, metric: str) -> float:
    """Two-sided p of a paired Wilcoxon signed-rank test of `name` against `reference` on the same pairs."""
    if reference is None or name == reference:
        return np.nan
    a = per_pair.loc[per_pair["model"] == name, metric].to_numpy(dtype=float)
    b = per_pair.loc[per_pair["model"] == reference, metric].to_numpy(dtype=float)
    if len(a) != len(b) or len(a) < 2 or np.all(a == b) or not np.isfinite(a - b).all():
        return np.nan
    return float(stats.wilcoxon(a, b).pvalue)


def pearson(predicted: pd.Series, true: pd.Series) -> float:
    if len(predicted) < 3 or np.ptp(predicted.to_numpy()) < NO_CHANGE_ML or np.ptp(true.to_numpy()) == 0:
        return np.nan
    return float(stats.pearsonr(predicted, true).statistic)


def monotonic_share(sweep: pd.DataFrame) -> float:
    """Share of subjects whose predicted ventricle volume rises at every step of the sweep."""
    rising = [bool(np.all(np.diff(g.sort_values("target_age")["ventricles"].to_numpy()) > 0))
              for _, g in sweep.groupby("subject_id")]
    return float(np.mean(rising))


def summary_markdown(summary: pd.DataFrame, per_pair: pd.DataFrame, split: str, reference: str | None) -> str:
    def cell(row, metric, digits):
        return (f"{row[f'{metric}_mean']:.{digits}f} ± {row[f'{metric}_std']:.{digits}f} "
                f"[{row[f'{metric}_ci_low']:.{digits}f}, {row[f'{metric}_ci_high']:.{digits}f}]")

    def number(value, digits=2):
        return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"

    first = summary.iloc[0]
    lines = [f"# Evaluation on the {split} split", "",
             f"{per_pair['subject_id'].nunique()} subjects, {summary['pairs'].iloc[0]} pairs, "
             f"{per_pair['years'].min():.1f}-{per_pair['years'].max():.1f} years apart. Image metrics inside the "
             "MNI152 brain mask, data range 1: mean ± std [bootstrap 95% CI]. p: paired Wilcoxon against "
             f"{reference or '(no trained model)'}. Ventricle change: Pearson r and mean absolute error (mL) of "
             "predicted vs true change, and the predicted change's mean ± std over pairs (true: "
             f"{first['ventricles_true_change_mean']:+.2f} ± {first['ventricles_true_change_std']:.2f} mL). Sweep: "
             "share of subjects whose predicted ventricles grow at every step.",
             "", "| model | PSNR (dB) | p | SSIM | p | MAE | ventricle change r | ventricle change MAE (mL) | "
             "ventricle change (mL) | sweep monotonic |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary.to_dict("records"):
        lines.append(f"| {row['model']} | {cell(row, 'psnr', 2)} | {number(row['psnr_p_vs_reference'], 3)} | "
                     f"{cell(row, 'ssim', 3)} | {number(row['ssim_p_vs_reference'], 3)} | {cell(row, 'mae', 4)} | "
                     f"{number(row['ventricles_change_r'])} | {number(row['ventricles_change_mae'])} | "
                     f"{row['ventricles_change_mean']:+.2f} ± {row['ventricles_change_std']:.2f} | "
                     f"{number(row['sweep_monotonic'])} |")
    lines += ["", "Volume change per region: Pearson r (MAE in mL) of predicted vs true change.", "",
              "| model | " + " | ".join(REGIONS) + " |", "|---" * (len(REGIONS) + 1) + "|"]
    for row in summary.to_dict("records"):
        cells = [f"{number(row[f'{r}_change_r'])} ({number(row[f'{r}_change_mae'])})" for r in REGIONS]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_all(per_pair: pd.DataFrame, sweep: pd.DataFrame, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    models = list(per_pair["model"].unique())
    figure = Figure(figsize=(4 * len(IMAGE_METRICS), 0.5 * len(models) + 2.5), layout="constrained")
    for axis, metric in zip(figure.subplots(1, len(IMAGE_METRICS)), IMAGE_METRICS):
        axis.boxplot([per_pair.loc[per_pair["model"] == m, metric] for m in models], orientation="horizontal",
                     tick_labels=models)
        axis.set_xlabel(metric.upper())
    figure.savefig(folder / "metrics.png", dpi=100)

    figure = Figure(figsize=(4 * len(models), 4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(models), sharex=True, sharey=True))
    for axis, model in zip(axes, models):
        group = per_pair[per_pair["model"] == model]
        axis.scatter(group["true_change_ventricles"], group["predicted_change_ventricles"], s=14)
        low, high = per_pair["true_change_ventricles"].min(), per_pair["true_change_ventricles"].max()
        axis.plot([low, high], [low, high], color="grey", lw=1)
        axis.set_title(model, fontsize=9)
        axis.set_xlabel("true ventricle change (mL)")
    axes[0].set_ylabel("predicted ventricle change (mL)")
    figure.savefig(folder / "ventricle_change.png", dpi=100)

    figure = Figure(figsize=(6, 4), layout="constrained")
    axis = figure.subplots()
    for model in models:
        group = per_pair[per_pair["model"] == model]
        axis.scatter(group["years"], group["psnr"], s=12, label=model)
    axis.set_xlabel("years between scans")
    axis.set_ylabel("PSNR (dB)")
    axis.legend(fontsize=7)
    figure.savefig(folder / "psnr_vs_years.png", dpi=100)

    if len(sweep):
        names = list(sweep["model"].unique())
        figure = Figure(figsize=(4 * len(names), 4), layout="constrained")
        for axis, model in zip(np.atleast_1d(figure.subplots(1, len(names), sharey=True)), names):
            for _, group in sweep[sweep["model"] == model].groupby("subject_id"):
                axis.plot(np.r_[0, group["years"]], np.r_[group["ventricles_start"].iloc[0], group["ventricles"]],
                          marker="o", ms=3)
            axis.set_title(model, fontsize=9)
            axis.set_xlabel("years after the first scan")
        figure.axes[0].set_ylabel("predicted ventricle volume (mL)")
        figure.savefig(folder / "age_sweep.png", dpi=100)
