"""Predicting follow-up scans with a trained model: `Predictor.from_checkpoint(path).predict(image, age, ages)`.

The same interface for NeuroAR (a run folder or an ablation's model folder) and the baselines (RUN/ldm,
RUN/stargan). The input is preprocessed exactly like the training data, encoded by the model's own
tokenizer or autoencoder, and for each target age the model draws several follow-ups; their mean is the
prediction and their per-voxel standard deviation its uncertainty. (A NeuroAR model of a change-coding
tokenizer draws the tokens of the change and decodes them on top of the earlier scan's latent.) A third output
keeps what the encoder cannot represent: the earlier scan plus the predicted change (decoded prediction minus
the decoded earlier scan). All three are returned in the input's own grid, affine and intensity range; the third
is the input itself plus the predicted change resampled onto it, so it keeps the input's own resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn

from neuroar import distributed
from neuroar.checkpoint import load_checkpoint, read_meta, weights_path
from neuroar.config import Config, config_from_dict
from neuroar.data.latents import autoencoder_sha256
from neuroar.data.nifti import read_volume, write_volume
from neuroar.data.preprocess import preprocess_image, to_input_space, with_change_in_input_space
from neuroar.errors import NeuroARError
from neuroar.files import sha256_file
from neuroar.models.baselines import build_baseline, predict_latent
from neuroar.models.tokenizer import MSVQVAE
from neuroar.models.transformer import NeuroAR, build_transformer, earlier_latent_features
from neuroar.runs import MODEL_NAME, load_autoencoder, load_tokenizer, resolve_model, tokenizer_checkpoint

# Settings a prediction may change: how to sample, and how the input is prepared (not what the model learnt).
PREDICTION_SETTINGS = ("sampling.", "ldm.ddim_steps=", "data.raw=", "data.register=")


@dataclass
class Prediction:
    """One target age: images in the input's space, and the same on the preprocessed grid for evaluation."""

    target_age: float
    mean: nib.Nifti1Image
    std: nib.Nifti1Image
    detail: nib.Nifti1Image  # the input + (decoded prediction - decoded earlier scan), at the input's resolution
    mean_DHW: np.ndarray
    std_DHW: np.ndarray
    detail_DHW: np.ndarray


