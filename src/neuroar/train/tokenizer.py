"""Training the MS-VQVAE on the preprocessed scans of a run folder.

Losses: L1 (optionally weighted up inside the template brain mask, where the evaluation measures) + the
quantizer's vq/commitment loss + an adversarial loss from MONAI's 3D PatchDiscriminator, which joins after
`adversarial_start` steps with VQGAN's adaptive weight (the ratio of the reconstruction and adversarial
gradient norms at the decoder's last layer).
The learning rate warms up linearly, then follows a cosine down to a tenth of its peak.
A perceptual loss needs pretrained weights, which this project never downloads; it is off.
With `tokenizer.code: change` a batch holds training pairs (batch_size of them): their earlier scans, then their
follow-ups, so that the losses read the same as for single scans (see models/tokenizer.py); validation measures
the follow-ups of the validation pairs. `train_tokenizer.change_weight` adds an L1 loss between the decoded change
(a follow-up's reconstruction minus its earlier scan's) and the true change: the evaluation measures the change,
and the reconstruction losses of two smooth reconstructions leave a smooth change.

The batch order is a function of (seed, step), and the torch RNG is checkpointed, so a run resumed from its
last checkpoint continues exactly as if it had not stopped. Checkpoints go to RUN/tokenizer/last.*,
logs to RUN/tokenizer_train.csv, RUN/tokenizer_val.csv and RUN/tensorboard/.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from monai.losses import PatchAdversarialLoss
from monai.metrics import PSNRMetric, SSIMMetric
from monai.networks.nets import PatchDiscriminator

from neuroar import distributed
from neuroar.config import Config, save_config
from neuroar.data.fingerprint import scan_fingerprint
from neuroar.data.preprocess import load_preprocessed, template_brain_mask
from neuroar.errors import NeuroARError
from neuroar.metrics import masked_psnr, masked_ssim
from neuroar.models.tokenizer import MSVQVAE
from neuroar.runs import tokenizer_checkpoint
from neuroar.train.loop import batch_indices, run_steps, split_scan_paths, volume_batch


def train_tokenizer(run_dir: str | Path, config: Config, progress: bool = True, retrain: bool = False
                    ) -> dict[str, float]:
    """Train (or resume) the tokenizer of a run prepared by `neuroar preprocess`; returns the last validation.
    Under `torchrun`, each process takes its share of every batch (see neuroar.distributed). A checkpoint
    trained on other scans or another split is refused, or with `retrain` set aside (see `run_steps`)."""
    run_dir = Path(run_dir)
    train_items, val_items = training_items(run_dir, config.tokenizer.code)
    settings = config.train_tokenizer
    ctx = distributed.init()
    device = ctx.device
    torch.manual_seed(config.seed)
    model = MSVQVAE(config.tokenizer).to(device)
    model.quantizer.connect(ctx.gather_batch, ctx.broadcast)
    discriminator = PatchDiscriminator(spatial_dims=3, channels=settings.discriminator_channels, in_channels=1,
                                       num_layers_d=3, norm="INSTANCE").to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=(0.5, 0.9))
    optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=settings.lr, betas=(0.5, 0.9))
    adversarial = PatchAdversarialLoss(criterion="least_squares")
    model_ddp, discriminator_ddp = ctx.wrap(model), ctx.wrap(discriminator)
    if ctx.main:
        save_config(config, run_dir / "config.yaml")
        print("tokenizer: perceptual loss off (it needs pretrained weights, which are never downloaded)")
    brain = template_brain_mask(config.data)
    brain_BDHW = torch.from_numpy(brain).float()[None, None].to(device)
    held_out = val_items or train_items

    def train_step(step: int) -> dict[str, float]:
        micro = ctx.shard(batch_indices(len(train_items), step, settings.batch_size, config.seed),
                          settings.accumulation)
        use_adversarial = step >= settings.adversarial_start and settings.adversarial_weight > 0
        optimizer.zero_grad(set_to_none=True)
        pairs = []  # (scans, reconstructions) of each micro-batch, for the discriminator
        totals: dict[str, float] = {}  # the step's values: micro-batches averaged here, processes below
        for i, rows in enumerate(micro):
            x = item_batch(train_items, rows).to(device)
            weights = 1.0 + settings.brain_weight * brain_BDHW
            with distributed.no_sync(model_ddp, last=i == len(micro) - 1):
                with distributed.autocast(device):
                    reconstruction, vq_loss, stats = model_ddp(x)
                    l1 = (weights * (reconstruction.float() - x).abs()).mean()
                    loss = l1 + vq_loss
                    logged = {}
                    if model.config.code == "change":  # logged for every change coder, a loss where weighted
                        change = change_l1(reconstruction, x, weights)
                        loss = loss + settings.change_weight * change
                        logged["change_l1"] = change.item()
                    adversarial_g = torch.zeros((), device=device)
                    if use_adversarial:
                        adversarial_g = adversarial(discriminator(reconstruction)[-1], target_is_real=True,
                                                    for_discriminator=False)
                        weight = _adaptive_weight(l1, adversarial_g, model.decoder.blocks[-1].conv.weight,
                                                  ctx.gather_batch)
                        loss = loss + settings.adversarial_weight * weight * adversarial_g
                (loss / len(micro)).backward()
            pairs.append((x, reconstruction.detach()))
            for key, value in {"l1": l1.item(), **logged, "vq": vq_loss.item(), "adversarial_g": adversarial_g.item(),
                               **stats}.items():
                totals[key] = totals.get(key, 0.0) + value / len(micro)
        optimizer.step()
        totals["adversarial_d"] = 0.0
        if use_adversarial:
            optimizer_d.zero_grad(set_to_none=True)
            for i, (x, reconstruction) in enumerate(pairs):
                with distributed.no_sync(discriminator_ddp, last=i == len(pairs) - 1), distributed.autocast(device):
                    real = adversarial(discriminator_ddp(x)[-1], target_is_real=True, for_discriminator=True)
                    fake = adversarial(discriminator_ddp(reconstruction)[-1], target_is_real=False,
                                       for_discriminator=True)
                    adversarial_d = 0.5 * (real + fake)
                    (adversarial_d / len(pairs)).backward()
                totals["adversarial_d"] += adversarial_d.item() / len(pairs)
            optimizer_d.step()
        return ctx.mean(totals)

    return run_steps(run_dir, "tokenizer", config, "train_tokenizer", tokenizer_checkpoint(run_dir),
                     {"model": model, "discriminator": discriminator},
                     {"model": optimizer, "discriminator": optimizer_d}, train_step,
                     lambda: validate(model, held_out, device, brain), ctx, scan_fingerprint(run_dir),
                     "val" if val_items else "train", retrain,
                     meta={"scales": [list(s) for s in config.tokenizer.scales]}, val_every=settings.val_every,
                     figures=lambda: {"val/reconstruction": _slice_figure(model, held_out, device)},
                     progress=progress)


def change_l1(reconstruction: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L1 between the decoded and the true change of a batch of pairs (earlier scans, then their follow-ups),
    weighted like the reconstruction's: what stays wrong in both reconstructions alike costs nothing here."""
    rec_earlier, rec_later = reconstruction.float().chunk(2)
    earlier, later = x.chunk(2)
    return (weights * ((rec_later - rec_earlier) - (later - earlier)).abs()).mean()


