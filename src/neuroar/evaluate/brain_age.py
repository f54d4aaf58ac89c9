"""The brain-age experiment of the paper: does adding model-synthetic scans to a brain-age regressor's
training data help it on real scans?

An SFCN-style regressor (models/sfcn.py) is trained, for each of `brain_age.seeds` seeds, (a) on the run's
real training scans and (b) for each given model, on those plus synthetic scans: each training scan's
follow-up predicted by the model (NeuroAR by default; any model folder works) at the scan's age +
`brain_age.synthetic_years`, ages at which the subject was not scanned (by default the predicted change added
to the real scan, `brain_age.synthetic_output`). All are evaluated on the real test scans (MAE, R2).

A seed's regressors differ by the synthetic scans alone: the same age bins (from the real training scans, so
that the real-only regressor does not move with the models compared), the same initial weights, and the same
real scans at every step, each with its synthetic scans beside it (`train_regressor`). So each model is
compared with real scans alone by a paired t-test over seeds, seed with seed, and the p-values of all the
tests a table reports (each model, MAE and R2) are Holm-Bonferroni-adjusted as one family.

Each model's synthetic scans are cached in OUT/synthetic/NAME.safetensors, keyed by the model's checkpoint and
the settings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import stats
from sklearn.metrics import mean_absolute_error, r2_score

from neuroar.config import Config
from neuroar.data.fingerprint import check_model_fits_run
from neuroar.data.pairs import held_out_split
from neuroar.data.preprocess import load_preprocessed
from neuroar.errors import NeuroARError
from neuroar.files import atomic_path, sha256_json, write_json, write_text
from neuroar.models.sfcn import SFCN
from neuroar.progress import Progress
from neuroar.runs import resolve_model
from neuroar.tables import markdown_table
from neuroar.train.loop import batch_indices, learning_rate, set_learning_rate

REAL = "real"
METRICS = ("mae", "r2")
BIN_MARGIN = 5.0  # years of bins below the youngest and above the oldest real training scan
SYNTHETIC_BATCH = 16  # scans predicted together by a model that batches scans (the baselines; NeuroAR goes one by one)


def synthetic_condition(name: str) -> str:
    """The training set of real scans plus model `name`'s synthetic ones."""
    return f"real + synthetic ({name})"


