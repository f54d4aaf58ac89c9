"""Every model evaluation compares, behind one interface: an earlier preprocessed scan and its age in, one
predicted preprocessed scan per target age out, each under an `Output` (a model and which of its outputs).

- `copy`: the follow-up is the earlier scan. What any model must beat on the change it predicts.
- `tokenizer-copy`: the earlier scan through the run's tokenizer (decoded from the tokens of "nothing changed"):
  what tokenization alone costs, and what a model that only predicts no change would score.
- `tokenizer-oracle` (pairs only: it reads the true follow-up): the earlier scan + decode(tokens of the true
  later scan) - decode(tokens of no change), tokens and decoding against the earlier scan (see
  models/tokenizer.py): how much of the true change the token space carries. A pair with no change gets the
  earlier scan back (to float rounding), so no decoder bias counts as change. It is
  no bound on what a token model delivers: its change carries the tokenizer's decoding noise as well, and where
  the truth barely changes (the adolescents' ventricles) copy beats it.
- `mean-change` (change-coding runs): the earlier scan + decode(its latent advanced by the cohort's mean latent
  change per year x the years) - decode(its latent), the training pairs' mean change fitted in closed form
  (models/mean_change.py): what knowing only the cohort's average aging predicts. A model that does not beat it
  has learnt nothing of the subject's own aging.
- `volume-trend` (evaluate/volume_trend.py; no image, so no image metrics): each region's change as the training
  pairs' linear trend of the volumes with the years and the earlier age: what the ages alone say of the volumes.
- a trained model: a run folder (its NeuroAR model), an ablation's folder, RUN/ldm or RUN/stargan: the
  sample mean of its predictions; the earlier scan plus its prediction minus the earlier scan through the
  model's own encoder and decoder (variant "detail"); and the earlier scan plus its prediction minus its
  prediction at the earlier scan's own age, drawn from the same random numbers (variant "aging": what the model
  says the years change, without what it changes in any scan at zero years); for a NeuroAR model with a change
  regressor (`transformer.change_width`) also its change base alone (variant "base", `ChangeBase`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from neuroar import distributed
from neuroar.config import Config
from neuroar.data.fingerprint import check_model_fits_run
from neuroar.data.tokens import run_mean_change, token_path
from neuroar.errors import NeuroARError
from neuroar.models.mean_change import advance
from neuroar.predict import NeuroARPredictor, Predictor, with_change
from neuroar.runs import MODEL_NAME, load_tokenizer, resolve_model, tokenizer_checkpoint

TRIVIAL = ("copy", "tokenizer-copy", "tokenizer-oracle", "mean-change", "volume-trend")
PLAIN = "plain"  # a model's own output, not one of its variants
BASE = "base"  # a NeuroAR model's change base alone (`ChangeBase`)


@dataclass(frozen=True)
class Output:
    """One output of a forecaster: `model` ("copy", a run's name, RUN/MODEL) and `variant` (PLAIN, "detail",
    "aging"). `label` names it in tables: the model, or MODEL+VARIANT."""

    model: str
    variant: str = PLAIN

    @property
    def label(self) -> str:
        return self.model if self.variant == PLAIN else f"{self.model}+{self.variant}"


class Forecaster(Protocol):
    """`predict` returns each of its outputs as one volume per target age. `later_DHWs`, the true follow-ups at
    the target ages, are given when evaluating pairs (and then only a forecaster that measures the truth, the
    tokenizer-oracle, reads them); an age sweep has none."""

    def predict(self, earlier_DHW: np.ndarray, earlier_age: float, target_ages: Sequence[float], seed: int,
                diagnosis: str | None = None, later_DHWs: Sequence[np.ndarray] | None = None
                ) -> dict[Output, list[np.ndarray]]: ...


class Copy:
    def predict(self, earlier_DHW, earlier_age, target_ages, seed, diagnosis=None, later_DHWs=None):
        return {Output("copy"): [earlier_DHW for _ in target_ages]}


class TokenizerCopy:
    def __init__(self, run_dir: Path, config: Config, device: torch.device | None = None):
        self.tokenizer = load_tokenizer(run_dir, config).to(device or distributed.default_device())

    def predict(self, earlier_DHW, earlier_age, target_ages, seed, diagnosis=None, later_DHWs=None):
        decoded = self.reconstruct(earlier_DHW)
        return {Output("tokenizer-copy"): [decoded for _ in target_ages]}

    def reconstruct(self, earlier_DHW: np.ndarray, later_DHW: np.ndarray | None = None) -> np.ndarray:
        """The follow-up `later` (None: the earlier scan itself) through the tokenizer's tokens, coded against
        the earlier scan."""
        f_earlier = self.tokenizer.latent_scan(earlier_DHW)
        f_later = f_earlier if later_DHW is None else self.tokenizer.latent_scan(later_DHW)
        return self.tokenizer.decode_followup(f_earlier, self.tokenizer.followup_tokens(f_earlier, f_later))[0]


class TokenizerOracle:
    """The true follow-up's token change added to the earlier scan, through `tokenizer_copy`'s tokenizer."""

    def __init__(self, tokenizer_copy: TokenizerCopy):
        self.tokenizer_copy = tokenizer_copy

    def predict(self, earlier_DHW, earlier_age, target_ages, seed, diagnosis=None, later_DHWs=None):
        if later_DHWs is None or len(later_DHWs) != len(target_ages):
            raise NeuroARError("the tokenizer-oracle needs the true follow-up at every target age; it evaluates "
                               "pairs, not an age sweep.")
        unchanged_DHW = self.tokenizer_copy.reconstruct(earlier_DHW)
        return {Output("tokenizer-oracle"): [with_change(earlier_DHW, self.tokenizer_copy.reconstruct(
            earlier_DHW, later_DHW), unchanged_DHW) for later_DHW in later_DHWs]}


class MeanChange:
    """The earlier scan advanced by the cohort's mean change (see the module's text), through `tokenizer_copy`'s
    tokenizer."""

    def __init__(self, tokenizer_copy: TokenizerCopy, mean_change_Cdhw: torch.Tensor):
        self.tokenizer = tokenizer_copy.tokenizer
        self.mean_change_Cdhw = mean_change_Cdhw.to(next(self.tokenizer.parameters()).device)

    def predict(self, earlier_DHW, earlier_age, target_ages, seed, diagnosis=None, later_DHWs=None):
        f_earlier = self.tokenizer.latent_scan(earlier_DHW)
        unchanged_DHW = self.tokenizer.decode_unchanged(f_earlier)[0]
        years_T = torch.tensor([age - earlier_age for age in target_ages], dtype=torch.float32)
        aged_TDHW = self.tokenizer.decode_latent(advance(f_earlier.expand(len(years_T), -1, -1, -1, -1), years_T,
                                                         self.mean_change_Cdhw))
        return {Output("mean-change"): [with_change(earlier_DHW, aged_DHW, unchanged_DHW) for aged_DHW in aged_TDHW]}


class ChangeBase:
    """A NeuroAR model's change base alone (with `transformer.change_width`): the earlier scan + decode(its latent
    advanced by the aging the model's change regressor expects) - decode(its latent), output MODEL+base. What the
    model predicts before any token: its tokens must add to it."""

    def __init__(self, name: str, predictor: NeuroARPredictor):
        self.name, self.tokenizer, self.model = name, predictor.tokenizer, predictor.model

    @torch.no_grad()
    def predict(self, earlier_DHW, earlier_age, target_ages, seed, diagnosis=None, later_DHWs=None):
        f_earlier = self.tokenizer.latent_scan(earlier_DHW)
        unchanged_DHW = self.tokenizer.decode_unchanged(f_earlier)[0]
        device = f_earlier.device
        years_T = torch.tensor([age - earlier_age for age in target_ages], dtype=torch.float32, device=device)
        ages_T = torch.full_like(years_T, float(earlier_age))
        aged_TDHW = self.tokenizer.decode_latent(self.model.change_base(
            f_earlier.expand(len(years_T), -1, -1, -1, -1), years_T, ages_T))
        return {Output(self.name, BASE): [with_change(earlier_DHW, aged_DHW, unchanged_DHW)
                                            for aged_DHW in aged_TDHW]}


class ModelForecaster:
    """The sample mean of a model's predictions and its variants "detail" and "aging" (see the module's text).
    The model is named by the run's name for its NeuroAR model, RUN/MODEL otherwise."""

    def __init__(self, name: str, predictor: Predictor, samples: int | None = None):
        self.name, self.predictor, self.samples = name, predictor, samples

    @classmethod
    def load(cls, path: Path, samples: int | None = None, sampling: Sequence[str] = ()) -> ModelForecaster:
        run_dir, model = resolve_model(path)
        name = run_dir.name if model == MODEL_NAME else f"{run_dir.name}/{model}"
        return cls(name, Predictor.from_checkpoint(path, sampling=sampling), samples)

    def predict(self, earlier_DHW, earlier_age, target_ages, seed, diagnosis=None, later_DHWs=None):
        return self.predict_many([(earlier_DHW, earlier_age, target_ages, diagnosis)], seed)[0]

    def predict_many(self, scans: Sequence[tuple[np.ndarray, float, Sequence[float], str | None]], seed: int
                     ) -> list[dict[Output, list[np.ndarray]]]:
        """`predict` of each (earlier scan, its age, target ages, diagnosis), all with `seed`: one call, so that
        a model that batches scans (the baselines) predicts them together."""
        # Every age draws the same random numbers, so the prediction at the earlier scan's own age holds the
        # model's changes that are not aging (the tokens it flips in any scan) and cancels them.
        predictions = self.predictor.predict_scans(
            [scan[0] for scan in scans], [scan[1] for scan in scans], [[scan[1], *scan[2]] for scan in scans],
            self.samples, [seed] * len(scans), [scan[3] for scan in scans])
        results = []
        for (earlier_DHW, *_), ((unaged_DHW, _, _), *outputs) in zip(scans, predictions):
            results.append({
                Output(self.name): [mean for mean, _, _ in outputs],
                Output(self.name, "detail"): [detail for _, _, detail in outputs],
                Output(self.name, "aging"): [with_change(earlier_DHW, mean, unaged_DHW) for mean, _, _ in outputs]})
        return results


