"""Time NeuroAR: a training step, and sampling with and without the KV cache (which must give the same tokens).

Run: .venv/bin/python benchmarks/neuroar_speed.py [--config demo] [--samples 4] [--batch 8]
Writes benchmarks/results/neuroar_speed_CONFIG.json, naming the machine. Weights are random: speed does not
depend on them. Also reports the parameter count of the config's transformer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from neuroar import __version__
from neuroar.config import load_config
from neuroar.models.tokenizer import MSVQVAE
from neuroar.models.transformer import earlier_scale_features, flatten, teacher_forcing_sequence
from neuroar.train.transformer import build_transformer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="demo")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    quantizer = MSVQVAE(config.tokenizer).quantizer.to(device).eval()
    model = build_transformer(config).to(device)
    codes = config.tokenizer.codebook_size

    def tokens(batch: int) -> list[torch.Tensor]:
        return [torch.randint(0, codes, (batch, *s), device=device) for s in config.tokenizer.scales]

    target, earlier = tokens(args.batch), tokens(args.batch)
    inputs_BLC = teacher_forcing_sequence(quantizer, target)
    earlier_BLC = torch.cat([flatten(f) for f in earlier_scale_features(quantizer, earlier)], 1)
    labels_BL = torch.cat([t.flatten(1) for t in target], 1)
    ages = torch.full((args.batch,), 70.0, device=device), torch.full((args.batch,), 73.0, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        loss = F.cross_entropy(model(inputs_BLC, earlier_BLC, *ages).flatten(0, 1), labels_BL.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    prior = tokens(args.samples)
    sample_ages = ages[0][:1].expand(args.samples), ages[1][:1].expand(args.samples)

    def sample(use_cache: bool) -> list[torch.Tensor]:
        return model.sample(quantizer, prior, *sample_ages, config.sampling, torch.Generator(device).manual_seed(0),
                            use_cache=use_cache)

    cached, uncached = sample(True), sample(False)
    model.train()
    result = {"what": f"NeuroAR ({args.config} config): training step with batch {args.batch}, sampling "
                      f"{args.samples} follow-ups with and without the KV cache",
              "parameters": sum(p.numel() for p in model.parameters()),
              "tokens_per_scan": int(labels_BL.shape[1]),
              "train_step_seconds": _time(train_step, args.repeats, device),
              "sample_seconds_kv_cache": _time(lambda: sample(True), args.repeats, device),
              "sample_seconds_no_cache": _time(lambda: sample(False), args.repeats, device),
              "same_tokens_with_and_without_cache": all(torch.equal(a, b) for a, b in zip(cached, uncached)),
              "device": str(device), "cpu_cores": os.cpu_count(), "machine": platform.platform(),
              "neuroar": __version__}
    write = Path(__file__).parent / "results" / f"neuroar_speed_{args.config}.json"
    write.parent.mkdir(exist_ok=True)
    write.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _time(work, repeats: int, device: torch.device) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return round(min(times), 3)


if __name__ == "__main__":
    main()
