"""Every model evaluation compares, behind one interface: an earlier preprocessed scan and its age in, one
predicted preprocessed scan per target age out.

- `copy`: the follow-up is the earlier scan. What any model must beat on the change it predicts.
- `tokenizer-copy`: the earlier scan through the run's tokenizer: the ceiling that tokenization leaves, and
  what a model that only reproduces its input's tokens would score.
- `tokenizer-oracle` (pairs only: it reads the true follow-up): the earlier scan + decode(tokens of the true
  later scan) - decode(tokens of the earlier scan), the best change any token model can deliver with this
  tokenizer. If its volume change is poor, the tokenizer, not the transformer, holds a model back.
- a trained model: a run folder (its NeuroAR model), an ablation's folder, RUN/ldm or RUN/stargan: the
  sample mean of its predictions; the earlier scan plus its prediction minus the earlier scan through the
  model's own encoder and decoder ("+detail"); and the earlier scan plus its prediction minus its prediction at
  the earlier scan's own age, drawn from the same random numbers ("+aging": what the model says the years
  change, without what it changes in any scan at zero years).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from neuroar.config import Config
from neuroar.predict import Predictor, with_change
from neuroar.runs import MODEL_NAME, load_tokenizer, resolve_model

TRIVIAL = ("copy", "tokenizer-copy", "tokenizer-oracle")


class Forecaster(Protocol):
    """`predict` returns named outputs (a model may offer variants), each one volume per target age."""

    def predict(self, earlier_DHW: np.ndarray, earlier_age: float, target_ages: Sequence[float], seed: int,
                diagnosis: str | None = None) -> dict[str, list[np.ndarray]]: ...


class Copy:
    def predict(self, earlier_DHW, earlier_age, target_ages, seed, diagnosis=None):
        return {"copy": [earlier_DHW for _ in target_ages]}


class TokenizerCopy:
    def __init__(self, run_dir: Path, config: Config):
        self.tokenizer = load_tokenizer(run_dir, config)

    def predict(self, earlier_DHW, earlier_age, target_ages, seed, diagnosis=None):
        decoded = self.reconstruct(earlier_DHW)
        return {"tokenizer-copy": [decoded for _ in target_ages]}

    def oracle(self, earlier_DHW: np.ndarray, later_DHW: np.ndarray, earlier_reconstructed_DHW: np.ndarray
               ) -> np.ndarray:
        """The true follow-up's token change added to the earlier scan: what a perfect token model would give.
        `earlier_reconstructed_DHW` is `predict`'s output for the earlier scan (not encoded and decoded twice)."""
        return with_change(earlier_DHW, self.reconstruct(later_DHW), earlier_reconstructed_DHW)

    @torch.no_grad()
    def reconstruct(self, volume_DHW: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(volume_DHW))[None, None]
        return self.tokenizer.decode_tokens(self.tokenizer.tokenize(x))[0, 0].clamp(0, 1).numpy()


class ModelForecaster:
    """The sample mean of a model's predictions, "NAME+detail" and "NAME+aging" (see the module's text). NAME
    is the run's name for its NeuroAR model, RUN/MODEL otherwise."""

    def __init__(self, name: str, predictor: Predictor, samples: int | None = None):
        self.name, self.predictor, self.samples = name, predictor, samples

    @classmethod
    def load(cls, path: Path, samples: int | None = None, sampling: Sequence[str] = ()) -> ModelForecaster:
        run_dir, model = resolve_model(path)
        name = run_dir.name if model == MODEL_NAME else f"{run_dir.name}/{model}"
        return cls(name, Predictor.from_checkpoint(path, sampling=sampling), samples)

    def predict(self, earlier_DHW, earlier_age, target_ages, seed, diagnosis=None):
        # Every age draws the same random numbers, so the prediction at the earlier scan's own age holds the
        # model's changes that are not aging (the tokens it flips in any scan) and cancels them.
        (unaged_DHW, _, _), *outputs = self.predictor.predict_preprocessed(
            earlier_DHW, earlier_age, [earlier_age, *target_ages], self.samples, seed, diagnosis)
        return {self.name: [mean for mean, _, _ in outputs], f"{self.name}+detail": [d for _, _, d in outputs],
                f"{self.name}+aging": [with_change(earlier_DHW, mean, unaged_DHW) for mean, _, _ in outputs]}


def load_forecasters(specs: Sequence[str], run_dir: Path, config: Config, samples: int | None = None,
                     sampling: Sequence[str] = ()) -> list[Forecaster]:
    """The trivial baselines first (always), then each model folder given (with `sampling` overrides)."""
    models = [ModelForecaster.load(Path(spec), samples, sampling) for spec in specs if spec not in TRIVIAL]
    return [Copy(), TokenizerCopy(run_dir, config), *models]
