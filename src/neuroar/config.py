"""Dataclass configs, loaded from YAML with `key.sub=value` overrides and validated on load.

Every field has a type; loading checks each value against it and rejects unknown keys, naming the key
and the file. Cross-field rules (a shape the tokenizer cannot divide, scales that do not end at the
latent grid) are checked by `validate`, which every loader calls.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from neuroar.errors import ConfigError
from neuroar.files import write_text

Shape3 = tuple[int, int, int]


@dataclass
class DataConfig:
    spacing: float = 2.0  # mm, isotropic
    shape: Shape3 = (80, 96, 88)  # voxels after crop/pad, RAS order
    # Intensities mapped to 0 and 1: a low percentile of all voxels (the background level) and a high
    # percentile of the head's voxels (robust to bright vessels and fat).
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    register: bool = False  # affine registration to MNI152 first (needs the `register` extra)
    cache_dir: str = "cache"  # preprocessed volumes, keyed by input content and this section
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train/val/test, by subject


@dataclass
class TokenizerConfig:
    downsample: int = 8  # voxels per latent cell along each axis: 8 at 2 mm, 16 at 1 mm
    # The first `patch` of the downsampling is a space-to-channel rearrangement (pixel unshuffle: a 2x2x2
    # patch becomes 8 channels), so no convolution runs at full resolution: 1 = convolutions from the voxels.
    patch: int = 2
    channels: int = 32  # width of the first encoder level, doubled at each downsampling up to 4x
    res_blocks: int = 1  # residual blocks per level
    norm_groups: int = 8  # GroupNorm groups; must divide every level's width
    latent_dim: int = 32  # channels of the latent grid = codebook vector size
    codebook_size: int = 1024
    scales: tuple[Shape3, ...] = ((1, 1, 1), (3, 4, 3), (5, 6, 6), (8, 9, 8), (10, 12, 11))
    beta: float = 0.25  # commitment loss weight

    @property
    def level_channels(self) -> tuple[int, ...]:
        levels = (self.downsample // self.patch).bit_length()  # log2(convolutional downsampling) + 1
        return tuple(self.channels * min(2**i, 4) for i in range(levels))


@dataclass
class TokenizerTrainingConfig:
    steps: int = 2000
    batch_size: int = 2
    lr: float = 2e-4  # peak; linear warm-up, then cosine decay to lr / 10 at the last step
    warmup_steps: int = 100
    adversarial_weight: float = 0.1  # times the adaptive weight (reconstruction / adversarial gradient norms)
    adversarial_start: int = 1000  # step at which the patch discriminator joins
    discriminator_channels: int = 16
    # Extra L1 weight inside the template brain mask (where the evaluation measures); 0 = uniform.
    brain_weight: float = 0.0
    accumulation: int = 1  # micro-batches per step (gradient accumulation); batch_size is the whole step's
    log_every: int = 10
    val_every: int = 250
    checkpoint_every: int = 250


@dataclass
class TransformerConfig:
    depth: int = 8  # number of blocks; the one knob that sizes the model: width = 64 * depth, heads = depth
    mlp_ratio: float = 4.0
    condition_dropout: float = 0.1  # share of training pairs without their ages (classifier-free guidance)
    dropout: float = 0.0  # on every block's attention and MLP output (residual dropout)
    # The earlier scan at scale k: "tokens" = its scale-k code vectors and its own scale-k input concatenated
    # with the target's input, an embedding of its token ids and a copy logit (the paper's token input; keeping
    # a token is one linear map away), "fhat" = its whole f_hat area-downsampled to scale k (the first design
    # here), "none" = no earlier scan (an ablation).
    earlier: Literal["tokens", "fhat", "none"] = "tokens"
    # Ablation switches: age tokens reached by cross-attention, the age embedding modulating every block
    # through AdaLN.
    cross_attention: bool = True
    adaln: bool = True

    @property
    def width(self) -> int:
        return 64 * self.depth

    @property
    def heads(self) -> int:
        return self.depth


@dataclass
class TransformerTrainingConfig:
    steps: int = 2000
    batch_size: int = 8  # pairs per step
    lr: float = 3e-4  # peak; linear warm-up, then cosine decay to lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 2.0
    accumulation: int = 1  # micro-batches per step (gradient accumulation); batch_size is the whole step's
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    log_every: int = 10
    val_every: int = 250
    checkpoint_every: int = 250


@dataclass
class SamplingConfig:
    samples: int = 4  # predictions per request; their mean is the prediction, their spread the uncertainty
    # Measured on the reference run (6 validation subjects, 36 pairs): 0.5 gave the best "+detail" PSNR with the
    # same ventricle-change r as 1.0 and greedy decoding, and coherent age sweeps (README, "Sampling").
    temperature: float = 0.5
    top_k: int = 0  # 0 = all codes
    top_p: float = 1.0  # nucleus; 1.0 = off
    guidance: float = 1.0  # classifier-free guidance on the ages; 1.0 = off (conditional logits only)
    # How the samples become one prediction: the mean of the decoded volumes, or the decoded mean f_hat.
    average: Literal["volumes", "fhat"] = "volumes"


@dataclass
class AutoencoderConfig:
    """MONAI's AutoencoderKL, the latent space of both the LDM and the latent StarGAN baselines."""

    channels: tuple[int, ...] = (32, 64, 64)  # one level each; downsampling by patch * 2 ** (levels - 1)
    patch: int = 1  # p x p x p patches folded into channels before the first convolution (as the tokenizer's)
    latent_channels: int = 4
    res_blocks: int = 1
    norm_groups: int = 8
    kl_weight: float = 1e-6