def predict_many(forecaster: Forecaster, scans: Sequence[tuple], seed: int,
                 later_DHWs: Sequence[Sequence[np.ndarray]] | None = None) -> list[dict[Output, list[np.ndarray]]]:
    """Each scan's outputs (scans as `ModelForecaster.predict_many` takes them; `later_DHWs`: each scan's true
    follow-ups, for the tokenizer-oracle): a trained model's together, the others' one by one."""
    if isinstance(forecaster, ModelForecaster):
        return forecaster.predict_many(scans, seed)
    later_DHWs = later_DHWs or [None] * len(scans)
    return [forecaster.predict(earlier_DHW, age, targets, seed, diagnosis, later)
            for (earlier_DHW, age, targets, diagnosis), later in zip(scans, later_DHWs)]


def load_forecasters(specs: Sequence[str], run_dir: Path, config: Config, samples: int | None = None,
                     sampling: Sequence[str] = ()) -> list[Forecaster]:
    """The trivial baselines first (always), then each model folder given (with `sampling` overrides). A model
    (or the run's tokenizer) trained on other data than its run now holds is refused."""
    check_model_fits_run(tokenizer_checkpoint(run_dir), run_dir)
    for spec in specs:
        if spec not in TRIVIAL:
            check_model_fits_run(Path.joinpath(*resolve_model(spec)) / "last", resolve_model(spec)[0])
    models = [ModelForecaster.load(Path(spec), samples, sampling) for spec in specs if spec not in TRIVIAL]
    tokenizer_copy = TokenizerCopy(run_dir, config)
    trivial = [Copy(), tokenizer_copy, TokenizerOracle(tokenizer_copy)]
    if config.tokenizer.code == "change" and token_path(run_dir).with_suffix(".json").is_file():
        trivial.append(MeanChange(tokenizer_copy, run_mean_change(run_dir, config.train_transformer.mirror)))
    bases = [ChangeBase(m.name, m.predictor) for m in models
             if isinstance(m.predictor, NeuroARPredictor) and m.predictor.model.change_regressor is not None]
    return [*trivial, *models, *bases]
