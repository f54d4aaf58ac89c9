"""A copy of a prepared run whose preprocessed scans are denoised: the lever "denoise before tokenizing", measured.

    python benchmarks/denoised_run.py runs/demo runs/denoised
    neuroar train-tokenizer --run runs/denoised
    python benchmarks/change_neuroar.py runs/denoised --name denoised-b4      # NeuroAR, scored on the test pairs
    python benchmarks/change_shape.py runs/change_neuroar/denoised-b4 --pairs 30

OUT gets RUN's config, scans.csv and pairs.csv (their cached paths moved to OUT's cache) and a copy of RUN's
preprocessed scans, each denoised in place by adaptive non-local means (ANTs DenoiseImage, Rician noise; Manjon et
al. 2010, the filter CAT12 applies by default), two scans at a time. Models are not copied: train them in OUT. The
truth of every pair is then the denoised later scan, so copy's and the oracle's scores change with it.
The preprocessing option `data.denoise` uses scikit-image's non-local means instead: ANTs' filter is not
reproducible (two denoisings of the demo's scans by it differed by up to 0.05 in a voxel), and the same scan must
give the same tokens on every path. This script keeps the filter that row denoised-b4 of CHANGE_NEUROAR.md measured.
"""

from __future__ import annotations

import argparse
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a prepared run (neuroar preprocess; e.g. make demo's runs/demo)")
    parser.add_argument("out", type=Path, help="a new folder")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new folder")
    cache = (args.run / "cache").resolve()
    args.out.mkdir(parents=True)
    shutil.copytree(cache, args.out / "cache")
    for name in ("config.yaml", "scans.csv", "pairs.csv"):
        text = (args.run / name).read_text()
        for old in (str(cache), str(args.run / "cache")):
            text = text.replace(old, str(args.out / "cache"))
        (args.out / name).write_text(text)
    scans = sorted((args.out / "cache").glob("*/*.nii"))
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_denoise_file, scans))
    print(f"{len(scans)} scans denoised into {args.out}")
    return 0


def _denoise_file(path: Path) -> None:
    import ants

    image = nib.load(path)
    volume = np.asarray(image.dataobj, dtype=np.float32)
    denoised = ants.denoise_image(ants.from_numpy(volume), noise_model="Rician").numpy()
    nib.save(nib.Nifti1Image(np.clip(denoised, 0, 1).astype(np.float32), image.affine, image.header), path)


if __name__ == "__main__":
    raise SystemExit(main())
