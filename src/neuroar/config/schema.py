"""The config schema: one dataclass per section, each with `check`, the rules on its own fields, beside them.
Rules that tie sections together (a shape the tokenizer cannot divide, scales that do not end at the latent
grid) are `Config.check`'s. `fail(key, message)` raises the ConfigError that names the file and the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

Shape3 = tuple[int, int, int]
Fail = Callable[[str, str], NoReturn]
BASELINES = ("ldm", "stargan")  # the models NeuroAR is compared with, in the latent space of one autoencoder


def _at_least_one(section: Any, key: str, names: tuple[str, ...], fail: Fail) -> None:
    for name in names:
        if getattr(section, name) < 1:
            fail(f"{key}.{name}", f"must be at least 1, got {getattr(section, name)}.")


def _power_of_two(value: int) -> bool:
    return value >= 1 and not value & (value - 1)


@dataclass
class DataConfig:
    spacing: float = 2.0  # mm, isotropic
    shape: Shape3 = (80, 96, 88)  # voxels after crop/pad, RAS order
    # Intensities mapped to 0 and 1: a low percentile of all voxels (the background level) and a high
    # percentile of the head's voxels (robust to bright vessels and fat).
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    register: bool = False  # affine registration to MNI152 first (needs the `register` extra)
    # Raw scanner T1w (a head, a bias field, any pose): N4 bias correction, skull stripping (deepbet), then the
    # affine registration whatever `register` says (needs the `raw` extra).
    raw: bool = False
    # Non-local means denoising on the model's grid (as CAT12 denoises by default): the two visits' independent
    # noise then stops filling the change tokens with what no model can predict (benchmarks/DEMO_BUDGET.md).
    denoise: bool = False
    cache_dir: str = "cache"  # preprocessed volumes, keyed by input content and this section
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train/val/test, by subject

    def check(self, key: str, fail: Fail) -> None:
        if self.spacing <= 0:
            fail(f"{key}.spacing", f"must be positive (mm), got {self.spacing}.")
        if min(self.shape) <= 0:
            fail(f"{key}.shape", f"every size must be positive, got {self.shape}.")
        lo, hi = self.intensity_percentiles
        if not 0 <= lo < hi <= 100:
            fail(f"{key}.intensity_percentiles", f"need 0 <= low < high <= 100, got {self.intensity_percentiles}.")
        if any(f < 0 for f in self.split_fractions) or abs(sum(self.split_fractions) - 1) > 1e-6:
            fail(f"{key}.split_fractions", f"train/val/test fractions must be >= 0 and sum to 1, "
                                           f"got {self.split_fractions}.")


CODES = ("scan", "change")  # what a tokenizer's tokens code: see TokenizerConfig.code


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
    # Self-attention at the bottleneck (MONAI's non-local block): over a 20x24x22 grid (10,560 positions) it is
    # most of a CPU step (1.15 s against 0.13 s at the demo's size, measured), so finer grids may turn it off.
    attention: bool = True
    # What the tokens code: "scan" = each scan on its own (the paper's MS-VQVAE); "change" = a follow-up as the
    # change of the continuous latent from its earlier scan's, decoded on top of that latent (trained on the
    # training pairs; train_tokenizer.batch_size then counts pairs). See models/tokenizer.py.
    code: str = "scan"
    # Code "change" only: a change vector takes the zero code ("nothing changed") unless another code brings it
    # closer by more than dead_zone x the mean energy of change vectors, so that the tokens leave out the small,
    # unpredictable part of a change (the two scans' noise). 0: plain nearest code.
    dead_zone: float = 0.0
    # A linear path around encoder and decoder (1x1x1 convolutions from the folded patches to the latent and from
    # the latent back), so that each patch's voxels can pass through linearly and a decoded change keeps its
    # edges. Needs the latent on the patch grid (downsample == patch).
    shortcut: bool = False
    # One codebook per scale instead of one shared by all (VAR's): the residuals shrink from scale to scale, and
    # in one shared codebook the last stages' small rest falls to a few codes (models/quantizer.py).
    codebook_per_scale: bool = False

    @property
    def level_channels(self) -> tuple[int, ...]:
        levels = (self.downsample // self.patch).bit_length()  # log2(convolutional downsampling) + 1
        return tuple(self.channels * min(2**i, 4) for i in range(levels))

    def check(self, key: str, fail: Fail) -> None:
        if not _power_of_two(self.downsample):
            fail(f"{key}.downsample", f"must be a power of two (8 at 2 mm, 16 at 1 mm), got {self.downsample}.")
        if not _power_of_two(self.patch) or self.downsample % self.patch:
            fail(f"{key}.patch", f"must be a power of two that divides downsample={self.downsample}, got "
                                 f"{self.patch}.")
        if self.channels <= 0 or self.latent_dim <= 0 or self.res_blocks < 1:
            fail(f"{key}.channels", "channels, latent_dim and res_blocks must be positive.")
        if self.norm_groups < 1 or any(c % self.norm_groups for c in self.level_channels):
            fail(f"{key}.norm_groups", f"{self.norm_groups} must divide every level's width {self.level_channels}.")
        if self.shortcut and self.downsample != self.patch:
            fail(f"{key}.shortcut", f"needs the latent on the patch grid: downsample ({self.downsample}) == patch "
                                    f"({self.patch}).")
        if self.codebook_size < 2:
            fail(f"{key}.codebook_size", f"must be at least 2, got {self.codebook_size}.")
        if not self.scales:
            fail(f"{key}.scales", "needs at least one scale.")
        if self.code not in CODES:
            fail(f"{key}.code", f"must be one of {', '.join(CODES)}, got {self.code!r}.")
        if self.dead_zone < 0 or (self.dead_zone and self.code != "change"):
            fail(f"{key}.dead_zone", f"must be >= 0, and 0 unless code is change; got {self.dead_zone}.")


@dataclass
class TrainingConfig:
    """What every trainer's schedule has."""

    steps: int = 2000
    batch_size: int = 8  # the whole step's, over micro-batches and processes
    lr: float = 1e-4  # peak; linear warm-up, then cosine decay to lr / 10 at the last step
    warmup_steps: int = 100
    accumulation: int = 1  # micro-batches per step (gradient accumulation)
    log_every: int = 10
    checkpoint_every: int = 250

    def check(self, key: str, fail: Fail) -> None:
        _at_least_one(self, key, ("steps", "batch_size", "accumulation", "log_every", "checkpoint_every"), fail)
        if self.lr <= 0 or self.warmup_steps < 0:
            fail(key, f"lr must be positive and warmup_steps >= 0, got {self.lr} and {self.warmup_steps}.")


