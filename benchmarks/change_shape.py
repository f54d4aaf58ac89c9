"""Why a run's NeuroAR moves grey matter the wrong way: the volume measure's response to the shape of a change.

    python benchmarks/change_shape.py runs/demo --pairs 30 --split val
    -> benchmarks/CHANGE_SHAPE.md and benchmarks/results/change_shape.json (the last invocation)

On the run's pairs, the change each output adds to the earlier scan, scored as the evaluation scores it (mean
change in mL, carried = mean / the truth's mean, Pearson r with the true change; ventricles and grey matter):
- the true change, halved in place, and blurred by a Gaussian of one voxel;
- the tokenizer-oracle, its change latent halved, and blurred by one latent voxel (the grid the tokens code);
- Gaussian noise of the spread the model adds at a zero-year gap (its "+detail" minus the earlier scan);
- NeuroAR's one draw (seed 0) at the pair's age and at the earlier scan's own age, and mixed with the oracle's
  tokens: NeuroAR's coarse scales with the oracle's local ones, and the other way round.
And per local scale (`transformer.local_scales`): the share of positions that change (token other than 0) in
the oracle's tokens and in NeuroAR's draw, and how well the model's teacher-forced probability of a change
ranks the oracle's changed positions (ROC AUC; 0.5 is chance). A change that is right in amount but spread
over its neighbours is what the grey-matter rows test: the measure's grey matter is the middle intensity class,
and a spread change leaves middle intensities behind.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from neuroar.config import load_config
from neuroar.data.preprocess import load_preprocessed
from neuroar.evaluate.compare import load_pairs
from neuroar.evaluate.volumes import regional_volumes, template_regions
from neuroar.models.transformer import earlier_latent_features, flatten, teacher_forcing_sequence
from neuroar.predict import Predictor, with_change
from neuroar.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
REGIONS = ("ventricles", "grey_matter")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder with a change-coding tokenizer and a NeuroAR model")
    parser.add_argument("--pairs", type=int, default=30, help="the first PAIRS pairs of the split")
    parser.add_argument("--split", default="val", help="the pairs scored (default: val)")
    parser.add_argument("--table", type=Path, default=ROOT / "benchmarks" / "CHANGE_SHAPE.md")
    args = parser.parse_args(argv)
    config = load_config(args.run / "config.yaml")
    regions = template_regions(config.data)
    pairs = load_pairs(args.run, args.split)[0].iloc[:args.pairs]
    predictor = Predictor.from_checkpoint(args.run)
    tokenizer, model = predictor.tokenizer, predictor.model
    if config.tokenizer.code != "change" or model.local is None:
        parser.error(f"{args.run} needs tokenizer.code=change and transformer.local_scales > 0")
    changes: dict[str, list[list[float]]] = {}
    local: dict[str, list[float]] = {}
    codes: dict[int, list[np.ndarray]] = {}
    rng = np.random.default_rng(0)
    for _, pair in pairs.iterrows():
        earlier_DHW = load_preprocessed(pair["earlier_path"])[0]
        measure = _measure(earlier_DHW, regions)
        outputs, oracle, drawn = _outputs(predictor, config, regions, pair, earlier_DHW, rng)
        for label, volume_DHW in outputs.items():
            changes.setdefault(label, []).append(measure(np.clip(volume_DHW, 0, 1).astype(np.float32)))
        f_earlier = tokenizer.latent_scan(earlier_DHW)
        log_probabilities = _log_probabilities(predictor, f_earlier, oracle, pair["earlier_age"], pair["later_age"])
        for k, log_p_lV in enumerate(log_probabilities, start=model.attended):
            token_l = oracle[k].flatten()
            changed_l = token_l != 0
            change_l = 1 - log_p_lV[:, 0].exp()
            # The code's cross-entropy given that the position changes: -log p(code) + log p(any change).
            code_nats = -(log_p_lV.gather(1, token_l[:, None])[:, 0] - change_l.log())[changed_l]
            local.setdefault(f"scale {k}: share of positions the oracle changes", []).append(
                float(changed_l.float().mean()))
            local.setdefault(f"scale {k}: share NeuroAR's draw changes", []).append(
                float((drawn[k] != 0).float().mean()))
            local.setdefault(f"scale {k}: AUC of p(change) for where the oracle changes", []).append(
                float(roc_auc_score(changed_l.numpy(), change_l.numpy())))
            local.setdefault(f"scale {k}: NeuroAR's cross-entropy of the oracle's code given a change (nats)",
                             []).append(float(code_nats.mean()))
            codes.setdefault(k, []).append(token_l[changed_l].numpy())
    for k, per_pair in codes.items():
        counts = np.bincount(np.concatenate(per_pair), minlength=config.tokenizer.codebook_size)[1:]
        share = counts[counts > 0] / counts.sum()
        local[f"scale {k}: entropy of the oracle's change codes (nats; {len(counts)} codes: "
              f"{np.log(len(counts)):.2f} if uniform)"] = [float(-(share * np.log(share)).sum())]
    results = _summary(changes, local, args, len(pairs))
    json_path = args.table.with_name("results") / "change_shape.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    args.table.write_text(_markdown(results))
    print(args.table.read_text())
    return 0


def _outputs(predictor, config, regions, pair, earlier_DHW: np.ndarray, rng: np.random.Generator):
    """Every output of the module's list for one pair (volumes), the oracle's tokens and NeuroAR's draw."""
    tokenizer, model = predictor.tokenizer, predictor.model
    later_DHW = load_preprocessed(pair["later_path"])[0]
    f_earlier, f_later = tokenizer.latent_scan(earlier_DHW), tokenizer.latent_scan(later_DHW)
    unchanged_DHW = tokenizer.decode_unchanged(f_earlier)[0]
    oracle = tokenizer.followup_tokens(f_earlier, f_later)
    drawn, zero_gap = (_draw(predictor, f_earlier, pair["earlier_age"], age, config.sampling)
                       for age in (pair["later_age"], pair["earlier_age"]))

    def decoded(change_latent: torch.Tensor) -> np.ndarray:
        return with_change(earlier_DHW, tokenizer.decode_latent(f_earlier + change_latent)[0], unchanged_DHW)

    def of_tokens(tokens: list[torch.Tensor]) -> np.ndarray:
        return decoded(tokenizer.quantizer.tokens_to_fhat(tokens).detach())

    true_change = later_DHW - earlier_DHW
    oracle_latent = tokenizer.quantizer.tokens_to_fhat(oracle).detach()
    zero_gap_DHW = of_tokens(zero_gap)
    spread = float((zero_gap_DHW - earlier_DHW)[regions.brain].std())
    noise = regions.brain * rng.normal(0, spread, true_change.shape)
    a = model.attended
    outputs = {
        "truth": later_DHW,
        "truth, change halved": earlier_DHW + 0.5 * true_change,
        "truth, change blurred 1 voxel": earlier_DHW + gaussian_filter(true_change, 1.0),
        "noise of NeuroAR's zero-gap spread": earlier_DHW + noise,
        "tokenizer-oracle": decoded(oracle_latent),
        "oracle, change latent halved": decoded(0.5 * oracle_latent),
        "oracle, change latent blurred 1 latent voxel": decoded(
            torch.from_numpy(gaussian_filter(oracle_latent.numpy(), (0, 0, 1, 1, 1)))),
        "NeuroAR, one draw": of_tokens(drawn),
        "NeuroAR, one draw at a zero-year gap": zero_gap_DHW,
        "NeuroAR's coarse scales + oracle's local scales": of_tokens([*drawn[:a], *oracle[a:]]),
        "oracle's coarse scales + NeuroAR's local scales": of_tokens([*oracle[:a], *drawn[a:]]),
    }
    return outputs, oracle, drawn


