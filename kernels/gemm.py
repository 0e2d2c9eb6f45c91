"""Exact modular matrix product of a small signed integer matrix against RNS residue arrays.

`W (m × k) @ X (k, ..., L, n) mod q_i` runs as float64 GEMMs (BLAS on CPU, cuBLAS on GPU): each
row of residues (one modulus) is cut into limbs of s bits and W into limbs of t bits with
k · 2^t · 2^s ≤ 2^52, so every GEMM output is an exact integer in float64. The limb products of one
row are recombined with their shifts and reduced once: the quotient by q is estimated in float64
and the remainder computed exactly in wrapping int64 arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from tensafe.kernels import modular
from tensafe.kernels.modular import Moduli
from tensafe.kernels.xp import run_blocks

EXACT_BITS = 52  # one bit below float64's 53 so that recombination estimates stay within a few q


@dataclass(frozen=True)
class LimbPlan:
    """W split into `w_limbs` limbs of `w_limb_bits`, one residue row into `x_limbs` of `x_limb_bits`."""

    w_limbs: int
    w_limb_bits: int
    x_limbs: int
    x_limb_bits: int

    @property
    def products(self) -> int:
        return self.w_limbs * self.x_limbs


def plan_limbs(w_bits: int, x_bits: int, k: int) -> LimbPlan:
    """The split with the fewest GEMMs such that k · 2^(W limb bits) · 2^(X limb bits) ≤ 2^52."""
    budget = EXACT_BITS - math.ceil(math.log2(max(k, 2)))
    best = None
    for w_limbs in range(1, w_bits + 1):
        w_limb_bits = math.ceil(w_bits / w_limbs)
        x_limb_bits = budget - w_limb_bits
        if x_limb_bits < 1:
            continue
        plan = LimbPlan(w_limbs, w_limb_bits, math.ceil(x_bits / x_limb_bits), x_limb_bits)
        if best is None or plan.products < best.products:
            best = plan
    if best is None:
        raise ValueError(f"no exact float64 split exists for a reduction over k={k} rows")
    return best


class ModularMatmul:
    """A fixed signed integer matrix W (m × k), ready to multiply RNS residue arrays exactly."""

    def __init__(self, weights: np.ndarray, moduli: Moduli):
        weights = np.asarray(weights)
        if weights.dtype.kind not in "iu" or weights.ndim != 2:
            raise TypeError("weights must be a 2-D integer matrix")
        self.moduli, self.xp, self.shape = moduli, moduli.xp, weights.shape
        magnitude = max(int(weights.max()), -int(weights.min())) if weights.size else 0
        if weights.size and int(weights.max()) >= 1 << 63:
            raise ValueError(f"weights must fit int64, got {int(weights.max())}")
        w = weights.astype(np.int64)
        # Bits of the largest limb magnitude: the signed top limb needs one more than |W|.
        w_bits = magnitude.bit_length() + 1
        self.plans = [plan_limbs(w_bits, q.bit_length(), weights.shape[1]) for q in moduli.values]
        self._rows = [_scalar_moduli(q, self.xp) for q in moduli.values]
        self._w: dict[int, Any] = {}  # limb count → W cut into that many limbs (xp arrays)
        for plan in self.plans:
            if plan.w_limbs not in self._w:
                self._w[plan.w_limbs] = [self.xp.asarray(limb) for limb in _split_signed(w, plan)]

    def __call__(self, x, epilogue=None, rows_out: int | None = None, target_elements: int | None = None):
        """x: uint64 residues (k, ..., L, n) → W @ x mod q, shape (m, ..., L, n).

        `epilogue` (a coefficient-wise function of a block, e.g. a rescale) is applied to each
        block as it is produced, so the full product is never held; `rows_out` is the number of
        residue rows it leaves (default L).
        """
        lead = x.shape[1:-2]
        rows = x.shape[-2] if rows_out is None else rows_out
        out = self.xp.empty((self.shape[0], *lead, rows, x.shape[-1]), dtype=self.xp.uint64)

        def one(cols):
            block = self.product(x[..., cols])
            out[..., cols] = block if epilogue is None else epilogue(block)

        run_blocks(one, self.column_blocks(x, target_elements), self.xp)
        return out

    def column_blocks(self, x, target_elements: int | None = None) -> list[slice]:
        """Slices of the last axis to process one at a time.

        A reduction over many rows (m ≤ k, stage 1) is GEMM-bound: blocks are large (2^24 input
        words) so that BLAS sees wide operands. An expansion (m > k, stage 2) is bound by the
        elementwise reduction of its output: blocks of 2^18 output words stay in cache.
        """
        if x.shape[0] != self.shape[1]:
            raise ValueError(f"x has {x.shape[0]} rows, W has {self.shape[1]} columns")
        n = x.shape[-1]
        in_per_column = x.size // n
        out_per_column = in_per_column // x.shape[0] * self.shape[0]
        if target_elements is None:
            target_elements = 1 << 24 if self.shape[0] <= self.shape[1] else 1 << 18
        per_column = in_per_column if self.shape[0] <= self.shape[1] else out_per_column
        step = max(1, min(n, target_elements // max(1, per_column)))
        return [slice(start, min(n, start + step)) for start in range(0, n, step)]

    def product(self, x):
        """W @ x mod q for one block, without blocking."""
        xp = self.xp
        m, k = self.shape
        rows = []
        for i, (q, plan) in enumerate(zip(self.moduli.values, self.plans)):
            row = x[..., i, :].reshape(k, -1)
            shape = (m, *x.shape[1:-2], x.shape[-1])
            row_out = None
            for a, w in enumerate(self._w[plan.w_limbs]):
                part = _reduce_limb_products(w, row, plan, q, xp).reshape(shape)
                if a:
                    shift = xp.asarray(np.uint64(pow(2, a * plan.w_limb_bits, q)))
                    part = modular.add(row_out, modular.mul(part, shift, self._rows[i]), self._rows[i])
                row_out = part
            rows.append(row_out)
        return xp.stack(rows, axis=-2)


def _split_signed(w: np.ndarray, plan: LimbPlan) -> list[np.ndarray]:
    """W = Σ_a W_a · 2^(a·t): 0 ≤ W_a < 2^t below the top limb, the top limb signed; float64."""
    limbs, rest, t = [], w, plan.w_limb_bits
    for a in range(plan.w_limbs):
        if a == plan.w_limbs - 1:
            limbs.append(rest)
        else:
            limbs.append(rest & ((1 << t) - 1))
            rest = rest >> t
    return [limb.astype(np.float64) for limb in limbs]


def _reduce_limb_products(w, row, plan: LimbPlan, q: int, xp):
    """(w @ row) mod q for one W limb, summing the X-limb GEMMs with their shifts, reduced once."""
    s = plan.x_limb_bits
    mask = np.uint64((1 << s) - 1)
    estimate: Any = None  # Σ_b G_b 2^(bs) in float64: within a few units of q of the exact sum
    exact: Any = None  # the same sum in wrapping int64: exact modulo 2^64
    for b in range(plan.x_limbs):
        part = row >> np.uint64(b * s) if b else row
        if b < plan.x_limbs - 1:  # the top limb has no bits above it to mask
            part = part & mask
        g = w @ part.astype(xp.float64)
        gi = g.astype(xp.int64)
        if b == 0:
            estimate, exact = g, gi
        else:
            estimate = estimate + g * float(1 << (b * s))
            exact = exact + gi * np.int64(1 << (b * s))
    quotient = xp.floor(estimate * (1.0 / q)).astype(xp.int64)
    remainder = exact - quotient * np.int64(q)  # the true value, |·| < 8q, despite the wrap above
    return (remainder % np.int64(q)).astype(xp.uint64)


def _scalar_moduli(q: int, xp) -> Moduli:
    """One modulus as 0-d arrays, to broadcast against a row of any shape."""
    m = Moduli.build([q], xp)
    return Moduli(m.values, m.q.reshape(()), m.q_signed.reshape(()), m.q_inverse.reshape(()), xp)
