"""NeuroAR from a tokenized run: training, resuming, and `predict` into the input's own space."""

import inspect
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from scipy import ndimage

from conftest import OneByOne, ball, make_tokenized_run, write_nifti
from neuroar.checkpoint import weights_path
from neuroar.cli import main
from neuroar.config import load_config
from neuroar.data.pairs import token_pairs
from neuroar.data.tokens import load_tokens
from neuroar.errors import NeuroARError
from neuroar.models.transformer import NeuroAR
from neuroar.predict import Predictor
from neuroar.runs import load_tokenizer, model_checkpoint, tokenizer_checkpoint
from neuroar.train.tokenizer import train_tokenizer
from neuroar.train.transformer import train_transformer


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """A tiny run with a briefly trained tokenizer and its cached tokens (shared; tests copy it)."""
    return make_tokenized_run(tmp_path_factory.mktemp("tokenized"))


@pytest.fixture
def run_dir(tokenized, tmp_path):
    return shutil.copytree(tokenized, tmp_path / "run")


def test_training_lowers_the_loss_and_writes_a_checkpoint(run_dir):
    config = load_config(run_dir / "config.yaml", ["train_transformer.steps=30", "train_transformer.val_every=30",
                                                   "train_transformer.lr=0.002"])
    metrics = train_transformer(run_dir, config, progress=False)
    log = pd.read_csv(run_dir / "neuroar_train.csv")
    assert log["loss"].iloc[-5:].mean() < 0.7 * log["loss"].iloc[:5].mean()
    assert {"scale0_accuracy", "scale2_loss", "scale2_copy_accuracy", "lr"} <= set(log.columns)
    assert {"loss", "accuracy", "scale1_accuracy"} <= set(metrics)
    # The logged copy accuracy is the share of equal tokens between each validation pair's two scans.
    tokens, scans = load_tokens(run_dir)
    pairs = token_pairs(run_dir, scans, "val")
    for k, maps in enumerate(tokens):
        equal = (maps[pairs["earlier_index"]] == maps[pairs["later_index"]]).float().flatten(1).mean(1)
        assert metrics[f"scale{k}_copy_accuracy"] == pytest.approx(equal.mean().item(), abs=1e-6)
        # One validation pair has no spread to measure; more give a standard error.
        se = metrics[f"scale{k}_gain_se"]
        assert (0 <= se < 1) if len(pairs) > 1 else np.isnan(se)
    # The prior loss: the validation targets' cross-entropy under the training targets' code frequencies (one
    # pseudo-token over the codes; the training pairs and, with train_transformer.mirror, their mirrored copies),
    # what a model that reads nothing of the pair scores.
    later = token_pairs(run_dir, scans, "train")["later_index"]
    mirrored, mirrored_scans = load_tokens(run_dir, mirrored=True)
    mirrored_later = token_pairs(run_dir, mirrored_scans, "train")["later_index"]
    for k, maps in enumerate(tokens):
        targets = (torch.cat([maps[later], mirrored[k][mirrored_later]]) if config.train_transformer.mirror
                   else maps[later])
        codes = config.tokenizer.codebook_size
        counts = np.bincount(targets.flatten().numpy(), minlength=codes) + 1 / codes
        expected = -np.log(counts / counts.sum())[maps[pairs["later_index"]].flatten().numpy()].mean()
        assert metrics[f"scale{k}_prior_loss"] == pytest.approx(expected, rel=1e-5)
    # The standard error of the gain over copy, against per-pair gains computed here from the trained model's
    # teacher-forced predictions: over the three training pairs (the tiny run validates on one pair), in
    # chunks of two so that the chunks' gains are joined.
    from neuroar.train.transformer import ScanSequences, evaluate_teacher_forced

    model = Predictor.from_checkpoint(run_dir).model
    sequences = ScanSequences.build(load_tokenizer(run_dir, config).quantizer, tokens, config.transformer.earlier)
    train_pairs = token_pairs(run_dir, scans, "train")
    train_pairs["diagnosis_id"] = model.diagnosis_ids([None] * len(train_pairs)).numpy()
    on_train = evaluate_teacher_forced(model, sequences, train_pairs, torch.device("cpu"), chunk=2)
    batch = sequences.batch(train_pairs, list(range(len(train_pairs))), torch.device("cpu"))
    with torch.no_grad():
        logits = model(batch["target_inputs"], batch["earlier"], batch["earlier_tokens"], batch["earlier_age"],
                       batch["target_age"], diagnosis_B=batch["diagnosis"])
    right_PL = (logits.argmax(-1) == batch["tokens"]).numpy()
    copied_PL = (batch["earlier_tokens"] == batch["tokens"]).numpy()
    ends = np.cumsum([maps[0].numel() for maps in tokens])  # each scale's tokens end the sequence's part
    spreads = []
    for k, end in enumerate(ends):
        scale = slice(end - tokens[k][0].numel(), end)
        gains_P = right_PL[:, scale].mean(1) - copied_PL[:, scale].mean(1)
        spreads.append(gains_P.std(ddof=1) / np.sqrt(len(gains_P)))
        assert on_train[f"scale{k}_gain_se"] == pytest.approx(spreads[-1], rel=1e-5, abs=1e-8)
    assert len(train_pairs) == 3 and max(spreads) > 0  # the gains do differ between pairs
    meta = json.loads(model_checkpoint(run_dir).with_suffix(".json").read_text())
    assert meta["step"] == 30 and len(meta["tokenizer_sha256"]) == 64
    assert (run_dir / "neuroar_val.csv").is_file()


