"""No lost work and no unsafe loading: SIGKILL and resume, checkpoint consistency, pickles refused, NaN stops."""

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_run
from neuroar.checkpoint import load_checkpoint, read_meta, save_checkpoint, weights_path
from neuroar.config import load_config
from neuroar.errors import NeuroARError
from neuroar.files import atomic_path, write_text
from neuroar.runs import tokenizer_checkpoint
from neuroar.train.log import RunLog
from neuroar.train.tokenizer import train_tokenizer

# Adversarial from step 3, so a resume must also restore the discriminator and its optimizer exactly.
KILLABLE = ["train_tokenizer.steps=14", "train_tokenizer.checkpoint_every=2", "train_tokenizer.val_every=100",
            "train_tokenizer.adversarial_start=3"]


def test_training_killed_at_random_steps_resumes_to_the_uninterrupted_weights(tmp_path):
    run = make_tiny_run(tmp_path)
    reference = shutil.copytree(run, tmp_path / "reference")
    train_tokenizer(reference, load_config(reference / "config.yaml", KILLABLE), progress=False)

    rng = random.Random(1234)
    command = [sys.executable, "-m", "neuroar", "train-tokenizer", "--run", str(run), *KILLABLE]
    log = run / "tokenizer_train.csv"
    kills = 0
    for _ in range(3):
        target = rng.randint(1, 13)  # kill once the log has reached this step
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while process.poll() is None and logged_steps(log) < target:
            time.sleep(0.05)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
    assert kills >= 2
    assert subprocess.run(command, capture_output=True).returncode == 0

    a, b = load_file(weights_path(tokenizer_checkpoint(run))), load_file(weights_path(tokenizer_checkpoint(reference)))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))
    steps = pd.read_csv(log)["step"].tolist()
    assert steps == list(range(1, 15))  # redone steps replace their first attempt in the log


def logged_steps(path: Path) -> int:
    try:
        return len(path.read_text().splitlines()) - 1
    except OSError:
        return 0


def test_a_checkpoint_always_names_complete_weights_of_its_own_step(tmp_path):
    module = torch.nn.Linear(3, 2)
    stem = tmp_path / "last"
    save_checkpoint(stem, {"model": module}, {}, {"step": 1})
    first = weights_path(stem)
    with torch.no_grad():
        module.weight.add_(1.0)
    save_checkpoint(stem, {"model": module}, {}, {"step": 2})
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["last.2.safetensors"] and not first.exists()
    # A process killed after writing step 3's weights but before its JSON: the JSON still names step 2's.
    shutil.copy(weights_path(stem), tmp_path / "last.3.safetensors")
    (tmp_path / "last.3.safetensors").write_bytes(b"half-written")
    restored = torch.nn.Linear(3, 2)
    assert load_checkpoint(stem, {"model": restored})["step"] == 2
    assert torch.equal(restored.weight, module.weight)


class _Payload:
    """Unpickling this creates a file: a stand-in for arbitrary code in a shared checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickled_checkpoint_is_refused_without_running_it(tmp_path, writer):
    module = torch.nn.Linear(3, 2)
    stem = tmp_path / "run" / "tokenizer" / "last"
    save_checkpoint(stem, {"model": module}, {}, {"step": 1})
    marker = tmp_path / "code-ran"
    payload = {"model.weight": _Payload(marker)}
    if writer == "pickle":
        weights_path(stem).write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, weights_path(stem))
    with pytest.raises(NeuroARError, match="cannot be read as safetensors.*never loaded"):
        load_checkpoint(stem, {"model": torch.nn.Linear(3, 2)})
    assert not marker.exists()


def test_a_corrupt_or_foreign_checkpoint_json_is_a_clear_error(tmp_path):
    stem = tmp_path / "last"
    stem.with_suffix(".json").write_text("{not json")
    with pytest.raises(NeuroARError, match="missing or corrupt"):
        read_meta(stem)
    stem.with_suffix(".json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(NeuroARError, match="format version 99"):
        read_meta(stem)


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = make_tiny_run(tmp_path)
    config = load_config(run / "config.yaml", ["train_tokenizer.steps=4", "train_tokenizer.checkpoint_every=2",
                                               "train_tokenizer.val_every=100"])
    train_tokenizer(run, config, progress=False)
    good = load_file(weights_path(tokenizer_checkpoint(run)))
    from neuroar.models.tokenizer import MSVQVAE

    forward = MSVQVAE.forward

    def poisoned(self, x):
        reconstruction, vq_loss, stats = forward(self, x)
        return reconstruction * float("nan"), vq_loss, stats

    monkeypatch.setattr(MSVQVAE, "forward", poisoned)
    longer = load_config(run / "config.yaml", ["train_tokenizer.steps=8", "train_tokenizer.checkpoint_every=2",
                                               "train_tokenizer.val_every=100"])
    with pytest.raises(NeuroARError, match="loss became nan at step 4.*last good checkpoint"):
        train_tokenizer(run, longer, progress=False)
    assert read_meta(tokenizer_checkpoint(run))["step"] == 4
    kept = load_file(weights_path(tokenizer_checkpoint(run)))
    assert all(np.array_equal(kept[k].numpy(), good[k].numpy()) for k in good)


def test_a_resumed_log_drops_the_redone_rows_and_a_fresh_one_starts_with_its_own_columns(tmp_path):
    first = RunLog(tmp_path, "model")
    for step in (10, 20, 30):
        first.log(step, {"l1": step / 100})
    first.close()
    resumed = RunLog(tmp_path, "model", resume_step=20)  # the checkpoint of step 20: step 30 is redone
    resumed.log(30, {"l1": 0.5})
    resumed.close()
    assert list(pd.read_csv(tmp_path / "model_train.csv")["l1"]) == [0.1, 0.2, 0.5]
    fresh = RunLog(tmp_path, "model")  # trained from scratch with another loss: its column is kept
    fresh.log(10, {"l1": 0.7, "change_l1": 0.3})
    fresh.close()
    log = pd.read_csv(tmp_path / "model_train.csv")
    assert list(log.columns) == ["step", "l1", "change_l1"] and list(log["change_l1"]) == [0.3]


def test_written_files_get_the_permissions_of_any_new_file(tmp_path):
    """Atomic writes go through a temporary file (created 0600): the result must still be readable by whoever
    the user's umask lets read a new file, e.g. the rest of a lab's group."""
    mask = os.umask(0o022)
    try:
        write_text(tmp_path / "summary.md", "text")
        with atomic_path(tmp_path / "weights.bin") as tmp:
            tmp.write_bytes(b"\0")  # as a writer that opens the temporary path itself would
        assert {(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {0o644}
    finally:
        os.umask(mask)
