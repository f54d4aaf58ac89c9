"""The evaluation's bookkeeping: each pair's row holds the prediction for that pair's own later scan and age."""

import numpy as np
import pandas as pd

from conftest import TINY, ball, write_nifti
from neuroar.config import load_config
from neuroar.data.preprocess import load_preprocessed, template_brain_mask
from neuroar.evaluate import compare
from neuroar.evaluate.forecasters import Copy, ModelForecaster
from neuroar.metrics import masked_psnr
from neuroar.pipeline import prepare_dataset


class AgeScaled:
    """A forecaster whose output differs with every target age, so that a prediction paired with another
    pair's age shows."""

    def predict(self, earlier_DHW, earlier_age, target_ages, seed, diagnosis=None):
        return {"scaled": [scaled(earlier_DHW, earlier_age, age) for age in target_ages]}


def scaled(earlier_DHW: np.ndarray, earlier_age: float, target_age: float) -> np.ndarray:
    return earlier_DHW * (1 + 0.05 * (target_age - earlier_age))


def two_subjects_in_the_test_split(tmp_path):
    """A run of two subjects of three visits, all in the test split: each first scan starts two pairs."""
    rows = []
    for i in range(6):
        path = write_nifti(tmp_path / "in" / f"s{i}.nii.gz", ball((i % 3 - 1, i % 2, 0), i), np.diag([4.0] * 3 + [1]))
        rows.append(f"s{i // 3},{i % 3},{[70, 71, 73][i % 3]},{path}")
    (tmp_path / "in" / "manifest.csv").write_text("subject_id,session_id,age,path\n" + "\n".join(rows) + "\n")
    config = load_config("demo", TINY + [f"data.cache_dir={tmp_path / 'cache'}"])
    prepare_dataset(tmp_path / "in" / "manifest.csv", config, tmp_path / "run", progress=False)
    for table in ("pairs", "scans"):
        frame = pd.read_csv(tmp_path / "run" / f"{table}.csv", dtype={"subject_id": str}, keep_default_na=False)
        frame.assign(split="test").to_csv(tmp_path / "run" / f"{table}.csv", index=False)
    return config, pd.read_csv(tmp_path / "run" / "pairs.csv", dtype={"subject_id": str}, keep_default_na=False)


def test_every_pair_is_scored_against_its_own_later_scan_and_age(tmp_path, monkeypatch):
    config, pairs = two_subjects_in_the_test_split(tmp_path)
    assert len(pairs) == 6 and pairs["earlier_path"].value_counts().max() == 2
    monkeypatch.setattr(compare, "load_forecasters", lambda *args: [Copy(), AgeScaled()])

    compare.evaluate_models([], tmp_path / "out", run_dir=tmp_path / "run", progress=False, sweep_years=())

    per_pair = pd.read_csv(tmp_path / "out" / "pairs.csv", dtype={"subject_id": str})
    brain = template_brain_mask(config.data)
    for name in ("copy", "scaled"):
        mine = per_pair[per_pair["model"] == name].reset_index(drop=True)
        columns = ["subject_id", "earlier_age", "later_age"]
        assert mine[columns].equals(pairs[columns])
        for pair, row in zip(pairs.itertuples(), mine.itertuples()):
            earlier, later = load_preprocessed(pair.earlier_path)[0], load_preprocessed(pair.later_path)[0]
            predicted = earlier if name == "copy" else scaled(earlier, pair.earlier_age, pair.later_age)
            assert np.isclose(row.psnr, masked_psnr(predicted, later, brain))


class AgeScaledPredictor:
    """Stands in for a model's `Predictor`: mean, spread and detail output are all the age-scaled scan."""

    def predict_preprocessed(self, earlier_DHW, earlier_age, target_ages, samples, seed, diagnosis=None):
        return [(scaled(earlier_DHW, earlier_age, age),) * 3 for age in target_ages]


def test_the_age_sweep_predicts_the_first_scan_of_the_first_sweep_subjects_only(tmp_path, monkeypatch):
    two_subjects_in_the_test_split(tmp_path)
    monkeypatch.setattr(compare, "load_forecasters", lambda *args: [ModelForecaster("model", AgeScaledPredictor())])

    compare.evaluate_models([], tmp_path / "out", run_dir=tmp_path / "run", progress=False, sweep_years=(1, 3),
                            sweep_subjects=1)

    sweep = pd.read_csv(tmp_path / "out" / "sweep.csv", dtype={"subject_id": str})
    assert set(sweep["subject_id"]) == {"s0"} and set(sweep["age"]) == {70}
    assert sorted(sweep.loc[sweep["model"] == "model", "target_age"]) == [71, 73]