def test_training_scans_are_cached_mirrored_left_right_and_join_training(run_dir, monkeypatch):
    from neuroar.data.preprocess import load_preprocessed

    config = load_config(run_dir / "config.yaml")
    tokens, scans = load_tokens(run_dir)
    mirrored_tokens, mirrored_scans = load_tokens(run_dir, mirrored=True)
    train = scans[scans["split"] == "train"].reset_index(drop=True)
    assert list(mirrored_scans["preprocessed"]) == list(train["preprocessed"]) and len(train) < len(scans)
    tokenizer = load_tokenizer(run_dir, config)
    for i in (0, len(train) - 1):  # independently: the volume reversed along its left-right (first) axis
        volume = np.ascontiguousarray(load_preprocessed(train["preprocessed"][i])[0][::-1])
        expected = tokenizer.encode_scan(torch.from_numpy(volume)[None, None])
        assert all(torch.equal(m[i], e[0]) for m, e in zip(mirrored_tokens, expected))
    # Training sees the run's pairs and the same pairs mirrored; without `mirror`, only the run's.
    import neuroar.train.transformer as trainer

    trained_on = {}
    real_statistics = trainer.token_statistics

    def spy(model, sequences, pairs):  # the pairs the trainer starts from and samples its batches among
        trained_on["pairs"] = pairs.copy()
        return real_statistics(model, sequences, pairs)

    monkeypatch.setattr(trainer, "token_statistics", spy)
    counts = {}
    for mirror in (True, False):
        overrides = ["train_transformer.steps=1", f"train_transformer.mirror={str(mirror).lower()}"]
        shutil.rmtree(run_dir / "neuroar", ignore_errors=True)
        train_transformer(run_dir, load_config(run_dir / "config.yaml", overrides), progress=False)
        counts[mirror] = len(trained_on["pairs"])
    assert counts[True] == 2 * counts[False] == 2 * len(token_pairs(run_dir, scans, "train"))
    assert trained_on["pairs"]["earlier_index"].max() < len(scans)  # without mirror: the run's own scans only


def test_zero_gap_pairs_add_each_training_scan_paired_with_itself(run_dir, monkeypatch):
    import neuroar.train.transformer as trainer

    trained_on = {}
    real_statistics = trainer.token_statistics

    def spy(model, sequences, pairs):
        trained_on["pairs"], trained_on["sequences"] = pairs.copy(), sequences
        return real_statistics(model, sequences, pairs)

    monkeypatch.setattr(trainer, "token_statistics", spy)
    overrides = ["train_transformer.steps=1", "train_transformer.mirror=false", "train_transformer.zero_gap_pairs=true"]
    train_transformer(run_dir, load_config(run_dir / "config.yaml", overrides), progress=False)
    pairs = trained_on["pairs"]
    _, scans = load_tokens(run_dir)
    real = token_pairs(run_dir, scans, "train")
    zero = pairs.iloc[len(real):]
    training_scans = set(real["earlier_index"]) | set(real["later_index"])
    assert pairs.iloc[:len(real)]["later_index"].tolist() == real["later_index"].tolist()
    assert sorted(zero["earlier_index"]) == sorted(training_scans)
    assert (zero["earlier_index"] == zero["later_index"]).all()
    ages = dict(zip(real["earlier_index"], real["earlier_age"])) | dict(zip(real["later_index"], real["later_age"]))
    assert (zero["years"] == 0).all() and (zero["earlier_age"] == zero["later_age"]).all()
    assert [ages[i] for i in zero["earlier_index"]] == zero["later_age"].tolist()
    assert set(zero["subject_id"]) == set(real["subject_id"])
    # Their targets are the tokens of no change.
    batch = trained_on["sequences"].batch(pairs, list(range(len(real), len(pairs))), torch.device("cpu"))
    assert torch.equal(batch["tokens"], batch["earlier_tokens"])


