"""`make bench`: speed and memory of the tokenizer, NeuroAR and the LDM, measured side by side in one run.

Each case runs in a fresh subprocess (so peak memory is its own), timed as the best of a few repeats after a
warm-up. Weights are random: speed and memory do not depend on them. Writes benchmarks/results/bench.json
and benchmarks/RESULTS.md (naming the machine, with the targets met or missed).

Run: .venv/bin/python benchmarks/bench.py [--repeats 3] [--only CASE ...]   (--only re-measures those cases and
keeps the others' numbers from results/bench.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).parent
RESULTS_JSON, RESULTS_MD = HERE / "results" / "bench.json", HERE / "RESULTS.md"
# An LDM U-Net of 1.8 M parameters beside the demo NeuroAR transformer's 1.2 M (widths 16 or 24 per level give
# 0.8 M or 1.8 M). Being the larger, it favours NeuroAR in the ratio: RESULTS.md names both counts.
LDM_COMPARABLE = ["ldm.channels=[24,48,48]", "ldm.head_channels=24", "ldm.ddim_steps=50"]
SCALES = {3: "[[1,1,1],[5,6,6],[10,12,11]]", 5: "[[1,1,1],[3,4,3],[5,6,6],[8,9,8],[10,12,11]]",
          7: "[[1,1,1],[2,2,2],[3,4,3],[5,6,6],[7,8,8],[8,10,9],[10,12,11]]"}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _timed(work, repeats: int) -> float:
    """Best wall time of `repeats` runs after one warm-up, in seconds."""
    device = _device()
    work()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb(before_mb: float) -> float:
    """Peak memory the measured work added: CUDA allocations on a GPU, resident memory on a CPU."""
    if _device().type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before_mb


def case_tokenizer(config_name: str, repeats: int) -> dict:
    from neuroar.config import load_config
    from neuroar.models.tokenizer import MSVQVAE

    config = load_config(config_name)
    model = MSVQVAE(config.tokenizer).to(_device()).eval()
    x = torch.rand(1, 1, *config.data.shape, device=_device())
    before = _rss_mb()
    with torch.no_grad():
        tokens = model.encode_scan(x)
        encode = _timed(lambda: model.encode_scan(x), repeats)
        decode = _timed(lambda: model.decode_tokens(tokens), repeats)
    return {"shape": list(config.data.shape), "encode_volumes_per_s": 1 / encode, "decode_volumes_per_s": 1 / decode,
            "peak_mb": _peak_mb(before)}


# The architectures before the patch embedding (convolutions from the voxels), beside the shipped ones.
OLD_TOKENIZER = ["tokenizer.patch=1", "tokenizer.channels=8"]
OLD_AUTOENCODER = ["autoencoder.patch=1", "autoencoder.channels=[8,16,16]"]


def case_training(kind: str, config_name: str, overrides: list[str], repeats: int, batch: int = 2) -> dict:
    """Training samples per second of the tokenizer or the baselines' autoencoder (forward, L1, backward,
    Adam step) on 2 mm volumes."""
    from neuroar.config import load_config
    from neuroar.models.autoencoder import build_autoencoder
    from neuroar.models.tokenizer import MSVQVAE

    config = load_config(config_name, overrides)
    torch.manual_seed(0)
    model = (MSVQVAE(config.tokenizer) if kind == "tokenizer" else build_autoencoder(config.autoencoder))
    model = model.to(_device()).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, *config.data.shape, device=_device())

    def step():
        if kind == "tokenizer":
            reconstruction, loss, _ = model(x)
        else:
            reconstruction, mu, sigma = model(x)
            loss = 1e-6 * (mu.square() + sigma.square()).mean()
        loss = loss + (reconstruction - x).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    before = _rss_mb()
    seconds = _timed(step, repeats)
    return {"config": config_name, "overrides": overrides, "batch": batch, "samples_per_s": batch / seconds,
            "parameters": sum(p.numel() for p in model.parameters()), "peak_mb": _peak_mb(before)}


def _neuroar(overrides: list[str]):
    from neuroar.config import load_config
    from neuroar.models.tokenizer import MSVQVAE
    from neuroar.models.transformer import build_transformer

    config = load_config("demo", overrides)
    torch.manual_seed(0)
    tokenizer = MSVQVAE(config.tokenizer).to(_device()).eval()
    return config, tokenizer, build_transformer(config).to(_device()).eval()


def case_neuroar_predict(scales: int, repeats: int, samples: int = 4) -> dict:
    """One scan's prediction: sampling `samples` follow-ups, with and without the KV cache, and decoding."""
    config, tokenizer, model = _neuroar([f"tokenizer.scales={SCALES[scales]}"])
    codes = config.tokenizer.codebook_size
    earlier = [torch.randint(0, codes, (samples, *s), device=_device()) for s in config.tokenizer.scales]
    ages = torch.full((samples,), 70.0, device=_device()), torch.full((samples,), 73.0, device=_device())

    def sample(use_cache: bool):
        return model.sample(tokenizer.quantizer, earlier, *ages, config.sampling, torch.Generator(_device())
                            .manual_seed(0), use_cache=use_cache)[0]

    before = _rss_mb()
    with torch.no_grad():
        same = all(torch.equal(a, b) for a, b in zip(sample(True), sample(False)))
        cached = _timed(lambda: sample(True), repeats)
        peak = _peak_mb(before)
        uncached = _timed(lambda: sample(False), repeats)
        decode = _timed(lambda: tokenizer.decode_tokens(sample(True)), repeats) - cached
    return {"scales": scales, "tokens": sum(int(torch.tensor(s).prod()) for s in config.tokenizer.scales),
            "samples": samples, "parameters": sum(p.numel() for p in model.parameters()),
            "sample_s_kv_cache": cached, "sample_s_no_cache": uncached, "decode_s": decode,
            "same_tokens": same, "peak_mb": peak}


