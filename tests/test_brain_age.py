"""The brain-age experiment: the SFCN regressor, and the with/without synthetic scans comparison."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_tiny_run
from neuroar.cli import main
from neuroar.config import load_config
from neuroar.evaluate.brain_age import predict_ages, train_regressor
from neuroar.models.sfcn import SFCN
from neuroar.train.baselines import train_baseline


def test_soft_labels_are_distributions_centred_on_the_age():
    model = SFCN((4,), torch.arange(60.5, 90.5, 1.0))
    labels = model.soft_labels(torch.tensor([70.5, 81.0]), sigma=1.0)
    assert torch.allclose(labels.sum(1), torch.ones(2))
    assert model.bin_centres[labels[0].argmax()] == 70.5
    assert abs(float(model.age(labels.log())[1]) - 81.0) < 0.01  # the expectation of a label is its age


def test_the_regressor_learns_an_age_signal():
    """Volumes whose brightness and size grow with age: a trained regressor predicts held-out ages closely."""
    generator = torch.Generator().manual_seed(0)

    def volumes(ages):
        grid = torch.stack(torch.meshgrid(*[torch.arange(12.0)] * 3, indexing="ij")) - 5.5
        radius = 2 + (ages - 60) / 8
        inside = (grid.norm(dim=0)[None] < radius[:, None, None, None]).float()
        return (inside * (ages[:, None, None, None] / 100) + 0.02 * torch.randn(inside.shape, generator=generator)
                )[:, None]

    train_ages, test_ages = 60 + 30 * torch.rand(64, generator=generator), torch.linspace(62, 88, 12)
    config = load_config("demo", ["brain_age.channels=[8,16]", "brain_age.steps=300", "brain_age.lr=0.005"])
    model = train_regressor(volumes(train_ages), train_ages, torch.arange(55.5, 95.5, 1.0), config, seed=0)
    predicted = predict_ages(model, volumes(test_ages))
    assert np.abs(predicted - test_ages.numpy()).mean() < 3.0  # ages spread over 26 years; guessing gives ~7


@pytest.fixture(scope="module")
def run_with_models(tmp_path_factory):
    run = make_tiny_run(tmp_path_factory.mktemp("brain_age"))
    config = load_config(run / "config.yaml", ["train_autoencoder.steps=3", "train_stargan.steps=3",
                                               "train_ldm.steps=3", "ldm.ddim_steps=2"])
    for kind in ("stargan", "ldm"):
        train_baseline(run, config, kind, progress=False)
    return run


def test_brain_age_compares_real_and_each_models_augmented_training_over_seeds(run_with_models, tmp_path):
    run = shutil.copytree(run_with_models, tmp_path / "run")
    out = tmp_path / "age"
    args = ["brain-age", "--run", str(run), "--models", str(run / "stargan"), str(run / "ldm"), "--out", str(out),
            "brain_age.channels=[4,8]", "brain_age.steps=5", "brain_age.seeds=3", "brain_age.synthetic_years=[1,2.5]",
            "ldm.ddim_steps=2"]
    assert main(args) == 0
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["seed"].unique()) == [0, 1, 2]
    assert list(results["training"].unique()) == ["real", "real + synthetic (stargan)", "real + synthetic (ldm)"]
    real = results[results["training"] == "real"]
    for name in ("stargan", "ldm"):
        augmented = results[results["training"] == f"real + synthetic ({name})"]
        assert len(real) == len(augmented) == 3
        # two synthetic scans per real one
        assert (augmented["training_scans"].to_numpy() == 3 * real["training_scans"].to_numpy()).all()
    assert np.isfinite(results[["mae", "r2"]].to_numpy()).all()
    summary = (out / "summary.md").read_text()
    assert "| real + synthetic (ldm) |" in summary and "MAE" in summary
    cached = out / "synthetic" / "stargan.safetensors"
    ages = json.loads(cached.with_suffix(".json").read_text())
    stamp = cached.stat().st_mtime_ns
    assert main(args) == 0  # the synthetic scans are reused, not regenerated
    assert cached.stat().st_mtime_ns == stamp
    assert json.loads(cached.with_suffix(".json").read_text()) == ages
    twice = ["brain-age", "--run", str(run), "--models", str(run / "stargan"), str(run / "stargan"), "--out",
             str(tmp_path / "twice")]
    assert main(twice) == 2  # two training sets of the same name would hide one another


@pytest.mark.parametrize("output", ["detail", "decoded"])
def test_the_synthetic_scans_are_the_chosen_output_of_the_models_prediction(run_with_models, tmp_path, output):
    from neuroar.data.preprocess import load_preprocessed
    from neuroar.evaluate.brain_age import synthetic_scans
    from neuroar.predict import Predictor

    config = load_config(run_with_models / "config.yaml", [f"brain_age.synthetic_output={output}",
                                                           "brain_age.synthetic_years=[2]"])
    scans = pd.read_csv(run_with_models / "scans.csv", dtype={"subject_id": str}, keep_default_na=False)
    train = scans[scans["split"] == "train"]
    volumes, ages = synthetic_scans(run_with_models / "stargan", train, config, tmp_path, progress=False)
    first = train.iloc[0]
    decoded, _, detail = Predictor.from_checkpoint(run_with_models / "stargan").predict_preprocessed(
        load_preprocessed(first["preprocessed"])[0], first["age"], [first["age"] + 2], samples=1,
        seed=config.seed * 100_003)[0]
    expected = detail if output == "detail" else decoded
    assert float(ages[0]) == first["age"] + 2 and not np.allclose(detail, decoded, atol=1e-3)
    np.testing.assert_allclose(volumes[0, 0].numpy(), expected, atol=1e-6)
