"""Randomness for DP-SGD: Poisson sampling draws and Gaussian noise, one stream per (use, step).

`SeededRandom` derives each step's stream from the run's seed, the use ("batch", "noise",
"shuffle") and the optimizer step, so a resumed run draws what the uninterrupted run would have
drawn at those steps and never replays the draws of earlier steps. It is reproducible and meant
for research runs only. `SecureRandom` draws from a CSPRNG (ChaCha20 keyed from OS entropy) and
makes each Gaussian the normalised sum of four, after Holohan & Braghin (arXiv:2107.10138,
section 5.1), against floating-point attacks on the noise; a resumed run gets fresh entropy.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from tensafe.kernels.sampling import ChaChaStream

_MANTISSA = 2.0**-53
# Stream labels: one independent stream per use and step; never renumber (seeded runs replay them).
USES = {"batch": 1, "noise": 2, "shuffle": 3, "skellam": 4, "dither": 5}


class Draws(Protocol):
    def uniform(self, n: int) -> np.ndarray: ...

    def normal(self, n: int) -> np.ndarray: ...


class _PCG64Draws:
    def __init__(self, generator: np.random.Generator):
        self._rng = generator

    def uniform(self, n: int) -> np.ndarray:
        return self._rng.random(n)

    def normal(self, n: int) -> np.ndarray:
        return self._rng.standard_normal(n)


class SeededRandom:
    """PCG64 streams keyed by (seed, use, step): reproducible, not for production privacy."""

    secure = False

    def __init__(self, seed: int):
        self.seed = seed

    def for_step(self, use: str, step: int, party: int = 0) -> Draws:
        """The stream of (use, step); `party` > 0 gives a worker of a distributed job its own."""
        key = [self.seed, USES[use], step] + ([party] if party else [])
        return _PCG64Draws(np.random.default_rng(key))


class SecureRandom:
    """A ChaCha20 keystream keyed from os.urandom; uniforms carry 53 random bits each."""

    secure = True

    def __init__(self):
        self._stream = ChaChaStream()

    def for_step(self, use: str, step: int, party: int = 0) -> Draws:
        if use not in USES:
            raise ValueError(f"unknown use {use!r}; one of {sorted(USES)}")
        return self  # every draw is fresh: there is nothing to replay

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


def gaussian_like(draws: Draws, ref: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std²) with the shape, dtype and device of `ref`."""
    sample = draws.normal(ref.numel()).reshape(ref.shape) * std
    return torch.from_numpy(sample).to(device=ref.device, dtype=ref.dtype)