@dataclass
class TokenizerTrainingConfig(TrainingConfig):
    batch_size: int = 2
    lr: float = 2e-4
    val_every: int = 250
    adversarial_weight: float = 0.1  # times the adaptive weight (reconstruction / adversarial gradient norms)
    adversarial_start: int = 1000  # step at which the patch discriminator joins
    discriminator_channels: int = 16
    # Extra L1 weight inside the template brain mask (where the evaluation measures); 0 = uniform.
    brain_weight: float = 0.0
    # tokenizer.code "change" only: weight of an L1 loss between the decoded change (follow-up's reconstruction
    # minus the earlier scan's) and the true change, weighted like the reconstruction's; 0 = off.
    change_weight: float = 0.0

    def check(self, key: str, fail: Fail) -> None:
        super().check(key, fail)
        _at_least_one(self, key, ("val_every", "discriminator_channels"), fail)
        if min(self.adversarial_weight, self.brain_weight, self.adversarial_start, self.change_weight) < 0:
            fail(key, "adversarial_weight, brain_weight, adversarial_start and change_weight must be >= 0.")


@dataclass
class TransformerConfig:
    depth: int = 8  # number of blocks; the one knob that sizes the model: width = 64 * depth, heads = depth
    mlp_ratio: float = 4.0
    condition_dropout: float = 0.1  # share of training pairs without their ages (classifier-free guidance)
    dropout: float = 0.0  # on every block's attention and MLP output (residual dropout)
    # The earlier scan at scale k: "tokens" = its scale-k code vectors and its own scale-k input concatenated
    # with the target's input, an embedding of its token ids and a copy logit (the paper's token input; keeping
    # a token is one linear map away), "fhat" = its whole f_hat area-downsampled to scale k (the first design
    # here), "none" = no earlier scan (an ablation); with tokenizer.code=change (the earlier scan has no tokens
    # there) "latent" = its continuous latent area-downsampled to scale k, with a copy logit on the token of no
    # change.
    earlier: Literal["tokens", "fhat", "latent", "none"] = "tokens"
    # The last `local_scales` scales are predicted by a small convolutional head (models/transformer.py,
    # LocalHead, `local_width` channels) instead of attention: full attention over a 20x24x22 scale (10,560
    # tokens) is beyond a CPU's budget.
    local_scales: int = 0
    local_width: int = 32
    # With tokenizer.code=change: code each follow-up against its earlier latent advanced by the cohort's mean
    # latent change per year of the gap (models/mean_change.py, fitted on the training pairs) instead of against
    # the earlier latent itself, so that the tokens code the pair's deviation from the cohort's mean aging.
    mean_change: bool = False
    # With mean_change: a small 3D convolutional network of this width (models/change_regressor.py), trained on
    # the training pairs before the transformer, adds each scan's own deviation from the mean change, read from
    # its latent and age, to the base the tokens are coded against; 0: the mean change alone.
    change_width: int = 0
    # Ablation switches: age tokens reached by cross-attention, the age embedding modulating every block
    # through AdaLN.
    cross_attention: bool = True
    adaln: bool = True
    # Diagnoses the model is conditioned on besides the ages (e.g. [CN, MCI, AD]; empty: the ages alone, which
    # can only predict the average rate of subjects of that age). A scan without a diagnosis gets the learned
    # "no diagnosis" embedding, which is also what pairs with dropped ages see.
    diagnoses: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        return 64 * self.depth

    @property
    def heads(self) -> int:
        return self.depth

    def check(self, key: str, fail: Fail) -> None:
        _at_least_one(self, key, ("depth",), fail)
        for name in ("dropout", "condition_dropout"):
            if not 0 <= getattr(self, name) < 1:
                fail(f"{key}.{name}", f"must be in [0, 1), got {getattr(self, name)}.")
        if len(set(self.diagnoses)) != len(self.diagnoses) or not all(d.strip() for d in self.diagnoses):
            fail(f"{key}.diagnoses", f"must be distinct, non-empty labels, got {list(self.diagnoses)}.")
        if self.change_width < 0:
            fail(f"{key}.change_width", f"must be >= 0 (0: no change regressor), got {self.change_width}.")
        if self.local_scales < 0 or self.local_width < 1:
            fail(f"{key}.local_scales", f"local_scales must be >= 0 and local_width >= 1, got {self.local_scales} "
                                        f"and {self.local_width}.")


