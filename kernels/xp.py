"""The array module: NumPy on CPU, CuPy on an NVIDIA GPU. Every kernel takes `xp` from here."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import numpy as np

ARRAY_MODULES = ("numpy", "cupy")


def array_module(name: str) -> ModuleType:
    """`numpy`, or `cupy` imported lazily (ImportError/RuntimeError say why it cannot run here)."""
    if name == "numpy":
        return np
    if name == "cupy":
        import cupy  # noqa: PLC0415  (GPU-only; imported only when chosen)

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("CuPy is installed but sees no CUDA device")
        return cupy
    raise ValueError(f"unknown array module {name!r}; expected one of {ARRAY_MODULES}")


def to_numpy(array) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else array.get()


def _cupy() -> ModuleType:
    import cupy  # noqa: PLC0415

    return cupy


def run_blocks(fn, blocks, xp) -> None:
    """Call `fn(block)` for every block: on NumPy across a thread pool of one worker per core with
    BLAS held to one thread each (NumPy releases the GIL in ufuncs and BLAS, and many small
    multi-threaded GEMMs cost more in synchronisation than they compute); on CuPy in order."""
    blocks = list(blocks)
    workers = min(len(blocks), os.cpu_count() or 1)
    if xp is not np or workers <= 1:
        for block in blocks:
            fn(block)
        return
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(fn, blocks):
            pass
