"""Runs never silently reuse what was computed from other data: a changed split (or scans, or pairs) makes every
trainer refuse, naming what changed and the flag that retrains, or with that flag set the old model aside; the
evaluation and brain-age stages redo their work; and the same scan gives the same tokens on every path."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_tiny_run
from neuroar.checkpoint import read_meta
from neuroar.cli import main
from neuroar.config import load_config
from neuroar.data.fingerprint import StaleModelError, data_fingerprint
from neuroar.data.latents import latent_path
from neuroar.data.nifti import read_volume
from neuroar.data.preprocess import preprocess_image
from neuroar.data.tokens import load_tokens, tokenize_run
from neuroar.pipeline import prepare_dataset
from neuroar.predict import Predictor
from neuroar.runs import model_checkpoint, tokenizer_checkpoint
from neuroar.train.autoencoder import train_autoencoder
from neuroar.train.baselines import train_baseline
from neuroar.train.tokenizer import train_tokenizer
from neuroar.train.transformer import train_transformer

TOKENIZER = ["train_tokenizer.steps=3", "train_tokenizer.val_every=100", "train_tokenizer.adversarial_weight=0"]
BASELINE = ["train_autoencoder.steps=2", "train_stargan.steps=2", "train_stargan.warmup_steps=1"]
OTHER_SPLIT = "data.split_fractions=[0.5,0.5,0]"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with a tokenizer, its tokens and a one-step NeuroAR model (shared; tests copy it)."""
    run = make_tiny_run(tmp_path_factory.mktemp("trained"))
    config = load_config(run / "config.yaml", [*TOKENIZER, "train_transformer.steps=1"])
    train_tokenizer(run, config, progress=False)
    tokenize_run(run, config, progress=False)
    train_transformer(run, config, progress=False)
    return run


@pytest.fixture
def run_dir(trained, tmp_path):
    shutil.copytree(trained.parent / "in", tmp_path / "in")  # the manifest, beside the run as make_tiny_run puts it
    return shutil.copytree(trained, tmp_path / "run")


def resplit(run_dir, *overrides: str) -> dict:
    """Preprocess the run's manifest again with other settings, as a user would; returns the new fingerprint."""
    config = load_config(run_dir / "config.yaml", list(overrides))
    prepare_dataset(run_dir.parent / "in" / "manifest.csv", config, run_dir, progress=False)
    return data_fingerprint(run_dir)


def test_the_fingerprint_changes_with_the_split_and_the_scans_but_not_with_a_re_run(run_dir):
    before = data_fingerprint(run_dir)
    assert resplit(run_dir) == before
    after = resplit(run_dir, OTHER_SPLIT)
    assert after["split"] != before["split"] and after["pairs"] != before["pairs"]
    assert after["scans"] == before["scans"]
    scans = pd.read_csv(run_dir / "scans.csv", keep_default_na=False, dtype={"age": float})
    scans.loc[0, "age"] += 0.5
    scans.to_csv(run_dir / "scans.csv", index=False)
    assert data_fingerprint(run_dir)["scans"] != after["scans"]
    assert read_meta(model_checkpoint(run_dir))["data"]["split"] == before["split"]


def test_a_changed_split_is_refused_by_every_stage_naming_what_changed_and_the_flag(run_dir, capsys):
    resplit(run_dir, OTHER_SPLIT)
    # The user's own sequence after a new split: a clear refusal, not a KeyError from the pairs.
    assert main(["tokenize", "--run", str(run_dir)]) == 2
    message = capsys.readouterr().err
    assert "subjects' split" in message and "--retrain" in message and "Traceback" not in message
    config = load_config(run_dir / "config.yaml", [*TOKENIZER, "train_tokenizer.steps=4"])
    with pytest.raises(StaleModelError, match="split.*--retrain"):
        train_tokenizer(run_dir, config, progress=False)
    with pytest.raises(StaleModelError, match="split"):
        train_transformer(run_dir, config, progress=False)


def test_retrain_sets_the_stale_models_aside_and_trains_on_the_new_split(run_dir):
    old_tokenizer = read_meta(tokenizer_checkpoint(run_dir))
    new = resplit(run_dir, OTHER_SPLIT)
    config = load_config(run_dir / "config.yaml", [*TOKENIZER, "train_transformer.steps=1"])
    train_tokenizer(run_dir, config, progress=False, retrain=True)
    tokenize_run(run_dir, config, progress=False)
    with pytest.raises(StaleModelError, match="split.*pairs.*tokens"):
        train_transformer(run_dir, config, progress=False)
    train_transformer(run_dir, config, progress=False, retrain=True)
    for name in ("tokenizer", "neuroar"):
        [aside] = run_dir.glob(f"{name}.replaced-*")
        assert read_meta(aside / "last")["data"]["split"] == old_tokenizer["data"]["split"]
        assert (aside / f"{name}_val.csv").is_file() or name == "neuroar"  # its logs went with it
        assert read_meta(run_dir / name / "last")["data"]["split"] == new["split"]
    assert read_meta(model_checkpoint(run_dir))["data"]["pairs"] == new["pairs"]
    assert (run_dir / "neuroar" / "config.yaml").is_file()


