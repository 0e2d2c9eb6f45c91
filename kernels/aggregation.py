"""A compiled CPU kernel (numba) of secure aggregation's quantization, bit-exact with NumPy.

`share`: noise += ⌊γ·x + u⌋ in one pass over the float32 (or float64) clipped sum, instead of a
float64 copy and four NumPy passes. The product and the sum are float64 operations in NumPy's
order (numba does not contract them into a fused multiply-add without fastmath), so the result
is the same integer vector. NumPy remains the reference and the fallback: `available()` is False
where numba does not import. The kernel releases the GIL.
"""

from __future__ import annotations

from typing import Any

import numpy as np

numba: Any
try:
    import numba
except ImportError:  # the NumPy path is used
    numba = None


def available() -> bool:
    return numba is not None


def _kernel(fn):
    if numba is None:
        return fn
    return numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")(fn)


@_kernel
def _share(x, scale, dither, noise):  # pragma: no cover (compiled)
    for i in range(x.shape[0]):
        noise[i] += np.int64(np.floor(np.float64(x[i]) * scale + dither[i]))


def share(x: np.ndarray, scale: float, dither: np.ndarray, noise: np.ndarray) -> None:
    """noise += ⌊scale·x + dither⌋, in place; x 1-D float32 or float64, dither float64, noise
    int64, all of one length."""
    if not x.shape == dither.shape == noise.shape or x.ndim != 1:
        raise ValueError(f"share: 1-D arrays of one length, got {x.shape}, {dither.shape}, {noise.shape}")
    if numba is None:
        noise += np.floor(x.astype(np.float64) * scale + dither).astype(np.int64)
    else:
        _share(x, scale, dither, noise)
