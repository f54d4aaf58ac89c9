"""The token space's yardstick: how much of the true change between two visits survives tokenizing and decoding,
per tokenizer design, per minute of its training. No transformer is trained.

    python benchmarks/token_space.py runs/demo --seconds 240 --designs demo grid20
    -> benchmarks/TOKEN_SPACE.md (one row per design measured, kept across invocations; measured on this
       machine, CPU-minutes) and benchmarks/results/token_space.json

Each design is a set of tokenizer overrides on RUN's config, trained from scratch on RUN's training scans for
`--seconds` of wall time (the step count from two timed probes of a few steps) into OUT/ROW (the design's name
unless --row names it), a run folder of its own that shares RUN's preprocessed scans; then `neuroar evaluate` with
no model scores the trivial outputs on RUN's test pairs. The yardstick is the tokenizer-oracle's row (the earlier
scan + dec(tokens(later)) - dec(tokens(earlier))): per region, r with the true change and "carried" = its mean
change / the true mean change. For these designs the oracle of a pair with no change is the earlier scan itself
(the same reconstruction is added and subtracted), so no bias is counted as change; a design whose decoder reads
the earlier scan must subtract its output for a scan paired with itself. PSNR: the tokenizer-copy's, in the brain.
Beside it the same oracle without the quantizer (the earlier scan + dec(f_later) - dec(f_earlier), continuous
latents): what the design's encoder and decoder carry, so that a row tells whether its quantizer or its autoencoder
loses the change.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pandas as pd

from neuroar.config import DEMO_SCAN_CODING, load_config
from neuroar.data.preprocess import template_brain_mask
from neuroar.evaluate.compare import carried, evaluate_models, load_pairs, pearson, predict_pairs, score_pairs
from neuroar.evaluate.forecasters import Output
from neuroar.evaluate.volumes import template_regions
from neuroar.predict import with_change
from neuroar.runs import load_tokenizer
from neuroar.tables import markdown_table
from neuroar.train.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FINE = "[[1,1,1],[3,4,3],[5,6,6],[10,12,11],[20,24,22]]"
# Every design starts from the paper's scan coding at 10x12x11 (the demo's tokenizer until it coded the change), so
# that a row does not depend on which demo config prepared RUN; NeuroAR's learning rate and sampling temperature stay
# RUN's, for the models that benchmarks/change_neuroar.py trains on a design's folder (its config.yaml).
SCAN_BASE = [o for o in DEMO_SCAN_CODING if not o.startswith(("train_transformer.lr=", "sampling.temperature="))]
# name -> (what it is, tokenizer overrides on SCAN_BASE). "demo" is SCAN_BASE itself; "grid20" halves the
# downsampling to 20x24x22 (bottleneck attention off: at 10,560 positions it is most of a CPU step).
DESIGNS = {
    "demo": ("the demo's tokenizer: 10x12x11, 512 codes, 5 scales", []),  # until it coded the change
    "grid20": ("20x24x22 grid, 512 codes, 5 scales, no attention",
               ["tokenizer.downsample=2", "tokenizer.attention=false", f"tokenizer.scales={FINE}"]),
    "grid20-thrice": ("grid20 with two more residual stages at 20x24x22",
                      ["tokenizer.downsample=2", "tokenizer.attention=false",
                       f"tokenizer.scales={FINE[:-1]},[20,24,22],[20,24,22]]"]),
    "grid20-4096": ("grid20 with 4096 codes",
                    ["tokenizer.downsample=2", "tokenizer.attention=false", f"tokenizer.scales={FINE}",
                     "tokenizer.codebook_size=4096"]),
    "grid20-twice": ("grid20 with a second residual stage at 20x24x22",
                     ["tokenizer.downsample=2", "tokenizer.attention=false",
                      f"tokenizer.scales={FINE[:-1]},[20,24,22]]"]),
    "grid20-latent4": ("grid20 with 4 latent channels instead of 16 (fewer numbers per code to match)",
                       ["tokenizer.downsample=2", "tokenizer.attention=false", f"tokenizer.scales={FINE}",
                        "tokenizer.latent_dim=4", "tokenizer.norm_groups=4"]),
    # Code the change from the earlier scan's continuous latent (tokenizer.code=change; batch_size counts pairs).
    "change": ("grid20 coding the change from the earlier scan's latent",
               ["tokenizer.downsample=2", "tokenizer.attention=false", f"tokenizer.scales={FINE}",
                "tokenizer.code=change", "transformer.earlier=latent"]),
    "change-twice": ("change with a second residual stage at 20x24x22",
                     ["tokenizer.downsample=2", "tokenizer.attention=false",
                      f"tokenizer.scales={FINE[:-1]},[20,24,22]]", "tokenizer.code=change",
                      "transformer.earlier=latent"]),
    "change-thrice": ("change with two more residual stages at 20x24x22",
                      ["tokenizer.downsample=2", "tokenizer.attention=false",
                       f"tokenizer.scales={FINE[:-1]},[20,24,22],[20,24,22]]", "tokenizer.code=change",
                       "transformer.earlier=latent"]),
    "change-twice-shortcut": ("change-twice with a linear path around encoder and decoder",
                              ["tokenizer.downsample=2", "tokenizer.attention=false",
                               f"tokenizer.scales={FINE[:-1]},[20,24,22]]", "tokenizer.code=change",
                               "transformer.earlier=latent", "tokenizer.shortcut=true"]),
    "change-twice-dz1": ("change-twice, a change vector below the mean change energy coded as no change",
                         ["tokenizer.downsample=2", "tokenizer.attention=false",
                          f"tokenizer.scales={FINE[:-1]},[20,24,22]]", "tokenizer.code=change",
                          "transformer.earlier=latent", "tokenizer.dead_zone=1.0"]),
}
REGIONS = ("ventricles", "grey_matter")
# What a table's reader must know beyond its rows, by the table's file name.
NOTES = {"TOKEN_SPACE.md": ["On `runs/demo` (`make demo`'s run). Change-twice-shortcut-dz1-750-lr3 and the rows after "
                            "it trained beside other jobs. Learning rate: the demo config's of the time, 0.001, for "
                            "every row but those that name train_tokenizer.lr=0.003 (the demo's since).", ""],
         "TOKEN_SPACE_ADOLESCENT.md": [
             "On the study's adolescent cohort, denoised: `neuroar study data.denoise=true --out runs/study-dn "
             "--cohorts adolescent` (150 subjects x 4 visits, 180 test pairs; grey matter is what ages there). "
             "Learning rate 0.003, the run's. Row dz1 is the study's tokenizer (the demo config's): it gives the "
             "study run's own oracle to the digit. Rows dz1 and rate0.1 trained beside another job. Rows dz1-last2 "
             "and rate0.1 ran two options of commit ba7a843, removed since (neither carried more): "
             "`tokenizer.dead_zone_scales` (the dead zone on the last N scales only) and `tokenizer.rate` (a code's "
             "price grows by rate x -ln of its share of use: entropy-constrained quantization).", ""],
         "TOKEN_SPACE_ELDERLY.md": [
             "On the study's elderly cohort as the study makes it: `neuroar study --out runs/study-time --cohorts "
             "elderly` (stopped after its NeuroAR models; 150 subjects x 4 visits, 180 test pairs). Learning rate "
             "0.003, the run's. The study's own tokenizer (dead zone 1) carried 77 % of the ventricles' growth (r "
             "0.99) in `results/study/models.csv`.", ""],
         "TOKEN_SPACE_ELDERLY_STUDY.md": [
             "On the study's elderly cohort as the study makes it (`neuroar study --out runs/study-dz0`, the shipped "
             "config; 150 subjects x 4 visits, 180 test pairs; the ventricles are what ages most there). Every row is "
             "the shipped tokenizer (design change-twice-shortcut, no dead zone, learning rate 0.003) with the lever "
             "its name and `what` give. The study's own tokenizer carried 92 % of the ventricles' growth (r 0.99) in "
             "`results/study/models.csv`. Five-books is now the study's token space (`study.STUDY`).", ""],
         "TOKEN_SPACE_ADOLESCENT_STUDY.md": [
             "On the study's adolescent cohort as the study makes it (`neuroar study --out runs/study-dz0`, the "
             "shipped config; 150 subjects x 4 visits, 180 test pairs; grey matter is what ages there). Every row is "
             "the shipped tokenizer (design change-twice-shortcut, no dead zone, learning rate 0.003) with the lever "
             "its name and `what` give. The study's own tokenizer carried 71 % of the grey matter's loss (r 0.95) in "
             "`results/study/models.csv`. Rows thrice to five trained beside other jobs (train s not comparable); the "
             "*-books rows (`tokenizer.codebook_per_scale`: one codebook per scale) alone. Row five-books-2 is "
             "five-books again, on a later session's machine, with the cohort made anew there (`neuroar study --out "
             "runs/study --cohorts adolescent`, stopped when its tokenizer began), beside a NeuroAR training: the "
             "spread of one design between two runs. Row stage-norm ran an "
             "option of commit 2ecc7fb, removed since (2 points more grey matter, a lower ventricles' r): "
             "`tokenizer.stage_norm` (each scale looks its residual up in the shared codebook in units of that "
             "scale's running RMS). With one shared codebook the last stages fell to a few codes (four: perplexity "
             "340, 85, 18 and 3 at the four 20x24x22 stages after 750 steps, `tokenizer_train.csv`); with one "
             "codebook per scale 258, 249, 199 and 145. Five-books is now the study's token space (`study.STUDY`): in "
             "the study's own run with it (`neuroar study --out runs/study-fb --cohorts adolescent --seeds 3`, "
             "`results/study/models.csv`) its oracle carried 93 % of the grey matter's loss (r 0.99).", ""]}
PROBE_STEPS = 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a prepared run (neuroar preprocess; e.g. make demo's runs/demo)")
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, default=240, help="wall time of each tokenizer's training")
    budget.add_argument("--steps", type=int, help="steps of each tokenizer's training instead (on a busy machine, "
                                                   "where wall time is not comparable between designs)")
    parser.add_argument("--row", help="the table row's name, for a design measured again with another budget or "
                                      "--set (default: the design's name; one design at a time)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides on top of the design's (a lever; needs --row)")
    parser.add_argument("--out", type=Path, default=Path("runs/token_space"))
    parser.add_argument("--table", type=Path, default=ROOT / "benchmarks" / "TOKEN_SPACE.md")
    args = parser.parse_args(argv)
    if args.row and len(args.designs) != 1:
        parser.error("--row names the row of one design: give --designs one name")
    if args.set and not args.row:
        parser.error("--set changes a design: name its row with --row")
    for name in args.designs:
        row = args.row or name
        measured = measure(args.run, name, args.seconds, args.out / row, args.steps, args.set)
        # Read the table again just before writing: another invocation may have added rows meanwhile.
        results = _load(_results_path(args.table)) | {row: measured}
        _write(results, args)
        print(json.dumps(measured), flush=True)
    return 0


def measure(run: Path, name: str, seconds: float, folder: Path, steps: int | None = None,
            extra: list[str] = ()) -> dict:
    """Train design `name` (with `extra` overrides) for `seconds` (or `steps`) into `folder` and measure what its
    tokenizer-oracle carries."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for table in ("config.yaml", "scans.csv", "pairs.csv"):
        shutil.copy(run / table, folder / table)
    overrides = [*SCAN_BASE, *DESIGNS[name][1], *extra]
    quiet = ["train_tokenizer.val_every=1000000", "train_tokenizer.checkpoint_every=1000000"]
    if steps is None:
        per_step = _seconds_per_step(folder, overrides + quiet, folder.with_suffix(".probe"))
        steps = max(PROBE_STEPS, int(seconds / per_step))
    config = load_config(folder / "config.yaml", [*overrides, *quiet, f"train_tokenizer.steps={steps}",
                                                  f"train_tokenizer.warmup_steps={min(50, steps // 10)}"])
    start = time.perf_counter()
    train_tokenizer(folder, config, progress=False)
    trained = time.perf_counter() - start
    summary = evaluate_models([], folder / "evaluation", run_dir=folder, sweep_subjects=0, progress=False)
    rows = summary.set_index("label")
    oracle, copy = rows.loc["tokenizer-oracle"], rows.loc["tokenizer-copy"]
    latent = latent_oracle(folder, config)
    what = DESIGNS[name][0] + "".join(f"; {o}" for o in extra)
    return {"design": what, "overrides": overrides[len(SCAN_BASE):], "steps": steps, "train_seconds": round(trained, 1),
            "latent": list(config.tokenizer.scales[-1]),
            "tokens": sum(d * h * w for d, h, w in config.tokenizer.scales),
            "pairs": int(oracle["pairs"]), "psnr_brain": round(float(copy["psnr_mean"]), 2),
            **{f"{r}_r": round(float(oracle[f"{r}_change_r"]), 3) for r in REGIONS},
            **{f"{r}_carried": round(float(oracle[f"{r}_carried"]), 3) for r in REGIONS},
            **{f"{r}_latent_{k}": round(v, 3) for r in REGIONS for k, v in latent[r].items()}}