class Predictor:
    """What every model's predictions share: preprocessing, the sample mean and spread, the detail-preserving
    variant, and the way back to the input's space. Subclasses produce decoded samples."""

    def __init__(self, config: Config, device: torch.device | None = None):
        self.config = config
        self.device = device or torch.device("cpu")

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None,
                        sampling: Sequence[str] = ()) -> Predictor:
        """Load a trained model: a run folder (its NeuroAR model) or a model folder inside one (an ablation,
        RUN/ldm, RUN/stargan). `sampling` overrides the checkpoint's sampling settings, e.g.
        ["sampling.temperature=0.5"] (NeuroAR) or ["ldm.ddim_steps=20"] (LDM), and how the input is prepared:
        ["data.raw=true"] for a raw scan (a head, any pose) given to a model trained on skull-stripped scans."""
        run_dir, name = resolve_model(path)
        stem = run_dir / name / "last"
        meta = read_meta(stem)
        kind = meta.get("model", MODEL_NAME)
        wrong = [o for o in sampling if not o.startswith(PREDICTION_SETTINGS)]
        if wrong:
            raise NeuroARError("only sampling.*, ldm.ddim_steps, data.raw and data.register can change at prediction "
                               f"time, not {', '.join(wrong)}.")
        config = config_from_dict(meta["config"], str(stem.with_suffix(".json")), sampling)
        device = torch.device(device) if device else distributed.default_device()
        if kind == MODEL_NAME:
            return NeuroARPredictor.load(run_dir, stem, meta, config, device)
        return LatentPredictor.load(run_dir, stem, meta, config, device)

    def predict(self, image: str | Path | nib.Nifti1Image, age: float, target_ages: Sequence[float],
                samples: int | None = None, seed: int = 0, diagnosis: str | None = None) -> list[Prediction]:
        """Predicted follow-ups of one scan taken at `age`, one per target age (years, each after `age`).
        `diagnosis`: the subject's, for a NeuroAR model conditioned on it (`transformer.diagnoses`); others
        ignore it."""
        check_ages(age, target_ages)
        img = read_volume(image) if isinstance(image, (str, Path)) else image
        if len(img.shape) != 3:
            raise NeuroARError(f"the input has shape {img.shape}; a single 3D T1-weighted volume is needed.")
        if not np.isfinite(img.get_fdata(dtype=np.float32)).all():
            raise NeuroARError("the input has NaN or infinite voxels; replace them (e.g. with 0) first.")
        volume_DHW, record = preprocess_image(img, self.config.data)
        input_XYZ = img.get_fdata(dtype=np.float32)  # "detail" is this plus the predicted change
        results = []
        for target_age, (mean, std, detail) in zip(target_ages, self.predict_preprocessed(
                volume_DHW, age, target_ages, samples, seed, diagnosis)):
            results.append(Prediction(
                float(target_age), to_input_space(mean, record), to_input_space(std, record, restore_intensity=False),
                with_change_in_input_space(detail - volume_DHW, record, input_XYZ),
                mean, std, detail))
        return results

    def predict_preprocessed(self, volume_DHW: np.ndarray, age: float, target_ages: Sequence[float],
                             samples: int | None = None, seed: int = 0, diagnosis: str | None = None
                             ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(mean, std, detail-preserving) volumes on the preprocessed grid, one triple per target age.

        Every target age draws its samples from the same random numbers (the generator restarts at `seed`), so
        a trajectory over several ages differs from age to age by what the ages change, not by fresh sampling
        noise: predicting [71, 74] gives at 74 exactly what predicting [74] gives."""
        return self.predict_scans([volume_DHW], [age], [target_ages], samples, [seed], [diagnosis])[0]

    @torch.no_grad()
    def predict_scans(self, volumes_DHW: Sequence[np.ndarray], ages: Sequence[float],
                      target_ages: Sequence[Sequence[float]], samples: int | None = None,
                      seeds: Sequence[int] | None = None, diagnoses: Sequence[str | None] | None = None,
                      batch: int = 16) -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """`predict_preprocessed` of every scan i (its age, target ages, seed and diagnosis the i-th of each),
        `batch` scans at a time where the model can batch scans (the baselines; NeuroAR goes scan by scan): each
        scan's numbers are those of its own call, to float rounding, whatever the batch."""
        samples = samples or self.config.sampling.samples
        seeds = list(seeds) if seeds is not None else [0] * len(volumes_DHW)
        diagnoses = list(diagnoses) if diagnoses is not None else [None] * len(volumes_DHW)
        results = []
        for start in range(0, len(volumes_DHW), batch):
            chunk = slice(start, start + batch)
            x_B1DHW = torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in volumes_DHW[chunk]])
                                       )[:, None].to(self.device)
            decoded = self.decoded_batch(x_B1DHW, ages[chunk], target_ages[chunk], samples,
                                         [self._restarting(seed) for seed in seeds[chunk]], diagnoses[chunk])
            for volume_DHW, (earlier_decoded, per_age) in zip(volumes_DHW[chunk], decoded):
                results.append([(mean, decoded_SDHW.std(0), with_change(volume_DHW, mean, earlier_decoded))
                                for mean, decoded_SDHW in per_age])
        return results

    def decoded_batch(self, x_B1DHW: torch.Tensor, ages: Sequence[float], target_ages: Sequence[Sequence[float]],
                      samples: int, generators: Sequence[Callable[[], torch.Generator]],
                      diagnoses: Sequence[str | None]) -> list[tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]]:
        """Per scan of the batch (B, 1, D, H, W): the scan through the model's own encoder and decoder (D, H, W),
        and per target age the prediction (D, H, W) with the `samples` decoded follow-ups (S, D, H, W) it
        combines, clamped to [0, 1]. `generators[i]()` gives scan i's random generator, restarted (at every
        target age)."""
        raise NotImplementedError

    def _restarting(self, seed: int) -> Callable[[], torch.Generator]:
        generator = torch.Generator(self.device)
        return lambda: generator.manual_seed(seed)

    def _ages(self, ages: float | Sequence[float], samples: int) -> torch.Tensor:
        """Each age `samples` times in a row: (len(ages) * samples,), or (samples,) for one age."""
        ages_B = torch.tensor(np.atleast_1d(np.asarray(ages, dtype=np.float32)))
        return ages_B.repeat_interleave(samples).to(self.device)


