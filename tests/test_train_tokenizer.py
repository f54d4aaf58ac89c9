"""Training the tokenizer from a run folder: the loss falls, resuming is exact, tokens are cached."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from conftest import make_tiny_run
from neuroar.checkpoint import weights_path
from neuroar.cli import main
from neuroar.config import load_config
from neuroar.data.tokens import load_tokens, tokenize_run
from neuroar.errors import NeuroARError
from neuroar.runs import tokenizer_checkpoint
from neuroar.train.tokenizer import train_tokenizer


@pytest.fixture
def run_dir(tmp_path):
    return make_tiny_run(tmp_path)


def test_reconstruction_loss_falls_and_outputs_are_written(run_dir):
    config = load_config(run_dir / "config.yaml", ["train_tokenizer.steps=40", "train_tokenizer.val_every=40"])
    metrics = train_tokenizer(run_dir, config, progress=False)
    log = pd.read_csv(run_dir / "tokenizer_train.csv")
    assert log["l1"].iloc[-5:].mean() < 0.6 * log["l1"].iloc[:5].mean()
    assert (log["adversarial_g"].iloc[3:] > 0).all() and (log["adversarial_g"].iloc[:3] == 0).all()
    assert {"psnr", "ssim", "psnr_brain", "ssim_brain", "scale2_used", "scale2_perplexity"} <= set(metrics)
    assert metrics["psnr"] > 10
    meta = json.loads(tokenizer_checkpoint(run_dir).with_suffix(".json").read_text())
    assert meta["step"] == 40 and meta["scales"] == [[1, 1, 1], [4, 4, 4], [8, 8, 8]]
    assert meta["preprocessing"]["spacing"] == 4.0
    assert any(k.startswith("model.quantizer.codebook") for k in load_file(weights_path(tokenizer_checkpoint(run_dir))))
    assert [p.name for p in (run_dir / "tokenizer").glob("*.safetensors")] == ["last.40.safetensors"]
    assert list((run_dir / "tensorboard" / "tokenizer").iterdir())

    path = tokenize_run(run_dir, config, progress=False)
    tokens, scans = load_tokens(run_dir)
    assert [tuple(t.shape) for t in tokens] == [(8, 1, 1, 1), (8, 4, 4, 4), (8, 8, 8, 8)]
    assert list(scans["session_id"].astype(str)) == list(pd.read_csv(run_dir / "scans.csv")["session_id"].astype(str))
    mtime = path.stat().st_mtime_ns
    assert tokenize_run(run_dir, config, progress=False) == path and path.stat().st_mtime_ns == mtime

    out = run_dir / "decoded.nii.gz"
    assert main(["decode", "--run", str(run_dir), "--subject", "s0", "--session", "0", "--out", str(out)]) == 0
    original_path = pd.read_csv(run_dir / "scans.csv")["path"].iloc[0]  # subject s0, session 0
    decoded, original = nib.load(out), nib.load(original_path)
    assert decoded.shape == original.shape and np.allclose(decoded.affine, original.affine)
    assert np.corrcoef(decoded.get_fdata().ravel(), original.get_fdata().ravel())[0, 1] > 0.5
    assert main(["decode", "--run", str(run_dir), "--subject", "s0", "--session", "0", "--out", original_path]) == 2


def test_resumed_training_equals_an_uninterrupted_run(run_dir, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    config = load_config(run_dir / "config.yaml", ["train_tokenizer.steps=6", "train_tokenizer.checkpoint_every=3",
                                                   "train_tokenizer.val_every=100"])
    train_tokenizer(run_dir, config, progress=False)
    halfway = load_config(other / "config.yaml", ["train_tokenizer.steps=3", "train_tokenizer.val_every=100"])
    train_tokenizer(other, halfway, progress=False)
    train_tokenizer(other, config, progress=False)
    a = load_file(weights_path(tokenizer_checkpoint(run_dir)))
    b = load_file(weights_path(tokenizer_checkpoint(other)))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a if not k.startswith("rng."))


def test_a_checkpoint_that_does_not_fit_the_config_is_refused(run_dir):
    config = load_config(run_dir / "config.yaml", ["train_tokenizer.steps=1"])
    train_tokenizer(run_dir, config, progress=False)
    wider = load_config(run_dir / "config.yaml", ["tokenizer.latent_dim=4", "train_tokenizer.steps=2"])
    with pytest.raises(NeuroARError, match="does not fit.*checkpoint"):
        train_tokenizer(run_dir, wider, progress=False)


def test_cli_needs_a_preprocessed_run(tmp_path, capsys):
    assert main(["train-tokenizer", "--run", str(tmp_path)]) == 2
    assert "neuroar preprocess" in capsys.readouterr().err