def test_the_logged_loss_is_the_whole_steps_not_one_micro_batchs(run_dir, tmp_path):
    other = shutil.copytree(run_dir, tmp_path / "other")
    common = ["train_transformer.steps=1", "train_transformer.log_every=1", "train_transformer.batch_size=2"]
    train_transformer(run_dir, load_config(run_dir / "config.yaml", common), progress=False)
    train_transformer(other, load_config(other / "config.yaml", [*common, "train_transformer.accumulation=2"]),
                      progress=False)
    whole, accumulated = pd.read_csv(run_dir / "neuroar_train.csv"), pd.read_csv(other / "neuroar_train.csv")
    for column in ("loss", "accuracy", "scale2_accuracy", "copy_accuracy"):
        assert accumulated[column].iloc[0] == pytest.approx(whole[column].iloc[0], rel=1e-5)


def test_resumed_training_equals_an_uninterrupted_run(run_dir, tmp_path):
    other = shutil.copytree(run_dir, tmp_path / "other")
    full = ["train_transformer.steps=6", "train_transformer.checkpoint_every=3", "train_transformer.val_every=100"]
    train_transformer(run_dir, load_config(run_dir / "config.yaml", full), progress=False)
    train_transformer(other, load_config(other / "config.yaml", full[:2] + ["train_transformer.steps=3",
                                                                            "train_transformer.val_every=100"]),
                      progress=False)
    train_transformer(other, load_config(other / "config.yaml", full), progress=False)
    a = load_file(weights_path(model_checkpoint(run_dir)))
    b = load_file(weights_path(model_checkpoint(other)))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a if not k.startswith("rng."))


def test_predict_writes_the_input_space_for_a_differently_shaped_and_oriented_input(run_dir, tmp_path):
    train_transformer(run_dir, load_config(run_dir / "config.yaml", ["train_transformer.steps=2"]), progress=False)
    # 3.5 mm, LPS-like orientation, a shape unlike the training grid's 32^3.
    affine = np.array([[-3.5, 0, 0, 60], [0, -3.5, 0, 70], [0, 0, 3.5, -50], [0, 0, 0, 1]])
    scan = write_nifti(tmp_path / "mine" / "scan.nii.gz", 3.0 * ball((0, 1, 0), 9, size=36)[:, :, 4:31], affine)
    out = tmp_path / "predictions"
    code = main(["predict", "--checkpoint", str(run_dir), "--input", str(scan), "--age", "70.5",
                 "--target-age", "72", "--target-age", "75", "--samples", "2", "--out", str(out)])
    assert code == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == [f"scan_age-{a}_{k}.nii.gz" for a in (72, 75) for k in ("detail", "mean", "std")]
    for path in out.iterdir():
        image = nib.load(path)
        assert image.shape == (36, 36, 27) and np.allclose(image.affine, affine)
        assert np.isfinite(image.get_fdata()).all()
    mean = nib.load(out / "scan_age-72_mean.nii.gz").get_fdata()
    assert 0.3 * 3 * 80 < mean.max() < 3 * 100 * 1.5  # back in the input's intensity range


@pytest.mark.slow
def test_predict_on_a_raw_scan_writes_its_grid_with_the_head_unchanged(run_dir, raw_cohort, tmp_path):
    """data.raw=true at prediction time: the raw scan is skull-stripped and registered, and the prediction goes
    back into the scanner's grid, bias field and head."""
    train_transformer(run_dir, load_config(run_dir / "config.yaml", ["train_transformer.steps=2"]), progress=False)
    scan = raw_cohort / "raw" / "sub-001" / "ses-01" / "anat" / "sub-001_ses-01_T1w.nii.gz"
    out = tmp_path / "predictions"
    code = main(["predict", "--checkpoint", str(run_dir), "--input", str(scan), "--age", "70", "--target-age", "73",
                 "--samples", "1", "--out", str(out), "data.raw=true"])
    assert code == 0
    raw, mean = nib.load(scan), nib.load(out / "sub-001_ses-01_T1w_age-73_mean.nii.gz")
    assert mean.shape == raw.shape and np.allclose(mean.affine, raw.affine)
    assert mean.header.get_sform(coded=True)[1] == raw.header.get_sform(coded=True)[1]
    brain = nib.load(str(scan).replace("_T1w", "_desc-brain_mask")).get_fdata() > 0
    head = ndimage.distance_transform_edt(~brain) > 5  # deepbet's mask reaches up to 4 voxels past the truth
    assert np.array_equal(mean.get_fdata()[head], raw.get_fdata()[head])
    # Inside the brain, as far as the tiny model's 128 mm grid reaches, the prediction replaced the scan.
    assert (ndimage.binary_erosion(brain, iterations=3) & (mean.get_fdata() != raw.get_fdata())).sum() > 50_000
    # "detail" is the raw scan plus the predicted change: the head untouched, the brain at the scan's own
    # resolution (its voxel-to-voxel texture kept, where "mean" has the model's 4 mm grid).
    detail = nib.load(out / "sub-001_ses-01_T1w_age-73_detail.nii.gz").get_fdata()
    assert np.array_equal(detail[head], raw.get_fdata()[head])
    inside = ndimage.binary_erosion(brain, iterations=3)
    texture = {name: np.corrcoef(ndimage.laplace(image)[inside], ndimage.laplace(raw.get_fdata())[inside])[0, 1]
               for name, image in (("detail", detail), ("mean", mean.get_fdata()))}
    assert texture["detail"] > 0.9 > texture["mean"] + 0.3, texture


def test_python_api_gives_one_prediction_per_target_age_and_a_spread(run_dir):
    train_transformer(run_dir, load_config(run_dir / "config.yaml", ["train_transformer.steps=2"]), progress=False)
    predictor = Predictor.from_checkpoint(run_dir)
    image = nib.Nifti1Image(ball((0, 0, 0), 3), np.diag([4.0, 4.0, 4.0, 1.0]))
    predictions = predictor.predict(image, 70.0, [71.0, 74.0], samples=3, seed=1)
    assert [p.target_age for p in predictions] == [71.0, 74.0]
    assert predictions[0].mean_DHW.shape == (32, 32, 32) and (predictions[0].std_DHW >= 0).all()
    again = predictor.predict(image, 70.0, [71.0, 74.0], samples=3, seed=1)
    assert np.array_equal(predictions[1].mean_DHW, again[1].mean_DHW)
    # Every target age draws from the same random numbers: a trajectory is one coherent set of samples.
    alone = predictor.predict(image, 70.0, [74.0], samples=3, seed=1)[0]
    assert np.array_equal(alone.mean_DHW, predictions[1].mean_DHW)
    assert not np.array_equal(predictor.predict(image, 70.0, [74.0], samples=3, seed=2)[0].mean_DHW, alone.mean_DHW)

    greedy = Predictor.from_checkpoint(run_dir, sampling=["sampling.top_k=1"])
    assert greedy.config.sampling.top_k == 1
    one, other = (greedy.predict(image, 70.0, [74.0], samples=2, seed=s)[0] for s in (1, 2))
    assert np.array_equal(one.mean_DHW, other.mean_DHW) and not one.std_DHW.any()  # the mode: no spread
    with pytest.raises(NeuroARError, match=r"only sampling.\*, ldm.ddim_steps, data.raw and data.register"):
        Predictor.from_checkpoint(run_dir, sampling=["transformer.depth=3"])


