"""Time the synthetic cohort: 40 subjects x 3 visits at 2 mm (target: under 3 minutes on 2 cores).

Run: .venv/bin/python benchmarks/synth_speed.py [--subjects 40 --visits 3 --spacing 2]
Writes benchmarks/results/synth_speed.json, naming the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from neuroar import __version__
from neuroar.data.synth.cohort import SynthOptions, make_cohort
from neuroar.files import write_json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--visits", type=int, default=3)
    parser.add_argument("--spacing", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    options = SynthOptions(subjects=args.subjects, visits=args.visits, spacing=args.spacing, workers=args.workers)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        make_cohort(folder, options, progress=False)
        seconds = time.perf_counter() - start
    result = {"what": f"neuroar synth: {args.subjects} subjects x {args.visits} visits at {args.spacing} mm",
              "seconds": round(seconds, 1), "scans_per_second": round(args.subjects * args.visits / seconds, 2),
              "cpu_cores": os.cpu_count(), "machine": platform.platform(), "processor": platform.processor(),
              "neuroar": __version__, "target_seconds": 180}
    write_json(Path(__file__).parent / "results" / "synth_speed.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
