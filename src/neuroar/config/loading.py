"""Loading configs: YAML files (or a shipped config by name), `key.sub=value` overrides, and the type check.

Every field has a type; loading checks each value against it and rejects unknown keys, naming the key and
the file, then runs the schema's own checks (`Config.check`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from neuroar.config.schema import Config
from neuroar.errors import ConfigError
from neuroar.files import write_text

CONFIG_DIR = Path(__file__).parents[1] / "configs"
# Overrides that turn the demo config back into the paper's scan coding, as the demo was until it coded the change:
# each scan tokenized on its own (10x12x11, five scales, bottleneck attention), NeuroAR reading the earlier scan's
# tokens (no cohort mean change), with that demo's NeuroAR learning rate and sampling (drawn). For the tests
# and benchmarks of the scan coder at the demo's size (configs/paper.yaml and reference.yaml are scan coders of
# their own).
DEMO_SCAN_CODING = ("tokenizer.code=scan", "tokenizer.shortcut=false", "tokenizer.dead_zone=0",
                    "tokenizer.attention=true", "tokenizer.downsample=4",
                    "tokenizer.scales=[[1,1,1],[3,4,3],[5,6,6],[8,9,8],[10,12,11]]", "train_tokenizer.change_weight=0",
                    "transformer.earlier=tokens", "transformer.local_scales=0", "train_transformer.lr=0.001",
                    "transformer.mean_change=false", "transformer.change_width=0", "sampling.codes=drawn",
                    "sampling.temperature=0.5")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML file, or a shipped config by name ("demo", "paper"), or the defaults when None;
    apply `key.sub=value` overrides; type-check; validate."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file() and path.parent == Path(".") and (CONFIG_DIR / f"{path}.yaml").is_file():
            path = CONFIG_DIR / f"{path}.yaml"
        source = str(path)
        raw = _read_yaml(path)
    return config_from_dict(raw, source, overrides)


def config_from_dict(raw: Mapping[str, Any], source: str, overrides: Sequence[str] = ()) -> Config:
    """A config from plain data (a checkpoint's copy, say) and `key.sub=value` overrides, type-checked and
    validated like a YAML file."""
    raw = copy.deepcopy(dict(raw))
    for override in overrides:
        _apply_override(raw, override)
    config = _build(Config, raw, prefix="", source=source)

    def fail(key: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: {key}: {message}")

    config.check(fail)
    return config


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config, so that a run folder says exactly what it ran with."""
    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"config file {path} does not exist; pass a YAML file or a shipped config name "
                          f"({shipped}).")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of keys (name:, data:, tokenizer:, ...), "
                          f"not a {type(raw).__name__}.")
    return raw


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like key.sub=value, e.g. data.spacing=1.")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parents[: i + 1])} is not a section.")
        node = child
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'. Valid keys here: {', '.join(names)}.{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}", source)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def wrong(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: {key} must be {expected}, got {value!r}.")

    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.", source)
    if origin is Literal:
        if value not in args:
            wrong(f"one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                continue
        wrong(" or ".join(getattr(a, "__name__", str(a)) for a in args))
    if tp is type(None):
        if value is not None:
            wrong("null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            wrong("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            wrong("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            wrong("a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            wrong("a string")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            wrong(f"a list ({_describe(tp)})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            wrong(f"a list of {len(args)} values ({_describe(tp)})")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")  # a bug in this module


def _describe(tp: Any) -> str:
    return str(tp).replace("typing.", "")