def test_a_baseline_and_its_autoencoder_refuse_a_changed_split(run_dir):
    config = load_config(run_dir / "config.yaml", BASELINE)
    train_baseline(run_dir, config, "stargan", progress=False)
    new = resplit(run_dir, OTHER_SPLIT)
    with pytest.raises(StaleModelError, match="autoencoder.*split.*--retrain"):
        train_baseline(run_dir, config, "stargan", progress=False)
    train_autoencoder(run_dir, config, progress=False, retrain=True)  # alone: the StarGAN is still stale
    with pytest.raises(StaleModelError, match="stargan.*split.*latents"):
        train_baseline(run_dir, config, "stargan", progress=False)
    train_baseline(run_dir, config, "stargan", progress=False, retrain=True)
    recorded = read_meta(model_checkpoint(run_dir, "stargan"))["data"]
    assert {k: recorded[k] for k in new} == new and recorded["latents"] == latent_path(run_dir).stem


def test_a_checkpoint_without_a_fingerprint_is_refused(run_dir):
    meta_path = model_checkpoint(run_dir).with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    del meta["data"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StaleModelError, match="no data fingerprint"):
        train_transformer(run_dir, load_config(run_dir / "config.yaml", ["train_transformer.steps=2"]), progress=False)


def test_the_evaluation_brain_age_and_report_stamps_change_with_the_data(run_dir, monkeypatch):
    import neuroar.evaluate.brain_age as brain_age
    import neuroar.evaluate.compare as compare
    import neuroar.report as report
    from neuroar.pipeline import brain_age_run, evaluate_run, report_run

    calls = []
    monkeypatch.setattr(compare, "evaluate_models", lambda *args, **kwargs: calls.append("evaluate"))
    monkeypatch.setattr(brain_age, "run_brain_age", lambda *args, **kwargs: calls.append("brain age"))
    monkeypatch.setattr(report, "build_report", lambda run, **kwargs: (calls.append("report"),
                                                                      (run / "report.html").write_text("")))
    config = load_config(run_dir / "config.yaml")
    for _ in range(2):
        evaluate_run(run_dir)
        brain_age_run(run_dir, config)
        report_run(run_dir)
    assert calls == ["evaluate", "brain age", "report"]  # the second round was up to date
    report_run(run_dir, seed=1)
    assert calls[-1] == "report"  # another seed draws other predictions
    (run_dir / "report.html").unlink()
    report_run(run_dir, seed=1)
    assert calls.count("report") == 3  # a report removed is built again
    scans = pd.read_csv(run_dir / "scans.csv", keep_default_na=False, dtype={"age": float})
    scans.loc[0, "age"] += 0.5  # other data, the same checkpoints
    scans.to_csv(run_dir / "scans.csv", index=False)
    evaluate_run(run_dir)
    brain_age_run(run_dir, config)
    report_run(run_dir, seed=1)
    assert calls[3:] == ["report", "report", "evaluate", "brain age", "report"]


def test_a_run_without_validation_subjects_says_it_validates_on_training_data(run_dir, capsys):
    resplit(run_dir, "data.split_fractions=[1,0,0]")
    config = load_config(run_dir / "config.yaml", TOKENIZER)
    train_tokenizer(run_dir, config, progress=False, retrain=True)
    assert "validating on train data" in capsys.readouterr().out
    assert list(pd.read_csv(run_dir / "tokenizer_val.csv")["validated_on"]) == ["train"]
    old = next(run_dir.glob("tokenizer.replaced-*"))
    assert list(pd.read_csv(old / "tokenizer_val.csv")["validated_on"]) == ["val"]


def test_cached_tokens_equal_the_tokens_a_prediction_encodes(run_dir):
    tokens, scans = load_tokens(run_dir)
    predictor = Predictor.from_checkpoint(run_dir)
    manifest = pd.read_csv(run_dir.parent / "in" / "manifest.csv", dtype=str)
    for i in (0, len(scans) - 1):
        row = manifest[(manifest["subject_id"] == str(scans["subject_id"][i]))
                       & (manifest["session_id"] == str(scans["session_id"][i]))].iloc[0]
        volume_DHW, _ = preprocess_image(read_volume(row["path"]), predictor.config.data)
        encoded = predictor.tokenizer.encode_scan(volume_DHW)
        assert all(torch.equal(cached[i], fresh[0]) for cached, fresh in zip(tokens, encoded))
    # ... and the same tokens under an autocast the caller left on.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = predictor.tokenizer.encode_scan(volume_DHW)
    assert all(torch.equal(a, b) for a, b in zip(encoded, again))
    assert np.array_equal(predictor.tokenizer.decode_scan(encoded), predictor.tokenizer.decode_scan(again))


def test_the_evaluation_refuses_a_model_trained_on_another_split(run_dir, tmp_path, capsys):
    resplit(run_dir, OTHER_SPLIT)
    # Its training subjects may now be test subjects: scoring it there would score what it learnt from.
    assert main(["evaluate", "--models", str(run_dir), "--split", "val", "--out", str(tmp_path / "evaluation")]) == 2
    message = capsys.readouterr().err
    assert "split" in message and "--retrain" in message
    assert not (tmp_path / "evaluation").exists()


def test_the_brain_age_experiment_refuses_a_model_trained_on_another_split(run_dir, capsys):
    resplit(run_dir, OTHER_SPLIT)
    assert main(["brain-age", "--run", str(run_dir), "brain_age.seeds=1", "brain_age.steps=1"]) == 2
    message = capsys.readouterr().err
    assert "split" in message and "--retrain" in message
    assert not (run_dir / "brain_age").exists()
