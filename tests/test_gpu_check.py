"""The prepared GPU check (benchmarks/gpu_check.py) in its reduced form on this machine, so that it cannot rot
between the sessions that have a GPU: every check runs and reports what it must."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_reduced_gpu_check_runs_every_check_and_finds_tokens_and_resumes_exact(tmp_path):
    out = tmp_path / "gpu_check.json"
    # A process of its own: the check turns on deterministic algorithms for the whole process.
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--reduced", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    tokens = result["tokens"]
    assert tokens["cache_vs_prediction"]["min"] == 1.0 and tokens["cache_vs_prediction"]["scans"] == 8
    assert tokens["device_vs_cpu"]["min"] == 1.0  # on a CPU the "device" is the CPU: the same numbers
    assert 0.5 < tokens["bf16_vs_float32"]["mean"] <= 1.0
    assert result["resume"]["max_weight_difference"] == {"tokenizer": 0.0, "neuroar": 0.0}
    assert result["ddp_adversarial"]["ok"], result["ddp_adversarial"]["stderr_tail"]
    assert result["ddp_adversarial"]["logged"]["adversarial_g"] > 0  # the adversarial term really ran
    assert {row["model"] for row in result["steps"]} == {"tokenizer", "NeuroAR"}
    assert all(row["step_seconds"] > 0 and row["peak_memory_bytes"] > 0 for row in result["steps"])
