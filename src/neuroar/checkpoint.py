"""Checkpoints: tensors in safetensors, everything else in a JSON file beside it; never pickle.

A checkpoint named NAME is NAME.json (format version, package version, config, step, optimizer
hyper-parameters, whatever the caller adds such as the preprocessing and the scale schedule, and the name of
its weights file) and NAME.STEP.safetensors (model weights under "model.", other modules' under their own
prefix, optimizer moments under "optim.<name>.", the CPU and CUDA RNG states under "rng."). Saving writes the
new weights file first, then replaces the JSON atomically, then deletes the previous weights file: a process
killed at any moment leaves a JSON that names complete weights of the same step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from neuroar import __version__
from neuroar.errors import NeuroARError
from neuroar.files import atomic_path, write_json

FORMAT_VERSION = 2


def save_checkpoint(path_stem: str | Path, modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], meta: dict[str, Any]) -> None:
    stem = Path(path_stem)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    groups = {}
    for name, optimizer in optimizers.items():
        state = optimizer.state_dict()
        for index, values in state["state"].items():
            tensors.update({f"optim.{name}.{index}.{k}": torch.as_tensor(v).cpu().contiguous()
                            for k, v in values.items()})
        groups[name] = state["param_groups"]
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()  # this process's device (one per process under torchrun)
    weights = stem.parent / f"{stem.name}.{int(meta.get('step', 0))}.safetensors"
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp))
    write_json(stem.with_suffix(".json"), {"format_version": FORMAT_VERSION, "neuroar_version": __version__,
                                          "weights": weights.name, "optimizer_groups": groups, **meta})
    for old in stem.parent.glob(f"{stem.name}.*.safetensors"):
        if old != weights:
            old.unlink(missing_ok=True)


def weights_path(path_stem: str | Path) -> Path:
    """The weights file a checkpoint's JSON names."""
    stem = Path(path_stem)
    return stem.parent / read_meta(stem)["weights"]


def read_meta(path_stem: str | Path) -> dict[str, Any]:
    meta_path = Path(path_stem).with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise NeuroARError(f"checkpoint {meta_path} cannot be read ({err}); it is missing or corrupt.") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise NeuroARError(f"checkpoint {meta_path} has format version {meta.get('format_version')}, this "
                           f"neuroar reads version {FORMAT_VERSION}.")
    return meta


def load_checkpoint(path_stem: str | Path, modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer] | None = None, restore_rng: bool = False
                    ) -> dict[str, Any]:
    """Load weights (and optimizer state, RNG) into the given objects; shapes must match exactly."""
    stem = Path(path_stem)
    meta = read_meta(stem)
    weights = stem.parent / meta["weights"]
    try:
        tensors = load_file(str(weights))
    except (OSError, SafetensorError) as err:
        raise NeuroARError(f"checkpoint weights {weights} cannot be read as safetensors ({err}); the file is "
                           "missing, truncated, or not a neuroar checkpoint (pickled files are never "
                           "loaded).") from None
    for name, module in modules.items():
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        expected = module.state_dict()
        problems = [f"missing {k}" for k in expected if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in expected]
        problems += [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                     for k, v in expected.items() if k in state and state[k].shape != v.shape]
        if problems:
            raise NeuroARError(f"checkpoint {stem} does not fit the {name} built from this config: "
                               + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else ""))
        module.load_state_dict(state)
    for name, optimizer in (optimizers or {}).items():
        prefix = f"optim.{name}."
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith(prefix):
                index, field = key[len(prefix):].split(".", 1)
                state.setdefault(int(index), {})[field] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_groups"][name]})
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta
