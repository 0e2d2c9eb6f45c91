"""CKKS encoding: slots ↔ real polynomial coefficients through the canonical embedding.

Slot j is the evaluation at ζ^(5^j mod 2N), ζ = e^(iπ/N); the conjugate slots carry the conjugate
values so that the coefficients are real. Evaluating at every odd power of ζ is a length-N FFT
of the ζ^k-twisted coefficients, so both directions cost O(N log N).
"""

from __future__ import annotations

import numpy as np

from tensafe.he.errors import SlotOverflow, ValueOutOfRange

_MAX_COEFF = 2.0**62  # int64 headroom for rounded, scaled coefficients


class Encoder:
    """Canonical-embedding encoder for ring degree n (n/2 complex slots); NumPy float64 only."""

    def __init__(self, n: int):
        self.n, self.slots = n, n // 2
        exponents = np.empty(self.slots, dtype=np.int64)
        e = 1
        for j in range(self.slots):
            exponents[j] = e
            e = e * 5 % (2 * n)
        self._slot_index = (exponents - 1) // 2
        self._conj_index = (2 * n - exponents - 1) // 2
        self._twist = np.exp(1j * np.pi * np.arange(n) / n)

    def to_coefficients(self, values: np.ndarray) -> np.ndarray:
        """(..., t ≤ slots) real or complex slot values → (..., n) real coefficients (unscaled)."""
        values = np.asarray(values)
        if values.shape[-1] > self.slots:
            raise SlotOverflow(
                f"{values.shape[-1]} values do not fit the {self.slots} slots of N={self.n}; "
                "use a larger ring (he.params) or fewer tokens per batch"
            )
        evals = np.zeros((*values.shape[:-1], self.n), dtype=np.complex128)
        t = values.shape[-1]
        evals[..., self._slot_index[:t]] = values
        evals[..., self._conj_index[:t]] = np.conj(values)
        return (np.fft.fft(evals, axis=-1) / self.n * np.conj(self._twist)).real

    def to_slots(self, coefficients: np.ndarray) -> np.ndarray:
        """(..., n) real coefficients → (..., slots) complex slot values."""
        evals = np.fft.ifft(coefficients * self._twist, axis=-1) * self.n
        return evals[..., self._slot_index]

    def encode(self, values: np.ndarray, scale: float) -> np.ndarray:
        """Slot values → int64 coefficients round(scale · m)."""
        scaled = np.rint(self.to_coefficients(values) * scale)
        if scaled.size and np.abs(scaled).max() >= _MAX_COEFF:
            bits = np.log2(np.abs(scaled).max())
            raise ValueOutOfRange(f"encoded coefficients reach 2^{bits:.0f}: the values are too large")
        return scaled.astype(np.int64)

    def decode(self, coefficients: np.ndarray, scale: float) -> np.ndarray:
        """Signed integer coefficients at `scale` → real parts of the slot values."""
        return self.to_slots(coefficients.astype(np.float64) / scale).real
