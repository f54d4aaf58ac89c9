"""`neuroar study`: both cohorts end to end at a tiny size, their results side by side, and an evaluation that
repeats to the same numbers on the same checkpoints."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from conftest import seed_results
from neuroar.errors import NeuroARError
from neuroar.study import brain_age_table, change_figure, run_study

TINY_STUDY = ["data.spacing=4", "data.shape=[40,48,40]", "data.split_fractions=[0.6,0.2,0.2]",
              "tokenizer.downsample=8", "tokenizer.patch=8", "tokenizer.scales=[[1,1,1],[3,3,3],[5,6,5]]",
              "tokenizer.codebook_per_scale=false", "transformer.local_scales=1",
              "train_tokenizer.steps=4",
              "train_transformer.steps=4", "train_transformer.batch_size=2", "train_transformer.change_steps=10",
              "train_autoencoder.steps=3",
              "train_ldm.steps=4", "train_stargan.steps=4", "ldm.ddim_steps=3", "brain_age.seeds=2",
              "brain_age.steps=4"]
COHORTS = ("elderly", "adolescent")


@pytest.mark.slow
def test_a_tiny_study_runs_both_cohorts_and_its_evaluation_repeats_to_the_same_csvs(tmp_path):
    out = tmp_path / "study"
    results = run_study(out, COHORTS, subjects=6, visits=3, overrides=TINY_STUDY, seeds=2)
    text = results.read_text()
    assert "## elderly" in text and "## adolescent" in text and text.count("`neuroar study --out") == 2
    assert all((out / "results" / f"{cohort}_change.png").stat().st_size > 10_000 for cohort in COHORTS)
    models = pd.read_csv(out / "results" / "models.csv")
    elderly, adolescent = (set(models.loc[models["cohort"] == c, "model"]) for c in COHORTS)
    assert {"copy", "tokenizer-copy", "tokenizer-oracle", "neuroar", "neuroar+aging", "seed-1", "seed-1+aging",
            "no-earlier", "diagnosis", "ldm", "stargan"} <= elderly
    assert_seed_spread(models, pd.read_csv(out / "results" / "seeds.csv"))
    assert "over its training seeds" in text
    assert "no-earlier" in adolescent and "diagnosis" not in adolescent  # one diagnosis (TD): nothing to condition on
    brain_age = pd.read_csv(out / "results" / "brain_age.csv")
    trainings = ["real", *(f"real + synthetic ({name})" for name in ("neuroar", "ldm", "stargan"))]
    assert list(brain_age["training"]) == 2 * trainings
    assert (brain_age["seeds"] == 2).all()
    with_synthetic = brain_age["training"] != "real"
    assert brain_age.loc[with_synthetic, "mae_p_vs_real"].between(0, 1).all()
    assert brain_age.loc[~with_synthetic, "mae_p_vs_real"].isna().all()
    for cohort in COHORTS:
        expected = expected_p_values(pd.read_csv(out / cohort / "brain_age" / "results.csv"))
        assert_p_values(brain_age[brain_age["cohort"] == cohort], expected)
        assert_recomputable(models[models["cohort"] == cohort], pd.read_csv(out / "results" / f"{cohort}_pairs.csv"),
                            "ventricles" if cohort == "elderly" else "grey_matter")

    produced = [out / c / "evaluation" / name for c in COHORTS for name in ("pairs.csv", "summary.csv", "sweep.csv")]
    produced += [out / c / "brain_age" / "results.csv" for c in COHORTS]
    produced += [out / "results" / name for name in ("models.csv", "brain_age.csv", "seeds.csv")]
    first = {path: path.read_bytes() for path in produced}
    checkpoints = {path: path.stat().st_mtime_ns for path in out.rglob("last.*.safetensors")}
    # tokenizer, NeuroAR, its second seed, its ablation, autoencoder, LDM and StarGAN per cohort, and the elderly's
    # diagnosis model
    assert len(checkpoints) == 2 * 7 + 1
    seconds = json.loads((out / "elderly" / "stage_seconds.json").read_text())
    assert seconds["evaluation"] > 0 and "NeuroAR diagnosis" in seconds
    # The elderly's evaluation and brain age again (the adolescents' run the same code and stay up to date).
    shutil.rmtree(out / "elderly" / "evaluation")
    shutil.rmtree(out / "elderly" / "brain_age")
    run_study(out, COHORTS, subjects=6, visits=3, overrides=TINY_STUDY, seeds=2)
    assert {path: path.stat().st_mtime_ns for path in checkpoints} == checkpoints  # nothing retrained
    for path, content in first.items():
        assert path.read_bytes() == content, path
    again = json.loads((out / "elderly" / "stage_seconds.json").read_text())
    assert again["evaluation"] > seconds["evaluation"] and again["tokenizer"] >= seconds["tokenizer"]

    # One cohort re-run on its own: the other cohort's results stay, in the same place.
    run_study(out, ["adolescent"], subjects=6, visits=3, overrides=TINY_STUDY, seeds=2)
    for name in ("models.csv", "brain_age.csv"):
        assert (out / "results" / name).read_bytes() == first[out / "results" / name]
    runs = json.loads((out / "results" / "machine.json").read_text())["cohorts"]
    assert set(runs) == set(COHORTS) and "--cohorts elderly adolescent" in runs["elderly"]["command"]
    assert runs["adolescent"]["command"].endswith("--cohorts adolescent --subjects 6 --visits 3 --seed 0 --seeds 2 "
                                                  + " ".join(TINY_STUDY))
    assert "## elderly" in (out / "results" / "results.md").read_text()
    # The code's version beside the machine: this checkout's commit (a clean clone in CI, maybe edited here).
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    if head.returncode == 0:
        assert runs["adolescent"]["machine"]["commit"].split("+")[0] == head.stdout.strip()


def assert_seed_spread(models: pd.DataFrame, spread: pd.DataFrame) -> None:
    """seeds.csv: per cohort and output, the mean and std of the main model's and its second seed's rows."""
    assert set(spread["output"]) >= {"plain", "detail", "aging"} and (spread["seeds"] == 2).all()
    for row in spread.itertuples():
        suffix = "" if row.output == "plain" else f"+{row.output}"
        mine = models[(models["cohort"] == row.cohort) & models["model"].isin([f"neuroar{suffix}", f"seed-1{suffix}"])]
        assert len(mine) == 2
        for metric in ("psnr", "change_r", "change_mae", "carried"):
            assert np.isclose(getattr(row, f"{metric}_mean"), mine[metric].mean(), equal_nan=True)
            assert np.isclose(getattr(row, f"{metric}_std"), mine[metric].std(), equal_nan=True)


def assert_recomputable(models: pd.DataFrame, pairs: pd.DataFrame, region: str) -> None:
    """models.csv's change numbers come back from the committed per-pair table."""
    assert set(pairs["model"]) == set(models["model"])
    for row in models.itertuples():
        mine = pairs[pairs["model"] == row.model]
        assert len(mine) == row.pairs
        predicted, true = mine[f"predicted_change_{region}"], mine[f"true_change_{region}"]
        assert np.isclose((predicted - true).abs().mean(), row.change_mae)
        assert np.isclose(predicted.mean(), row.change_mean) and np.isclose(true.mean(), row.true_change_mean)
        assert np.isnan(row.carried) or np.isclose(row.carried, predicted.mean() / true.mean())  # NaN: no mean change


