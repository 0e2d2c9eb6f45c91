"""Samplers for RLWE: uniform mod q, ternary, discrete Gaussian; all driven by a ChaCha20 stream.

A `ChaChaStream` keyed from OS entropy is the CSPRNG; keyed from a 32-byte seed it is a
deterministic expander (the seeded `a` halves of fresh ciphertexts). NumPy's generators are never
used for key material, masks or errors.
"""

from __future__ import annotations

import math
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32
GAUSSIAN_SIGMA = 3.19
_GAUSSIAN_TAIL = 10  # the table covers |x| ≤ 10σ; the mass beyond is below 2^-70


class ChaChaStream:
    """A ChaCha20 keystream: `ChaChaStream()` from os.urandom, `ChaChaStream(seed, label)` seeded."""

    def __init__(self, seed: bytes | None = None, label: int = 0):
        if seed is None:
            seed = os.urandom(SEED_BYTES)
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a stream seed has {SEED_BYTES} bytes, got {len(seed)}")
        # cryptography's 16-byte ChaCha20 "nonce" is the 32-bit block counter then the 96-bit nonce:
        # the label goes in the nonce, so streams of different labels never overlap.
        nonce = bytes(4) + label.to_bytes(12, "little")
        self._enc = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()

    def bytes(self, count: int) -> bytes:
        return self._enc.update(bytes(count))

    def words(self, count: int) -> np.ndarray:
        """`count` uniform uint64 words."""
        return np.frombuffer(self.bytes(8 * count), dtype=np.uint64)


def uniform_mod(stream: ChaChaStream, q: int, count: int) -> np.ndarray:
    """`count` uniform residues in [0, q) by rejection (deterministic for a seeded stream): each
    candidate is the low bits(q) bits of a 32-bit word of the stream (q < 2^32) or a 64-bit one."""
    bits = q.bit_length()
    dtype = np.uint32 if bits <= 32 else np.uint64
    mask, bound = dtype((1 << bits) - 1), dtype(q)
    size = np.dtype(dtype).itemsize
    out = np.empty(0, dtype=np.uint64)
    while out.size < count:
        need = count - out.size
        draws = need + need * ((1 << bits) - q) // q + need // 64 + 16  # the expected rejections, and more
        draw: np.ndarray = np.frombuffer(stream.bytes(size * draws), dtype=dtype)
        draw = draw & mask
        out = np.concatenate([out, draw[draw < bound][:need].astype(np.uint64)])
    return out


def uniform_rns(stream: ChaChaStream, moduli: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Uniform residues of shape (*shape, L, n) where shape[-1] is n, one row per modulus."""
    *lead, n = shape
    count = math.prod(lead) * n
    rows = [uniform_mod(stream, q, count).reshape(*lead, n) for q in moduli]
    return np.stack(rows, axis=-2)


def ternary(stream: ChaChaStream, count: int) -> np.ndarray:
    """Uniform in {−1, 0, 1} (int64)."""
    out = np.empty(0, dtype=np.int64)
    while out.size < count:
        draw = np.frombuffer(stream.bytes(count - out.size + 16), dtype=np.uint8)
        draw = draw[draw < 255]  # 255 = 3·85: keep 0…254 so that mod 3 is uniform
        out = np.concatenate([out, (draw % 3).astype(np.int64) - 1])
    return out[:count]


def _gaussian_table(sigma: float) -> tuple[np.ndarray, int]:
    bound = math.ceil(_GAUSSIAN_TAIL * sigma)
    support = np.arange(-bound, bound + 1)
    weights = np.exp(-(support.astype(np.float64) ** 2) / (2 * sigma * sigma))
    cdf = np.cumsum(weights / weights.sum())
    # 53-bit integer thresholds: x is the first support point whose cumulative mass exceeds u.
    return np.minimum(np.round(cdf * 2.0**53), 2.0**53).astype(np.uint64), bound


_TABLES: dict[float, tuple[np.ndarray, int]] = {}


def discrete_gaussian(stream: ChaChaStream, count: int, sigma: float = GAUSSIAN_SIGMA) -> np.ndarray:
    """Discrete Gaussian of parameter σ on ℤ, tail-cut at 10σ, by table inversion (int64)."""
    if sigma not in _TABLES:
        _TABLES[sigma] = _gaussian_table(sigma)
    thresholds, bound = _TABLES[sigma]
    u = stream.words(count) >> np.uint64(11)
    return np.searchsorted(thresholds, u, side="right").astype(np.int64) - bound