@dataclass
class LDMConfig:
    """MONAI's DiffusionModelUNet on the autoencoder's latents: the noisy follow-up latent concatenated with
    the earlier scan's, both ages as cross-attention tokens; DDPM training, DDIM sampling."""

    channels: tuple[int, ...] = (64, 128, 128)  # one level each, the latent grid halved between levels
    attention_levels: tuple[bool, ...] = (False, False, True)  # cross-attention to the ages lives here
    res_blocks: int = 1
    head_channels: int = 32
    timesteps: int = 1000
    # What the U-Net predicts: the velocity (well conditioned at every noise level), the noise, or the latent.
    prediction: Literal["v_prediction", "epsilon", "sample"] = "v_prediction"
    ddim_steps: int = 50  # sampling steps; a prediction costs this many U-Net passes


@dataclass
class StarGANConfig:
    """A generator mapping an earlier latent and a target age to a follow-up latent; a discriminator with an
    adversarial (patch) head and an age head."""

    channels: int = 64
    res_blocks: int = 4
    adversarial_weight: float = 1.0
    age_weight: float = 1.0
    cycle_weight: float = 10.0  # back to the earlier age
    identity_weight: float = 5.0  # the earlier age itself changes nothing


@dataclass
class TrainingConfig:
    """The baselines' trainers (autoencoder, LDM, StarGAN)."""

    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-4  # peak; linear warm-up, then cosine decay to lr / 10
    warmup_steps: int = 100
    grad_clip: float = 1.0
    accumulation: int = 1  # micro-batches per step (gradient accumulation); batch_size is the whole step's
    log_every: int = 10
    checkpoint_every: int = 250


@dataclass
class BrainAgeConfig:
    """The brain-age experiment: an SFCN-style regressor (Peng et al. 2021) trained on real scans, and on real
    plus model-synthetic scans, evaluated on real test scans."""

    channels: tuple[int, ...] = (32, 64, 128, 256, 256)  # one conv block (and a halving) each
    downsample: int = 1  # average-pool the preprocessed volume first (2: 2 mm -> 4 mm), for CPUs
    bin_width: float = 1.0  # years per soft-label bin
    label_sigma: float = 1.0  # years; the Gaussian soft label around the true age
    synthetic_years: tuple[float, ...] = (1.5, 3.0)  # synthetic scans at each training scan's age + these
    seeds: int = 3
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3