def case_ldm_predict(repeats: int, samples: int = 4) -> dict:
    """One scan's prediction by the LDM: 50 DDIM steps for `samples` follow-ups, and decoding."""
    from neuroar.config import load_config
    from neuroar.models.autoencoder import build_autoencoder
    from neuroar.models.ldm import LatentDiffusion

    config = load_config("demo", LDM_COMPARABLE)
    torch.manual_seed(0)
    model = LatentDiffusion(config.ldm, config.autoencoder.latent_channels, config.autoencoder.norm_groups)
    model = model.to(_device()).eval()
    autoencoder = build_autoencoder(config.autoencoder).to(_device()).eval()
    latent = torch.randn(samples, config.autoencoder.latent_channels, *config.autoencoder_latent_shape,
                         device=_device())
    ages = torch.full((samples,), 70.0, device=_device()), torch.full((samples,), 73.0, device=_device())
    before = _rss_mb()
    with torch.no_grad():
        sample = _timed(lambda: model.sample(latent, *ages), max(1, repeats - 1))
        peak = _peak_mb(before)
        decode = _timed(lambda: autoencoder.decode(latent), repeats)
    return {"ddim_steps": config.ldm.ddim_steps, "samples": samples,
            "parameters": sum(p.numel() for p in model.parameters()), "sample_s": sample, "decode_s": decode,
            "peak_mb": peak}


