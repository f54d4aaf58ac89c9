"""Training the NeuroAR transformer on a run's cached tokens.

Every (earlier, later) pair of scans of a training subject is one example (and, with
`train_transformer.mirror`, the same pair with both scans mirrored left-right): the later scan's tokens are
the target (with `tokenizer.code: change`, the tokens of its change from the earlier scan), cross-entropy with
teacher forcing. The frozen tokenizer's quantizer turns each scan's tokens once
into the two sequences the model reads (its teacher-forcing inputs, and its features as an earlier scan);
batches are then only indexing. Logged losses and accuracies are those of the whole step (every micro-batch
and process), beside the accuracy of copying the earlier scan's tokens: a model below it has not learned
to keep what stays. Ages (and diagnoses, see `transformer.diagnoses`) are dropped for
`transformer.condition_dropout` of the pairs so that sampling can use classifier-free guidance. A model lives
in RUN/NAME/ (NAME = "neuroar" unless an ablation gets its own): last.* (with the sha256 of the tokenizer
weights the tokens came from) and config.yaml; logs go to RUN/NAME_train.csv, RUN/NAME_val.csv and
TensorBoard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from neuroar import distributed
from neuroar.checkpoint import load_checkpoint, weights_path
from neuroar.config import Config
from neuroar.data.fingerprint import data_fingerprint
from neuroar.data.tokens import ChangeBase, earlier_ages, pair_rows, pair_tokens, token_path, training_tokens
from neuroar.files import sha256_file
from neuroar.models.mean_change import fit_mean_change
from neuroar.models.quantizer import MultiScaleQuantizer
from neuroar.models.tokenizer import MSVQVAE
from neuroar.models.transformer import (
    NeuroAR,
    build_transformer,
    earlier_latent_features,
    earlier_scale_features,
    flatten,
    teacher_forcing_sequence,
)
from neuroar.runs import MODEL_NAME, load_tokenizer, model_checkpoint, tokenizer_checkpoint
from neuroar.train.loop import batch_indices, check_trained_on, is_log_step, run_steps


@dataclass
class ScanSequences:
    """Per scan of the run (N scans, L tokens over all scales, C latent channels): its tokens (N, L), its
    teacher-forcing inputs as a target (N, L, C) and its input as an earlier scan (N, L, C'), as
    `transformer.earlier` (`earlier`) asks for it."""

    tokens_NL: torch.Tensor
    inputs_NLC: torch.Tensor
    earlier_NLC: torch.Tensor

    @classmethod
    def build(cls, quantizer: MultiScaleQuantizer, tokens: list[torch.Tensor], earlier: str, chunk: int = 32
              ) -> ScanSequences:
        inputs, features = [], []
        for start in range(0, len(tokens[0]), chunk):
            part = [t[start:start + chunk] for t in tokens]
            inputs.append(teacher_forcing_sequence(quantizer, part))
            features.append(torch.cat([flatten(f) for f in earlier_scale_features(quantizer, part, earlier)], 1))
        return cls(torch.cat([t.flatten(1) for t in tokens], 1), torch.cat(inputs), torch.cat(features))

    def targets(self, pairs: pd.DataFrame, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The unchanged tokens (the earlier scan's) and the target tokens of the chosen pairs, (B, L) each."""
        chosen = pairs.iloc[rows]
        earlier, later = (torch.as_tensor(chosen[column].to_numpy(copy=True))
                          for column in ("earlier_index", "later_index"))
        return self.tokens_NL[earlier], self.tokens_NL[later]

    def batch(self, pairs: pd.DataFrame, rows: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        chosen = pairs.iloc[rows]
        earlier = torch.as_tensor(chosen["earlier_index"].to_numpy(copy=True))
        later = torch.as_tensor(chosen["later_index"].to_numpy(copy=True))
        unchanged, tokens = self.targets(pairs, rows)
        return {"target_inputs": self.inputs_NLC[later].to(device), "earlier": self.earlier_NLC[earlier].to(device),
                "earlier_tokens": unchanged.to(device), "tokens": tokens.to(device), **_conditions(chosen, device)}


@dataclass
class ChangeSequences:
    """With `tokenizer.code: change`: per scan its continuous latent (N, C, d, h, w), per pair the tokens of its
    change (P, L), and the tokens of no change (L,), the "copy" of this token space. A batch's teacher-forcing
    inputs and earlier-scan inputs are made from them on the fly: stored for every pair and scale they would
    take ~1.5 MB per pair at a 20x24x22 grid, made per batch they cost a few pooling and 3x3x3 convolutions.
    Given a change base (`NeuroAR.change_base`, with `transformer.mean_change`) the tokens code each follow-up
    against its earlier latent advanced by the aging it expects, and "copy" is then that expected aging."""

    quantizer: MultiScaleQuantizer
    latents_NCdhw: torch.Tensor
    tokens_PL: torch.Tensor
    row: dict[tuple[int, int], int]
    unchanged_L: torch.Tensor

    @classmethod
    def build(cls, tokenizer: MSVQVAE, latents_NCdhw: torch.Tensor, pairs: list[pd.DataFrame],
              change_base: ChangeBase | None = None) -> ChangeSequences:
        every = pd.concat(pairs).drop_duplicates(["earlier_index", "later_index"])
        every = every.sort_values(["earlier_index", "later_index"]).reset_index(drop=True)
        tokens = pair_tokens(tokenizer, latents_NCdhw, *pair_rows(every), earlier_ages(every), change_base)
        unchanged = tokenizer.unchanged_tokens(latents_NCdhw[:1])
        keys = zip(every["earlier_index"], every["later_index"])
        return cls(tokenizer.quantizer, latents_NCdhw, torch.cat([t.flatten(1) for t in tokens], 1),
                   {key: i for i, key in enumerate(keys)}, torch.cat([t.flatten(1) for t in unchanged], 1)[0])

    def targets(self, pairs: pd.DataFrame, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens of no change and the chosen pairs' change tokens, (B, L) each."""
        chosen = pairs.iloc[rows]
        tokens_BL = self.tokens_PL[[self.row[key] for key in zip(chosen["earlier_index"], chosen["later_index"])]]
        return self.unchanged_L.expand(len(rows), -1), tokens_BL

    @torch.no_grad()
    def batch(self, pairs: pd.DataFrame, rows: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        chosen = pairs.iloc[rows]
        earlier = torch.as_tensor(chosen["earlier_index"].to_numpy(copy=True))
        unchanged_BL, tokens_BL = self.targets(pairs, rows)
        maps, start = [], 0
        for d, h, w in self.quantizer.scales:
            maps.append(tokens_BL[:, start:start + d * h * w].view(-1, d, h, w))
            start += d * h * w
        features = earlier_latent_features(self.quantizer.scales, self.latents_NCdhw[earlier])
        return {"target_inputs": teacher_forcing_sequence(self.quantizer, maps).to(device),
                "earlier": torch.cat([flatten(f) for f in features], 1).to(device),
                "earlier_tokens": unchanged_BL.to(device), "tokens": tokens_BL.to(device),
                **_conditions(chosen, device)}


def _conditions(chosen: pd.DataFrame, device: torch.device) -> dict[str, torch.Tensor]:
    return {"earlier_age": torch.tensor(chosen["earlier_age"].to_numpy(), dtype=torch.float32, device=device),
            "target_age": torch.tensor(chosen["later_age"].to_numpy(), dtype=torch.float32, device=device),
            "diagnosis": torch.as_tensor(chosen["diagnosis_id"].to_numpy(copy=True), device=device)}


def train_transformer(run_dir: str | Path, config: Config, progress: bool = True, name: str = MODEL_NAME,
                      retrain: bool = False) -> dict[str, float]:
    """Train (or resume) a NeuroAR transformer of a tokenized run into RUN/NAME; returns the last validation
    metrics. Models with other names (ablations) share the run's tokenizer and tokens. A checkpoint trained on
    other scans, split, pairs or tokens is refused, or with `retrain` set aside (see `run_steps`)."""
    run_dir = Path(run_dir)
    settings = config.train_transformer
    ctx = distributed.init()
    device = ctx.device
    checkpoint = model_checkpoint(run_dir, name)
    fingerprint = {**data_fingerprint(run_dir), "tokens": token_path(run_dir).stem}
    torch.manual_seed(config.seed)
    model = build_transformer(config)
    if checkpoint.with_suffix(".json").is_file():
        check_trained_on(run_dir, name, checkpoint, fingerprint, retrain, ctx)  # may set it aside
    # Resuming, the change base the checkpoint's tokens were coded against is the checkpoint's; anew, it is fitted.
    resumed = checkpoint.with_suffix(".json").is_file()
    if resumed:
        load_checkpoint(checkpoint, {"model": model})
    sequences, train_pairs, val_pairs = training_data(run_dir, config, model, fit_base=not resumed,
                                                      progress=progress and ctx.main)
    model.to(device)
    for pairs in (train_pairs, val_pairs):
        pairs["diagnosis_id"] = model.diagnosis_ids(list(pairs.get("diagnosis", [""] * len(pairs)))).numpy()
    rates, log_priors = token_statistics(model, sequences, train_pairs)
    model.init_copy_logits(rates)
    model.activation_checkpointing = settings.activation_checkpointing
    optimizer = torch.optim.AdamW(model.parameter_groups(settings.weight_decay), lr=settings.lr, betas=(0.9, 0.95))
    tokenizer_sha = sha256_file(weights_path(tokenizer_checkpoint(run_dir)))
    model_ddp = ctx.wrap(model)

    def train_step(step: int) -> dict[str, float]:
        rows = batch_indices(len(train_pairs), step, settings.batch_size, config.seed)
        # Drawn for the whole batch on every process, so each takes the draws of its own rows.
        drop = torch.rand(len(rows)) < config.transformer.condition_dropout
        micro = ctx.shard(list(range(len(rows))), settings.accumulation)
        log_step = is_log_step(step, settings)
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for i, positions in enumerate(micro):
            batch = sequences.batch(train_pairs, [rows[j] for j in positions], device)
            with distributed.no_sync(model_ddp, last=i == len(micro) - 1):
                with distributed.autocast(device):
                    logits = model_ddp(batch["target_inputs"], batch["earlier"], batch["earlier_tokens"],
                                       batch["earlier_age"], batch["target_age"], drop[positions].to(device),
                                       batch["diagnosis"])
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch["tokens"].flatten())
                (loss / len(micro)).backward()
            # Per-scale metrics only where they are logged: they cost a second pass over the logits.
            values = {"loss": loss.item(), **(per_scale_metrics(model, logits.detach(), batch["tokens"],
                                                                batch["earlier_tokens"]) if log_step else {})}
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + value / len(micro)
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        return ctx.mean(totals)

    return run_steps(run_dir, name, config, "train_transformer", checkpoint, {"model": model},
                     {"model": optimizer}, train_step,
                     lambda: evaluate_teacher_forced(model, sequences, val_pairs if len(val_pairs) else train_pairs,
                                                     device, log_priors=log_priors), ctx,
                     fingerprint, "val" if len(val_pairs) else "train", retrain,
                     meta={"model": MODEL_NAME, "tokenizer_sha256": tokenizer_sha,
                           "scales": [list(s) for s in config.tokenizer.scales]},
                     val_every=settings.val_every, config_path=run_dir / name / "config.yaml", progress=progress)


def training_data(run_dir: Path, config: Config, model: NeuroAR, fit_base: bool = False, progress: bool = True
                  ) -> tuple[ScanSequences | ChangeSequences, pd.DataFrame, pd.DataFrame]:
    """What NeuroAR trains and validates on: the run's token sequences, its training pairs (with their mirrored
    copies and zero-gap pairs where the config asks for them) and its validation pairs. With
    `transformer.mean_change` the change tokens are coded against `model.change_base`, which `fit_base` first
    fits to the training pairs (on the CPU, where the model must be then)."""
    settings = config.train_transformer
    tokens, train_pairs, val_pairs = training_tokens(run_dir, settings.mirror)
    if settings.zero_gap_pairs:
        train_pairs = pd.concat([train_pairs, zero_gap_pairs(train_pairs)], ignore_index=True)
    tokenizer = load_tokenizer(run_dir, config)
    if config.tokenizer.code == "change":  # `tokens` holds the scans' latents: see data/tokens.py
        if fit_base and config.transformer.mean_change:
            fit_change_base(model, tokens[0], train_pairs, config, progress)
        sequences = ChangeSequences.build(tokenizer, tokens[0], [train_pairs, val_pairs],
                                          model.change_base if config.transformer.mean_change else None)
    else:
        sequences = ScanSequences.build(tokenizer.quantizer, tokens, config.transformer.earlier)
    return sequences, train_pairs, val_pairs


@torch.no_grad()
def fit_change_base(model: NeuroAR, latents_NCdhw: torch.Tensor, train_pairs: pd.DataFrame, config: Config,
                    progress: bool = True) -> None:
    """The model's mean change per year over the training pairs and, with `transformer.change_width`, its
    change regressor (models/change_regressor.py) trained on them, its last error printed beside the mean
    change's."""
    earlier, later, years = pair_rows(train_pairs)  # zero-gap pairs add nothing: both weigh a pair by its years
    model.mean_change_Cdhw.copy_(fit_mean_change(latents_NCdhw, earlier, later, years))
    if model.change_regressor is None:
        return
    settings = config.train_transformer
    with torch.enable_grad():
        losses = model.change_regressor.fit(latents_NCdhw, earlier, later, years, earlier_ages(train_pairs),
                                            model.mean_change_Cdhw, settings.change_steps,
                                            settings.change_batch_size, settings.change_lr, config.seed, progress)
    if progress:
        print(f"change regressor: latent change's mean squared error {losses['mse']:.3g} over its last steps' "
              f"pairs, against the mean change's {losses['mean_change_mse']:.3g}")


def zero_gap_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """Every scan of `pairs` (rows as `token_pairs` gives them) paired with itself: the same scan as earlier and
    later, at its own age, zero years apart."""
    shared = [c for c in ("subject_id", "diagnosis", "split") if c in pairs.columns]
    ends = [pairs[[*shared, f"{end}_session", f"{end}_age", f"{end}_index"]]
            .set_axis([*shared, "session", "age", "index"], axis=1) for end in ("earlier", "later")]
    scans = pd.concat(ends).drop_duplicates("index").sort_values("index").reset_index(drop=True)
    return scans[shared].assign(earlier_session=scans["session"], later_session=scans["session"],
                                earlier_age=scans["age"], later_age=scans["age"], years=0.0,
                                earlier_index=scans["index"], later_index=scans["index"])


def token_statistics(model: NeuroAR, sequences: ScanSequences | ChangeSequences, pairs: pd.DataFrame,
                     chunk: int = 64) -> tuple[list[float], list[torch.Tensor]]:
    """Per scale, over the given pairs' targets: the share of tokens equal to the unchanged ones (the earlier
    scan's, or those of no change), and the log-frequency of each code (V,), add-one smoothed: the token
    distribution of a model that reads nothing of the pair."""
    equal, targets = [], []
    for start in range(0, len(pairs), chunk):
        unchanged_BL, tokens_BL = sequences.targets(pairs, list(range(start, min(start + chunk, len(pairs)))))
        equal.append((unchanged_BL == tokens_BL).float())
        targets.append(tokens_BL)
    equal_NL, targets_NL = torch.cat(equal), torch.cat(targets)
    copy, log_priors = [], []
    for start, length in zip(model.starts, model.lengths):
        copy.append(equal_NL[:, start:start + length].mean().item())
        codes = model.head.out_features
        # One pseudo-token spread over the codes: unseen codes stay finite without moving a scale of few tokens.
        counts_V = torch.bincount(targets_NL[:, start:start + length].flatten(), minlength=codes) + 1 / codes
        log_priors.append((counts_V / counts_V.sum()).log())
    return copy, log_priors


def per_scale_metrics(model: NeuroAR, logits_BLV: torch.Tensor, tokens_BL: torch.Tensor,
                      earlier_tokens_BL: torch.Tensor, log_priors: Sequence[torch.Tensor] | None = None
                      ) -> dict[str, float]:
    """Cross-entropy and top-1 accuracy of the teacher-forced predictions, in total and per scale, beside the
    accuracy of copying the earlier scan's tokens (the bar a model must clear) and, given the training targets'
    code frequencies (`token_statistics`), their cross-entropy per scale (`scaleK_prior_loss`): where most tokens
    are kept, top-1 accuracy cannot tell a model from copy, but a cross-entropy under the frequencies' is what
    it learnt of the pair (where the tokens change, and to what)."""
    # Over the flattened tokens: on a CPU 3.6x faster than over (B, V, L) (8 pairs of 22,657 tokens: 0.27 s / 0.99 s).
    loss_BL = F.cross_entropy(logits_BLV.float().flatten(0, 1), tokens_BL.flatten(),
                              reduction="none").view_as(tokens_BL)
    correct_BL = (logits_BLV.argmax(-1) == tokens_BL).float()
    copied_BL = (earlier_tokens_BL == tokens_BL).float()
    metrics = {"loss": loss_BL.mean().item(), "accuracy": correct_BL.mean().item(),
               "copy_accuracy": copied_BL.mean().item()}
    for k, (start, length) in enumerate(zip(model.starts, model.lengths)):
        metrics[f"scale{k}_loss"] = loss_BL[:, start:start + length].mean().item()
        metrics[f"scale{k}_accuracy"] = correct_BL[:, start:start + length].mean().item()
        metrics[f"scale{k}_copy_accuracy"] = copied_BL[:, start:start + length].mean().item()
        if log_priors is not None:
            prior_loss_BL = -log_priors[k].to(tokens_BL.device)[tokens_BL[:, start:start + length]]
            metrics[f"scale{k}_prior_loss"] = prior_loss_BL.mean().item()
    return metrics


def gains_over_copy(model: NeuroAR, logits_BLV: torch.Tensor, tokens_BL: torch.Tensor,
                    earlier_tokens_BL: torch.Tensor) -> torch.Tensor:
    """(B, K): per pair and scale, the model's accuracy minus copying's on the same tokens."""
    gain_BL = ((logits_BLV.argmax(-1) == tokens_BL).float() - (earlier_tokens_BL == tokens_BL).float())
    return torch.stack([gain_BL[:, start:start + length].mean(1) for start, length in zip(model.starts,
                                                                                          model.lengths)], 1)


@torch.no_grad()
def evaluate_teacher_forced(model: NeuroAR, sequences: ScanSequences | ChangeSequences, pairs: pd.DataFrame,
                            device: torch.device, chunk: int = 8, log_priors: Sequence[torch.Tensor] | None = None
                            ) -> dict[str, float]:
    """Teacher-forced loss and accuracies over the given pairs (ages always given), and per scale the standard
    error of the gain over copy (`scaleK_gain_se`, over pairs: the tokens of one pair are not independent), so
    that "above copy" can be told from noise: a gain within two standard errors of 0 is not a gain."""
    model.eval()
    totals: dict[str, float] = {}
    gains = []
    for start in range(0, len(pairs), chunk):
        rows = list(range(start, min(start + chunk, len(pairs))))
        batch = sequences.batch(pairs, rows, device)
        logits = model(batch["target_inputs"], batch["earlier"], batch["earlier_tokens"], batch["earlier_age"],
                       batch["target_age"], diagnosis_B=batch["diagnosis"])
        values = per_scale_metrics(model, logits, batch["tokens"], batch["earlier_tokens"], log_priors)
        for key, value in values.items():
            totals[key] = totals.get(key, 0.0) + value * len(rows) / len(pairs)
        gains.append(gains_over_copy(model, logits, batch["tokens"], batch["earlier_tokens"]).cpu())
    gains_PK = torch.cat(gains)
    spread_K = gains_PK.std(0) / len(gains_PK) ** 0.5 if len(gains_PK) > 1 else torch.full((gains_PK.shape[1],),
                                                                                             float("nan"))
    totals.update({f"scale{k}_gain_se": float(se) for k, se in enumerate(spread_K)})
    return totals