class NeuroARPredictor(Predictor):
    def __init__(self, config: Config, tokenizer: MSVQVAE, model: NeuroAR, device: torch.device | None = None):
        super().__init__(config, device)
        self.tokenizer = tokenizer.to(self.device).eval()
        self.model = model.to(self.device).eval()

    @classmethod
    def load(cls, run_dir: Path, stem: Path, meta: dict, config: Config, device: torch.device) -> NeuroARPredictor:
        """Refuses a transformer trained on another tokenizer's tokens."""
        tokenizer = tokenizer_checkpoint(run_dir)
        if (not tokenizer.with_suffix(".json").is_file()
                or sha256_file(weights_path(tokenizer)) != meta["tokenizer_sha256"]):
            raise NeuroARError(f"{stem} was trained on the tokens of a tokenizer that {run_dir}/tokenizer no longer "
                               "holds; re-run `neuroar tokenize` and `neuroar train-ar` for this run.")
        model = build_transformer(config)
        load_checkpoint(stem, {"model": model})
        return cls(config, load_tokenizer(run_dir, config), model, device)

    def decoded_batch(self, x_B1DHW, ages, target_ages, samples, generators, diagnoses):
        # Scan by scan: a sampling step draws all its tokens from one generator. (Batching scans would gain little
        # on a CPU: the transformer is compute-bound; random demo weights, beside another job: 1.5x at 16 scans.)
        return [self._decoded_scan(x_B1DHW[i:i + 1], ages[i], target_ages[i], samples, generators[i], diagnoses[i])
                for i in range(len(ages))]

    def _decoded_scan(self, x, age, target_ages, samples, generator, diagnosis):
        if self.config.sampling.codes == "expected":  # one deterministic prediction: more samples would repeat it
            samples = 1
        diagnosis_S = self.model.diagnosis_ids([diagnosis]).to(self.device).expand(samples)
        f_earlier = self.tokenizer.latent_scan(x)
        unchanged = self.tokenizer.unchanged_tokens(f_earlier)
        earlier_decoded = self.tokenizer.decode_unchanged(f_earlier)[0]
        f_earlier_S = f_earlier.expand(samples, -1, -1, -1, -1)
        unchanged = [t.expand(samples, -1, -1, -1) for t in unchanged]
        earlier_maps = (earlier_latent_features(self.tokenizer.quantizer.scales, f_earlier_S)
                        if self.config.tokenizer.code == "change" else None)
        per_age = []
        for target_age in target_ages:
            _, f_hat_S = self.model.sample(self.tokenizer.quantizer, unchanged, self._ages(age, samples),
                                           self._ages(target_age, samples), self.config.sampling, generator(),
                                           diagnosis_B=diagnosis_S, earlier_maps=earlier_maps)
            years_S = self._ages(target_age, samples) - self._ages(age, samples)
            f_S = self.tokenizer.with_earlier(self.model.change_base(f_earlier_S, years_S, self._ages(age, samples)),
                                              f_hat_S)
            decoded = self.tokenizer.decode_latent(f_S)
            if self.config.sampling.average == "fhat":  # decode the samples' mean latent
                mean = self.tokenizer.decode_latent(f_S.mean(0, keepdim=True))[0]
            else:
                mean = decoded.mean(0)
            per_age.append((mean, decoded))
        return earlier_decoded, per_age


