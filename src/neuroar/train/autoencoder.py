"""Training MONAI's AutoencoderKL on the run's preprocessed scans: the latent space the LDM and latent
StarGAN baselines work in.

L1 reconstruction + `autoencoder.kl_weight` x KL divergence to N(0, 1). A checkpoint lives in
RUN/autoencoder/last.*, logs in RUN/autoencoder_train.csv and TensorBoard; the last step also logs the
held-out reconstruction PSNR. Resuming continues exactly (batch order and RNG are checkpointed). Under
`torchrun`, note that AutoencoderKL draws its reparameterisation noise inside its forward, from each
process's own (identically seeded) generator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neuroar import distributed
from neuroar.config import Config
from neuroar.data.fingerprint import scan_fingerprint
from neuroar.data.preprocess import load_preprocessed, template_brain_mask
from neuroar.metrics import masked_psnr
from neuroar.models.autoencoder import PatchAutoencoderKL, build_autoencoder
from neuroar.runs import autoencoder_checkpoint
from neuroar.train.loop import batch_indices, run_steps, split_scan_paths, volume_batch


def train_autoencoder(run_dir: str | Path, config: Config, progress: bool = True, retrain: bool = False
                      ) -> dict[str, float]:
    """Train (or resume) the autoencoder of a preprocessed run; returns its held-out reconstruction metrics.
    A checkpoint trained on other scans or another split is refused, or with `retrain` set aside."""
    run_dir = Path(run_dir)
    train_paths, val_paths = split_scan_paths(run_dir)
    settings = config.train_autoencoder
    ctx = distributed.init()
    device = ctx.device
    torch.manual_seed(config.seed)
    model = build_autoencoder(config.autoencoder).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    model_ddp = ctx.wrap(model)

    def train_step(step: int) -> dict[str, float]:
        micro = ctx.shard(batch_indices(len(train_paths), step, settings.batch_size, config.seed),
                          settings.accumulation)
        optimizer.zero_grad(set_to_none=True)
        totals = {"l1": 0.0, "kl": 0.0}  # the step's values: micro-batches averaged here, processes below
        for i, rows in enumerate(micro):
            x = volume_batch(train_paths, rows).to(device)
            with distributed.no_sync(model_ddp, last=i == len(micro) - 1):
                with distributed.autocast(device):
                    reconstruction, mu, sigma = model_ddp(x)
                l1 = F.l1_loss(reconstruction.float(), x)
                kl = 0.5 * (mu.float() ** 2 + sigma.float() ** 2 - torch.log(sigma.float() ** 2 + 1e-8) - 1).mean()
                (l1 + config.autoencoder.kl_weight * kl).div(len(micro)).backward()
            totals["l1"] += l1.item() / len(micro)
            totals["kl"] += kl.item() / len(micro)
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        return ctx.mean(totals)

    brain = template_brain_mask(config.data)
    return run_steps(run_dir, "autoencoder", config, "train_autoencoder", autoencoder_checkpoint(run_dir),
                     {"model": model}, {"model": optimizer}, train_step,
                     lambda: validate_autoencoder(model, val_paths or train_paths, device, brain), ctx,
                     scan_fingerprint(run_dir), "val" if val_paths else "train", retrain, progress=progress)


@torch.no_grad()
def validate_autoencoder(model: PatchAutoencoderKL, paths: list[str], device: torch.device, brain: np.ndarray
                         ) -> dict[str, float]:
    """Reconstruction PSNR (from the latent mean) of the whole volume and inside the brain mask."""
    model.eval()
    whole, inside = [], []
    for path in paths:
        x = torch.from_numpy(load_preprocessed(path)[0])[None, None].to(device)
        rebuilt = model.decode(model.encode(x)[0]).float().clamp(0, 1)[0, 0].cpu().numpy()
        original = x[0, 0].cpu().numpy()
        whole.append(masked_psnr(rebuilt, original, np.ones_like(brain)))
        inside.append(masked_psnr(rebuilt, original, brain))
    return {"psnr": float(np.mean(whole)), "psnr_brain": float(np.mean(inside))}
