"""The brain-age experiment of the paper: does adding model-synthetic scans to a brain-age regressor's
training data help it on real scans?

An SFCN-style regressor (models/sfcn.py) is trained, for each of `brain_age.seeds` seeds, (a) on the run's
real training scans and (b) for each given model, on those plus synthetic scans: each training scan's
follow-up predicted by the model (NeuroAR by default; any model folder works) at the scan's age +
`brain_age.synthetic_years`, ages at which the subject was not scanned (by default the predicted change added
to the real scan, `brain_age.synthetic_output`). All are evaluated on the real test scans (MAE, R2). Each
model's synthetic scans are cached in OUT/synthetic/NAME.safetensors, keyed by the model's checkpoint and the
settings.
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
from sklearn.metrics import mean_absolute_error, r2_score

from neuroar.config import Config
from neuroar.data.preprocess import load_preprocessed
from neuroar.errors import NeuroARError
from neuroar.files import atomic_path, sha256_json, write_json, write_text
from neuroar.models.sfcn import SFCN
from neuroar.progress import Progress
from neuroar.runs import resolve_model
from neuroar.train.loop import batch_indices, learning_rate, set_learning_rate

REAL = "real"


def synthetic_condition(name: str) -> str:
    """The training set of real scans plus model `name`'s synthetic ones."""
    return f"real + synthetic ({name})"


def run_brain_age(run_dir: str | Path, config: Config, models: Sequence[str | Path] = (),
                  out_dir: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Train and evaluate the regressors on real scans and, for each of `models` (default: the run's NeuroAR),
    on real + that model's synthetic scans; writes OUT/results.csv (one row per seed and training set) and
    OUT/summary.md (mean +- std over seeds); returns the results."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "brain_age"
    settings = config.brain_age
    scans = pd.read_csv(run_dir / "scans.csv", dtype={"subject_id": str}, keep_default_na=False)
    train = scans[scans["split"] == "train"]
    test_split = "test" if (scans["split"] == "test").any() else "val"
    test = scans[scans["split"] == test_split]
    if train.empty or test.empty:
        raise NeuroARError(f"{run_dir}/scans.csv needs training and test (or validation) scans for the brain-age "
                           "experiment.")
    real_x, real_age = _volumes(train, settings.downsample), torch.tensor(train["age"].to_numpy(), dtype=torch.float32)
    test_x, test_age = _volumes(test, settings.downsample), test["age"].to_numpy(dtype=float)
    training_sets = {REAL: (real_x, real_age)}
    for model in models or [run_dir]:
        name = resolve_model(model)[1]
        if synthetic_condition(name) in training_sets:
            raise NeuroARError(f"two of the brain-age models are named {name!r}; give models of different names.")
        synthetic_x, synthetic_age = synthetic_scans(model, train, config, out_dir, progress)
        training_sets[synthetic_condition(name)] = (torch.cat([real_x, synthetic_x]),
                                                    torch.cat([real_age, synthetic_age]))
    every_age = torch.cat([ages for _, ages in training_sets.values()])
    bins = torch.arange(np.floor(float(every_age.min())) - 5, np.ceil(float(every_age.max())) + 5 + 1e-6,
                        settings.bin_width) + settings.bin_width / 2
    rows = []
    for seed in Progress(range(settings.seeds), desc="brain age", unit="seed", enabled=progress):
        for condition, (x, ages) in training_sets.items():
            regressor = train_regressor(x, ages, bins, config, seed)
            predicted = predict_ages(regressor, test_x)
            rows.append({"training": condition, "seed": seed, "training_scans": len(x), "test_scans": len(test),
                         "mae": mean_absolute_error(test_age, predicted), "r2": r2_score(test_age, predicted)})
    results = pd.DataFrame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "results.csv", results.to_csv(index=False))
    write_text(out_dir / "summary.md", summary_markdown(results, test_split))
    return results


def synthetic_scans(model: str | Path, train: pd.DataFrame, config: Config, out_dir: Path, progress: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each training scan's predicted follow-ups at its age + `synthetic_years` (one sample each, the model's
    own sampling settings; the `synthetic_output` kind), downsampled like the real scans: (N, 1, d, h, w) and
    their ages (N,)."""
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
        return tensors["volumes"], tensors["ages"]
    predictor = Predictor.from_checkpoint(model)
    volumes, ages = [], []
    for i, scan in enumerate(Progress(train.to_dict("records"), desc=f"synthetic scans ({name})", unit="scan",
                                  enabled=progress)):
        targets = [scan["age"] + years for years in settings.synthetic_years]
        outputs = predictor.predict_preprocessed(load_preprocessed(scan["preprocessed"])[0], scan["age"], targets,
                                                 samples=1, seed=config.seed * 100_003 + i,
                                                 diagnosis=scan.get("diagnosis"))
        for target, (decoded_DHW, _, detail_DHW) in zip(targets, outputs):
            chosen_DHW = detail_DHW if settings.synthetic_output == "detail" else decoded_DHW
            volumes.append(_downsample(torch.from_numpy(np.ascontiguousarray(chosen_DHW)), settings.downsample))
            ages.append(target)
    tensors = {"volumes": torch.stack(volumes).contiguous(), "ages": torch.tensor(ages, dtype=torch.float32)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    write_json(meta_path, {"key": key, "model": str(model), "scans": len(volumes)})
    return tensors["volumes"], tensors["ages"]


def train_regressor(x_N1DHW: torch.Tensor, ages_N: torch.Tensor, bins: torch.Tensor, config: Config, seed: int
                    ) -> SFCN:
    settings = config.brain_age
    torch.manual_seed(seed)
    model = SFCN(settings.channels, bins)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=1e-3)
    model.train()
    for step in range(settings.steps):
        set_learning_rate([optimizer], learning_rate(step, settings.lr, settings.steps // 20, settings.steps))
        rows = batch_indices(len(x_N1DHW), step, settings.batch_size, seed)
        log_probs = model(x_N1DHW[rows])
        loss = F.kl_div(log_probs, model.soft_labels(ages_N[rows], settings.label_sigma), reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def predict_ages(model: SFCN, x_N1DHW: torch.Tensor, chunk: int = 16) -> np.ndarray:
    return torch.cat([model.age(model(x_N1DHW[i:i + chunk])) for i in range(0, len(x_N1DHW), chunk)]).numpy()


def summary_markdown(results: pd.DataFrame, split: str) -> str:
    lines = [f"# Brain age ({split} scans)", "",
             "| training data | training scans | MAE (years) | R2 |", "|---|---|---|---|"]
    for condition, group in results.groupby("training", sort=False):
        lines.append(f"| {condition} | {int(group['training_scans'].iloc[0])} | "
                     f"{group['mae'].mean():.2f} ± {group['mae'].std(ddof=1):.2f} | "
                     f"{group['r2'].mean():.3f} ± {group['r2'].std(ddof=1):.3f} |")
    lines += ["", f"Mean ± standard deviation over {results['seed'].nunique()} seeds; "
              f"{int(results['test_scans'].iloc[0])} real test scans.", ""]
    return "\n".join(lines)


def _volumes(scans: pd.DataFrame, downsample: int) -> torch.Tensor:
    return torch.stack([_downsample(torch.from_numpy(load_preprocessed(p)[0]), downsample)
                        for p in scans["preprocessed"]])


def _downsample(volume_DHW: torch.Tensor, factor: int) -> torch.Tensor:
    return F.avg_pool3d(volume_DHW[None, None].float(), factor)[0] if factor > 1 else volume_DHW[None].float()
