"""Randomness for DP-SGD: Poisson sampling draws and Gaussian noise.

`SeededRandom` is reproducible (research runs); `SecureRandom` draws from a CSPRNG (ChaCha20
keyed from OS entropy) and makes each Gaussian the normalised sum of four, after Holohan &
Braghin (arXiv:2107.10138, section 5.1), against floating-point attacks on the noise.
"""

from __future__ import annotations

import numpy as np
import torch

from tensafe.kernels.sampling import ChaChaStream

_MANTISSA = 2.0**-53


class SeededRandom:
    """PCG64 seeded from the run's seed: reproducible, not for production privacy."""

    secure = False

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)

    def uniform(self, n: int) -> np.ndarray:
        return self._rng.random(n)

    def normal(self, n: int) -> np.ndarray:
        return self._rng.standard_normal(n)


class SecureRandom:
    """A ChaCha20 keystream keyed from os.urandom; uniforms carry 53 random bits each."""

    secure = True

    def __init__(self):
        self._stream = ChaChaStream()

    def uniform(self, n: int) -> np.ndarray:
        words = self._stream.words(n)
        # (k + 0.5) / 2^53 lies in (0, 1): Box–Muller needs log(u) finite.
        return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * _MANTISSA

    def _box_muller(self, n: int) -> np.ndarray:
        half = (n + 1) // 2
        u1, u2 = self.uniform(half), self.uniform(half)
        radius = np.sqrt(-2.0 * np.log(u1))
        return np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:n]

    def normal(self, n: int) -> np.ndarray:
        return self._box_muller(4 * n).reshape(4, n).sum(axis=0) / 2.0


def make_random(secure: bool, seed: int) -> SeededRandom | SecureRandom:
    return SecureRandom() if secure else SeededRandom(seed)


def gaussian_like(rng: SeededRandom | SecureRandom, ref: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std²) with the shape, dtype and device of `ref`."""
    sample = rng.normal(ref.numel()).reshape(ref.shape) * std
    return torch.from_numpy(sample).to(device=ref.device, dtype=ref.dtype)
