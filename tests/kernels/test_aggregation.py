"""Secure aggregation's compiled quantization equals NumPy's bit for bit, float32 and float64."""

from __future__ import annotations

import numpy as np
import pytest
from tensafe.kernels import aggregation


@pytest.mark.skipif(not aggregation.available(), reason="numba is not installed")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_compiled_share_equals_numpy(dtype):
    rng = np.random.default_rng(1)
    size = 50_001
    x = (rng.standard_cauchy(size) * 3).astype(dtype)  # heavy tails: large and tiny magnitudes
    x[:4] = [0.0, -0.0, 1e-30, -1e-30]
    dither, noise = rng.random(size), rng.integers(-(10**9), 10**9, size=size)
    scale = 987_654.321
    expected = noise + np.floor(x.astype(np.float64) * scale + dither).astype(np.int64)
    aggregation.share(x, scale, dither, noise)
    np.testing.assert_array_equal(noise, expected)


def test_share_refuses_mismatched_arrays():
    with pytest.raises(ValueError, match="one length"):
        aggregation.share(np.zeros(3), 1.0, np.zeros(4), np.zeros(3, dtype=np.int64))
