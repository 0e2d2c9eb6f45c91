"""Adapter folders for serving tests: saved exactly as task=train saves them (PEFT), with a non-zero B."""

from __future__ import annotations

from pathlib import Path

import torch

from tensafe.models.loader import load_model
from tensafe.models.lora import attach_lora


def trained_looking_adapter(cfg, folder: Path, seed: int, b_scale: float = 0.5, target_modules=None):
    """Save a LoRA adapter of `cfg.model` whose B is random (so it changes outputs); return the PEFT
    model with that adapter (eval mode) as the plaintext reference."""
    lora_cfg = cfg.model.lora
    if target_modules is not None:
        lora_cfg = lora_cfg.model_copy(update={"target_modules": list(target_modules)})
    model = attach_lora(load_model(cfg.model, seed=0).model, lora_cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_scale)
            elif "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(folder)
    return model.eval()