def _measure(earlier_DHW: np.ndarray, regions):
    """The change in mL of each region from the earlier scan to a volume."""
    before = regional_volumes(earlier_DHW, regions)

    def change(volume_DHW: np.ndarray) -> list[float]:
        after = regional_volumes(volume_DHW, regions)
        return [after[region] - before[region] for region in REGIONS]
    return change


def _draw(predictor, f_earlier: torch.Tensor, earlier_age: float, target_age: float, sampling) -> list[torch.Tensor]:
    """NeuroAR's tokens of one draw from seed 0 (the same random numbers at every age)."""
    tokenizer, model = predictor.tokenizer, predictor.model
    scales = tokenizer.quantizer.scales
    ages = [torch.full((1,), float(age)) for age in (earlier_age, target_age)]
    with torch.no_grad():
        tokens, _ = model.sample(tokenizer.quantizer, tokenizer.unchanged_tokens(f_earlier), *ages, sampling,
                                 torch.Generator().manual_seed(0),
                                 earlier_maps=earlier_latent_features(scales, f_earlier))
        return tokens


def _log_probabilities(predictor, f_earlier: torch.Tensor, tokens: list[torch.Tensor], earlier_age: float,
                       target_age: float) -> list[torch.Tensor]:
    """Per local scale, the model's teacher-forced log-probabilities (l, V) of every code at every position."""
    tokenizer, model = predictor.tokenizer, predictor.model
    quantizer = tokenizer.quantizer
    earlier = torch.cat([flatten(x) for x in earlier_latent_features(quantizer.scales, f_earlier)], 1)
    unchanged = torch.cat([t.flatten(1) for t in tokenizer.unchanged_tokens(f_earlier)], 1)
    ages = [torch.full((1,), float(age)) for age in (earlier_age, target_age)]
    with torch.no_grad():
        logits_BLV = model(teacher_forcing_sequence(quantizer, tokens), earlier, unchanged, *ages)
    log_p_LV = logits_BLV.float().log_softmax(-1)[0]
    return [log_p_LV[model.starts[k]:model.ends[k]] for k in range(model.attended, len(quantizer.scales))]


