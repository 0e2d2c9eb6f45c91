"""he=ckks_cupy: the same kernels with xp = CuPy. A contract test runs everywhere; the real test
runs where CuPy sees a CUDA device."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tensafe.he.backends import kernels as kernel_backend
from tensafe.he.backends.kernels import CupyCKKSBackend, KernelCKKSBackend
from tensafe.he.errors import BackendUnavailable
from tensafe.he.lora import Evaluator, KeyHolder


def _cuda_visible() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    import cupy

    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001  (no driver: CuPy raises its own CUDA errors)
        return False


def _delta(backend_cls, params):
    holder = KeyHolder(backend_cls(params))
    rng = np.random.default_rng(7)
    a, b, x = rng.normal(size=(32, 4)) / 6, rng.normal(size=(4, 32)) / 2, rng.normal(size=(50, 32))
    evaluator = Evaluator(backend_cls(params), holder.public_context(), a, b, 0.5)
    sent = holder.to_bytes(holder.encrypt(x, evaluator.input_bound))
    out = holder.decrypt(holder.from_bytes(evaluator.evaluate_bytes(sent)), 50, outputs=32)
    return out, 0.5 * x @ a @ b


@pytest.mark.skipif(_cuda_visible(), reason="a CUDA device is present: the real test runs instead")
def test_without_a_gpu_ckks_cupy_is_a_clear_error_naming_the_cpu_backend(n4096):
    with pytest.raises(BackendUnavailable, match="he=ckks_numpy"):
        CupyCKKSBackend(n4096)


def test_contract_the_cupy_backend_runs_the_array_module_it_is_given(n4096, monkeypatch):
    """Everything the CuPy backend does goes through the `xp` it receives: handed NumPy under the
    name cupy, it computes the same HE-LoRA delta as the NumPy backend."""
    requested = []

    def fake_array_module(name):
        requested.append(name)
        return np

    monkeypatch.setattr(kernel_backend, "array_module", fake_array_module)
    out, reference = _delta(CupyCKKSBackend, n4096)
    assert requested and set(requested) == {"cupy"}
    assert np.abs(out - reference).max() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_visible(), reason="needs CuPy and a CUDA device")
def test_on_a_gpu_ckks_cupy_matches_ckks_numpy(n4096):
    gpu, reference = _delta(CupyCKKSBackend, n4096)
    cpu, _ = _delta(KernelCKKSBackend, n4096)
    assert np.abs(gpu - reference).max() < 1e-4
    assert np.abs(gpu - cpu).max() < 2e-4