@dataclass
class TransformerTrainingConfig(TrainingConfig):
    lr: float = 3e-4
    val_every: int = 250
    weight_decay: float = 0.05
    grad_clip: float = 2.0
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    # Train also on every training pair mirrored left-right (tokens cached once by `neuroar tokenize`): measured
    # on the demo cohort (34 training subjects), validation loss 1.196 against 1.312 without.
    mirror: bool = True
    # Train also on each training scan paired with itself (a gap of zero years, no change), so that a prediction
    # at the earlier scan's own age, which "+aging" subtracts, is one the model has seen. Off: on the demo (250
    # steps, a 40 % share of such pairs) NeuroAR then learnt no change at all (+detail and +aging ventricles r
    # -0.01, against 0.69 without; benchmarks/CHANGE_NEUROAR.md row toklr3-b4-zerogap).
    zero_gap_pairs: bool = False
    # The change regressor's training (transformer.change_width): AdamW, cosine schedule from change_lr. On the
    # demo's test pairs 1500 steps of 4 pairs erred as little as of 8, 400 steps of 8 more (benchmarks/
    # CHANGE_REGRESSION.md: ventricles 2.52, 2.51, 3.33 mL).
    change_steps: int = 1500
    change_batch_size: int = 4
    change_lr: float = 1e-3

    def check(self, key: str, fail: Fail) -> None:
        super().check(key, fail)
        _at_least_one(self, key, ("val_every", "change_steps", "change_batch_size"), fail)
        if self.change_lr <= 0:
            fail(f"{key}.change_lr", f"must be positive, got {self.change_lr}.")
        if self.weight_decay < 0 or self.grad_clip <= 0:
            fail(key, "grad_clip must be positive, weight_decay >= 0.")


