"""Attach PEFT LoRA adapters to a base model, and save/load them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tensafe.config.schema import LoraConfig
from tensafe.errors import ConfigError


def attach_lora(model: Any, cfg: LoraConfig, gradient_checkpointing: bool = False):
    """Wrap `model` in a PEFT LoRA model; only the LoRA matrices are trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [m for m in cfg.target_modules if m not in names]
    if unknown:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise ConfigError(
            "model.lora.target_modules", unknown, f"not in this model; its linear modules: {linear}"
        )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # annotated int; PEFT scales by alpha / r in float
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def load_adapter(base: torch.nn.Module, adapter_dir: str | Path):
    """A PEFT model with the adapter saved by task=train (frozen, eval mode)."""
    from peft import PeftModel

    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise ConfigError("task.adapter", str(adapter_dir), "not an adapter folder (no adapter_config.json)")
    model = PeftModel.from_pretrained(base, path, is_trainable=False)
    model.eval()
    return model


def random_adapter(model: torch.nn.Module, cfg: LoraConfig, seed: int, b_scale: float = 0.5):
    """`model` with a LoRA adapter whose B is random (not PEFT's zeros, so it changes outputs) and A
    has PEFT's own initialisation, in eval mode: for serving tests and benchmarks, where what matters
    is the shape, the magnitudes and the cost, not the skill."""
    with torch.random.fork_rng():  # PEFT draws A from the global generator: seed it, then restore it
        torch.manual_seed(seed)
        model = attach_lora(model, cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * b_scale)
    return model.eval()