def run_brain_age(run_dir: str | Path, config: Config, models: Sequence[str | Path] = (),
                  out_dir: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Train and evaluate the regressors on real scans and, for each of `models` (default: the run's NeuroAR),
    on real + that model's synthetic scans; writes OUT/results.csv (one row per seed and training set),
    OUT/predictions.csv (one row per seed, training set and test scan) and OUT/summary.md (mean +- std over
    seeds, paired t-tests against real alone, raw and Holm-Bonferroni-adjusted); returns the results."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "brain_age"
    settings = config.brain_age
    scans = pd.read_csv(run_dir / "scans.csv", dtype={"subject_id": str, "session_id": str},
                        keep_default_na=False)
    train = scans[scans["split"] == "train"]
    test_split = held_out_split(scans)
    test = scans[scans["split"] == test_split]
    if train.empty or test.empty:
        raise NeuroARError(f"{run_dir}/scans.csv needs training and test (or validation) scans for the brain-age "
                           "experiment.")
    real_x, real_age = _volumes(train, settings.downsample), torch.tensor(train["age"].to_numpy(), dtype=torch.float32)
    test_x, test_age = _volumes(test, settings.downsample), test["age"].to_numpy(dtype=float)
    added: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {REAL: None}  # synthetic scans per training set
    for model in models or [run_dir]:
        model_run, name = resolve_model(model)
        # A model that learnt from what are now test scans would make its synthetic scans from them.
        check_model_fits_run(model_run / name / "last", model_run)
        if synthetic_condition(name) in added:
            raise NeuroARError(f"two of the brain-age models are named {name!r}; give models of different names.")
        added[synthetic_condition(name)] = synthetic_scans(model, train, config, out_dir, progress)
    bins = age_bins(real_age, settings.bin_width)
    rows, predictions = [], []
    for seed in Progress(range(settings.seeds), desc="brain age", unit="seed", enabled=progress):
        for condition, synthetic in added.items():
            regressor = train_regressor(real_x, real_age, bins, config, seed, synthetic)
            predicted = predict_ages(regressor, test_x).astype(float)  # float64, as written to the CSV
            rows.append({"training": condition, "seed": seed,
                         "training_scans": len(real_x) + (0 if synthetic is None else synthetic[1].numel()),
                         "test_scans": len(test), "mae": mean_absolute_error(test_age, predicted),
                         "r2": r2_score(test_age, predicted)})
            predictions.append(pd.DataFrame({"training": condition, "seed": seed,
                                             "subject_id": test["subject_id"].to_numpy(),
                                             "session_id": test["session_id"].to_numpy(), "age": test_age,
                                             "predicted_age": predicted}))
    results = pd.DataFrame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "results.csv", results.to_csv(index=False))
    write_text(out_dir / "predictions.csv", pd.concat(predictions, ignore_index=True).to_csv(index=False))
    write_text(out_dir / "summary.md", summary_markdown(results, test_split))
    return results


def age_bins(real_ages_N: torch.Tensor, width: float) -> torch.Tensor:
    """Centres of `width`-year bins from `BIN_MARGIN` years below the youngest to as many above the oldest of
    the real training scans. The real scans' alone: the real-only regressor must not change with the models
    compared (a synthetic scan older than the last bin is labelled towards the last bins)."""
    low = np.floor(float(real_ages_N.min())) - BIN_MARGIN
    high = np.ceil(float(real_ages_N.max())) + BIN_MARGIN
    return torch.arange(low, high + 1e-6, width) + width / 2


def synthetic_scans(model: str | Path, train: pd.DataFrame, config: Config, out_dir: Path, progress: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each training scan's predicted follow-ups at its age + `synthetic_years` (one sample each, the model's
    own sampling settings; the `synthetic_output` kind), downsampled like the real scans: (N, K, 1, d, h, w) for
    the N training scans and K `synthetic_years`, and their ages (N, K)."""
    from neuroar.predict import Predictor

    settings = config.brain_age
    run_dir, name = resolve_model(model)
    checkpoint = json.loads((run_dir / name / "last.json").read_text())
    key = sha256_json({"checkpoint": checkpoint, "years": list(settings.synthetic_years), "seed": config.seed,
                       "output": settings.synthetic_output, "downsample": settings.downsample,
                       "scans": list(train["preprocessed"])})
    path = out_dir / "synthetic" / f"{name}.safetensors"
    meta_path = path.with_suffix(".json")
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        tensors = load_file(str(path))
        return _per_scan(tensors, len(train))
    predictor = Predictor.from_checkpoint(model)
    volumes, ages = [], []
    scans = train.to_dict("records")
    # Scan i draws from seed config.seed * 100_003 + i, so its synthetic scans do not depend on the batch it is in.
    with Progress(desc=f"synthetic scans ({name})", unit="scan", total=len(scans), enabled=progress) as bar:
        for start in range(0, len(scans), SYNTHETIC_BATCH):
            chunk = scans[start:start + SYNTHETIC_BATCH]
            targets = [[scan["age"] + years for years in settings.synthetic_years] for scan in chunk]
            outputs = predictor.predict_scans([load_preprocessed(scan["preprocessed"])[0] for scan in chunk],
                                              [scan["age"] for scan in chunk], targets, samples=1,
                                              seeds=[config.seed * 100_003 + start + i for i in range(len(chunk))],
                                              diagnoses=[scan.get("diagnosis") for scan in chunk],
                                              batch=SYNTHETIC_BATCH)
            for scan_targets, scan_outputs in zip(targets, outputs):
                for target, (decoded_DHW, _, detail_DHW) in zip(scan_targets, scan_outputs):
                    chosen_DHW = detail_DHW if settings.synthetic_output == "detail" else decoded_DHW
                    volumes.append(_downsample(torch.from_numpy(np.ascontiguousarray(chosen_DHW)), settings.downsample))
                    ages.append(target)
            bar.update(len(chunk))
    tensors = {"volumes": torch.stack(volumes).contiguous(), "ages": torch.tensor(ages, dtype=torch.float32)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    write_json(meta_path, {"key": key, "model": str(model), "scans": len(volumes)})
    return _per_scan(tensors, len(train))


def _per_scan(tensors: dict[str, torch.Tensor], scans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached scans, stored one after another (scan by scan, then year), as (N, K, ...)."""
    return tensors["volumes"].unflatten(0, (scans, -1)), tensors["ages"].unflatten(0, (scans, -1))


def train_regressor(x_N1DHW: torch.Tensor, ages_N: torch.Tensor, bins: torch.Tensor, config: Config, seed: int,
                    synthetic: tuple[torch.Tensor, torch.Tensor] | None = None) -> SFCN:
    """An SFCN trained on real scans (N, 1, D, H, W) of ages (N,) and, given `synthetic` (K scans per real one,
    (N, K, 1, D, H, W), and their ages (N, K)), on those too. A step takes the real scans that the real-only
    regressor of the same seed takes at that step and, with them, their synthetic scans (B (1 + K) scans): the
    two regressors of a seed start from the same weights and see the same real scans in the same order, so
    that they differ by the synthetic scans alone (and every scan, real or synthetic, is seen equally often)."""
    settings = config.brain_age
    torch.manual_seed(seed)
    model = SFCN(settings.channels, bins)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=1e-3)
    model.train()
    for step in range(settings.steps):
        set_learning_rate([optimizer], learning_rate(step, settings.lr, settings.steps // 20, settings.steps))
        rows = batch_indices(len(x_N1DHW), step, settings.batch_size, seed)
        x_B1DHW, ages_B = x_N1DHW[rows], ages_N[rows]
        if synthetic is not None:
            x_B1DHW = torch.cat([x_B1DHW, synthetic[0][rows].flatten(0, 1)])
            ages_B = torch.cat([ages_B, synthetic[1][rows].flatten()])
        log_probs = model(x_B1DHW)
        loss = F.kl_div(log_probs, model.soft_labels(ages_B, settings.label_sigma), reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def predict_ages(model: SFCN, x_N1DHW: torch.Tensor, chunk: int = 16) -> np.ndarray:
    return torch.cat([model.age(model(x_N1DHW[i:i + chunk])) for i in range(0, len(x_N1DHW), chunk)]).numpy()


def compare_with_real(results: pd.DataFrame) -> pd.DataFrame:
    """Per training set of `results` (`run_brain_age`'s rows; in their order): its seeds, MAE and R2 over seeds
    (mean, std) and, for each training set but real, the raw two-sided p of a paired t-test of each metric
    against real alone over the seeds, each seed's regressor with real's of the same seed (`METRIC_p_vs_real`;
    NaN for real, and with fewer than two seeds)."""
    real = results[results["training"] == REAL].set_index("seed")
    rows = []
    for training, runs in results.groupby("training", sort=False):
        runs = runs.set_index("seed")
        if set(runs.index) != set(real.index) or not runs.index.is_unique:
            raise NeuroARError(f"the brain-age results have {training!r} with seeds {sorted(runs.index)} and "
                               f"{REAL!r} with {sorted(real.index)}; a paired test needs each seed once in both.")
        runs = runs.loc[real.index]
        row = {"training": training, "seeds": len(runs)}
        paired = training != REAL and len(runs) > 1
        for metric in METRICS:
            row |= {metric: runs[metric].mean(), f"{metric}_std": runs[metric].std(ddof=1),
                    f"{metric}_p_vs_real": (float(stats.ttest_rel(runs[metric], real[metric]).pvalue) if paired
                                            else float("nan"))}
        rows.append(row)
    return pd.DataFrame(rows)


def holm_adjusted(table: pd.DataFrame) -> pd.DataFrame:
    """`table` (rows of `compare_with_real`, of one run or several) with `METRIC_p_vs_real_holm` columns added
    last: all its `METRIC_p_vs_real` Holm-Bonferroni-adjusted as one family, every training set and metric."""
    columns = [f"{metric}_p_vs_real" for metric in METRICS]
    adjusted = holm(table[columns].to_numpy(dtype=float).ravel()).reshape(len(table), len(columns))
    return table.assign(**{f"{column}_holm": adjusted[:, i] for i, column in enumerate(columns)})


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (Holm 1979) of a family of m tests: the i-th smallest p (i from 0)
    times m - i, made non-decreasing in that order, at most 1. A NaN (no test) is not counted and stays NaN."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * (len(order) - np.arange(len(order)))))
    return adjusted


def summary_markdown(results: pd.DataFrame, split: str) -> str:
    table = holm_adjusted(compare_with_real(results))
    tests = int(table[[f"{metric}_p_vs_real" for metric in METRICS]].notna().to_numpy().sum())
    scans = results.groupby("training", sort=False)["training_scans"].first()
    rows = [[row.training, int(scans[row.training]), f"{row.mae:.2f} ± {row.mae_std:.2f}", _p(row.mae_p_vs_real),
             _p(row.mae_p_vs_real_holm), f"{row.r2:.3f} ± {row.r2_std:.3f}", _p(row.r2_p_vs_real),
             _p(row.r2_p_vs_real_holm)] for row in table.itertuples(index=False)]
    lines = [f"# Brain age ({split} scans)", "",
             markdown_table(["training data", "training scans", "MAE (years)", "p", "p (Holm)", "R2", "p",
                             "p (Holm)"], rows)]
    tested = (f"raw and Holm-Bonferroni-adjusted over the {tests} tests of this table" if tests
              else "none here: it needs two seeds or more")
    lines += ["", f"Mean ± standard deviation over {results['seed'].nunique()} seeds; "
              f"{int(results['test_scans'].iloc[0])} real test scans. p: two-sided paired t-test against "
              "real scans alone over the seeds (a seed's regressors share their initial weights and real "
              f"batches), {tested}.", ""]
    return "\n".join(lines)


def _p(value: float) -> str:
    return "–" if np.isnan(value) else f"{value:.2g}"


def _volumes(scans: pd.DataFrame, downsample: int) -> torch.Tensor:
    return torch.stack([_downsample(torch.from_numpy(load_preprocessed(p)[0]), downsample)
                        for p in scans["preprocessed"]])


def _downsample(volume_DHW: torch.Tensor, factor: int) -> torch.Tensor:
    return F.avg_pool3d(volume_DHW[None, None].float(), factor)[0] if factor > 1 else volume_DHW[None].float()
