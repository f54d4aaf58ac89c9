"""Cached autoencoder latents: every preprocessed scan of a run encoded once (the posterior mean) by the
trained AutoencoderKL, for the LDM and latent StarGAN baselines.

RUN/latents/KEY.safetensors ("latents": (N, C, d, h, w) float32) beside a JSON file with the scans in order
and the latent scale factor (1 / standard deviation of the training scans' latents, which brings them to
unit variance for diffusion). KEY hashes the autoencoder's weights and the run's scans and split (the scale
factor comes from the training scans). An autoencoder trained on other scans or another split is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from neuroar import distributed
from neuroar.checkpoint import weights_path
from neuroar.config import Config
from neuroar.data.fingerprint import check_model_fits_run, scan_fingerprint
from neuroar.data.preprocess import load_preprocessed
from neuroar.data.tokens import SCAN_COLUMNS
from neuroar.errors import NeuroARError
from neuroar.files import atomic_path, sha256_file, sha256_json, write_json
from neuroar.progress import Progress
from neuroar.runs import autoencoder_checkpoint, load_autoencoder


def encode_run(run_dir: str | Path, config: Config, progress: bool = True) -> Path:
    """Encode every scan of the run (once) and return the latent file."""
    run_dir = Path(run_dir)
    scans = pd.read_csv(run_dir / "scans.csv", keep_default_na=False)
    path = latent_path(run_dir)
    if path.with_suffix(".json").is_file():
        return path
    check_model_fits_run(autoencoder_checkpoint(run_dir), run_dir,
                         f"Re-train it: `neuroar train-baseline ldm --run {run_dir} --retrain`.")
    model = load_autoencoder(run_dir, config).to(distributed.default_device())
    latents = [model.encode_scan(load_preprocessed(preprocessed)[0])[0].cpu()
               for preprocessed in Progress(scans["preprocessed"], desc="latents", unit="scan", enabled=progress)]
    latents_NCDHW = torch.stack(latents)
    scale = 1.0 / float(latents_NCDHW[torch.tensor((scans["split"] == "train").to_numpy())].std())
    with atomic_path(path) as tmp:
        save_file({"latents": latents_NCDHW.contiguous()}, str(tmp))
    write_json(path.with_suffix(".json"), {"scans": scans[SCAN_COLUMNS].to_dict("records"), "latent_scale": scale,
                                           "autoencoder_sha256": autoencoder_sha256(run_dir)})
    return path


def load_latents(run_dir: str | Path) -> tuple[torch.Tensor, float, pd.DataFrame]:
    """Unscaled latents (N, C, d, h, w), the latent scale factor, and the table of the N scans."""
    run_dir = Path(run_dir)
    path = latent_path(run_dir)
    if not path.with_suffix(".json").is_file():
        check_model_fits_run(autoencoder_checkpoint(run_dir), run_dir,
                         f"Re-train it: `neuroar train-baseline ldm --run {run_dir} --retrain`.")
        raise NeuroARError(f"no latents for the current autoencoder and scans of {run_dir}; run "
                           f"`neuroar train-baseline ldm --run {run_dir}` (it encodes them).")
    meta = json.loads(path.with_suffix(".json").read_text())
    return load_file(str(path))["latents"], float(meta["latent_scale"]), pd.DataFrame(meta["scans"])


def autoencoder_sha256(run_dir: str | Path) -> str:
    checkpoint = autoencoder_checkpoint(run_dir)
    if not checkpoint.with_suffix(".json").is_file():
        raise NeuroARError(f"no trained autoencoder in {run_dir}; run `neuroar train-baseline ldm --run {run_dir}`.")
    return sha256_file(weights_path(checkpoint))


def latent_path(run_dir: str | Path) -> Path:
    """The run's latent file for its current autoencoder, scans and split (its stem is the latents' fingerprint)."""
    run_dir = Path(run_dir)
    scans = pd.read_csv(run_dir / "scans.csv", keep_default_na=False)
    key = sha256_json({"weights": autoencoder_sha256(run_dir), "scans": list(scans["preprocessed"]),
                       "split": scan_fingerprint(run_dir)["split"]})
    return run_dir / "latents" / f"{key[:16]}.safetensors"
