"""Adapter folders for serving tests: saved exactly as task=train saves them (PEFT), with a non-zero B."""

from __future__ import annotations

from pathlib import Path

from tensafe.models.loader import load_model
from tensafe.models.lora import random_adapter


def trained_looking_adapter(cfg, folder: Path, seed: int, b_scale: float = 0.5, target_modules=None):
    """Save a random LoRA adapter of `cfg.model` to `folder`; return its PEFT model as the reference."""
    lora_cfg = cfg.model.lora
    if target_modules is not None:
        lora_cfg = lora_cfg.model_copy(update={"target_modules": list(target_modules)})
    model = random_adapter(load_model(cfg.model, seed=0).model, lora_cfg, seed, b_scale=b_scale)
    model.save_pretrained(folder)
    return model