def paired_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p of the paired t statistic of a - b, from the differences' mean and standard error."""
    d = a - b
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    return float(2 * stats.t.sf(abs(t), len(d) - 1))


def expected_p_values(results: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Per (training set, metric) but real: the p of each seed's regressor against real's of the same seed."""
    by_seed = results.pivot(index="seed", columns="training", values=["mae", "r2"])
    return {(training, metric): paired_p(by_seed[metric][training].to_numpy(), by_seed[metric]["real"].to_numpy())
            for training in results["training"].unique() if training != "real" for metric in ("mae", "r2")}


def assert_p_values(table: pd.DataFrame, expected: dict[tuple[str, str], float]) -> None:
    assert table.loc[table["training"] == "real", ["mae_p_vs_real", "r2_p_vs_real"]].isna().all().all()
    for (training, metric), p in expected.items():
        assert table.loc[table["training"] == training, f"{metric}_p_vs_real"].item() == pytest.approx(p, rel=1e-9)


def test_the_brain_age_p_values_pair_each_seed_with_real_of_the_same_seed(tmp_path):
    """The seeds' spread is large and the synthetic scans make each seed's regressor a little worse: a paired
    test over seeds shows it, an unpaired one or pairs of other seeds (the rows here are in another order) not."""
    results = seed_results(("neuroar", "ldm"))
    (tmp_path / "brain_age").mkdir()
    results.to_csv(tmp_path / "brain_age" / "results.csv", index=False)
    table = brain_age_table(tmp_path, "elderly")
    expected = expected_p_values(results)
    assert_p_values(table, expected)
    assert expected["real + synthetic (neuroar)", "mae"] < 0.01
    assert (table["cohort"] == "elderly").all() and (table["seeds"] == 4).all()


def test_a_cohorts_change_figure_is_a_grid_of_the_compared_outputs_coloured_by_diagnosis(tmp_path):
    """The study's models (its run is named after the cohort) under readable names, copy's panel first, three rows
    of four, and the cohort's diagnoses in its legend in the order its scans list them."""
    run = tmp_path / "elderly"
    (run / "evaluation").mkdir(parents=True)
    subjects, diagnoses = ["a", "b", "c"], ["CN", "MCI", "AD"]
    pd.DataFrame({"subject_id": subjects, "age": 70.0, "diagnosis": diagnoses}).to_csv(run / "scans.csv", index=False)
    models = ["copy", "tokenizer-copy", "tokenizer-oracle"] + [f"elderly{m}" for m in ("", "/no-earlier", "/diagnosis",
                                                                                      "/ldm", "/stargan")]
    rows = [{"label": model if variant == "plain" else f"{model}+{variant}", "model": model, "variant": variant,
             "pair": p, "subject_id": subjects[p % 3], "true_change_ventricles": 1.0 + p,
             "predicted_change_ventricles": 0.5 * p}
            for model in models for variant in (("plain",) if model in models[:3] else ("plain", "detail", "aging"))
            for p in range(6)]
    pd.DataFrame(rows).to_csv(run / "evaluation" / "pairs.csv", index=False)

    figure = change_figure(run, "elderly")

    panels = [axis for axis in figure.axes if axis.get_visible()]
    grid = panels[0].get_subplotspec().get_gridspec()
    assert (grid.nrows, grid.ncols, len(panels)) == (3, 4, 12)
    assert [" ".join(axis.get_title().split("\n")[:-1]) for axis in panels] == [  # the name, maybe wrapped
        "copy", "tokenizer-oracle", "NeuroAR (+aging)", "NeuroAR (+detail)", "NeuroAR, no earlier scan (+aging)",
        "NeuroAR, no earlier scan (+detail)", "NeuroAR with diagnosis (+aging)", "NeuroAR with diagnosis (+detail)",
        "LDM (+aging)", "LDM (+detail)", "StarGAN (+aging)", "StarGAN (+detail)"]
    assert [text.get_text() for text in figure.legends[0].get_texts()] == [*diagnoses, "no change"]
    assert figure.get_suptitle() == "elderly: 6 test pairs"
    assert panels[0].get_xlabel() == "" and figure.get_supxlabel() == "true ventricles change (mL)"


def test_a_cohort_interrupted_mid_study_keeps_the_seconds_of_the_stages_it_ran(tmp_path, monkeypatch):
    """A study that takes longer than a sitting runs in pieces: each stage's seconds are written as it ends (the
    interrupted one's too), so the cost in results/ is what the pieces took, not the last piece's."""
    def interrupted(*args, **kwargs):
        time.sleep(0.2)
        raise KeyboardInterrupt

    monkeypatch.setattr("neuroar.train.tokenizer.train_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_study(tmp_path, ["adolescent"], subjects=5, visits=2, overrides=TINY_STUDY)
    seconds = json.loads((tmp_path / "adolescent" / "stage_seconds.json").read_text())
    assert set(seconds) == {"synthetic cohort", "validate, split, preprocess", "tokenizer"}
    assert seconds["synthetic cohort"] > 0 and seconds["tokenizer"] >= 0.2


def test_a_study_needs_its_main_models_seed(tmp_path):
    with pytest.raises(NeuroARError, match="--seeds must be at least 1"):
        run_study(tmp_path, ["adolescent"], seeds=0)
    assert not any(tmp_path.iterdir())  # refused before anything was made