def case_baseline_scans(repeats: int, scans: int = 32, batch: int = 16) -> dict:
    """The brain-age experiment's synthetic scans from a baseline (the demo config's LDM and StarGAN, as the study
    trains them): `scans` scans, one sample and one target age each, one at a time against `batch` at a time
    (`Predictor.predict_scans`); the same numbers either way (the largest difference is reported)."""
    import numpy as np

    from neuroar.config import load_config
    from neuroar.models.autoencoder import build_autoencoder
    from neuroar.models.baselines import build_baseline
    from neuroar.predict import LatentPredictor

    config = load_config("demo", ["ldm.target=change"])
    torch.manual_seed(0)
    volumes = list(np.random.default_rng(0).random((scans, *config.data.shape), dtype=np.float32))
    ages, targets, seeds = [70.0] * scans, [[72.0]] * scans, list(range(scans))
    result = {"scans": scans, "batch": batch, "ddim_steps": config.ldm.ddim_steps}
    for kind in ("ldm", "stargan"):
        predictor = LatentPredictor(config, kind, build_autoencoder(config.autoencoder),
                                    build_baseline(kind, config)["model"], 1.0, _device())
        outputs = {}
        for size, key in ((1, f"{kind}_one_by_one_s"), (batch, f"{kind}_batched_s")):
            def predict(size=size, predictor=predictor, outputs=outputs):
                outputs[size] = predictor.predict_scans(volumes, ages, targets, samples=1, seeds=seeds, batch=size)

            result[key] = _timed(predict, max(1, repeats - 1))
        result[f"{kind}_largest_difference"] = max(float(np.abs(a[0][0] - b[0][0]).max())
                                                   for a, b in zip(outputs[1], outputs[batch]))
    return result


def case_volumes(repeats: int, subjects: int = 8, visits: int = 4, chunk: int = 16) -> dict:
    """The evaluation's volume measure (`regional_volumes`) of a small synthetic cohort's scans on the demo's
    grid: one scan at a time against `chunk` at a time (`regional_volumes_many`, as the evaluation measures a
    pair's outputs); the same numbers either way (the largest relative difference is reported)."""
    import tempfile

    from neuroar.config import load_config
    from neuroar.data.nifti import read_volume
    from neuroar.data.preprocess import preprocess_image
    from neuroar.data.synth.cohort import SynthOptions, make_cohort
    from neuroar.evaluate.volumes import regional_volumes, regional_volumes_many, template_regions

    config = load_config("demo").data
    with tempfile.TemporaryDirectory() as folder:
        manifest = make_cohort(folder, SynthOptions(subjects=subjects, visits=visits, seed=7), progress=False)
        volumes = [preprocess_image(read_volume(Path(folder) / path), config)[0] for path in manifest["path"]]
    regions = template_regions(config)
    measured = {}

    def one_by_one():
        measured["one"] = [regional_volumes(volume, regions) for volume in volumes]

    def together():
        measured["together"] = [v for start in range(0, len(volumes), chunk)
                                for v in regional_volumes_many(volumes[start:start + chunk], regions)]

    return {"scans": len(volumes), "chunk": chunk, "one_by_one_s": _timed(one_by_one, repeats),
            "together_s": _timed(together, repeats),
            "largest_relative_difference": max(abs(a[k] - b[k]) / abs(a[k]) for a, b in
                                               zip(measured["one"], measured["together"]) for k in a)}