Item = tuple[str, ...]  # what the tokenizer codes: (scan,) or, with code "change", (earlier scan, follow-up)


def training_items(run_dir: Path, code: str) -> tuple[list[Item], list[Item]]:
    """The preprocessed scans (code "scan") or pairs (code "change") of the run's training and validation
    splits."""
    train_paths, val_paths = split_scan_paths(run_dir)
    if code == "scan":
        return [(p,) for p in train_paths], [(p,) for p in val_paths]
    pairs = pd.read_csv(run_dir / "pairs.csv", keep_default_na=False)
    items = {split: list(zip(rows["earlier_path"], rows["later_path"])) for split, rows in pairs.groupby("split")}
    if not items.get("train"):
        raise NeuroARError(f"{run_dir}/pairs.csv has no training pairs; tokenizer.code=change learns from "
                           "subjects with two scans at different ages in the training split (or use code=scan).")
    return items["train"], items.get("val", [])


def item_batch(items: list[Item], rows: list[int]) -> torch.Tensor:
    """The volumes of the given items, (B, 1, D, H, W): the scans, or the pairs' earlier scans then their
    follow-ups (B = 2P)."""
    return torch.cat([volume_batch([item[i] for item in items], rows) for i in range(len(items[0]))])


@torch.no_grad()
def validate(model: MSVQVAE, items: list[Item], device: torch.device, brain: np.ndarray) -> dict[str, float]:
    """Reconstruction PSNR and SSIM (3D, data range 1) of the whole volume and inside the brain mask, and
    per-scale code use, averaged over the given scans (or the follow-ups of the given pairs)."""
    model.eval()
    # Per-scan values rather than MONAI's aggregate(), which would all-gather across processes while only rank
    # 0 validates.
    psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=3, data_range=1.0)
    rows = []
    for item in items:
        x, tokens, reconstruction = _reconstruct(model, item, device)
        rebuilt, original = reconstruction[0, 0].cpu().numpy(), x[0, 0].cpu().numpy()
        rows.append({"psnr": float(psnr(reconstruction, x).mean()), "ssim": float(ssim(reconstruction, x).mean()),
                     "psnr_brain": masked_psnr(rebuilt, original, brain),
                     "ssim_brain": masked_ssim(rebuilt, original, brain), **model.quantizer.usage_stats(tokens)})
    return pd.DataFrame(rows).mean().to_dict()