@dataclass
class SamplingConfig:
    samples: int = 4  # predictions per request; their mean is the prediction, their spread the uncertainty
    # Measured once on a reference run (6 validation subjects, 36 pairs; not kept in a committed file): 0.5 gave
    # the best "+detail" PSNR with the same ventricle-change r as 1.0 and greedy decoding, and coherent age sweeps.
    temperature: float = 0.5
    top_k: int = 0  # 0 = all codes
    top_p: float = 1.0  # nucleus; 1.0 = off
    guidance: float = 1.0  # classifier-free guidance on the ages; 1.0 = off (conditional logits only)
    # How the samples become one prediction: the mean of the decoded volumes, or the decoded mean f_hat.
    average: Literal["volumes", "fhat"] = "volumes"
    # What each token position adds to f_hat: a "drawn" token's code, or the "expected" code (the mean of the
    # scale's codes weighted by the probabilities after temperature, top-k and top-p): the model's mean latent
    # at each scale given the coarser ones, one deterministic prediction (its samples are identical: one is run).
    codes: Literal["drawn", "expected"] = "drawn"

    def check(self, key: str, fail: Fail) -> None:
        if self.samples < 1 or self.temperature <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            fail(key, "samples >= 1, temperature > 0, top_k >= 0 (0 = all) and 0 < top_p <= 1 are needed; "
                      f"got {self}.")
        if self.guidance < 0:
            fail(f"{key}.guidance", f"must be >= 0 (1 = off), got {self.guidance}.")


@dataclass
class AutoencoderConfig:
    """MONAI's AutoencoderKL, the latent space of both the LDM and the latent StarGAN baselines."""

    channels: tuple[int, ...] = (32, 64, 64)  # one level each; downsampling by patch * 2 ** (levels - 1)
    patch: int = 1  # p x p x p patches folded into channels before the first convolution (as the tokenizer's)
    latent_channels: int = 4
    res_blocks: int = 1
    norm_groups: int = 8
    kl_weight: float = 1e-6

    @property
    def downsample(self) -> int:
        return self.patch * 2 ** (len(self.channels) - 1)

    def check(self, key: str, fail: Fail) -> None:
        if not self.channels or self.latent_channels < 1 or self.res_blocks < 1 or self.kl_weight < 0:
            fail(key, "needs at least one level, latent_channels and res_blocks >= 1, kl_weight >= 0.")
        if any(c % self.norm_groups for c in self.channels):
            fail(f"{key}.norm_groups", f"{self.norm_groups} must divide every level's width {self.channels}.")
        if not _power_of_two(self.patch):
            fail(f"{key}.patch", f"must be a power of two, got {self.patch}.")


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
    # What is diffused: the follow-up latent, or its change from the earlier one (models/ldm.py).
    target: Literal["later", "change"] = "later"
    ddim_steps: int = 50  # sampling steps; a prediction costs this many U-Net passes

    def check(self, key: str, fail: Fail) -> None:
        if len(self.attention_levels) != len(self.channels) or not any(self.attention_levels):
            fail(f"{key}.attention_levels", f"needs one flag per level of {key}.channels {self.channels}, at least "
                                            "one true (the ages reach the U-Net by cross-attention there).")
        if any(c % self.head_channels for c in self.channels):
            fail(f"{key}.channels", f"every width {self.channels} must divide by {key}.head_channels "
                                    f"({self.head_channels}).")
        if not 1 <= self.ddim_steps <= self.timesteps:
            fail(f"{key}.ddim_steps", f"must be between 1 and {key}.timesteps ({self.timesteps}), got "
                                      f"{self.ddim_steps}.")


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

    def check(self, key: str, fail: Fail) -> None:
        weights = (self.adversarial_weight, self.age_weight, self.cycle_weight, self.identity_weight)
        if self.channels < 1 or self.res_blocks < 1 or min(weights) < 0:
            fail(key, "channels and res_blocks must be >= 1, loss weights >= 0.")


