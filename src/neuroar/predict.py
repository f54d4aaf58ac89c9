"""Predicting follow-up scans with a trained run: `Predictor.from_checkpoint(run).predict(image, age, ages)`.

The input is preprocessed exactly like the training data, tokenized, and for each target age the
transformer samples several follow-ups; their mean is the prediction and their per-voxel standard
deviation its uncertainty. A third output keeps what the tokenizer cannot represent: the earlier scan plus
the predicted change (decoded prediction minus the decoded earlier scan). All three are returned in the
input's own grid, affine and intensity range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from neuroar.config import Config, config_from_dict
from neuroar.data.nifti import read_volume
from neuroar.data.preprocess import preprocess_image, to_input_space
from neuroar.errors import NeuroARError
from neuroar.files import sha256_file
from neuroar.models.tokenizer import MSVQVAE
from neuroar.models.transformer import NeuroAR
from neuroar.train.checkpoint import load_checkpoint, read_meta, weights_path
from neuroar.train.tokenizer import tokenizer_checkpoint
from neuroar.train.transformer import build_transformer, resolve_model, transformer_checkpoint


@dataclass
class Prediction:
    """One target age: images in the input's space, and the same on the preprocessed grid for evaluation."""

    target_age: float
    mean: nib.Nifti1Image
    std: nib.Nifti1Image
    detail: nib.Nifti1Image  # earlier scan + (decoded prediction - decoded earlier scan)
    mean_DHW: np.ndarray
    std_DHW: np.ndarray
    detail_DHW: np.ndarray


class Predictor:
    def __init__(self, config: Config, tokenizer: MSVQVAE, model: NeuroAR, device: torch.device | None = None):
        self.config = config
        self.device = device or torch.device("cpu")
        self.tokenizer = tokenizer.to(self.device).eval()
        self.model = model.to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None,
                        sampling: Sequence[str] = ()) -> Predictor:
        """Load a run's tokenizer and transformer (a run folder, or a model folder inside one such as an
        ablation's); refuses a transformer trained on another tokenizer's tokens. `sampling` overrides the
        checkpoint's sampling settings, e.g. ["sampling.temperature=0.5"]."""
        run_dir, name = resolve_model(path)
        stem = transformer_checkpoint(run_dir, name)
        meta = read_meta(stem)
        wrong = [o for o in sampling if not o.startswith("sampling.")]
        if wrong:
            raise NeuroARError(f"only sampling settings can change at prediction time, not {', '.join(wrong)}.")
        config = config_from_dict(meta["config"], str(stem.with_suffix(".json")), sampling)
        tokenizer = tokenizer_checkpoint(run_dir)
        if (not tokenizer.with_suffix(".json").is_file()
                or sha256_file(weights_path(tokenizer)) != meta["tokenizer_sha256"]):
            raise NeuroARError(f"{stem} was trained on the tokens of a tokenizer that {run_dir}/tokenizer no longer "
                               "holds; re-run `neuroar tokenize` and `neuroar train-ar` for this run.")
        tokenizer_model, model = MSVQVAE(config.tokenizer), build_transformer(config)
        load_checkpoint(tokenizer, {"model": tokenizer_model})
        load_checkpoint(stem, {"model": model})
        device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(config, tokenizer_model, model, device)

    def predict(self, image: str | Path | nib.Nifti1Image, age: float, target_ages: Sequence[float],
                samples: int | None = None, seed: int = 0) -> list[Prediction]:
        """Predicted follow-ups of one scan taken at `age`, one per target age (years, each after `age`)."""
        check_ages(age, target_ages)
        img = read_volume(image) if isinstance(image, (str, Path)) else image
        if len(img.shape) != 3:
            raise NeuroARError(f"the input has shape {img.shape}; a single 3D T1-weighted volume is needed.")
        if not np.isfinite(img.get_fdata(dtype=np.float32)).all():
            raise NeuroARError("the input has NaN or infinite voxels; replace them (e.g. with 0) first.")
        volume_DHW, record = preprocess_image(img, self.config.data)
        results = []
        for target_age, (mean, std, detail) in zip(target_ages, self.predict_preprocessed(
                volume_DHW, age, target_ages, samples, seed)):
            results.append(Prediction(float(target_age), to_input_space(mean, record), to_input_space(std, record,
                                      restore_intensity=False), to_input_space(detail, record), mean, std, detail))
        return results

    @torch.no_grad()
    def predict_preprocessed(self, volume_DHW: np.ndarray, age: float, target_ages: Sequence[float],
                             samples: int | None = None, seed: int = 0
                             ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(mean, std, detail-preserving) volumes on the preprocessed grid, one triple per target age."""
        samples = samples or self.config.sampling.samples
        x = torch.from_numpy(np.ascontiguousarray(volume_DHW, dtype=np.float32))[None, None].to(self.device)
        earlier_tokens = self.tokenizer.tokenize(x)
        earlier_decoded = self.tokenizer.decode_tokens(earlier_tokens)[0, 0].clamp(0, 1).cpu().numpy()
        generator = torch.Generator(self.device).manual_seed(seed)
        earlier_tokens = [t.expand(samples, -1, -1, -1) for t in earlier_tokens]
        outputs = []
        for target_age in target_ages:
            tokens = self.model.sample(self.tokenizer.quantizer, earlier_tokens,
                                       torch.full((samples,), float(age), device=self.device),
                                       torch.full((samples,), float(target_age), device=self.device),
                                       self.config.sampling, generator)
            decoded = self.tokenizer.decode_tokens(tokens)[:, 0].clamp(0, 1).cpu().numpy()
            mean = decoded.mean(0)
            detail = np.clip(volume_DHW + mean - earlier_decoded, 0, 1)
            outputs.append((mean, decoded.std(0), detail.astype(np.float32)))
        return outputs


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
