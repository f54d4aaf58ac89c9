"""The quick demo end to end: every stage's output, its report in a browser, and a re-run that skips what is
done. (The interrupted demo is in a file of its own, so that the test processes run the two at once.)"""

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import SMALL_DEMO, run_neuroar

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


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_resumes(tmp_path, quick_demo_cohort):
    out = tmp_path / "demo"
    shutil.copytree(quick_demo_cohort, out / "cohort")  # made once for both demo tests (make_cohort: test_synth)
    first = run_neuroar("demo", "--quick", "--out", str(out), *SMALL_DEMO, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "cohort is up to date, skipped" in first.stdout
    for name in ("config.yaml", "scans.csv", "pairs.csv", "summary.md", "cohort/manifest.csv", "cohort/truth.csv",
                 "cohort/figures/trajectories.png", "cohort/figures/montage.png", "tokenizer/last.json",
                 "neuroar/last.json",
                 "evaluation/summary.md", "evaluation/pairs.csv", "evaluation/figures/change.png",
                 "brain_age/summary.md", "brain_age/results.csv", "report.html"):
        assert (out / name).is_file(), name
    assert len(list((out / "tokens").glob("*.safetensors"))) == 1
    assert not any((out / name).exists() for name in ("autoencoder", "ldm", "stargan"))  # the demo trains no baseline
    summary = (out / "summary.md").read_text()
    assert "| train |" in summary and "(40, 48, 40)" in summary and "| AD |" in summary
    assert "| copy |" in summary and "| tokenizer-copy |" in summary and "| demo |" in summary
    assert "| real + synthetic (neuroar) |" in summary and "demo/ldm" not in summary and "LDM" not in summary
    assert "## NeuroAR against copying the earlier scan's tokens" in summary and "| 1 | " in summary
    assert "The evaluation's change columns below say what the model learned." in summary  # the demo codes the change
    report = (out / "report.html").read_text()
    assert "<td>real + synthetic (neuroar)</td>" in report
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
    again = run_neuroar("demo", "--quick", "--out", str(out), *SMALL_DEMO, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("up to date, skipped") == 4  # cohort, evaluation, brain age,
    # report