def case_neuroar_training(repeats: int, batch: int = 8) -> dict:
    """Training steps per second on cached tokens vs tokenizing both scans of each pair on the fly."""
    from neuroar.models.transformer import earlier_scale_features, flatten, teacher_forcing_sequence

    config, tokenizer, model = _neuroar([])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    volumes = torch.rand(2 * batch, 1, *config.data.shape, device=_device())
    with torch.no_grad():
        cached_tokens = tokenizer.encode_scan(volumes)

    def step(tokens):
        later, earlier = [t[:batch] for t in tokens], [t[batch:] for t in tokens]
        with torch.no_grad():
            inputs = teacher_forcing_sequence(tokenizer.quantizer, later)
            earlier_BLC = torch.cat([flatten(f) for f in earlier_scale_features(tokenizer.quantizer, earlier,
                                                                                 config.transformer.earlier)], 1)
        ages = torch.full((batch,), 70.0, device=_device()), torch.full((batch,), 73.0, device=_device())
        logits = model(inputs, earlier_BLC, torch.cat([t.flatten(1) for t in earlier], 1), *ages)
        loss = F.cross_entropy(logits.flatten(0, 1), torch.cat([t.flatten(1) for t in later], 1).flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def on_the_fly():
        with torch.no_grad():
            tokens = tokenizer.encode_scan(volumes)
        step(tokens)

    before = _rss_mb()
    cached = _timed(lambda: step(cached_tokens), repeats)
    peak_cached = _peak_mb(before)
    fly = _timed(on_the_fly, max(1, repeats - 1))
    return {"batch_pairs": batch, "cached_steps_per_s": 1 / cached, "on_the_fly_steps_per_s": 1 / fly,
            "peak_mb_cached": peak_cached, "peak_mb_on_the_fly": _peak_mb(before)}


def case_neuroar_attention(repeats: int, batch: int = 8) -> dict:
    """One block's self-attention, forward and backward, on the demo config's 2113 tokens: one SDPA call under
    an L x L block-causal mask (the design until 2026-12-02) against the model's scale-by-scale calls."""
    config, _, model = _neuroar([])
    block = model.blocks[0].train()
    x_BLW = torch.randn(batch, model.ends[-1], config.transformer.width, device=_device(), requires_grad=True)
    visible_LL = model.levels[None, :] <= model.levels[:, None]

    def masked():
        B, L, W = x_BLW.shape
        q, k, v = block.qkv(x_BLW).view(B, L, 3, block.heads, W // block.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible_LL)
        block.proj(out.transpose(1, 2).reshape(B, L, W)).sum().backward()

    def scale_by_scale():
        block._attend(x_BLW, model.ends, None).sum().backward()

    return {"tokens": model.ends[-1], "batch_pairs": batch, "masked_s": _timed(masked, repeats),
            "scale_by_scale_s": _timed(scale_by_scale, repeats)}


def case_raw_preprocessing(spacing: int) -> dict:
    """Seconds per step for one raw scan (synthetic: a head in the scanner's 240x240x220 mm field of view at
    `spacing` mm), once: every step takes seconds, so a repeat would only double the wait."""
    import tempfile

    import pandas as pd

    from neuroar.config import load_config
    from neuroar.data.nifti import read_volume
    from neuroar.data.preprocess import preprocess_image
    from neuroar.data.synth.cohort import SynthOptions, make_cohort

    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "raw"
        make_cohort(folder, SynthOptions(subjects=1, visits=1, spacing=spacing, raw=True, workers=1), progress=False)
        image = read_volume(raw / pd.read_csv(raw / "manifest.csv")["path"].iloc[0])
        _, record = preprocess_image(image, load_config("reference", ["data.raw=true"]).data)
    return {"shape": list(image.shape), **{k: v for k, v in record.checks.items() if k.startswith("seconds")}}


CASES = {
    "tokenizer_training_old": lambda r: case_training("tokenizer", "reference", OLD_TOKENIZER, r),
    "tokenizer_training_new": lambda r: case_training("tokenizer", "reference", [], r),
    "autoencoder_training_old": lambda r: case_training("autoencoder", "reference", OLD_AUTOENCODER, r),
    "autoencoder_training_new": lambda r: case_training("autoencoder", "reference", [], r),
    "tokenizer_2mm": lambda r: case_tokenizer("reference", r),
    "tokenizer_1mm": lambda r: case_tokenizer("paper", 1),
    "neuroar_predict_3_scales": lambda r: case_neuroar_predict(3, r),
    "neuroar_predict_5_scales": lambda r: case_neuroar_predict(5, r),
    "neuroar_predict_7_scales": lambda r: case_neuroar_predict(7, r),
    "ldm_predict": lambda r: case_ldm_predict(r),
    "baseline_scans": lambda r: case_baseline_scans(r),
    "volumes": lambda r: case_volumes(r),
    "neuroar_training": lambda r: case_neuroar_training(r),
    "neuroar_attention": lambda r: case_neuroar_attention(r),
    "raw_preprocessing_2mm": lambda r: case_raw_preprocessing(2),
    "raw_preprocessing_1mm": lambda r: case_raw_preprocessing(1),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=list(CASES))
    parser.add_argument("--render", action="store_true", help="rewrite RESULTS.md from results/bench.json")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)  # a subprocess's one case
    args = parser.parse_args()
    if args.render:
        saved = json.loads(RESULTS_JSON.read_text())
        RESULTS_MD.write_text(results_markdown(saved["machine"], saved["results"]))
        return
    if args.case:
        print(json.dumps(CASES[args.case](args.repeats)))
        return
    # With --only, the other cases keep their last measured numbers (and the file says which machine made them).
    saved = json.loads(RESULTS_JSON.read_text()) if args.only and RESULTS_JSON.is_file() else {}
    results = saved.get("results", {})
    for case in results.values():  # kept numbers say where and when they were measured
        case.setdefault("measured", f"{saved['machine']['platform']}, {saved['machine'].get('date', '?')}")
    machine = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "cpu_cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d")}
    for name in args.only or CASES:
        print(f"== {name}", flush=True)
        done = subprocess.run([sys.executable, __file__, "--case", name, "--repeats", str(args.repeats)],
                              capture_output=True, text=True)
        if done.returncode:
            results[name] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
        else:
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        results[name]["measured"] = f"{machine['platform']}, {machine['date']}"
        print(json.dumps(results[name]), flush=True)
    RESULTS_JSON.parent.mkdir(exist_ok=True)
    RESULTS_JSON.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    RESULTS_MD.write_text(results_markdown(machine, results))
    print(RESULTS_MD.read_text())


