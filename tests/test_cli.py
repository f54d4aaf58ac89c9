"""The `neuroar` command: exit codes, messages, run folders, and the demo end to end."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import blob_volume, write_nifti
from neuroar.cli import main


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "neuroar", *args], capture_output=True, text=True, cwd=cwd)


def test_user_errors_exit_2_with_one_message_and_no_traceback(tmp_path):
    result = run("preprocess", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    debug = run("--debug", "preprocess", str(tmp_path / "missing.csv"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_config_command_prints_resolved_overrides(capsys):
    assert main(["config", "--config", "paper", "data.spacing=1.5", "seed=4"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"]["spacing"] == 1.5 and resolved["seed"] == 4
    assert resolved["tokenizer"]["codebook_size"] == 2048
    assert main(["config", "data.spacng=2"]) == 2
    assert "data.spacing" in capsys.readouterr().err


def test_preprocess_writes_only_into_its_run_and_cache(tmp_path):
    inputs = tmp_path / "inputs"
    for seed, subject in enumerate("abc"):
        for session in ("1", "2"):
            write_nifti(inputs / f"{subject}{session}.nii.gz", blob_volume(seed=seed))
    rows = [f"{s},{v},{a},{s}{v}.nii.gz" for s in "abc" for v, a in (("1", 70), ("2", 71.5))]
    (inputs / "manifest.csv").write_text("subject_id,session_id,age,path\n" + "\n".join(rows) + "\n")
    before = sorted((p, p.stat().st_mtime_ns) for p in inputs.rglob("*"))
    out = tmp_path / "run"
    code = main(["preprocess", str(inputs / "manifest.csv"), "--out", str(out), "data.spacing=4",
                 "data.shape=[40,48,40]", "tokenizer.scales=[[1,1,1],[10,12,10]]", f"data.cache_dir={tmp_path / 'c'}"])
    assert code == 0
    assert sorted((p, p.stat().st_mtime_ns) for p in inputs.rglob("*")) == before
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["shape"] == [40, 48, 40] and config["data"]["spacing"] == 4.0
    scans = pd.read_csv(out / "scans.csv")
    assert len(scans) == 6 and scans["split"].notna().all()
    assert scans["preprocessed"].str.startswith(str(tmp_path / "c")).all()
    assert len(pd.read_csv(out / "pairs.csv")) == 3


ARTIFACTS = Path(os.environ.get("NEUROAR_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))


def open_in_chromium(page: Path, screenshot: Path) -> list[str]:
    """Open a file in headless Chromium (Debian's), offline; return its console errors and page errors."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (`apt-get install chromium`; `make test` does).")
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
        tab = context.new_page()
        tab.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        tab.on("pageerror", lambda error: errors.append(str(error)))
        tab.goto(page.resolve().as_uri(), wait_until="load")
        tab.wait_for_timeout(1000)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return errors


CHROMIUM = "/usr/bin/chromium"

# The quick demo shrunk further (4 mm, a few training steps) so that the test checks every stage in a minute.
SMALL_DEMO = ["data.spacing=4", "data.shape=[40,48,40]", "tokenizer.downsample=8",
              "tokenizer.scales=[[1,1,1],[3,3,3],[5,6,5]]",
              "train_tokenizer.steps=4", "train_transformer.steps=4", "train_transformer.batch_size=2",
              "train_autoencoder.steps=3", "train_ldm.steps=4", "train_stargan.steps=4", "ldm.ddim_steps=3",
              "brain_age.steps=4"]


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_resumes(tmp_path, quick_demo_cohort):
    out = tmp_path / "demo"
    shutil.copytree(quick_demo_cohort, out / "cohort")  # made once for both demo tests (make_cohort: test_synth)
    first = run("demo", "--quick", "--out", str(out), *SMALL_DEMO, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "cohort is up to date, skipped" in first.stdout
    for name in ("config.yaml", "scans.csv", "pairs.csv", "summary.md", "cohort/manifest.csv", "cohort/truth.csv",
                 "cohort/figures/trajectories.png", "cohort/figures/montage.png", "tokenizer/last.json",
                 "neuroar/last.json", "autoencoder/last.json", "ldm/last.json", "stargan/last.json",
                 "evaluation/summary.md", "evaluation/pairs.csv", "evaluation/figures/change.png",
                 "brain_age/summary.md", "brain_age/results.csv", "report.html"):
        assert (out / name).is_file(), name
    assert len(list((out / "tokens").glob("*.safetensors"))) == 1
    summary = (out / "summary.md").read_text()
    assert "| train |" in summary and "(40, 48, 40)" in summary and "| AD |" in summary
    assert "| copy |" in summary and "| tokenizer-copy |" in summary and "| demo |" in summary
    assert "| demo/ldm |" in summary and "| demo/stargan |" in summary and "| real + synthetic (neuroar) |" in summary
    assert "## NeuroAR against copying the earlier scan's tokens" in summary and "| 1 | " in summary
    report = (out / "report.html").read_text()
    assert "<td>demo/ldm</td>" in report and "<td>real + synthetic (neuroar)</td>" in report
    assert "<td>copy</td>" in report and report.count("data:image/png;base64,") >= 7 and "<iframe srcdoc=" in report
    assert "http://" not in report.replace("http://www.w3.org", "") and "src='http" not in report
    errors = open_in_chromium(out / "report.html", ARTIFACTS / "report.png")
    assert errors == [], errors
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
    scans = pd.read_csv(out / "scans.csv")
    assert set(scans["split"]) == {"train", "val", "test"}
    per_pair = pd.read_csv(out / "evaluation" / "pairs.csv", dtype={"subject_id": str})
    diagnosis = scans.drop_duplicates("subject_id").set_index("subject_id")["diagnosis"]
    assert (per_pair["diagnosis"] == per_pair["subject_id"].map(diagnosis)).all()  # the change figure's colours
    again = run("demo", "--quick", "--out", str(out), *SMALL_DEMO, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("up to date, skipped") == 3  # cohort, evaluation, brain age


@pytest.mark.slow
def test_an_interrupted_demo_continues_where_it_stopped(tmp_path, quick_demo_cohort):
    """Ctrl-C during the LDM stage exits with 130; the re-run keeps every finished stage's output."""
    out = tmp_path / "demo"
    shutil.copytree(quick_demo_cohort, out / "cohort")
    # 80 LDM steps: the interrupt, sent within 0.2 s of the first log line (step 10), lands during training.
    args = [sys.executable, "-m", "neuroar", "demo", "--quick", "--out", str(out), *SMALL_DEMO, "train_ldm.steps=80"]
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
    again = run("demo", "--quick", "--out", str(out), *SMALL_DEMO, "train_ldm.steps=80", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # not retrained, not re-encoded
    assert list(pd.read_csv(out / "ldm_train.csv")["step"]) == list(range(10, 81, 10))
    assert (out / "report.html").is_file()
