"""Training the baselines the paper compares against, in the latent space of one AutoencoderKL per run:

- `ldm`: a latent diffusion model (models/ldm.py), denoising MSE on the follow-up latent or its change;
- `stargan`: a latent StarGAN (models/stargan.py): least-squares adversarial loss, the discriminator's age
  head (trained on real latents, applied to generated ones), cycle consistency back to the earlier age and
  identity at the earlier age.

Both train on the same (earlier, later) pairs of training subjects as NeuroAR. `train_baseline` first trains
the run's autoencoder and caches every scan's latent (each skipped once done), then the baseline into
RUN/KIND/last.* (with the latent scale factor and the sha256 of the autoencoder weights); logs go to
RUN/KIND_train.csv, RUN/KIND_val.csv and TensorBoard. Resuming continues exactly.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from neuroar import distributed
from neuroar.config import Config
from neuroar.data.fingerprint import data_fingerprint
from neuroar.data.latents import autoencoder_sha256, encode_run, latent_path, load_latents
from neuroar.data.pairs import token_pairs
from neuroar.errors import NeuroARError
from neuroar.models.baselines import BASELINES, build_baseline, predict_latent
from neuroar.models.stargan import GeneratorPasses
from neuroar.runs import model_checkpoint
from neuroar.train.autoencoder import train_autoencoder
from neuroar.train.loop import batch_indices, run_steps


def train_baseline(run_dir: str | Path, config: Config, kind: str, progress: bool = True, retrain: bool = False
                   ) -> dict[str, float]:
    """Train (or resume) a baseline of a preprocessed run; returns its validation metrics. A checkpoint (of the
    autoencoder, or of the baseline) trained on other data is refused, or with `retrain` set aside."""
    if kind not in BASELINES:
        raise NeuroARError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}.")
    run_dir = Path(run_dir)
    train_autoencoder(run_dir, config, progress, retrain)
    encode_run(run_dir, config, progress)
    latents_NCDHW, scale, scans = load_latents(run_dir)
    latents_NCDHW = latents_NCDHW * scale
    train_pairs, val_pairs = token_pairs(run_dir, scans, "train"), token_pairs(run_dir, scans, "val")
    if train_pairs.empty:
        raise NeuroARError(f"{run_dir}/pairs.csv has no training pairs; the baselines need subjects with at least "
                           "two scans in the training split.")
    settings = getattr(config, f"train_{kind}")
    ctx = distributed.init()
    device = ctx.device
    torch.manual_seed(config.seed)
    modules = {k: m.to(device) for k, m in build_baseline(kind, config, float(train_pairs["later_age"].mean())
                                                          ).items()}
    if kind == "ldm" and config.ldm.target == "change":  # a resumed run loads the same value with its weights
        change_NCDHW = (latents_NCDHW[train_pairs["later_index"].to_numpy(copy=True)]
                        - latents_NCDHW[train_pairs["earlier_index"].to_numpy(copy=True)])
        modules["model"].change_scale.fill_(1 / change_NCDHW.std().item())
    betas = (0.5, 0.999) if kind == "stargan" else (0.9, 0.999)
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=settings.lr, betas=betas) for k, m in modules.items()}
    checkpoint = model_checkpoint(run_dir, kind)
    autoencoder = autoencoder_sha256(run_dir)
    # What runs forward under DDP: the LDM's training loss, the generator's three passes, the discriminator.
    if kind == "ldm":
        wrapped = {"model": ctx.wrap(modules["model"])}
    else:
        wrapped = {"model": ctx.wrap(GeneratorPasses(modules["model"])),
                   "discriminator": ctx.wrap(modules["discriminator"])}
    step_losses = _ldm_losses if kind == "ldm" else _stargan_losses

    def train_step(step: int) -> dict[str, float]:
        rows = batch_indices(len(train_pairs), step, settings.batch_size, config.seed)
        micro = ctx.shard(list(range(len(rows))), settings.accumulation)
        return ctx.mean(step_losses(modules, wrapped, optimizers, latents_NCDHW, train_pairs, rows, micro, config,
                                    settings.grad_clip, device))

    held_out = val_pairs if len(val_pairs) else train_pairs
    return run_steps(run_dir, kind, config, f"train_{kind}", checkpoint, modules, optimizers, train_step,
                     lambda: validate_baseline(kind, modules["model"], latents_NCDHW, held_out, device, config.seed),
                     ctx, {**data_fingerprint(run_dir), "latents": latent_path(run_dir).stem},
                     "val" if len(val_pairs) else "train", retrain,
                     meta={"model": kind, "latent_scale": scale, "autoencoder_sha256": autoencoder},
                     config_path=run_dir / kind / "config.yaml", progress=progress)


@torch.no_grad()
def validate_baseline(kind: str, model: nn.Module, latents_NCDHW: torch.Tensor, pairs: pd.DataFrame,
                      device: torch.device, seed: int, limit: int = 64) -> dict[str, float]:
    """Mean squared error of predicted against true follow-up latents on (up to `limit`) pairs, beside the
    error of copying the earlier latent."""
    model.eval()
    batch = _latent_batch(latents_NCDHW, pairs, list(range(min(limit, len(pairs)))), device)
    noise = torch.randn(batch["earlier"].shape, generator=torch.Generator(device).manual_seed(seed), device=device)
    predicted = predict_latent(kind, model, batch["earlier"], batch["earlier_age"], batch["target_age"], noise)
    return {"latent_mse": F.mse_loss(predicted, batch["later"]).item(),
            "copy_latent_mse": F.mse_loss(batch["earlier"], batch["later"]).item()}


def _latent_batch(latents_NCDHW: torch.Tensor, pairs: pd.DataFrame, rows: list[int], device: torch.device
                  ) -> dict[str, torch.Tensor]:
    chosen = pairs.iloc[rows]
    return {"earlier": latents_NCDHW[chosen["earlier_index"].to_numpy(copy=True)].to(device),
            "later": latents_NCDHW[chosen["later_index"].to_numpy(copy=True)].to(device),
            "earlier_age": torch.tensor(chosen["earlier_age"].to_numpy(), dtype=torch.float32, device=device),
            "target_age": torch.tensor(chosen["later_age"].to_numpy(), dtype=torch.float32, device=device)}


def _finish(optimizer: torch.optim.Optimizer, module: nn.Module, grad_clip: float) -> None:
    torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    optimizer.step()


def _ldm_losses(modules, wrapped, optimizers, latents, pairs, rows, micro, config: Config, grad_clip: float,
                device) -> dict[str, float]:
    """One LDM step; returns its loss averaged over this process's micro-batches."""
    # Noise and timesteps drawn for the whole batch on every process; each takes those of its own rows.
    noise = torch.randn(len(rows), *latents.shape[1:])
    t = torch.randint(0, config.ldm.timesteps, (len(rows),))
    optimizers["model"].zero_grad(set_to_none=True)
    totals = {"mse": 0.0}
    for i, positions in enumerate(micro):
        batch = _latent_batch(latents, pairs, [rows[j] for j in positions], device)
        with distributed.no_sync(wrapped["model"], last=i == len(micro) - 1):
            with distributed.autocast(device):
                loss = wrapped["model"](batch["later"], batch["earlier"], batch["earlier_age"], batch["target_age"],
                                        noise[positions].to(device), t[positions].to(device))
            (loss / len(micro)).backward()
        _add_share(totals, {"mse": loss}, len(micro))
    _finish(optimizers["model"], modules["model"], grad_clip)
    return totals


