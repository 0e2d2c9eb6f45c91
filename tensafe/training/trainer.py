"""The Lightning trainer factory: one place that maps hardware and train config onto L.Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from tensafe.config.schema import HardwareConfig


def build_trainer(
    hw: HardwareConfig,
    *,
    max_steps: int,
    output_dir: Path,
    logger: Any = False,
    callbacks: list[L.Callback] | None = None,
    log_every_n_steps: int = 50,
    progress_bar: bool = False,
) -> L.Trainer:
    return L.Trainer(
        accelerator=hw.accelerator,
        devices=1,
        precision=hw.precision,
        max_steps=max_steps,
        max_epochs=-1,
        logger=logger,
        callbacks=callbacks or [],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        num_sanity_val_steps=0,
        log_every_n_steps=log_every_n_steps,
        use_distributed_sampler=False,
        default_root_dir=str(output_dir),
    )