@dataclass
class BaselineTrainingConfig(TrainingConfig):
    """The baselines' trainers (autoencoder, LDM, StarGAN)."""

    grad_clip: float = 1.0

    def check(self, key: str, fail: Fail) -> None:
        super().check(key, fail)
        if self.grad_clip <= 0:
            fail(f"{key}.grad_clip", f"must be positive, got {self.grad_clip}.")


@dataclass
class BrainAgeConfig:
    """The brain-age experiment: an SFCN-style regressor (Peng et al. 2021) trained on real scans, and on real
    plus model-synthetic scans, evaluated on real test scans."""

    channels: tuple[int, ...] = (32, 64, 128, 256, 256)  # one conv block (and a halving) each
    downsample: int = 1  # average-pool the preprocessed volume first (2: 2 mm -> 4 mm), for CPUs
    bin_width: float = 1.0  # years per soft-label bin
    label_sigma: float = 1.0  # years; the Gaussian soft label around the true age
    synthetic_years: tuple[float, ...] = (1.5, 3.0)  # synthetic scans at each training scan's age + these
    # Which prediction is a synthetic scan: "detail", the predicted change added to the real scan (which keeps
    # its texture; the evaluation's +detail), or "decoded", the model's own output, blurred by its decoder (a
    # regressor can learn that blur as a sign of age).
    synthetic_output: Literal["detail", "decoded"] = "detail"
    seeds: int = 3
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3

    def check(self, key: str, fail: Fail) -> None:
        if not self.channels or min(self.channels) < 1 or self.downsample < 1 or self.seeds < 1 or self.steps < 1:
            fail(key, "needs at least one channel width (each >= 1), downsample, seeds and steps >= 1.")
        if min(self.bin_width, self.label_sigma, self.lr) <= 0 or self.batch_size < 1:
            fail(key, "bin_width, label_sigma and lr must be positive, batch_size >= 1.")
        if any(y <= 0 for y in self.synthetic_years):
            fail(f"{key}.synthetic_years", f"must be positive (years after a scan), got {self.synthetic_years}.")


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
    train_autoencoder: BaselineTrainingConfig = field(default_factory=lambda: BaselineTrainingConfig(batch_size=2))
    ldm: LDMConfig = field(default_factory=LDMConfig)
    train_ldm: BaselineTrainingConfig = field(default_factory=BaselineTrainingConfig)
    stargan: StarGANConfig = field(default_factory=StarGANConfig)
    train_stargan: BaselineTrainingConfig = field(default_factory=BaselineTrainingConfig)
    brain_age: BrainAgeConfig = field(default_factory=BrainAgeConfig)
    # The baselines trained beside NeuroAR (and their autoencoder when any), evaluated and given to the brain-age
    # experiment: the study trains both, the demo none (at its scale they show nothing: benchmarks/DEMO_BUDGET.md).
    baselines: tuple[str, ...] = BASELINES

    @property
    def latent_shape(self) -> Shape3:
        d = self.tokenizer.downsample
        return tuple(s // d for s in self.data.shape)  # type: ignore[return-value]

    @property
    def autoencoder_latent_shape(self) -> Shape3:
        d = self.autoencoder.downsample
        return tuple(s // d for s in self.data.shape)  # type: ignore[return-value]

    def check(self, fail: Fail) -> None:
        """Every section's own rules, then the rules between sections."""
        if not self.name or any(c in self.name for c in "/\\"):
            fail("name", f"{self.name!r} must be a non-empty folder name without slashes.")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.check(f.name, fail)
        for kind in self.baselines:
            if kind not in BASELINES or self.baselines.count(kind) > 1:
                fail("baselines", f"{list(self.baselines)} must name each of {', '.join(BASELINES)} at most once.")
        shape, tok, ae = self.data.shape, self.tokenizer, self.autoencoder
        if any(s % tok.downsample for s in shape):
            fail("data.shape", f"{shape} is not divisible by tokenizer.downsample={tok.downsample}; pick a shape "
                               f"whose sizes are multiples of {tok.downsample}.")
        latent = self.latent_shape
        for k, scale in enumerate(tok.scales):
            if min(scale) < 1 or any(s > m for s, m in zip(scale, latent)):
                fail(f"tokenizer.scales[{k}]", f"{scale} must be between (1, 1, 1) and the latent grid {latent}.")
            if k and any(s < p for s, p in zip(scale, tok.scales[k - 1])):
                fail(f"tokenizer.scales[{k}]", f"{scale} is coarser than the scale before it; scales go from "
                                               "coarse to fine.")
        if tuple(tok.scales[-1]) != latent:
            fail("tokenizer.scales", f"the last scale {tok.scales[-1]} must equal the latent grid {latent} "
                                     f"(data.shape {shape} / tokenizer.downsample {tok.downsample}).")
        if self.transformer.local_scales >= len(tok.scales):
            fail("transformer.local_scales", f"{self.transformer.local_scales} leaves no scale to attention; at most "
                                             f"{len(tok.scales) - 1} of the {len(tok.scales)} scales can be local.")
        if self.train_tokenizer.change_weight > 0 and tok.code != "change":
            fail("train_tokenizer.change_weight", "needs tokenizer.code=change (the loss reads a pair's decoded "
                                                  "change); set it to 0 or code the change.")
        if self.transformer.mean_change and tok.code != "change":
            fail("transformer.mean_change", "needs tokenizer.code=change (the cohort's mean change is a change of "
                                            "the earlier scan's latent); set it to false or code the change.")
        if self.transformer.change_width and not self.transformer.mean_change:
            fail("transformer.change_width", "regresses a scan's deviation from the cohort's mean change; set "
                                             "transformer.mean_change=true or change_width=0.")
        readable = ("latent", "none") if tok.code == "change" else ("tokens", "fhat", "none")
        if self.transformer.earlier not in readable:
            fail("transformer.earlier", f"{self.transformer.earlier!r} does not go with tokenizer.code={tok.code}; "
                                        f"choose one of {', '.join(readable)}.")
        if any(s % ae.downsample for s in shape):
            fail("autoencoder.channels", f"patch {ae.patch} and {len(ae.channels)} levels downsample by "
                                         f"{ae.downsample}, which does not divide data.shape {shape}.")
        if any(c % ae.norm_groups for c in self.ldm.channels):
            fail("ldm.channels", f"every width {self.ldm.channels} must divide by autoencoder.norm_groups "
                                 f"({ae.norm_groups}).")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    """Tuples to lists, recursively, so that the YAML a run writes can be read back by `load_config`."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
