"""`neuroar plan`: what a config costs before it runs. Parameter counts of every model, the token count per
scale, FLOPs of one training step and an estimate of peak memory per GPU, all computed on PyTorch's meta
device (shapes only, no memory, no data); and, on request, one measured training step at full shape.

Memory estimate per process: weights, gradients and Adam's two moments in float32 (16 bytes per parameter)
plus the activations a step saves for its backward pass, counted as they are saved (float32 on the meta
device; bf16 autocast on a GPU stores many of them at half that size, so the estimate errs high). With
`train_transformer.activation_checkpointing`, the block inputs plus one block's recomputed activations.
"""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from neuroar.config import Config
from neuroar.errors import NeuroARError
from neuroar.models.tokenizer import MSVQVAE
from neuroar.models.transformer import build_transformer, earlier_channels
from neuroar.tables import markdown_table

OPTIMIZER_BYTES_PER_PARAMETER = 16  # float32 weight, gradient, and Adam's two moments


@dataclass
class StepCost:
    model: str
    batch: int
    parameters: int
    flops: float  # forward + backward of one training step
    activation_bytes: int

    def memory_bytes(self) -> int:
        return OPTIMIZER_BYTES_PER_PARAMETER * self.parameters + self.activation_bytes


def parameter_counts(config: Config) -> dict[str, int]:
    from neuroar.models.autoencoder import build_autoencoder
    from neuroar.models.baselines import build_baseline

    with torch.device("meta"):
        models = {"tokenizer (MS-VQVAE)": MSVQVAE(config.tokenizer), "NeuroAR transformer": build_transformer(config)}
        models["autoencoder (AutoencoderKL)"] = build_autoencoder(config.autoencoder)
        models["LDM U-Net"] = build_baseline("ldm", config)["model"]
        stargan = build_baseline("stargan", config)
        models["StarGAN generator"], models["StarGAN discriminator"] = stargan["model"], stargan["discriminator"]
    return {name: _count(model) for name, model in models.items()}


def scans_per_item(config: Config) -> int:
    """Scans per item of a tokenizer batch: one, or a pair's two with `tokenizer.code: change`."""
    return 2 if config.tokenizer.code == "change" else 1


def step_costs(config: Config, batch: int | None = None) -> list[StepCost]:
    """FLOPs and saved activations of one training step of the tokenizer and of NeuroAR, at `batch` or at each
    trainer's configured batch size."""
    tokenizer_batch = batch or config.train_tokenizer.batch_size
    transformer_batch = batch or config.train_transformer.batch_size
    with torch.device("meta"):
        tokenizer, transformer = MSVQVAE(config.tokenizer).train(), build_transformer(config).train()
    transformer.activation_checkpointing = config.train_transformer.activation_checkpointing
    length = sum(d * h * w for d, h, w in config.tokenizer.scales)
    ages = torch.full((transformer_batch,), 70.0, device="meta")

    def tokenizer_step():
        volumes = tokenizer_batch * scans_per_item(config)
        reconstruction, vq_loss, _ = tokenizer(torch.rand(volumes, 1, *config.data.shape, device="meta"))
        ((reconstruction - 0.5).abs().mean() + vq_loss).backward()

    def transformer_step():
        inputs = torch.randn(transformer_batch, length, config.tokenizer.latent_dim, device="meta")
        earlier = torch.randn(transformer_batch, length, earlier_channels(config.transformer.earlier,
                                                                          config.tokenizer.latent_dim), device="meta")
        labels = torch.zeros(transformer_batch * length, dtype=torch.long, device="meta")
        logits = transformer(inputs, earlier, labels.view(transformer_batch, length), ages, ages + 3)
        F.cross_entropy(logits.flatten(0, 1), labels).backward()

    costs = [_measure("tokenizer", tokenizer, tokenizer_step, tokenizer_batch),
             _measure("NeuroAR", transformer, transformer_step, transformer_batch)]
    if transformer.activation_checkpointing:
        # Only block inputs are kept; the backward pass then recomputes one block at a time, whose
        # activations (a 1/depth share of the full count) exist on top of them.
        transformer.activation_checkpointing = False
        full = _measure("NeuroAR", transformer, transformer_step, transformer_batch).activation_bytes
        costs[1].activation_bytes += full // config.transformer.depth
    return costs


