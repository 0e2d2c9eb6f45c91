"""`private/train_steps.csv`: each optimizer step's un-noised train loss and batch size.

Under DP neither number is covered by ε (the batch size is the Poisson draw itself), so they are
written only here, in the run's private folder, for the data owner; loggers get them only when
training is not private.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L

STEP_LOG = Path("private") / "train_steps.csv"
COLUMNS = ("step", "train_loss", "batch_examples")


class PrivateStepLog(L.Callback):
    def __init__(self, output_dir: Path):
        self.path = output_dir / STEP_LOG

    def on_train_start(self, trainer, module) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():  # a resumed run in the same folder appends
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        if "train_loss" not in metrics:
            return
        row = (trainer.global_step, float(metrics["train_loss"]), int(metrics["batch_examples"]))
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow(row)
