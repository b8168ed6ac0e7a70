"""The epoch log of a training run: one CSV row per epoch and per step, and TensorBoard.

The files keep their names (OUT/metrics.csv per epoch, OUT/steps.csv per step): runs written
before still resume into them, and bench/ and scripts/ read them by those names.
"""

from __future__ import annotations

import csv
from pathlib import Path

EPOCHS_FILE = "metrics.csv"  # the name runs have always had; the code calls it the epoch log
STEPS_FILE = "steps.csv"


class EpochLog:
    """Per-epoch and per-step CSV files (appended on resume) and TensorBoard when installed.

    The epoch file has one dev_r10_<split> column per dev split (text->image recall@10) and their
    mean, dev_r10, beside the losses.
    """

    EPOCH_FIELDS = ("epoch", "step", "train_loss", "val_loss", "dev_r10", "lr", "pairs_per_s",
                    "seconds")  # fmt: skip
    STEP_FIELDS = ("step", "epoch", "loss", "lr")

    def __init__(self, out_dir: Path, enabled: bool, dev_splits: list[str] = ()):
        self.enabled = enabled
        self.epoch_fields = (*self.EPOCH_FIELDS, *(f"dev_r10_{name}" for name in dev_splits))
        self.epochs_path = out_dir / EPOCHS_FILE
        self.steps_path = out_dir / STEPS_FILE
        self.tensorboard = _tensorboard_writer(out_dir / "tensorboard") if enabled else None

    def step(self, **row) -> None:
        if self.enabled:
            self._append(self.steps_path, self.STEP_FIELDS, row)
            if self.tensorboard:
                self.tensorboard.add_scalar("loss/train_step", row["loss"], row["step"])

    def epoch(self, **row) -> None:
        if self.enabled:
            self._append(self.epochs_path, self.epoch_fields, row)
            if self.tensorboard:
                for key in ("train_loss", "val_loss", "dev_r10", "lr", "pairs_per_s"):
                    self.tensorboard.add_scalar(f"epoch/{key}", row[key], row["epoch"])
                self.tensorboard.flush()

    @staticmethod
    def _append(path: Path, fields, row: dict) -> None:
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(fields)
            writer.writerow(
                [f"{row[k]:.6g}" if isinstance(row[k], float) else row[k] for k in fields]
            )


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))