class LatentOracle:
    """The tokenizer-oracle without quantization: the earlier scan + dec(f_later) - dec(f_earlier)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def predict(self, earlier_DHW, earlier_age, target_ages, seed, diagnosis=None, later_DHWs=None):
        decode, latent = self.tokenizer.decode_latent, self.tokenizer.latent_scan
        unchanged_DHW = decode(latent(earlier_DHW))[0]
        return {Output("latent-oracle"): [with_change(earlier_DHW, decode(latent(later_DHW))[0], unchanged_DHW)
                                          for later_DHW in later_DHWs]}


def latent_oracle(folder: Path, config) -> dict[str, dict[str, float]]:
    """Per region, r and carried of `LatentOracle` on the test pairs of the run in `folder`."""
    pairs, _ = load_pairs(folder)
    oracle = LatentOracle(load_tokenizer(folder, config).eval())
    per_pair = score_pairs(predict_pairs([oracle], pairs, progress=False), template_brain_mask(config.data),
                           template_regions(config.data))
    return {r: {"r": pearson(per_pair[f"predicted_change_{r}"], per_pair[f"true_change_{r}"]),
                "carried": carried(per_pair[f"predicted_change_{r}"], per_pair[f"true_change_{r}"])}
            for r in REGIONS}


def _seconds_per_step(folder: Path, overrides: list[str], probe: Path) -> float:
    """Seconds per training step, from two short runs whose difference cancels what every run pays once
    (building the model, the codebook's start, the final validation)."""
    seconds = []
    for steps in (PROBE_STEPS, 3 * PROBE_STEPS):
        shutil.rmtree(probe, ignore_errors=True)
        shutil.copytree(folder, probe)
        start = time.perf_counter()
        train_tokenizer(probe, load_config(probe / "config.yaml", [*overrides, f"train_tokenizer.steps={steps}"]),
                        progress=False)
        seconds.append(time.perf_counter() - start)
    shutil.rmtree(probe)
    return max(1e-3, (seconds[1] - seconds[0]) / (2 * PROBE_STEPS))


def _unquantized(row: dict, region: str) -> str:
    """The latent oracle's carried (r), or a dash for rows measured before it was."""
    if pd.isna(row.get(f"{region}_latent_carried", float("nan"))):
        return "–"
    return f"{row[f'{region}_latent_carried']:.0%} ({row[f'{region}_latent_r']:.2f})"


def _results_path(table: Path) -> Path:
    """The numbers behind a table: benchmarks/results/<table's name>.json (token_space.json for TOKEN_SPACE.md)."""
    return table.with_name("results") / f"{table.stem.lower()}.json"


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write(results: dict, args: argparse.Namespace) -> None:
    json_path = _results_path(args.table)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    frame = pd.DataFrame([{"name": name, **row} for name, row in results.items()])
    budget = f"--steps {args.steps}" if args.steps else f"--seconds {args.seconds:g}"
    lines = ["# The token space's yardstick", "",
             "What the tokenizer-oracle carries of the true change on the test pairs, per tokenizer design trained "
             "from scratch for the steps in its row (a step is 2 scans, or 2 pairs for the change designs); no "
             f"transformer. Written by `python benchmarks/token_space.py {args.run} {budget} --designs ...` (see its "
             "docstring; the last invocation's budget shown); "
             f"numbers in results/{json_path.name}. carried = oracle mean change / true mean change; r: Pearson with "
             "the true change; PSNR: tokenizer-copy in the brain; unquantized: the same oracle from the continuous "
             "latents, what the design's encoder and decoder carry (carried, r); train s: the wall seconds of its "
             "training where it "
             "ran (compare them within one table only). Every setting a row does not name is the run's config's "
             f"(`{args.run}/config.yaml`, from the design's scan-coding base).", "", *NOTES.get(args.table.name, []),
             ""]
    rows = [[row["name"], row["design"], "x".join(map(str, row["latent"])), f"{row['tokens']:,}", row["steps"],
             f"{row['train_seconds']:.0f}", f"{row['psnr_brain']:.2f}", f"{row['ventricles_r']:.2f}",
             f"{row['ventricles_carried']:.0%}", f"{row['grey_matter_r']:.2f}", f"{row['grey_matter_carried']:.0%}",
             *(_unquantized(row, r) for r in REGIONS)]
            for row in frame.to_dict("records")]
    lines.append(markdown_table(["design", "what", "latent", "tokens", "steps", "train s", "PSNR", "ventricles r",
                                 "carried", "grey matter r", "carried", "unquantized: ventricles",
                                 "grey matter"], rows))
    args.table.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
