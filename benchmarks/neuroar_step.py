"""NeuroAR's training step on the study's token space, timed in one process: for paired whole-process timings.

    farm-bench -n 3 --warmup 0 --timeout 900 \
        --vs ".venv/bin/python benchmarks/neuroar_step.py" -- .venv/bin/python benchmarks/neuroar_step.py --reuse

Random tokens and latents at the study's shapes (`study.STUDY`'s scales, one codebook per scale, five local scales)
and batch 4; one warm-up step, then --steps steps of forward, backward and AdamW; prints the mean seconds of each
part. --reuse first calls `neuroar.allocator.reuse_freed_memory`, as the `neuroar` program does.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from neuroar.allocator import reuse_freed_memory
from neuroar.config import load_config
from neuroar.models.quantizer import MultiScaleQuantizer
from neuroar.models.transformer import build_transformer, earlier_latent_features, flatten, teacher_forcing_sequence
from neuroar.study import STUDY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reuse", action="store_true", help="call reuse_freed_memory first")
    args = parser.parse_args()
    reused = reuse_freed_memory() if args.reuse else False
    config = load_config("demo", STUDY)
    torch.manual_seed(0)
    model = build_transformer(config)
    tok = config.tokenizer
    quantizer = MultiScaleQuantizer(tok.codebook_size, tok.latent_dim, tok.scales, per_scale=tok.codebook_per_scale)
    maps = [torch.randint(0, tok.codebook_size, (args.batch, *scale)) for scale in tok.scales]
    latent_BCdhw = torch.randn(args.batch, tok.latent_dim, *tok.scales[-1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ages = torch.full((args.batch,), 70.0), torch.full((args.batch,), 72.0)

    def step() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        with torch.no_grad():
            inputs = teacher_forcing_sequence(quantizer, maps)
            earlier = torch.cat([flatten(f) for f in earlier_latent_features(tok.scales, latent_BCdhw)], 1)
        tokens = torch.cat([m.flatten(1) for m in maps], 1)
        t1 = time.perf_counter()
        logits = model(inputs, earlier, torch.zeros_like(tokens), *ages)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        t2 = time.perf_counter()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    step()
    inputs_s, forward_s, backward_s = np.mean([step() for _ in range(args.steps)], 0)
    print(f"reuse_freed_memory {reused}: inputs {inputs_s:.3f} s, forward {forward_s:.3f} s, backward and AdamW "
          f"{backward_s:.3f} s, step {inputs_s + forward_s + backward_s:.3f} s")


if __name__ == "__main__":
    main()
