"""One console line every few optimizer steps: step, train loss, ε so far, seconds per step.

The console is the data owner's: under DP the train loss there is marked private (it is not
noised). ε, a function of the mechanism's public parameters alone, also goes to the loggers at
the same steps.
"""

from __future__ import annotations

import time

import lightning as L


class ProgressLine(L.Callback):
    def __init__(self, every_n_steps: int, total_steps: int):
        self.every_n_steps, self.total_steps = every_n_steps, total_steps
        self._started = 0.0
        self._loss_sum, self._batches = 0.0, 0

    def on_train_start(self, trainer, module) -> None:
        self._started = time.perf_counter()
        self._first_step = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None:
            self._loss_sum += float(loss)
            self._batches += 1
        step = trainer.global_step
        if step % self.every_n_steps and step != self.total_steps:
            return
        eps = module.mechanism.epsilon()
        if eps is not None:
            module.log("epsilon", eps, batch_size=1)
        privacy = f"ε {eps:.3f}" if eps is not None else "no DP"
        per_step = (time.perf_counter() - self._started) / max(1, step - self._first_step)
        mean_loss = self._loss_sum / max(1, self._batches)
        marked = " (private)" if eps is not None else ""
        line = (
            f"step {step:>5}/{self.total_steps}  train loss {mean_loss:.4f}{marked}  {privacy}  "
            f"{per_step:.2f} s/step"
        )
        print(line, flush=True)
        self._loss_sum, self._batches = 0.0, 0
