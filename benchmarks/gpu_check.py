"""The prepared GPU check: one command on any CUDA machine, one JSON file out.

    python benchmarks/gpu_check.py                    # on a GPU: -> benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --reduced --out F  # tiny shapes, any device (the test suite runs this on CPU)

What it measures, each where a CPU cannot tell (no test depends on a GPU):
- tokens: a run's cached tokens (encoded on the device) against the tokens a prediction encodes from the input
  file, against the same tokenizer on the CPU, and against an encoder left under bf16 autocast (share equal);
- resume: a tokenizer and a NeuroAR model trained 2k steps straight and k + k with a restart in between, with
  deterministic algorithms on: the largest weight difference (0 means resumed exactly);
- ddp_adversarial: two processes (on one GPU: gloo) train the tokenizer two steps with the adversarial term on
  from step 0 (its `autograd.grad` under DistributedDataParallel);
- steps: the paper config's tokenizer and transformer training step, seconds and peak memory at batch 1 and 2
  (`neuroar plan --run-step`; reduced: the reduced config at batch 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Deterministic cuBLAS needs this before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from neuroar.checkpoint import weights_path  # noqa: E402
from neuroar.config import DEMO_SCAN_CODING, load_config  # noqa: E402
from neuroar.data.nifti import read_volume  # noqa: E402
from neuroar.data.preprocess import preprocess_image  # noqa: E402
from neuroar.data.tokens import load_tokens, tokenize_run  # noqa: E402
from neuroar.errors import NeuroARError  # noqa: E402
from neuroar.pipeline import prepare_dataset  # noqa: E402
from neuroar.plan import measure_steps  # noqa: E402
from neuroar.predict import Predictor  # noqa: E402
from neuroar.runs import load_tokenizer, model_checkpoint, tokenizer_checkpoint  # noqa: E402
from neuroar.train.tokenizer import train_tokenizer  # noqa: E402
from neuroar.train.transformer import train_transformer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Reduced: 32^3 volumes at 4 mm, a tokenizer of 8 channels and 3 scales, a one-block transformer.
# The demo config shrunk, with the paper's scan coding (as the paper config the device runs) in place of its change.
REDUCED = [*DEMO_SCAN_CODING, "data.spacing=4", "data.shape=[32,32,32]", "tokenizer.channels=8",
           "tokenizer.norm_groups=4", "tokenizer.latent_dim=8", "tokenizer.codebook_size=64",
           "tokenizer.scales=[[1,1,1],[4,4,4],[8,8,8]]", "transformer.depth=1"]
COMMON = ["data.split_fractions=[0.75,0.25,0]", "train_tokenizer.batch_size=2", "train_tokenizer.val_every=1000",
          "train_tokenizer.adversarial_weight=0", "train_transformer.batch_size=2", "train_transformer.val_every=1000"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reduced", action="store_true", help="tiny shapes and steps (any device)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.use_deterministic_algorithms(True, warn_only=True)
    start = time.perf_counter()
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "reduced": args.reduced, "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp), args.reduced)
        steps = 4 if args.reduced else 200
        config = load_config(run / "config.yaml", [f"train_tokenizer.steps={steps}"])
        train_tokenizer(run, config, progress=False)
        result["tokens"] = check_tokens(run, config, device)
        result["resume"] = check_resume(run, args.reduced)
        result["ddp_adversarial"] = check_ddp(run)
    result["steps"] = check_steps(args.reduced, device)
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def make_run(root: Path, reduced: bool) -> Path:
    """A small synthetic cohort (reduced: textured ellipsoids) preprocessed into ROOT/run."""
    if reduced:
        import nibabel as nib

        rows = []
        for i in range(8):
            offset = np.indices((32,) * 3) - 16.0 - np.array([i % 3 - 1, i % 2, 0])[:, None, None, None]
            inside = ((offset / np.array([10, 12, 9])[:, None, None, None]) ** 2).sum(0) < 1
            volume = (inside * (80 + 20 * np.random.default_rng(i).random((32,) * 3))).astype(np.float32)
            path = root / "in" / f"s{i}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(volume, np.diag([4.0, 4.0, 4.0, 1.0])), path)
            rows.append(f"s{i // 2},{i % 2},{70 + i % 2},{path}")
        manifest = root / "in" / "manifest.csv"
        manifest.write_text("subject_id,session_id,age,path\n" + "\n".join(rows) + "\n")
    else:
        from neuroar.data.synth.cohort import SynthOptions, make_cohort

        make_cohort(root / "in", SynthOptions(subjects=8, visits=2, seed=0), progress=False)
        manifest = root / "in" / "manifest.csv"
    config = load_config("demo", [*(REDUCED if reduced else []), *COMMON, f"data.cache_dir={root / 'cache'}"])
    prepare_dataset(manifest, config, root / "run", progress=False)
    return root / "run"


def share_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    equal = sum(int((x.cpu() == y.cpu()).sum()) for x, y in zip(a, b))
    return equal / sum(x.numel() for x in a)


def check_tokens(run: Path, config, device: torch.device) -> dict:
    """Cached tokens against prediction-time, CPU and bf16-autocast tokens of the same scans."""
    tokenize_run(run, config, progress=False)
    cached, scans = load_tokens(run)
    train_transformer(run, load_config(run / "config.yaml", ["train_transformer.steps=1"]), progress=False)
    predictor = Predictor.from_checkpoint(run, device)
    cpu = load_tokenizer(run, config)
    inputs = pd.read_csv(run / "scans.csv", dtype=str, keep_default_na=False)
    manifest = {(r["subject_id"], r["session_id"]): r["path"] for r in inputs.to_dict("records")}
    shares = {"cache_vs_prediction": [], "device_vs_cpu": [], "bf16_vs_float32": []}
    for i in range(len(scans)):
        path = manifest[(str(scans["subject_id"][i]), str(scans["session_id"][i]))]
        volume_DHW, _ = preprocess_image(read_volume(path), predictor.config.data)
        encoded = predictor.tokenizer.encode_scan(volume_DHW)
        shares["cache_vs_prediction"].append(share_equal([t[i:i + 1] for t in cached], encoded))
        shares["device_vs_cpu"].append(share_equal(encoded, cpu.encode_scan(volume_DHW)))
        tokenizer = predictor.tokenizer
        x = torch.from_numpy(volume_DHW)[None, None].to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = tokenizer.quantizer.encode(tokenizer.features(x))
        shares["bf16_vs_float32"].append(share_equal(encoded, bf16))
    return {key: {"min": min(values), "mean": float(np.mean(values)), "scans": len(values)}
            for key, values in shares.items()}


def check_resume(run: Path, reduced: bool) -> dict:
    """Largest weight difference between training 2k steps straight and k, restart, k more."""
    k = 2 if reduced else 20
    differences = {}
    for name, train, checkpoint, settings in (
            ("tokenizer", train_tokenizer, tokenizer_checkpoint, "train_tokenizer"),
            ("neuroar", train_transformer, model_checkpoint, "train_transformer")):
        folders = [run.parent / f"{name}_straight", run.parent / f"{name}_resumed"]
        for folder in folders:
            shutil.copytree(run, folder)
            shutil.rmtree(checkpoint(folder).parent, ignore_errors=True)
        common = [f"{settings}.checkpoint_every={k}"]  # NeuroAR trains on the run's tokens, copied along
        train(folders[0], load_config(folders[0] / "config.yaml", [*common, f"{settings}.steps={2 * k}"]),
              progress=False)
        train(folders[1], load_config(folders[1] / "config.yaml", [*common, f"{settings}.steps={k}"]), progress=False)
        train(folders[1], load_config(folders[1] / "config.yaml", [*common, f"{settings}.steps={2 * k}"]),
              progress=False)
        a, b = (load_file(weights_path(checkpoint(folder))) for folder in folders)
        differences[name] = max(float((a[key].double() - b[key].double()).abs().max())
                                for key in a if key.startswith("model."))
    return {"steps": [k, k], "max_weight_difference": differences}


def check_ddp(run: Path) -> dict:
    """Two processes train the tokenizer with the adversarial term from step 0."""
    folder = run.parent / "ddp"
    shutil.copytree(run, folder)
    shutil.rmtree(tokenizer_checkpoint(folder).parent, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "neuroar", "train-tokenizer", "--run-dir", str(folder), "train_tokenizer.steps=2",
                           "train_tokenizer.batch_size=2", "train_tokenizer.adversarial_weight=0.1",
                           "train_tokenizer.adversarial_start=0", "train_tokenizer.log_every=1"],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    logged = {}
    if done.returncode == 0:
        last = pd.read_csv(folder / "tokenizer_train.csv").iloc[-1]
        logged = {key: float(last[key]) for key in ("l1", "adversarial_g", "adversarial_d")}
    return {"ok": done.returncode == 0, "seconds": round(time.perf_counter() - start, 1), "logged": logged,
            "stderr_tail": "" if done.returncode == 0 else done.stderr[-2000:]}


def check_steps(reduced: bool, device: torch.device) -> list[dict]:
    """Training step seconds and peak memory of the paper config (reduced: the reduced config) per batch."""
    name, overrides, batches = ("demo, reduced", REDUCED, [1]) if reduced else ("paper", [], [1, 2])
    results = []
    for batch in batches:
        try:
            config = load_config(name.split(",")[0], overrides)
            results += [{"config": name, **row} for row in measure_steps(config, batch, device)]
        except (NeuroARError, torch.cuda.OutOfMemoryError) as err:
            results.append({"config": name, "batch": batch, "error": str(err)[:500]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    raise SystemExit(main())