def test_a_model_conditioned_on_diagnosis_reads_each_pairs_and_each_requests_diagnosis(run_dir, tmp_path, capsys,
                                                                                       monkeypatch):
    pairs = pd.read_csv(run_dir / "pairs.csv", dtype=str, keep_default_na=False)
    pairs["diagnosis"] = ["" if subject == "s3" else "AD" for subject in pairs["subject_id"]]
    pairs.to_csv(run_dir / "pairs.csv", index=False)
    with pytest.raises(NeuroARError, match="'AD' is not one this model was trained on"):
        train_transformer(run_dir, load_config(run_dir / "config.yaml", ["train_transformer.steps=1",
                                                                         "transformer.diagnoses=[CN]"]), progress=False)
    seen = []
    forward = NeuroAR.forward

    def spy(self, *args, **kwargs):
        diagnosis_B = inspect.signature(forward).bind(self, *args, **kwargs).arguments.get("diagnosis_B")
        seen.append(None if diagnosis_B is None else diagnosis_B.tolist())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(NeuroAR, "forward", spy)
    train_transformer(run_dir, load_config(run_dir / "config.yaml", ["train_transformer.steps=3",
                                                                     "transformer.diagnoses=[CN,MCI,AD]"]),
                      progress=False)
    training = {tuple(ids) for ids in seen if ids is not None}
    assert None not in seen and training and all(set(ids) <= {2, 3} for ids in training)  # AD, or none (s3)

    predictor = Predictor.from_checkpoint(run_dir)
    image = nib.Nifti1Image(ball((0, 0, 0), 3), np.diag([4.0, 4.0, 4.0, 1.0]))
    sample, sampled = predictor.model.sample, []
    monkeypatch.setattr(predictor.model, "sample", lambda *a, **k: sampled.append(k["diagnosis_B"].tolist())
                        or sample(*a, **k))
    for diagnosis in ("MCI", None):
        predictor.predict(image, 70.0, [74.0], samples=2, diagnosis=diagnosis)
    assert sampled == [[1, 1], [3, 3]]
    scan = write_nifti(tmp_path / "mine" / "scan.nii.gz", ball((0, 0, 0), 1), np.diag([4.0, 4.0, 4.0, 1.0]))
    assert main(["predict", "--checkpoint", str(run_dir), "--input", str(scan), "--age", "70", "--target-age", "72",
                 "--diagnosis", "Dementia", "--out", str(tmp_path / "out")]) == 2
    assert "'Dementia' is not one this model was trained on (CN, MCI, AD)" in capsys.readouterr().err


def test_bad_requests_are_refused_clearly(run_dir, tmp_path, capsys):
    train_transformer(run_dir, load_config(run_dir / "config.yaml", ["train_transformer.steps=1"]), progress=False)
    scan = write_nifti(tmp_path / "mine" / "scan.nii.gz", ball((0, 0, 0), 1), np.diag([4.0, 4.0, 4.0, 1.0]))
    series = write_nifti(tmp_path / "mine" / "series.nii.gz", np.stack([ball((0, 0, 0), 1)] * 2, -1))
    common = ["predict", "--checkpoint", str(run_dir), "--age", "70", "--out", str(tmp_path / "out")]
    assert main(common + ["--input", str(scan), "--target-age", "69"]) == 2
    assert "not after the scan's age" in capsys.readouterr().err
    assert main(common + ["--input", str(series), "--target-age", "72"]) == 2
    assert "single 3D" in capsys.readouterr().err
    assert main(common + ["--input", str(scan), "--target-age", "72", "--out", str(scan.parent)]) == 2
    assert "input's folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    # Retraining the tokenizer makes the transformer's tokens stale: prediction must refuse, not mis-decode.
    config = load_config(run_dir / "config.yaml", ["train_tokenizer.steps=16", "train_tokenizer.val_every=100"])
    train_tokenizer(run_dir, config, progress=False)
    assert tokenizer_checkpoint(run_dir).with_suffix(".json").is_file()
    with pytest.raises(NeuroARError, match="another tokenizer|no longer holds"):
        Predictor.from_checkpoint(run_dir)


