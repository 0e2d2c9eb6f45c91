"""A hardware choice this machine or the privacy mechanism cannot honour fails with a clear message."""

from __future__ import annotations

import pytest
import torch

from tensafe.errors import ConfigError
from tensafe.training.hardware import apply_hardware
from tests.conftest import compose_cfg


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize("target", ["a100_80gb", "h100_80gb", "h200"])
def test_gpu_targets_refuse_a_cpu_machine(target):
    with pytest.raises(ConfigError, match="hardware=cpu") as err:
        apply_hardware(compose_cfg(f"hardware={target}").hardware, dp=True)
    assert err.value.key == "hardware"


@pytest.mark.parametrize(
    "override,key",
    [
        ("hardware.gradient_checkpointing=true", "hardware.gradient_checkpointing"),
        ("hardware.compile=true", "hardware.compile"),
        ("hardware.liger_kernels=true", "hardware.liger_kernels"),
        ("hardware.precision=16-mixed", "hardware.precision"),  # its loss scaler skips steps by the data
    ],
)
def test_choices_dp_or_cpu_cannot_honour_are_refused(override, key):
    with pytest.raises(ConfigError) as err:
        apply_hardware(compose_cfg(override).hardware, dp=True)
    assert err.value.key == key


def test_cpu_target_gives_the_cpu_device():
    assert apply_hardware(compose_cfg("hardware=cpu").hardware, dp=True) == torch.device("cpu")


def test_fp16_mixed_precision_is_allowed_without_dp():
    hardware = compose_cfg("hardware.precision=16-mixed").hardware
    assert apply_hardware(hardware, dp=False) == torch.device("cpu")
