"""The `neuroar` command: exit codes, messages, run folders (the demo end to end: test_demo*.py)."""

import pandas as pd
import yaml

from conftest import blob_volume, run_neuroar, write_nifti
from neuroar.cli import main


def test_user_errors_exit_2_with_one_message_and_no_traceback(tmp_path):
    result = run_neuroar("preprocess", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    debug = run_neuroar("--debug", "preprocess", str(tmp_path / "missing.csv"))
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
                 "data.shape=[40,48,40]", "tokenizer.scales=[[1,1,1],[10,12,10],[20,24,20]]",
                 f"data.cache_dir={tmp_path / 'c'}"])
    assert code == 0
    assert sorted((p, p.stat().st_mtime_ns) for p in inputs.rglob("*")) == before
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["shape"] == [40, 48, 40] and config["data"]["spacing"] == 4.0
    scans = pd.read_csv(out / "scans.csv")
    assert len(scans) == 6 and scans["split"].notna().all()
    assert scans["preprocessed"].str.startswith(str(tmp_path / "c")).all()
    assert len(pd.read_csv(out / "pairs.csv")) == 3


def test_study_takes_overrides_after_its_cohorts_and_refuses_unknown_cohorts(tmp_path, monkeypatch, capsys):
    called = {}

    def fake_study(out, cohorts, subjects, visits, seed, overrides, retrain, seeds):
        called.update(cohorts=cohorts, overrides=overrides, seeds=seeds)
        (tmp_path / "results.md").write_text("study")
        return tmp_path / "results.md"

    monkeypatch.setattr("neuroar.study.run_study", fake_study)
    assert main(["study", "seed=2", "--seeds", "3", "--cohorts", "adolescent", "data.denoise=true"]) == 0
    assert called == {"cohorts": ["adolescent"], "overrides": ["seed=2", "data.denoise=true"], "seeds": 3}
    assert main(["study", "--cohorts", "adolescnt"]) == 2
    assert "adolescnt" in capsys.readouterr().err
