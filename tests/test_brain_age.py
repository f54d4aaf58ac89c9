"""The brain-age experiment: the SFCN regressor, and the with/without synthetic scans comparison."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from conftest import OneByOne, make_tiny_run, seed_results
from neuroar.cli import main
from neuroar.config import load_config
from neuroar.errors import NeuroARError
from neuroar.evaluate import brain_age
from neuroar.evaluate.brain_age import (
    compare_with_real,
    holm,
    holm_adjusted,
    predict_ages,
    run_brain_age,
    summary_markdown,
    train_regressor,
)
from neuroar.models.sfcn import SFCN
from neuroar.train.baselines import train_baseline

QUICK = ["brain_age.channels=[4,8]", "brain_age.steps=3", "brain_age.seeds=1"]


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


def test_brain_age_compares_real_and_each_models_augmented_training_over_seeds(run_with_models, tmp_path, capsys):
    run = shutil.copytree(run_with_models, tmp_path / "run")
    out = tmp_path / "age"
    args = ["brain-age", "--run", str(run), "--models", str(run / "stargan"), str(run / "ldm"), "--out", str(out),
            "brain_age.channels=[4,8]", "brain_age.steps=5", "brain_age.seeds=3", "brain_age.synthetic_years=[1,2.5]",
            "ldm.ddim_steps=2"]
    assert main(args) == 0
    log = capsys.readouterr().err
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["seed"].unique()) == [0, 1, 2]
    assert list(results["training"].unique()) == ["real", "real + synthetic (stargan)", "real + synthetic (ldm)"]
    real = results[results["training"] == "real"]
    for name in ("stargan", "ldm"):
        augmented = results[results["training"] == f"real + synthetic ({name})"]
        assert len(real) == len(augmented) == 3
        # two synthetic scans per real one
        assert (augmented["training_scans"].to_numpy() == 3 * real["training_scans"].to_numpy()).all()
        # the log counts the real scans each model's synthetic ones are made from
        assert f"synthetic scans ({name}): {real['training_scans'].iloc[0]} scans in " in log
    assert np.isfinite(results[["mae", "r2"]].to_numpy()).all()
    # MAE and R2 are those of each regressor's predictions of the real test scans' ages, computed here.
    scans = pd.read_csv(run / "scans.csv", dtype={"subject_id": str})
    test = scans[scans["split"] == "val"]  # the tiny run holds no test split
    predictions = pd.read_csv(out / "predictions.csv", dtype={"subject_id": str})
    for row in results.itertuples():
        rows = predictions[(predictions["training"] == row.training) & (predictions["seed"] == row.seed)]
        assert list(rows["subject_id"]) == list(test["subject_id"]) and row.test_scans == len(test)
        truth, predicted = test["age"].to_numpy(), rows["predicted_age"].to_numpy()
        np.testing.assert_array_equal(rows["age"].to_numpy(), truth)
        assert row.mae == pytest.approx(np.abs(predicted - truth).mean(), rel=1e-9)
        r2 = 1 - ((truth - predicted) ** 2).sum() / ((truth - truth.mean()) ** 2).sum()
        assert row.r2 == pytest.approx(r2, rel=1e-9)
    summary = (out / "summary.md").read_text()
    assert "| real + synthetic (ldm) |" in summary and "MAE" in summary
    assert "p (Holm)" in summary and "Holm-Bonferroni-adjusted over the 4 tests" in summary
    cached = out / "synthetic" / "stargan.safetensors"
    ages = json.loads(cached.with_suffix(".json").read_text())
    stamp = cached.stat().st_mtime_ns
    assert main(args) == 0  # the synthetic scans are reused, not regenerated
    assert cached.stat().st_mtime_ns == stamp
    assert json.loads(cached.with_suffix(".json").read_text()) == ages
    twice = ["brain-age", "--run", str(run), "--models", str(run / "stargan"), str(run / "stargan"), "--out",
             str(tmp_path / "twice")]
    assert main(twice) == 2  # two training sets of the same name would hide one another


class EncodingPredictor(OneByOne):
    """A stand-in model whose outputs say what they were predicted from: decoded = the scan + target age / 100,
    detail = 1 - the scan + target age / 100; it records each call."""

    def __init__(self):
        self.calls = []

    def predict_preprocessed(self, volume_DHW, age, target_ages, samples, seed, diagnosis=None):
        self.calls.append({"volume": volume_DHW, "age": age, "targets": list(target_ages), "samples": samples,
                           "seed": seed})
        return [(volume_DHW + t / 100, np.zeros_like(volume_DHW), 1 - volume_DHW + t / 100) for t in target_ages]


@pytest.mark.parametrize("output", ["detail", "decoded"])
def test_the_synthetic_scans_are_the_chosen_output_of_the_models_prediction(run_with_models, tmp_path, output,
                                                                            monkeypatch):
    from neuroar.data.preprocess import load_preprocessed
    from neuroar.evaluate.brain_age import synthetic_scans
    from neuroar.predict import Predictor

    model = EncodingPredictor()
    monkeypatch.setattr(Predictor, "from_checkpoint", staticmethod(lambda path: model))
    config = load_config(run_with_models / "config.yaml", [f"brain_age.synthetic_output={output}",
                                                           "brain_age.synthetic_years=[2,3.5]",
                                                           "brain_age.downsample=2"])
    scans = pd.read_csv(run_with_models / "scans.csv", dtype={"subject_id": str}, keep_default_na=False)
    train = scans[scans["split"] == "train"]
    volumes, ages = synthetic_scans(run_with_models / "stargan", train, config, tmp_path, progress=False)
    assert volumes.shape[:3] == (len(train), 2, 1) and ages.shape == (len(train), 2)
    # One call per training scan, with its own volume and age, one sample and a seed of its own.
    assert len(model.calls) == len(train) and len({call["seed"] for call in model.calls}) == len(train)
    for i, (scan, call) in enumerate(zip(train.to_dict("records"), model.calls)):
        volume = load_preprocessed(scan["preprocessed"])[0]
        assert np.array_equal(call["volume"], volume) and call["age"] == scan["age"] and call["samples"] == 1
        for j, years in enumerate((2, 3.5)):
            target = scan["age"] + years
            decoded, detail = volume + target / 100, 1 - volume + target / 100
            assert float(ages[i, j]) == target and not np.allclose(detail, decoded, atol=1e-3)
            chosen = detail if output == "detail" else decoded
            d, h, w = (n // 2 for n in chosen.shape)  # 2x2x2 block means, as the real scans are downsampled
            expected = chosen.reshape(d, 2, h, 2, w, 2).mean((1, 3, 5))
            np.testing.assert_allclose(volumes[i, j, 0].numpy(), expected, atol=1e-6)
    # The cached scans come back in the same layout, without the model.
    monkeypatch.setattr(Predictor, "from_checkpoint", staticmethod(lambda path: pytest.fail("not cached")))
    cached = synthetic_scans(run_with_models / "stargan", train, config, tmp_path, progress=False)
    assert torch.equal(cached[0], volumes) and torch.equal(cached[1], ages)


def test_the_real_regressor_does_not_change_with_the_synthetic_scans_beside_it(run_with_models, tmp_path,
                                                                              monkeypatch):
    """Its age bins come from the real training scans alone: synthetic scans 1 or 9 years older than the real
    ones (beyond the real ages' bins) leave the real-only regressor's predictions as they were. Every regressor
    is given the same real scans, the augmented ones their synthetic scans apart (see the next test)."""
    calls = []

    def spy(x_N1DHW, ages_N, bins, config, seed, synthetic=None):
        calls.append((x_N1DHW, None if synthetic is None else synthetic[1].shape))
        return train_regressor(x_N1DHW, ages_N, bins, config, seed, synthetic)

    monkeypatch.setattr(brain_age, "train_regressor", spy)
    config = load_config(run_with_models / "config.yaml", QUICK)
    out = {}
    for years in (1, 9):
        config.brain_age.synthetic_years = (years,)
        run_brain_age(run_with_models, config, [run_with_models / "stargan"], tmp_path / str(years), progress=False)
        out[years] = pd.read_csv(tmp_path / str(years) / "predictions.csv")
    real = [table[table["training"] == "real"] for table in out.values()]
    pd.testing.assert_frame_equal(real[0], real[1])
    augmented = [table[table["training"] != "real"]["predicted_age"].to_numpy() for table in out.values()]
    assert not np.allclose(*augmented)  # the synthetic scans' ages did reach the augmented regressors
    trained = len(pd.read_csv(run_with_models / "scans.csv").query("split == 'train'"))
    assert [shape for _, shape in calls] == [None, (trained, 1)] * 2
    assert all(torch.equal(x, calls[0][0]) for x, _ in calls) and len(calls[0][0]) == trained


def test_a_seeds_regressors_share_initial_weights_and_real_batches_and_differ_by_the_synthetic_scans(
        monkeypatch):
    """The real-only and the augmented regressor of a seed: the same initial weights, and at every step the
    same real scans in the same order, the augmented one with those scans' own synthetic scans beside them."""
    seen = []

    class Recording(SFCN):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append({"initial": {k: v.clone() for k, v in self.state_dict().items()}, "batches": []})

        def forward(self, x_B1DHW):
            if self.training:  # each scan's identity is its value
                seen[-1]["batches"].append(x_B1DHW[:, 0, 0, 0, 0].round().long().tolist())
            return super().forward(x_B1DHW)

    monkeypatch.setattr(brain_age, "SFCN", Recording)
    real_x = torch.arange(6.0)[:, None, None, None, None].expand(6, 1, 4, 4, 4).contiguous()
    ids = 100 + 10 * torch.arange(6.0)[:, None] + torch.arange(2.0)  # scan i's synthetic scans: 10 i + 100, + 101
    synthetic_x = ids[:, :, None, None, None, None].expand(6, 2, 1, 4, 4, 4).contiguous()
    ages = torch.linspace(60, 70, 6)
    config = load_config("demo", ["brain_age.channels=[2]", "brain_age.steps=5", "brain_age.batch_size=4"])
    bins = torch.arange(50.5, 80.5)
    for synthetic in (None, (synthetic_x, ages[:, None] + torch.tensor([1.0, 2.0]))):
        train_regressor(real_x, ages, bins, config, seed=3, synthetic=synthetic)
    real, augmented = seen
    assert all(torch.equal(real["initial"][k], augmented["initial"][k]) for k in real["initial"])
    assert len(real["batches"]) == len(augmented["batches"]) == 5
    assert len({tuple(batch) for batch in real["batches"]}) > 1  # the batches do change from step to step
    for rows, batch in zip(real["batches"], augmented["batches"]):
        assert batch[:4] == rows and sorted(batch[4:]) == sorted(100 + 10 * r + j for r in rows for j in (0, 1))


def paired_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p of the paired t statistic of a - b, from the differences' mean and standard error."""
    d = a - b
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    return float(2 * stats.t.sf(abs(t), len(d) - 1))


def test_each_model_is_compared_with_real_alone_seed_with_seed():
    results = seed_results(("a", "b"))
    table = compare_with_real(results)
    assert list(table.columns) == ["training", "seeds", "mae", "mae_std", "mae_p_vs_real", "r2", "r2_std",
                                   "r2_p_vs_real"]
    real = results[results["training"] == "real"].sort_values("seed")
    for row in table.itertuples():
        runs = results[results["training"] == row.training].sort_values("seed")
        for metric in ("mae", "r2"):
            assert getattr(row, metric) == pytest.approx(runs[metric].mean())
            expected = np.nan if row.training == "real" else paired_p(runs[metric].to_numpy(), real[metric].to_numpy())
            assert getattr(row, f"{metric}_p_vs_real") == pytest.approx(expected, nan_ok=True)
    assert table.loc[1, "mae_p_vs_real"] < 0.01  # seed with seed, "a" is consistently worse
    with pytest.raises(NeuroARError, match="each seed once in both"):
        compare_with_real(results[~((results["training"] == "real") & (results["seed"] == 0))])


def test_holm_bonferroni_adjusts_the_family_of_tests():
    # m = 3 tests: 0.01 * 3, then 0.03 * 2, then 0.04 * 1 raised to the 0.06 before it; NaN is no test.
    np.testing.assert_allclose(holm([0.04, np.nan, 0.01, 0.03]), [0.06, np.nan, 0.03, 0.06])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(0).uniform(0, 0.2, 12)
    np.testing.assert_allclose(holm(p), multitest.multipletests(p, method="holm")[1])


def test_the_summary_reports_raw_and_holm_adjusted_p_over_every_test_it_shows():
    results = seed_results(("a", "b"))
    table = holm_adjusted(compare_with_real(results))
    raw = table[["mae_p_vs_real", "r2_p_vs_real"]].to_numpy()
    adjusted = table[["mae_p_vs_real_holm", "r2_p_vs_real_holm"]].to_numpy()
    tested = ~np.isnan(raw)
    assert tested.sum() == 4  # two models, two metrics
    np.testing.assert_allclose(adjusted[tested], holm(raw[tested]))
    assert (adjusted[tested] >= raw[tested]).all() and np.isnan(adjusted[~tested]).all()
    summary = summary_markdown(results, "test")
    assert "| MAE (years) | p | p (Holm) | R2 | p | p (Holm) |" in summary
    assert "Holm-Bonferroni-adjusted over the 4 tests" in summary
    a = table.iloc[1]
    assert f"| {a.mae_p_vs_real:.2g} | {a.mae_p_vs_real_holm:.2g} |" in summary
