"""Training logs: TensorBoard, and plain CSV files in the run folder (NAME_train.csv, NAME_val.csv)."""

from __future__ import annotations

import csv
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class RunLog:
    def __init__(self, run_dir: str | Path, name: str):
        self.run_dir, self.name = Path(run_dir), name
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard" / name))

    def log(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{kind}/{key}", value, step)
        path = self.run_dir / f"{self.name}_{kind}.csv"
        row = {"step": step, **values}
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
