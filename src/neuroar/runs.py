"""A run folder's layout and its trained models: where each checkpoint lives, and the loaders that rebuild a
model from a run's config and weights. Everything that reads a run (tokens and latents in `data/`, the
trainers, prediction, evaluation) finds its models here.

    RUN/tokenizer/last.*     the MS-VQVAE               RUN/autoencoder/last.*   the baselines' AutoencoderKL
    RUN/neuroar/last.*       NeuroAR (ablations beside it under other names)
    RUN/ldm/last.*, RUN/stargan/last.*                  the baselines
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from neuroar.checkpoint import load_checkpoint
from neuroar.config import Config, load_config
from neuroar.errors import NeuroARError
from neuroar.models.autoencoder import PatchAutoencoderKL, build_autoencoder
from neuroar.models.tokenizer import MSVQVAE

MODEL_NAME = "neuroar"  # the default model folder of a run; ablations train beside it under other names


def load_run_config(run_dir: str | Path, config: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The config a run was prepared with (RUN/config.yaml), or `config` (a file or a shipped name) instead;
    with `key.sub=value` overrides."""
    if config is not None:
        return load_config(config, overrides)
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise NeuroARError(f"{path} not found; run `neuroar preprocess MANIFEST --out {run_dir}` first.")
    return load_config(path, overrides)


def tokenizer_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / "tokenizer" / "last"


def autoencoder_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / "autoencoder" / "last"


def model_checkpoint(run_dir: str | Path, name: str = MODEL_NAME) -> Path:
    """A predicting model's checkpoint: NeuroAR (`name` = its folder) or a baseline (`name` = ldm, stargan)."""
    return Path(run_dir) / name / "last"


def resolve_model(path: str | Path) -> tuple[Path, str]:
    """(run folder, model name) from a run folder (its default model) or a model folder inside a run."""
    path = Path(path)
    if model_checkpoint(path).with_suffix(".json").is_file():
        return path, MODEL_NAME
    if (path / "last.json").is_file():
        return path.parent, path.name
    raise NeuroARError(f"{path} holds no trained model (neither {path}/{MODEL_NAME}/last.json nor {path}/last.json); "
                       "train one with `neuroar train-ar --run RUN` or `neuroar train-baseline ldm --run RUN`.")


def load_tokenizer(run_dir: str | Path, config: Config) -> MSVQVAE:
    checkpoint = tokenizer_checkpoint(run_dir)
    if not checkpoint.with_suffix(".json").is_file():
        raise NeuroARError(f"no trained tokenizer in {run_dir}; run `neuroar train-tokenizer --run {run_dir}`.")
    model = MSVQVAE(config.tokenizer)
    load_checkpoint(checkpoint, {"model": model})
    return model.eval()


def load_autoencoder(run_dir: str | Path, config: Config) -> PatchAutoencoderKL:
    checkpoint = autoencoder_checkpoint(run_dir)
    if not checkpoint.with_suffix(".json").is_file():
        raise NeuroARError(f"no trained autoencoder in {run_dir}; run `neuroar train-baseline ldm --run {run_dir}` "
                           "(it trains the autoencoder first).")
    model = build_autoencoder(config.autoencoder)
    load_checkpoint(checkpoint, {"model": model})
    return model.eval()