def _stargan_losses(modules, wrapped, optimizers, latents, pairs, rows, micro, config: Config, grad_clip: float,
                    device) -> dict[str, float]:
    """One StarGAN step (the discriminator's, then the generator's); returns its losses averaged over this
    process's micro-batches."""
    generator, discriminator, weights = modules["model"], modules["discriminator"], config.stargan
    batches = [_latent_batch(latents, pairs, [rows[j] for j in positions], device) for positions in micro]
    totals = dict.fromkeys(("generator", "discriminator", "adversarial_g", "age_g", "age_d", "cycle", "identity"),
                           0.0)
    optimizers["discriminator"].zero_grad(set_to_none=True)
    for i, batch in enumerate(batches):
        with torch.no_grad():
            fake = generator(batch["earlier"], batch["earlier_age"], batch["target_age"])
        with distributed.no_sync(wrapped["discriminator"], last=i == len(batches) - 1), distributed.autocast(device):
            real_logits, real_age = wrapped["discriminator"](torch.cat([batch["later"], fake]))
            real_logits, fake_logits = real_logits.float().chunk(2)
            d_adversarial = (F.mse_loss(real_logits, torch.ones_like(real_logits))
                             + F.mse_loss(fake_logits, torch.zeros_like(fake_logits)))
            d_age = F.l1_loss(real_age.float().chunk(2)[0], batch["target_age"]) / 10
            d_loss = weights.adversarial_weight * d_adversarial + weights.age_weight * d_age
            (d_loss / len(batches)).backward()
        _add_share(totals, {"discriminator": d_loss, "age_d": d_age}, len(batches))
    _finish(optimizers["discriminator"], discriminator, grad_clip)
    optimizers["model"].zero_grad(set_to_none=True)
    for i, batch in enumerate(batches):
        earlier = batch["earlier"]
        with distributed.no_sync(wrapped["model"], last=i == len(batches) - 1), distributed.autocast(device):
            fake, cycled, same = wrapped["model"](earlier, batch["earlier_age"], batch["target_age"])
            fake_logits, fake_age = discriminator(fake)  # its gradients are discarded at its next step
            g_adversarial = F.mse_loss(fake_logits.float(), torch.ones_like(fake_logits.float()))
            g_age = F.l1_loss(fake_age.float(), batch["target_age"]) / 10
            cycle = F.l1_loss(cycled.float(), earlier)
            identity = F.l1_loss(same.float(), earlier)
            g_loss = (weights.adversarial_weight * g_adversarial + weights.age_weight * g_age
                      + weights.cycle_weight * cycle + weights.identity_weight * identity)
            (g_loss / len(batches)).backward()
        _add_share(totals, {"generator": g_loss, "adversarial_g": g_adversarial, "age_g": g_age, "cycle": cycle,
                            "identity": identity}, len(batches))
    _finish(optimizers["model"], generator, grad_clip)
    return totals


def _add_share(totals: dict[str, float], values: dict[str, torch.Tensor], count: int) -> None:
    """Add each value's share of the step's mean over `count` micro-batches to `totals`."""
    for key, value in values.items():
        totals[key] += value.item() / count