def results_markdown(machine: dict, results: dict) -> str:
    def get(case: str, key: str) -> float:
        return results.get(case, {}).get(key, float("nan"))

    n5, ldm, train = "neuroar_predict_5_scales", "ldm_predict", "neuroar_training"
    neuroar_total = get(n5, "sample_s_kv_cache") + get(n5, "decode_s")
    ldm_total = get(ldm, "sample_s") + get(ldm, "decode_s")
    speed = ldm_total / neuroar_total
    sampling_speed = get(ldm, "sample_s") / get(n5, "sample_s_kv_cache")
    kv = get(n5, "sample_s_no_cache") / get(n5, "sample_s_kv_cache")
    cached = get(train, "cached_steps_per_s") / get(train, "on_the_fly_steps_per_s")
    tokenizer_speed = get("tokenizer_training_new", "samples_per_s") / get("tokenizer_training_old", "samples_per_s")
    autoencoder_speed = (get("autoencoder_training_new", "samples_per_s")
                         / get("autoencoder_training_old", "samples_per_s"))

    def verdict(value: float, target: float) -> str:
        return "met" if value >= target else "**missed**"

    lines = ["# Benchmarks", "",
             f"`make bench` on {machine['device']} ({machine['cpu_cores']} CPU cores, {machine['platform']}, "
             f"torch {machine['torch']}), {machine['date']}. Random weights; best of a few repeats after a warm-up; "
             "each case in its own process. Memory: peak resident memory the case added on a CPU, peak CUDA "
             "allocation on a GPU. Raw numbers: `benchmarks/results/bench.json`."
             + (" Some cases' numbers come from earlier runs on other machines: see the last section."
                if len({v.get("measured") for v in results.values()}) > 1 else ""), "",
             "## Targets", "", "| target | measured | |", "|---|---|---|",
             f"| NeuroAR prediction >= 20x faster than the LDM with 50 DDIM steps (sampling and decoding) | "
             f"{speed:.1f}x | {verdict(speed, 20)} |",
             f"| the same, sampling only (transformer passes vs U-Net passes) | {sampling_speed:.1f}x | "
             f"{verdict(sampling_speed, 20)} |",
             f"| KV cache >= 2x faster than recomputing the prefix | {kv:.2f}x | {verdict(kv, 2)} |",
             f"| training on cached tokens >= 10x more steps/s than on-the-fly encoding | {cached:.1f}x | "
             f"{verdict(cached, 10)} |",
             f"| tokenizer training (reference config) >= 4x the samples/s of the old full-resolution architecture | "
             f"{tokenizer_speed:.1f}x | {verdict(tokenizer_speed, 4)} |",
             f"| baselines' autoencoder training (reference config) >= 2x the old | {autoencoder_speed:.1f}x | "
             f"{verdict(autoencoder_speed, 2)} |", "",
             f"Where the time goes: NeuroAR spends {get(n5, 'decode_s'):.2f} of its {neuroar_total:.2f} s decoding the "
             f"samples with the tokenizer's decoder, so end to end it is {speed:.1f}x faster than the LDM while its "
             f"sampling alone is {sampling_speed:.1f}x faster. The KV cache saves only the prefix recomputation, "
             "and the last scale holds most tokens (1320 of 2113 with 5 scales), so recomputing costs at most ~1.5x; "
             "it grows with more, finer scales (table below). On-the-fly training tokenizes both scans of every "
             "pair, and at this small transformer the tokenizer's encoder costs only a few times a transformer step.",
             "",
             "## Prediction of one scan (4 samples, one target age)", "",
             "| model | parameters | sampling (s) | decoding (s) | total (s) | peak memory (MB) |",
             "|---|---|---|---|---|---|",
             f"| NeuroAR, KV cache ({results.get(n5, {}).get('tokens', '?')} tokens, 5 scales) | "
             f"{results.get(n5, {}).get('parameters', 0):,} | {get(n5, 'sample_s_kv_cache'):.3f} | "
             f"{get(n5, 'decode_s'):.3f} | {neuroar_total:.3f} | {get(n5, 'peak_mb'):.0f} |",
             f"| NeuroAR, no cache | | {get(n5, 'sample_s_no_cache'):.3f} | | | |",
             f"| LDM, {results.get(ldm, {}).get('ddim_steps', '?')} DDIM steps | "
             f"{results.get(ldm, {}).get('parameters', 0):,} | {get(ldm, 'sample_s'):.3f} | {get(ldm, 'decode_s'):.3f} "
             f"| {ldm_total:.3f} | {get(ldm, 'peak_mb'):.0f} |", "",
             "## NeuroAR with the number of scales (same 10x12x11 latent grid)", "",
             "| scales | tokens | sampling, KV cache (s) | no cache (s) | cache speed-up | peak memory (MB) |",
             "|---|---|---|---|---|---|"]
    for k in (3, 5, 7):
        case = f"neuroar_predict_{k}_scales"
        ratio = get(case, "sample_s_no_cache") / get(case, "sample_s_kv_cache")
        lines.append(f"| {k} | {results.get(case, {}).get('tokens', '?')} | {get(case, 'sample_s_kv_cache'):.3f} | "
                     f"{get(case, 'sample_s_no_cache'):.3f} | {ratio:.2f}x | {get(case, 'peak_mb'):.0f} |")
    lines += ["", "## Tokenizer, 2 mm (reference config) and 1 mm (paper config), one volume", "",
              "| config | volume | encode (volumes/s) | decode (volumes/s) | peak memory (MB) |",
              "|---|---|---|---|---|"]
    for case, name in (("tokenizer_2mm", "reference"), ("tokenizer_1mm", "paper")):
        lines.append(f"| {name} | {results.get(case, {}).get('shape', '?')} | {get(case, 'encode_volumes_per_s'):.3f} "
                     f"| {get(case, 'decode_volumes_per_s'):.3f} | {get(case, 'peak_mb'):.0f} |")
    lines += ["", "## Training the tokenizer and the autoencoder (reference config, 2 mm, batch of 2)", "",
              "Old: convolutions from the voxels (" + ", ".join(OLD_TOKENIZER) + "; " + ", ".join(OLD_AUTOENCODER)
              + "). New: the shipped reference config (2x2x2 patches folded into channels first).", "",
              "| model | architecture | parameters | samples/s | peak memory (MB) |", "|---|---|---|---|---|"]
    for model in ("tokenizer", "autoencoder"):
        for age in ("old", "new"):
            case = f"{model}_training_{age}"
            lines.append(f"| {model} | {age} | {results.get(case, {}).get('parameters', 0):,} | "
                         f"{get(case, 'samples_per_s'):.3f} | {get(case, 'peak_mb'):.0f} |")
    lines += ["", "## NeuroAR training (demo config, batch of 8 pairs)", "",
              "| input | steps/s | peak memory (MB) |", "|---|---|---|",
              f"| cached tokens | {get(train, 'cached_steps_per_s'):.3f} | {get(train, 'peak_mb_cached'):.0f} |",
              f"| both scans of each pair tokenized on the fly | {get(train, 'on_the_fly_steps_per_s'):.3f} | "
              f"{get(train, 'peak_mb_on_the_fly'):.0f} |", ""]
    attention = "neuroar_attention"
    lines += ["## NeuroAR self-attention (demo config, one block, batch of 8 pairs, forward and backward)", "",
              "| attention | seconds |", "|---|---|",
              f"| one call under a {results.get(attention, {}).get('tokens', '?')}^2 block-causal mask | "
              f"{get(attention, 'masked_s'):.3f} |",
              f"| scale by scale, no mask (shipped) | {get(attention, 'scale_by_scale_s'):.3f} "
              f"({get(attention, 'masked_s') / get(attention, 'scale_by_scale_s'):.2f}x faster) |", ""]
    scans = results.get("baseline_scans", {})
    lines += [f"## Baselines' predictions of {scans.get('scans', '?')} scans (brain age's synthetic scans: one "
              "sample, one target age each; demo config)", "",
              "| model | one scan at a time (s) | "
              f"{scans.get('batch', '?')} at a time (s) | speed-up | largest difference |", "|---|---|---|---|---|"]
    for kind, name in (("ldm", f"LDM, {scans.get('ddim_steps', '?')} DDIM steps"), ("stargan", "latent StarGAN")):
        one, batched = get("baseline_scans", f"{kind}_one_by_one_s"), get("baseline_scans", f"{kind}_batched_s")
        lines.append(f"| {name} | {one:.2f} | {batched:.2f} | {one / batched:.1f}x | "
                     f"{get('baseline_scans', f'{kind}_largest_difference'):.1e} |")
    lines.append("")
    volumes = results.get("volumes", {})
    lines += [f"## The evaluation's volume measure of {volumes.get('scans', '?')} preprocessed scans (demo grid)", "",
              f"| one scan at a time (s) | {volumes.get('chunk', '?')} at a time (s) | speed-up | largest relative "
              "difference |", "|---|---|---|---|",
              f"| {get('volumes', 'one_by_one_s'):.2f} | {get('volumes', 'together_s'):.2f} | "
              f"{get('volumes', 'one_by_one_s') / get('volumes', 'together_s'):.1f}x | "
              f"{get('volumes', 'largest_relative_difference'):.1e} |", ""]
    lines += ["## Raw scans: seconds per step (`preprocess` with data.raw=true, one synthetic raw scan)", "",
              "Accuracy against the truth (Dice, pose, volumes): `benchmarks/RAW_PREPROCESSING.md`.", "",
              "| scan | voxels | N4 | skull stripping (deepbet) | affine registration (ANTs) |",
              "|---|---|---|---|---|"]
    for spacing in (2, 1):
        case = results.get(f"raw_preprocessing_{spacing}mm", {})
        lines.append(f"| {spacing} mm | {'x'.join(map(str, case.get('shape', ['?'])))} | "
                     + " | ".join(f"{case.get(k, float('nan')):.1f} s" for k in ("seconds_n4", "seconds_skull_strip",
                                                                               "seconds_register")) + " |")
    lines.append("")
    measured: dict[str, list[str]] = {}
    for case, values in results.items():
        measured.setdefault(values.get("measured", "?"), []).append(case)
    if len(measured) > 1:
        lines += ["## Where each case was measured (`--only` keeps the other cases' numbers)", "",
                  *[f"- {where}: {', '.join(cases)}" for where, cases in measured.items()], ""]
    errors = {k: v["error"] for k, v in results.items() if "error" in v}
    if errors:
        lines += ["## Cases that failed", "", *[f"- {k}: {v}" for k, v in errors.items()], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