def _reconstruct(model: MSVQVAE, item: Item, device: torch.device
                 ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """An item's scan (its follow-up for a pair) (1, 1, D, H, W), its tokens, and its reconstruction from them
    (against the earlier scan for a pair), clamped to [0, 1]."""
    volumes = [torch.from_numpy(load_preprocessed(path)[0])[None, None].to(device) for path in item]
    f_earlier = model.latent_scan(volumes[0]) if len(item) == 2 else None
    tokens = model.followup_tokens(f_earlier, model.latent_scan(volumes[-1]))
    return volumes[-1], tokens, torch.from_numpy(model.decode_followup(f_earlier, tokens))[:, None].to(device)


def _adaptive_weight(reconstruction: torch.Tensor, adversarial: torch.Tensor, last: torch.Tensor,
                     gather: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """VQGAN's weight of the adversarial loss: the ratio of the reconstruction and adversarial gradient norms at
    the decoder's last layer. The gradients are averaged over the processes (`gather` stacks every rank's)
    before their norms, so that every rank weighs its term alike, as one process would on the global batch."""
    grad_rec, grad_adv = (gather(torch.autograd.grad(loss, last, retain_graph=True)[0][None]).mean(0)
                          for loss in (reconstruction, adversarial))
    return (grad_rec.norm() / (grad_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()


@torch.no_grad()
def _slice_figure(model: MSVQVAE, items: list[Item], device: torch.device):
    model.eval()
    x, _, reconstruction = _reconstruct(model, items[0], device)
    original, rebuilt = x[0, 0].cpu().numpy(), reconstruction[0, 0].cpu().numpy()
    figure = Figure(figsize=(9, 6), layout="constrained")
    axes = figure.subplots(2, 3)
    for axis, index in enumerate(np.array(original.shape) // 2):
        for row, volume in enumerate((original, rebuilt)):
            axes[row, axis].imshow(np.rot90(np.take(volume, index, axis=axis)), cmap="gray", vmin=0, vmax=1)
            axes[row, axis].axis("off")
    axes[0, 0].set_title("scan")
    axes[1, 0].set_title("reconstruction")
    return figure