@dataclass
class Config:
    name: str = "demo"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train_tokenizer: TokenizerTrainingConfig = field(default_factory=TokenizerTrainingConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    train_transformer: TransformerTrainingConfig = field(default_factory=TransformerTrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    train_autoencoder: TrainingConfig = field(default_factory=lambda: TrainingConfig(batch_size=2))
    ldm: LDMConfig = field(default_factory=LDMConfig)
    train_ldm: TrainingConfig = field(default_factory=TrainingConfig)
    stargan: StarGANConfig = field(default_factory=StarGANConfig)
    train_stargan: TrainingConfig = field(default_factory=TrainingConfig)
    brain_age: BrainAgeConfig = field(default_factory=BrainAgeConfig)

    @property
    def latent_shape(self) -> Shape3:
        d = self.tokenizer.downsample
        return tuple(s // d for s in self.data.shape)  # type: ignore[return-value]

    @property
    def autoencoder_latent_shape(self) -> Shape3:
        d = self.autoencoder.patch * 2 ** (len(self.autoencoder.channels) - 1)
        return tuple(s // d for s in self.data.shape)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


CONFIG_DIR = Path(__file__).parent / "configs"


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
    validate(config, source)
    return config


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config, so that a run folder says exactly what it ran with."""
    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def validate(config: Config, source: str = "config") -> None:
    data, tok = config.data, config.tokenizer

    def fail(key: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: {key}: {message}")

    if not config.name or any(c in config.name for c in "/\\"):
        fail("name", f"{config.name!r} must be a non-empty folder name without slashes.")
    if data.spacing <= 0:
        fail("data.spacing", f"must be positive (mm), got {data.spacing}.")
    if min(data.shape) <= 0:
        fail("data.shape", f"every size must be positive, got {data.shape}.")
    lo, hi = data.intensity_percentiles
    if not 0 <= lo < hi <= 100:
        fail("data.intensity_percentiles", f"need 0 <= low < high <= 100, got {data.intensity_percentiles}.")
    if any(f < 0 for f in data.split_fractions) or abs(sum(data.split_fractions) - 1) > 1e-6:
        fail("data.split_fractions", f"train/val/test fractions must be >= 0 and sum to 1, "
                                     f"got {data.split_fractions}.")
    if tok.downsample < 1 or tok.downsample & (tok.downsample - 1):
        fail("tokenizer.downsample", f"must be a power of two (8 at 2 mm, 16 at 1 mm), got {tok.downsample}.")
    if tok.patch < 1 or tok.patch & (tok.patch - 1) or tok.downsample % tok.patch:
        fail("tokenizer.patch", f"must be a power of two that divides downsample={tok.downsample}, got {tok.patch}.")
    if any(s % tok.downsample for s in data.shape):
        fail("data.shape", f"{data.shape} is not divisible by tokenizer.downsample={tok.downsample}; "
                           f"pick a shape whose sizes are multiples of {tok.downsample}.")
    if tok.channels <= 0 or tok.latent_dim <= 0 or tok.res_blocks < 1:
        fail("tokenizer.channels", "channels, latent_dim and res_blocks must be positive.")
    if tok.norm_groups < 1 or any(c % tok.norm_groups for c in tok.level_channels):
        fail("tokenizer.norm_groups", f"{tok.norm_groups} must divide every level's width {tok.level_channels}.")
    if tok.codebook_size < 2:
        fail("tokenizer.codebook_size", f"must be at least 2, got {tok.codebook_size}.")
    if not tok.scales:
        fail("tokenizer.scales", "needs at least one scale.")
    latent = config.latent_shape
    for k, scale in enumerate(tok.scales):
        if min(scale) < 1 or any(s > m for s, m in zip(scale, latent)):
            fail(f"tokenizer.scales[{k}]", f"{scale} must be between (1, 1, 1) and the latent grid {latent}.")
        if k and any(s < p for s, p in zip(scale, tok.scales[k - 1])):
            fail(f"tokenizer.scales[{k}]", f"{scale} is coarser than the scale before it; "
                                           "scales go from coarse to fine.")
    if tuple(tok.scales[-1]) != latent:
        fail("tokenizer.scales", f"the last scale {tok.scales[-1]} must equal the latent grid {latent} "
                                 f"(data.shape {data.shape} / tokenizer.downsample {tok.downsample}).")
    train = config.train_tokenizer
    for key in ("steps", "batch_size", "log_every", "val_every", "checkpoint_every", "discriminator_channels",
                "accumulation"):
        if getattr(train, key) < 1:
            fail(f"train_tokenizer.{key}", f"must be at least 1, got {getattr(train, key)}.")
    if train.lr <= 0 or train.adversarial_weight < 0 or train.brain_weight < 0 or train.adversarial_start < 0:
        fail("train_tokenizer", "lr must be positive; adversarial_weight, brain_weight, adversarial_start >= 0.")
    if config.transformer.depth < 1:
        fail("transformer.depth", f"must be at least 1, got {config.transformer.depth}.")
    if not 0 <= config.transformer.dropout < 1:
        fail("transformer.dropout", f"must be in [0, 1), got {config.transformer.dropout}.")
    if not 0 <= config.transformer.condition_dropout < 1:
        fail("transformer.condition_dropout", f"must be in [0, 1), got {config.transformer.condition_dropout}.")
    ar = config.train_transformer
    for key in ("steps", "batch_size", "log_every", "val_every", "checkpoint_every", "accumulation"):
        if getattr(ar, key) < 1:
            fail(f"train_transformer.{key}", f"must be at least 1, got {getattr(ar, key)}.")
    if ar.lr <= 0 or ar.weight_decay < 0 or ar.grad_clip <= 0:
        fail("train_transformer", "lr and grad_clip must be positive, weight_decay >= 0.")
    sampling = config.sampling
    if sampling.samples < 1 or sampling.temperature <= 0 or sampling.top_k < 0 or not 0 < sampling.top_p <= 1:
        fail("sampling", "samples >= 1, temperature > 0, top_k >= 0 (0 = all) and 0 < top_p <= 1 are needed; "
                         f"got {sampling}.")
    if sampling.guidance < 0:
        fail("sampling.guidance", f"must be >= 0 (1 = off), got {sampling.guidance}.")
    _validate_baselines(config, fail)


def _validate_baselines(config: Config, fail) -> None:
    ae, ldm = config.autoencoder, config.ldm
    if not ae.channels or ae.latent_channels < 1 or ae.res_blocks < 1 or ae.kl_weight < 0:
        fail("autoencoder", "needs at least one level, latent_channels and res_blocks >= 1, kl_weight >= 0.")
    if any(c % ae.norm_groups for c in ae.channels):
        fail("autoencoder.norm_groups", f"{ae.norm_groups} must divide every level's width {ae.channels}.")
    if ae.patch < 1 or ae.patch & (ae.patch - 1):
        fail("autoencoder.patch", f"must be a power of two, got {ae.patch}.")
    down = ae.patch * 2 ** (len(ae.channels) - 1)
    if any(s % down for s in config.data.shape):
        fail("autoencoder.channels", f"patch {ae.patch} and {len(ae.channels)} levels downsample by {down}, which "
                                     f"does not divide data.shape {config.data.shape}.")
    if len(ldm.attention_levels) != len(ldm.channels) or not any(ldm.attention_levels):
        fail("ldm.attention_levels", f"needs one flag per level of ldm.channels {ldm.channels}, at least one "
                                     "true (the ages reach the U-Net by cross-attention there).")
    if any(c % ae.norm_groups for c in ldm.channels) or any(c % ldm.head_channels for c in ldm.channels):
        fail("ldm.channels", f"every width {ldm.channels} must divide by autoencoder.norm_groups "
                             f"({ae.norm_groups}) and ldm.head_channels ({ldm.head_channels}).")
    if not 1 <= ldm.ddim_steps <= ldm.timesteps:
        fail("ldm.ddim_steps", f"must be between 1 and ldm.timesteps ({ldm.timesteps}), got {ldm.ddim_steps}.")
    gan = config.stargan
    if gan.channels < 1 or gan.res_blocks < 1 or min(gan.adversarial_weight, gan.age_weight, gan.cycle_weight,
                                                     gan.identity_weight) < 0:
        fail("stargan", "channels and res_blocks must be >= 1, loss weights >= 0.")
    age = config.brain_age
    if not age.channels or min(age.channels) < 1 or age.downsample < 1 or age.seeds < 1 or age.steps < 1:
        fail("brain_age", "needs at least one channel width (each >= 1), downsample, seeds and steps >= 1.")
    if min(age.bin_width, age.label_sigma, age.lr) <= 0 or age.batch_size < 1:
        fail("brain_age", "bin_width, label_sigma and lr must be positive, batch_size >= 1.")
    if any(y <= 0 for y in age.synthetic_years):
        fail("brain_age.synthetic_years", f"must be positive (years after a scan), got {age.synthetic_years}.")
    for section in ("train_autoencoder", "train_ldm", "train_stargan"):
        train = getattr(config, section)
        for key in ("steps", "batch_size", "log_every", "checkpoint_every", "accumulation"):
            if getattr(train, key) < 1:
                fail(f"{section}.{key}", f"must be at least 1, got {getattr(train, key)}.")
        if train.lr <= 0 or train.grad_clip <= 0 or train.warmup_steps < 0:
            fail(section, "lr and grad_clip must be positive, warmup_steps >= 0.")


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


def _plain(obj: Any) -> Any:
    """Tuples to lists, recursively, so that the YAML a run writes can be read back by `load_config`."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