def test_evaluate_compares_every_model_on_the_same_pairs_with_the_copy_baselines(run_dir, tmp_path):
    train_transformer(run_dir, load_config(run_dir / "config.yaml", ["train_transformer.steps=2"]), progress=False)
    ablation = load_config(run_dir / "config.yaml", ["train_transformer.steps=2", "transformer.earlier=none"])
    train_transformer(run_dir, ablation, progress=False, name="no-earlier")
    out = tmp_path / "evaluation"
    assert main(["evaluate", "--models", str(run_dir), str(run_dir / "no-earlier"), "--split", "val",
                 "--samples", "2", "--out", str(out)]) == 0
    per_pair = pd.read_csv(out / "pairs.csv", dtype={"subject_id": str})
    names = ["copy", "tokenizer-copy", "tokenizer-oracle", "volume-trend", "run", "run+detail", "run+aging",
             "run/no-earlier", "run/no-earlier+detail", "run/no-earlier+aging"]
    assert list(per_pair["label"].unique()) == names
    pairs = pd.read_csv(run_dir / "pairs.csv", dtype={"subject_id": str})
    assert (per_pair.groupby("label").size() == (pairs["split"] == "val").sum()).all()

    # The copy baseline scores exactly the copy's error, and predicts no change at all.
    from neuroar.data.preprocess import load_preprocessed, template_brain_mask
    from neuroar.metrics import masked_psnr

    brain = template_brain_mask(load_config(run_dir / "config.yaml").data)
    val = pairs[pairs["split"] == "val"].iloc[0]
    expected = masked_psnr(load_preprocessed(val["earlier_path"])[0], load_preprocessed(val["later_path"])[0], brain)
    copy = per_pair[(per_pair["label"] == "copy") & (per_pair["earlier_age"] == val["earlier_age"])]
    assert copy["psnr"].iloc[0] == pytest.approx(expected)
    assert (per_pair.loc[per_pair["label"] == "copy", "predicted_change_ventricles"] == 0).all()
    # The oracle adds the true follow-up's token change to the earlier scan (computed here independently).
    tokenizer = load_tokenizer(run_dir, load_config(run_dir / "config.yaml"))
    earlier_DHW, later_DHW = load_preprocessed(val["earlier_path"])[0], load_preprocessed(val["later_path"])[0]

    @torch.no_grad()
    def decoded(volume_DHW):
        x = torch.from_numpy(volume_DHW)[None, None]
        return tokenizer.decode(tokenizer.quantizer.tokens_to_fhat(tokenizer.encode_scan(x)))[0, 0].clamp(0, 1).numpy()

    oracle = np.clip(earlier_DHW + decoded(later_DHW) - decoded(earlier_DHW), 0, 1)
    row = per_pair[(per_pair["label"] == "tokenizer-oracle") & (per_pair["earlier_age"] == val["earlier_age"])]
    assert row["psnr"].iloc[0] == pytest.approx(masked_psnr(oracle, later_DHW, brain), rel=1e-5)

    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["label"]) == names
    assert np.isnan(summary.loc[summary["label"] == "copy", "psnr_p_vs_copy"]).all()
    table = (out / "summary.md").read_text()
    assert all(f"| {name} |" in table for name in names)
    sweep = pd.read_csv(out / "sweep.csv")
    assert set(sweep["label"]) == set(names[4:]) and set(sweep["years"].round(6)) == {1, 2, 4, 6, 8}  # models only
    assert {p.name for p in (out / "figures").iterdir()} == {"metrics.png", "change.png",
                                                           "psnr_vs_years.png", "age_sweep.png", "change_all.png"}


def test_the_aging_variant_keeps_what_the_years_change_and_cancels_what_the_model_changes_at_zero_years():
    """A stand-in predictor whose every prediction changes the scan by a fixed random field (a bias, whatever the
    ages) and brightens it by 0.01 per year: "+aging" is the earlier scan plus the years' part alone."""
    from neuroar.evaluate.forecasters import ModelForecaster, Output

    bias_DHW = np.random.default_rng(0).uniform(-0.2, 0.2, (4, 5, 6)).astype(np.float32)

    class Biased(OneByOne):
        def predict_preprocessed(self, volume_DHW, age, target_ages, samples, seed, diagnosis=None):
            means = [volume_DHW + bias_DHW + 0.01 * (target - age) for target in target_ages]
            return [(mean, np.zeros_like(mean), np.zeros_like(mean)) for mean in means]  # detail: not used

    earlier_DHW = np.full((4, 5, 6), 0.5, dtype=np.float32)
    outputs = ModelForecaster("m", Biased()).predict(earlier_DHW, 70.0, [72.0, 80.0], seed=0)
    assert set(outputs) == {Output("m"), Output("m", "detail"), Output("m", "aging")}
    for target, mean_DHW, aging_DHW in zip([72.0, 80.0], outputs[Output("m")], outputs[Output("m", "aging")]):
        np.testing.assert_allclose(mean_DHW, 0.5 + bias_DHW + 0.01 * (target - 70), atol=1e-6)
        np.testing.assert_allclose(aging_DHW, 0.5 + 0.01 * (target - 70), atol=1e-6)


