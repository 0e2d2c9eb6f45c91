"""RNS modular arithmetic on uint64 arrays, for moduli below 2^50.

Residue arrays have shape (..., L, n) with one row per modulus; `Moduli` holds the L moduli as a
column (L, 1) that broadcasts against them. Products use the floating-point quotient trick: the
quotient ⌊ab/q⌋ is estimated in float64, biased down by 2^-51 so that the estimate is never above
the true quotient and at most one below it; the remainder, computed exactly in wrapping 64-bit
arithmetic, is then in [0, 2q). Values in [0, 2q) are brought into [0, q) with min(r, r − q):
r − q wraps to a huge unsigned number exactly when r < q.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

MAX_MODULUS_BITS = 50
DOWN = 1.0 - 2.0**-51  # quotient estimates never exceed the true quotient (see module docstring)


@dataclass(frozen=True)
class Moduli:
    """L moduli as broadcastable columns in the three dtypes the kernels need."""

    values: tuple[int, ...]
    q: Any  # uint64 (L, 1)
    q_signed: Any  # int64 (L, 1)
    q_inverse: Any  # float64 (L, 1): (1 − 2^-51)/q
    xp: ModuleType

    @classmethod
    def build(cls, values, xp: ModuleType = np) -> Moduli:
        values = tuple(int(v) for v in values)
        for v in values:
            if not 2 < v < (1 << MAX_MODULUS_BITS):
                raise ValueError(f"modulus {v} is outside (2, 2^{MAX_MODULUS_BITS})")
        column = np.array(values, dtype=np.uint64).reshape(-1, 1)
        return cls(
            values=values,
            q=xp.asarray(column),
            q_signed=xp.asarray(column.astype(np.int64)),
            q_inverse=xp.asarray(DOWN / column.astype(np.float64)),
            xp=xp,
        )

    def __len__(self) -> int:
        return len(self.values)

    def prefix(self, count: int) -> Moduli:
        """The first `count` moduli (a lower level of the chain)."""
        return Moduli.build(self.values[:count], self.xp)


def add(a, b, m: Moduli):
    s = a + b
    return m.xp.minimum(s, s - m.q)


def sub(a, b, m: Moduli):
    d = a + (m.q - b)
    return m.xp.minimum(d, d - m.q)


def mul(a, b, m: Moduli, b_float=None):
    """a·b mod q for residues a, b < q; `b_float` is b as float64 when the caller has it cached."""
    xp = m.xp
    bf = b.astype(xp.float64) if b_float is None else b_float
    quotient = (a.astype(xp.float64) * bf * m.q_inverse).astype(xp.uint64)
    r = a * b - quotient * m.q
    return xp.minimum(r, r - m.q)


def mul_shoup(a, w, w_over_q, m: Moduli):
    """a·w mod q for a fixed w with `w_over_q` = (1 − 2^-51)·w/q precomputed (twiddles, constants)."""
    quotient = (a.astype(m.xp.float64) * w_over_q).astype(m.xp.uint64)
    r = a * w - quotient * m.q
    return m.xp.minimum(r, r - m.q)


def shoup_constant(w, m: Moduli):
    """(1 − 2^-51)·w/q for `mul_shoup`."""
    return w.astype(m.xp.float64) * m.q_inverse


def reduce_signed(x, m: Moduli):
    """Signed integers (int64 array, any magnitude) to residues in [0, q) for each modulus."""
    return (x % m.q_signed).astype(m.xp.uint64)


def center(a, m: Moduli):
    """Residues to their signed representatives in (−q/2, q/2], as int64."""
    s = a.view(m.xp.int64) if a.dtype == m.xp.uint64 else a
    return m.xp.where(s > m.q_signed // 2, s - m.q_signed, s)


def scalar_residues(value: int, m: Moduli):
    """A Python integer (any size, any sign) as a (L, 1) uint64 residue column."""
    return m.xp.asarray(np.array([value % q for q in m.values], dtype=np.uint64).reshape(-1, 1))


def divide_round_by_last(x, m: Moduli):
    """round(x / q_last) on the other moduli: residues (..., L, n) → (..., L−1, n).

    The exact integer x − [x]_{q_last} (centred remainder) is divisible by q_last; dividing it
    is multiplying by q_last^{-1} modulo each remaining q_i.
    """
    xp, q_last = m.xp, m.values[-1]
    rest = m.prefix(len(m) - 1)
    last = center(x[..., -1:, :], Moduli.build([q_last], xp))
    if q_last < min(rest.values):  # |last| ≤ q_last/2 < q_i: one conditional add reduces it
        last_mod = xp.where(last < 0, last + rest.q_signed, last).view(xp.uint64)
    else:
        last_mod = reduce_signed(last, rest)
    diff = sub(x[..., :-1, :], last_mod, rest)
    inverses = xp.asarray(np.array([pow(q_last, -1, q) for q in rest.values], dtype=np.uint64).reshape(-1, 1))
    return mul_shoup(diff, inverses, shoup_constant(inverses, rest), rest)
