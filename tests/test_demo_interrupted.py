"""Ctrl-C during a demo, then the demo again: it goes on from the stage it was in."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import SMALL_DEMO, run_neuroar


@pytest.mark.slow
def test_an_interrupted_demo_continues_where_it_stopped(tmp_path, quick_demo_cohort):
    """Ctrl-C during the LDM stage exits with 130; the re-run keeps every finished stage's output and ends with
    the LDM in the evaluation and the report (the demo trains no baseline unless asked)."""
    out = tmp_path / "demo"
    shutil.copytree(quick_demo_cohort, out / "cohort")
    # 80 LDM steps: the interrupt, sent within 0.2 s of the first log line (step 10), lands during training.
    settings = [*SMALL_DEMO, "baselines=[ldm]", "train_ldm.steps=80"]
    args = [sys.executable, "-m", "neuroar", "demo", "--quick", "--out", str(out), *settings]
    # Ctrl-C's default action even where the suite itself was started in the background (a shell then ignores
    # SIGINT for it, and children inherit that).
    demo = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in demo.stdout:
        if line.startswith("== LDM"):
            break
    while not (out / "ldm_train.csv").is_file():  # training has started
        time.sleep(0.2)
    demo.send_signal(signal.SIGINT)
    _, stderr = demo.communicate(timeout=120)
    assert demo.returncode == 130 and "interrupted" in stderr
    assert not (out / "ldm" / "last.json").exists() and not (out / "evaluation").exists()
    finished = {p: p.stat().st_mtime_ns for folder in ("tokenizer", "neuroar", "autoencoder", "tokens", "latents")
                for p in (out / folder).glob("*.safetensors")}
    assert len(finished) == 5
    again = run_neuroar("demo", "--quick", "--out", str(out), *settings, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # not retrained, not re-encoded
    assert list(pd.read_csv(out / "ldm_train.csv")["step"]) == list(range(10, 81, 10))
    assert "<td>demo/ldm</td>" in (out / "report.html").read_text() and not (out / "stargan").exists()