def test_evaluate_can_take_the_splits_first_subjects_only(run_dir, tmp_path):
    out = tmp_path / "evaluation"
    assert main(["evaluate", "--run", str(run_dir), "--split", "train", "--subjects", "2", "--out", str(out)]) == 0
    pairs = pd.read_csv(run_dir / "pairs.csv", dtype={"subject_id": str})
    first_two = sorted(pairs.loc[pairs["split"] == "train", "subject_id"].unique())[:2]
    per_pair = pd.read_csv(out / "pairs.csv", dtype={"subject_id": str})
    assert sorted(per_pair["subject_id"].unique()) == first_two
    # copy, tokenizer-copy, the oracle and the volume trend
    assert len(per_pair) == 4 * (pairs["subject_id"].isin(first_two) & (pairs["split"] == "train")).sum()


def test_no_command_writes_into_the_folders_of_its_inputs(run_dir, tmp_path):
    inputs = {Path(p).parent for p in pd.read_csv(run_dir / "scans.csv")["path"]}
    scan = write_nifti(tmp_path / "mine" / "scan.nii.gz", ball((0, 0, 0), 2), np.diag([4.0, 4.0, 4.0, 1.0]))
    inputs.add(scan.parent)

    def snapshot():
        return {p: (p.stat().st_mtime_ns, p.read_bytes()) for folder in inputs for p in folder.rglob("*")
                if p.is_file()}

    before = snapshot()
    assert main(["train-ar", "--run", str(run_dir), "train_transformer.steps=2"]) == 0
    assert main(["predict", "--checkpoint", str(run_dir), "--input", str(scan), "--age", "70", "--target-age", "72",
                 "--samples", "1", "--out", str(tmp_path / "predicted")]) == 0
    assert main(["evaluate", "--models", str(run_dir), "--split", "val", "--samples", "1",
                 "--out", str(run_dir / "evaluation")]) == 0
    assert main(["report", str(run_dir)]) == 0
    assert main(["decode", "--run", str(run_dir), "--subject", "s0", "--session", "0",
                 "--out", str(tmp_path / "decoded.nii.gz")]) == 0
    assert snapshot() == before


def test_gain_over_copy_is_each_pairs_model_minus_copy_accuracy_per_scale():
    from types import SimpleNamespace

    from neuroar.train.transformer import gains_over_copy

    model = SimpleNamespace(starts=[0, 1], lengths=[1, 4])
    tokens = torch.tensor([[3, 1, 1, 2, 2], [0, 0, 1, 1, 1]])
    earlier = torch.tensor([[3, 1, 0, 0, 2], [1, 0, 1, 1, 1]])
    predicted = torch.tensor([[3, 1, 1, 0, 0], [0, 0, 1, 1, 0]])
    gains = gains_over_copy(model, torch.nn.functional.one_hot(predicted, 4).float(), tokens, earlier)
    # pair 0: scale 0 both right; scale 1 model 2/4, copy 2/4. pair 1: scale 0 model right, copy wrong;
    # scale 1 model 3/4, copy 4/4.
    assert torch.allclose(gains, torch.tensor([[0.0, 0.0], [1.0, -0.25]]))


def test_the_verdict_against_copy_needs_two_standard_errors(tmp_path):
    from neuroar.pipeline import versus_copy

    pd.DataFrame([{"step": 10, "scale0_accuracy": 1.0, "scale0_copy_accuracy": 1.0, "scale0_gain_se": 0.0,
                   "scale1_accuracy": 0.917, "scale1_copy_accuracy": 0.920, "scale1_gain_se": 0.004,
                   "scale2_accuracy": 0.73, "scale2_copy_accuracy": 0.70, "scale2_gain_se": 0.01,
                   "scale3_accuracy": 0.60, "scale3_copy_accuracy": 0.65, "scale3_gain_se": 0.01}]).to_csv(
        tmp_path / "neuroar_val.csv", index=False)
    rows = versus_copy(tmp_path).splitlines()[-4:]
    assert [row.split("|")[-2].strip() for row in rows] == ["equal to copy", "not distinguishable from copy",
                                                            "above copy", "below copy"]
    assert "-0.003 +- 0.008" in rows[1]
