"""Where each output of a run puts its change: the mean and spread of (output - earlier scan) over the earlier scan's
white- and grey-matter voxels, beside the truth's (later - earlier) and the tokenizer-oracle's. A probe for why a
model's grey-matter change has the wrong sign in the volume measure while its ventricles' is right.

    python benchmarks/change_by_tissue.py runs/demo --pairs 12

Intensities are the preprocessed scans' (0-1); tissue is the volume measure's own (evaluate/volumes.py: posterior
above 0.5 in the earlier scan). The truth's change holds both scans' noise; the outputs' do not.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from neuroar.config import load_config
from neuroar.evaluate.compare import load_pairs, predict_pairs
from neuroar.evaluate.forecasters import load_forecasters
from neuroar.evaluate.volumes import template_regions, tissue_maps
from neuroar.tables import markdown_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder with a trained NeuroAR model")
    parser.add_argument("--pairs", type=int, default=12, help="the first PAIRS test pairs")
    args = parser.parse_args(argv)
    config = load_config(args.run / "config.yaml")
    pairs, _ = load_pairs(args.run, "test")
    regions = template_regions(config.data)
    forecasters = load_forecasters(["tokenizer-oracle", str(args.run)], args.run, config)
    values: dict[str, list[tuple[float, ...]]] = {}
    for prediction in predict_pairs(forecasters, pairs.iloc[:args.pairs], progress=False):
        earlier = prediction.earlier_DHW
        _, grey, white = tissue_maps(earlier, regions.brain)
        outputs = {"truth": prediction.later_DHW, **{o.label: v for o, v in prediction.outputs.items()}}
        for label, volume in outputs.items():
            change = volume - earlier
            values.setdefault(label, []).append((change[white > 0.5].mean(), change[white > 0.5].std(),
                                                 change[grey > 0.5].mean(), change[grey > 0.5].std()))
    rows = []
    for label, per_pair in values.items():
        white_mean, white_std, grey_mean, grey_std = np.mean(np.array(per_pair), 0)
        rows.append([label, f"{white_mean:+.4f}", f"{white_std:.4f}", f"{grey_mean:+.4f}", f"{grey_std:.4f}"])
    print(markdown_table(["output", "white matter: mean change", "std", "grey matter: mean change", "std"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