def _summary(changes: dict[str, list[list[float]]], local: dict[str, list[float]], args, pairs: int) -> dict:
    truth = np.array(changes["truth"])
    rows = {}
    for label, values in changes.items():
        values = np.array(values)
        rows[label] = {region: {"mean_ml": round(float(values[:, i].mean()), 2),
                                "carried": round(float(values[:, i].mean() / truth[:, i].mean()), 3),
                                "r": round(float(np.corrcoef(values[:, i], truth[:, i])[0, 1]), 3)
                                if values[:, i].std() > 0 else None}
                       for i, region in enumerate(REGIONS)}
    return {"run": str(args.run), "split": args.split, "pairs": pairs, "outputs": rows,
            "local_scales": {label: round(float(np.mean(v)), 3) for label, v in local.items()}}


def _markdown(results: dict) -> str:
    lines = ["# The shape of a change and the volume measure", "",
             f"Written by `python benchmarks/change_shape.py {results['run']} --pairs {results['pairs']} --split "
             f"{results['split']}` (see its docstring); numbers in results/change_shape.json. Mean change per pair "
             "(mL), carried (mean / the truth's mean) and r (Pearson with the true change) over the pairs; an "
             "output's change is what it adds to the earlier scan, scored by the evaluation's volume measure.", ""]
    rows = [[label, *[f"{v[r]['mean_ml']:+.2f} / {v[r]['carried']:.0%} / "
                      f"{'–' if v[r]['r'] is None else format(v[r]['r'], '.2f')}" for r in REGIONS]]
            for label, v in results["outputs"].items()]
    lines += [markdown_table(["output", "ventricles: mL / carried / r", "grey matter: mL / carried / r"], rows), "",
              "The local scales (NeuroAR's convolutional head), teacher-forced on the oracle's tokens: where the "
              "changes are (the share of positions whose token is not 0, the ROC AUC of the model's probability of a "
              "change there) and which code each change is (the entropy of the oracle's codes over the pairs, the "
              "model's cross-entropy of the right code given a change; a model that knew the code would be near 0, "
              "one that knew only the codes' frequencies near the entropy).", "",
              markdown_table(["local scale", "value"], [[k, v] for k, v in results["local_scales"].items()]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
