"""Training logs: TensorBoard, and plain CSV files in the run folder (NAME_train.csv, NAME_val.csv).

A run resumed from its checkpoint at step S first drops the CSV rows after S (the steps it will redo) and
any row a killed process left half-written, so the logs read as one uninterrupted run; a training from scratch
starts its logs anew (with its own columns).
"""

from __future__ import annotations

import csv
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from neuroar.files import atomic_path

LOG_KINDS = ("train", "val")


class RunLog:
    def __init__(self, run_dir: str | Path, name: str, resume_step: int = 0):
        self.run_dir, self.name = Path(run_dir), name
        for kind in LOG_KINDS:  # by name: an ablation "neuroar_x" logs to neuroar_x_train.csv, not neuroar's
            if (path := self.run_dir / f"{name}_{kind}.csv").is_file():
                if resume_step == 0:  # a training from scratch: its columns may differ from the old log's
                    path.unlink()
                else:
                    _keep_rows_up_to(path, resume_step)
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard" / name))

    def log(self, step: int, values: dict[str, float], kind: str = "train", text: dict[str, str] | None = None
            ) -> None:
        """`values` go to TensorBoard and the CSV, `text` (labels such as the data validated on) to the CSV."""
        for key, value in values.items():
            self.writer.add_scalar(f"{kind}/{key}", value, step)
        path = self.run_dir / f"{self.name}_{kind}.csv"
        row = {"step": step, **values, **(text or {})}
        header = None
        if path.exists():
            with open(path, newline="") as f:
                header = next(csv.reader(f), None)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header or list(row), extrasaction="ignore")
            if header is None:
                writer.writeheader()
            writer.writerow(row)

    def figure(self, tag: str, figure, step: int) -> None:
        self.writer.add_figure(tag, figure, step)

    def close(self) -> None:
        self.writer.close()


def _keep_rows_up_to(path: Path, step: int) -> None:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header, kept = rows[0], [rows[0]]
    for row in rows[1:]:
        try:
            if len(row) == len(header) and int(row[0]) <= step:
                kept.append(row)
        except ValueError:
            continue
    if len(kept) != len(rows):
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)