def plan_markdown(config: Config, batch: int | None = None) -> str:
    scales = config.tokenizer.scales
    tokens = [d * h * w for d, h, w in scales]
    lines = [f"# Plan: {config.name} config", "",
             f"Data {config.data.shape} at {config.data.spacing:g} mm; tokenizer latent grid {scales[-1]}, "
             f"autoencoder latent grid {config.autoencoder_latent_shape} x {config.autoencoder.latent_channels}.", "",
             markdown_table(["model", "parameters"],
                            [[name, f"{count:,}"] for name, count in parameter_counts(config).items()]), "",
             markdown_table(["scale", "token map", "tokens"],
                            [*([k, "x".join(map(str, s)), f"{n:,}"] for k, (s, n) in enumerate(zip(scales, tokens))),
                             ["all", "", f"{sum(tokens):,}"]]), "",
             "One training step per process (meta device; memory = 16 bytes per parameter for float32 weights, "
             "gradients and Adam moments, plus float32 activations saved for the backward pass):", "",
             markdown_table(["model", "batch", "FLOPs per step", "activations", "estimated peak memory"],
                            [[cost.model, cost.batch, f"{cost.flops / 1e12:.3g} TFLOP",
                              f"{cost.activation_bytes / 2**30:.2f} GiB", f"{cost.memory_bytes() / 2**30:.2f} GiB"]
                             for cost in step_costs(config, batch)])]
    return "\n".join(lines) + "\n"


def measure_steps(config: Config, batch: int = 1, device: torch.device | None = None) -> list[dict]:
    """One measured training step (after a warm-up step) of the tokenizer and of NeuroAR at full shape on
    random data; refuses when the estimate exceeds the memory the device has free."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = free_memory_bytes(device)
    estimates = {cost.model: cost.memory_bytes() for cost in step_costs(config, batch)}
    if max(estimates.values()) > available:
        worst = max(estimates, key=estimates.get)
        raise NeuroARError(f"one {worst} step at batch {batch} needs about {estimates[worst] / 2**30:.1f} GiB, "
                           f"but {device} has {available / 2**30:.1f} GiB free; run it on a larger GPU, lower the "
                           "batch, or enable train_transformer.activation_checkpointing.")
    results = []
    for name, build in _steps(config, batch, device):
        model, step = build()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else contextlib.nullcontext())
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            with autocast:
                loss = step()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        results.append({"model": name, "batch": batch, "device": str(device), "step_seconds": seconds[-1],
                        "peak_memory_bytes": peak, "estimated_bytes": estimates[name],
                        "memory": "CUDA allocations" if device.type == "cuda" else "the whole process, resident"})
        del model, optimizer
    return results


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def _steps(config: Config, batch: int, device: torch.device):
    """(name, build) per model; build() makes the model and its step function only when its turn comes."""
    length = sum(d * h * w for d, h, w in config.tokenizer.scales)
    ages = torch.full((batch,), 70.0, device=device)

    def tokenizer():
        model = MSVQVAE(config.tokenizer).to(device).train()
        x = torch.rand(batch * scans_per_item(config), 1, *config.data.shape, device=device)

        def step():
            reconstruction, vq_loss, _ = model(x)
            return (reconstruction.float() - x).abs().mean() + vq_loss

        return model, step

    def transformer():
        model = build_transformer(config).to(device).train()
        model.activation_checkpointing = config.train_transformer.activation_checkpointing
        inputs = torch.randn(batch, length, config.tokenizer.latent_dim, device=device)
        labels = torch.randint(0, config.tokenizer.codebook_size, (batch * length,), device=device)
        earlier_tokens = torch.randint(0, config.tokenizer.codebook_size, (batch, length), device=device)
        earlier = torch.randn(batch, length, earlier_channels(config.transformer.earlier, config.tokenizer.latent_dim),
                              device=device)

        def step():
            logits = model(inputs, earlier, earlier_tokens, ages, ages + 3)
            return F.cross_entropy(logits.float().flatten(0, 1), labels)

        return model, step

    return [("tokenizer", tokenizer), ("NeuroAR", transformer)]


def _measure(name: str, model: nn.Module, step, batch: int) -> StepCost:
    saved: list[int] = []
    parameters = {id(p) for p in model.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in parameters and id(tensor._base) not in parameters:  # weights are counted once
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return StepCost(name, batch, _count(model), float(counter.get_total_flops()), sum(saved))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