class LatentPredictor(Predictor):
    """An LDM or latent StarGAN in its run's AutoencoderKL latent space (StarGAN is deterministic: its
    samples are identical and its spread zero)."""

    def __init__(self, config: Config, kind: str, autoencoder: nn.Module, model: nn.Module, latent_scale: float,
                 device: torch.device | None = None):
        super().__init__(config, device)
        self.kind, self.latent_scale = kind, latent_scale
        self.autoencoder = autoencoder.to(self.device).eval()
        self.model = model.to(self.device).eval()

    @classmethod
    def load(cls, run_dir: Path, stem: Path, meta: dict, config: Config, device: torch.device) -> LatentPredictor:
        """Refuses a baseline trained in the latent space of another autoencoder."""
        if autoencoder_sha256(run_dir) != meta["autoencoder_sha256"]:
            raise NeuroARError(f"{stem} was trained on the latents of an autoencoder that {run_dir}/autoencoder no "
                               f"longer holds; re-run `neuroar train-baseline {meta['model']} --run {run_dir}`.")
        model = build_baseline(meta["model"], config)["model"]
        load_checkpoint(stem, {"model": model})
        return cls(config, meta["model"], load_autoencoder(run_dir, config), model, float(meta["latent_scale"]),
                   device)

    def decoded_batch(self, x_B1DHW, ages, target_ages, samples, generators, diagnoses):
        if self.kind == "stargan":
            samples = 1  # deterministic: every sample would be this one
        latent_BCdhw = self.autoencoder.encode_scan(x_B1DHW)
        earlier_decoded = self.autoencoder.decode(latent_BCdhw)[:, 0].clamp(0, 1).cpu().numpy()
        # Each scan's starting noise comes from its own generator, the numbers a batch of one draws (the LDM's DDIM
        # sampling is deterministic from there), and the same at every target age.
        latent_BSCdhw = (latent_BCdhw * self.latent_scale)[:, None].expand(-1, samples, -1, -1, -1, -1)
        noise_BSCdhw = None
        if self.kind == "ldm":
            noise_BSCdhw = torch.stack([torch.randn((samples, *latent_BCdhw.shape[1:]), generator=generator(),
                                                    device=self.device) for generator in generators])
        per_scan: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in ages]
        for k in range(max(len(t) for t in target_ages)):  # the k-th target age of every scan that has one
            rows = [i for i, t in enumerate(target_ages) if len(t) > k]
            predicted = predict_latent(self.kind, self.model, latent_BSCdhw[rows].flatten(0, 1),
                                       self._ages([ages[i] for i in rows], samples),
                                       self._ages([target_ages[i][k] for i in rows], samples),
                                       None if noise_BSCdhw is None else noise_BSCdhw[rows].flatten(0, 1))
            decoded = self.autoencoder.decode(predicted / self.latent_scale)[:, 0].clamp(0, 1).cpu().numpy()
            for i, decoded_SDHW in zip(rows, decoded.reshape(len(rows), samples, *decoded.shape[1:])):
                per_scan[i].append((decoded_SDHW.mean(0), decoded_SDHW))
        return [(earlier_decoded[i], per_scan[i]) for i in range(len(ages))]


def write_predictions(checkpoint: str | Path, image: str | Path, age: float, target_ages: Sequence[float],
                      out_dir: str | Path, samples: int | None = None, seed: int = 0, sampling: Sequence[str] = (),
                      device: str | torch.device | None = None, diagnosis: str | None = None) -> list[Path]:
    """Predict a scan at each target age and write, per age, OUT/STEM_age-A_{mean,std,detail}.nii.gz in the
    input's grid and header; returns the files written. `sampling` as in `Predictor.from_checkpoint`."""
    image, out_dir = Path(image), Path(out_dir)
    if out_dir.resolve() == image.resolve().parent:
        raise NeuroARError(f"--out {out_dir} is the input's folder; write predictions to a folder of their own.")
    if samples is not None and samples < 1:
        raise NeuroARError(f"--samples must be at least 1, got {samples}.")
    check_ages(age, target_ages)
    volume = read_volume(image)
    predictor = Predictor.from_checkpoint(checkpoint, device, sampling=sampling)
    stem = image.name.removesuffix(".gz").removesuffix(".nii")
    written = []
    for prediction in predictor.predict(volume, age, target_ages, samples, seed, diagnosis):
        for kind in ("mean", "std", "detail"):
            path = out_dir / f"{stem}_age-{prediction.target_age:g}_{kind}.nii.gz"
            write_volume(path, getattr(prediction, kind).get_fdata(dtype="float32"), volume.affine, volume.header)
            written.append(path)
    return written


def with_change(volume_DHW: np.ndarray, after_DHW: np.ndarray, before_DHW: np.ndarray) -> np.ndarray:
    """The scan plus the change from `before` to `after` (two outputs of one model, so that what the model does
    to any scan cancels), clipped to the intensity range."""
    return np.clip(volume_DHW + after_DHW - before_DHW, 0, 1).astype(np.float32)


def check_ages(age: float, target_ages: Sequence[float]) -> None:
    if not target_ages:
        raise NeuroARError("no target age given; pass at least one (e.g. --target-age 75).")
    for value in [age, *target_ages]:
        if not math.isfinite(value) or not 0 <= value <= 130:
            raise NeuroARError(f"age {value} is not a plausible age in years (0-130).")
    earlier = [t for t in target_ages if t <= age]
    if earlier:
        raise NeuroARError(f"target ages {earlier} are not after the scan's age {age}; NeuroAR predicts "
                           "follow-ups, so every target age must be later than the input's.")
