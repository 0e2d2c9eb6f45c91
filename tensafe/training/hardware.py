"""Apply a `hardware=` target: check the device exists, set threads, enable Liger kernels."""

from __future__ import annotations

import importlib.util

import torch

from tensafe.config.schema import HardwareConfig
from tensafe.errors import ConfigError


def apply_hardware(hw: HardwareConfig, dp: bool) -> torch.device:
    """Validate `hw` against this machine and the privacy mechanism; return the device to use."""
    if hw.accelerator == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "hardware",
            hw.name,
            "needs a CUDA GPU and none is visible here "
            "(torch.cuda.is_available() is False); use hardware=cpu",
        )
    if hw.precision.startswith("bf16") and hw.accelerator == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("hardware.precision", hw.precision, "this GPU has no bf16; use 16-mixed or 32-true")
    if dp and hw.precision == "16-mixed":
        raise ConfigError(
            "hardware.precision",
            hw.precision,
            "fp16 mixed precision under privacy=dp_sgd is refused: its gradient scaler skips the steps "
            "whose gradients overflow, a data-dependent choice the accountant cannot see; "
            "use bf16-mixed or 32-true",
        )
    if dp and hw.gradient_checkpointing:
        raise ConfigError(
            "hardware.gradient_checkpointing",
            True,
            "recomputed activations break per-example gradient hooks under privacy=dp_sgd; "
            "set hardware.gradient_checkpointing=false",
        )
    if dp and hw.compile:
        raise ConfigError(
            "hardware.compile",
            True,
            "torch.compile is not supported with Opacus per-sample gradients; set hardware.compile=false",
        )
    if hw.liger_kernels:
        if hw.accelerator != "cuda":
            raise ConfigError(
                "hardware.liger_kernels",
                True,
                "Liger kernels are Triton GPU kernels; set hardware.liger_kernels=false on CPU",
            )
        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError(
                "hardware.liger_kernels",
                True,
                "liger-kernel is not installed: "
                "pip install 'tensafe[gpu]' or set hardware.liger_kernels=false",
            )
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # Loss stays ours (per-example, answer tokens only): no fused cross-entropy.
        apply_liger_kernel_to_llama(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
    if hw.num_threads is not None:
        torch.set_num_threads(hw.num_threads)
    return torch.device("cuda" if hw.accelerator == "cuda" else "cpu")
