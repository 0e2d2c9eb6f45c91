"""Negacyclic number-theoretic transform over RNS residues, vectorised over all leading axes.

Forward: Cooley–Tukey with ψ powers in bit-reversed order (output index i holds the evaluation
at ψ^(2·brv(i)+1)); inverse: Gentleman–Sande, then multiplication by n^{-1}. Pointwise products
of two forward transforms are negacyclic products mod (X^n + 1).
"""

from __future__ import annotations

import numpy as np
from tensafe.kernels import compiled as compiled_kernels
from tensafe.kernels import modular
from tensafe.kernels.modular import Moduli
from tensafe.kernels.primes import primitive_root_of_unity
from tensafe.kernels.xp import run_blocks


def bit_reverse(i: int, bits: int) -> int:
    return int(format(i, f"0{bits}b")[::-1], 2) if bits else 0


class NTT:
    """Precomputed twiddles for ring degree n and one modulus chain; arrays are (..., L, n).
    On NumPy the transforms run compiled (`tensafe.kernels.compiled`, bit-exact) where numba
    imports, unless `compiled=False`."""

    def __init__(self, n: int, moduli: Moduli, compiled: bool | None = None):
        if n < 2 or n & (n - 1):
            raise ValueError(f"ring degree {n} is not a power of two ≥ 2")
        self.n, self.moduli, self.xp = n, moduli, moduli.xp
        logn = n.bit_length() - 1
        order = [bit_reverse(i, logn) for i in range(n)]
        fwd, inv, n_inv = [], [], []
        for q in moduli.values:
            psi = primitive_root_of_unity(2 * n, q)
            psi_inv = pow(psi, -1, q)
            fwd.append(_powers(psi, n, q)[order])
            inv.append(_powers(psi_inv, n, q)[order])
            n_inv.append(pow(n, -1, q))
        xp = self.xp
        self._fwd = xp.asarray(np.stack(fwd))
        self._inv = xp.asarray(np.stack(inv))
        self._fwd_f = modular.shoup_constant(self._fwd, moduli)
        self._inv_f = modular.shoup_constant(self._inv, moduli)
        self._n_inv = xp.asarray(np.array(n_inv, dtype=np.uint64).reshape(-1, 1))
        self._staged = self._staged_moduli()
        usable = xp is np and compiled_kernels.available()
        if compiled and not usable:
            raise ValueError("the compiled NTT needs NumPy arrays and numba")
        self.compiled = usable if compiled is None else bool(compiled)

    def prefix(self, count: int) -> NTT:
        """The transform for the first `count` moduli (a lower level), sharing the tables."""
        sub = object.__new__(NTT)
        sub.n, sub.xp, sub.moduli = self.n, self.xp, self.moduli.prefix(count)
        sub._fwd, sub._inv = self._fwd[:count], self._inv[:count]
        sub._fwd_f, sub._inv_f, sub._n_inv = self._fwd_f[:count], self._inv_f[:count], self._n_inv[:count]
        sub._staged = sub._staged_moduli()
        sub.compiled = self.compiled
        return sub

    def _staged_moduli(self) -> Moduli:
        # The moduli shaped (L, 1, 1) to broadcast against a stage's (..., L, groups, span) view.
        m, shape = self.moduli, (len(self.moduli), 1, 1)
        return Moduli(
            m.values, m.q.reshape(shape), m.q_signed.reshape(shape), m.q_inverse.reshape(shape), m.xp
        )

    def forward(self, a):
        """Coefficients → evaluations (bit-reversed order). Does not modify `a`."""
        return self._blocked(self._forward, a)

    def inverse(self, a):
        """Evaluations (bit-reversed order) → coefficients. Does not modify `a`."""
        return self._blocked(self._inverse, a)

    def _blocked(self, transform, a, target_elements: int = 1 << 16):
        """Run `transform` over cache-sized blocks of polynomials: every stage then stays in cache."""
        lead, tail = a.shape[:-2], a.shape[-2:]
        flat = a.reshape(-1, *tail)
        step = max(1, target_elements // (tail[0] * tail[1]))
        if flat.shape[0] <= step:
            return transform(flat.copy()).reshape(a.shape)
        out = self.xp.empty_like(flat)

        def one(rows):
            out[rows] = transform(flat[rows].copy())

        run_blocks(one, [slice(s, s + step) for s in range(0, flat.shape[0], step)], self.xp)
        return out.reshape(*lead, *tail)

    def _forward(self, a):
        if self.compiled:
            compiled_kernels.ntt_forward(a, self._fwd, self._fwd_f, self.moduli.q.reshape(-1))
            return a
        xp, n, L = self.xp, self.n, len(self.moduli)
        lead = a.shape[:-2]
        span, groups = n, 1
        while groups < n:
            span //= 2
            view = a.reshape(*lead, L, groups, 2, span)
            w = self._fwd[:, groups : 2 * groups].reshape(L, groups, 1)
            wf = self._fwd_f[:, groups : 2 * groups].reshape(L, groups, 1)
            mg = self._staged
            u, hi = view[..., 0, :], view[..., 1, :]
            v = modular.mul_shoup(hi, w, wf, mg)
            d = u + (mg.q - v)
            xp.minimum(d, d - mg.q, out=hi)
            s = u + v
            xp.minimum(s, s - mg.q, out=u)
            groups *= 2
        return a

    def _inverse(self, a):
        if self.compiled:
            m = self.moduli
            compiled_kernels.ntt_inverse(
                a, self._inv, self._inv_f, m.q.reshape(-1), m.q_inverse.reshape(-1), self._n_inv.reshape(-1)
            )
            return a
        xp, m, n, L = self.xp, self.moduli, self.n, len(self.moduli)
        lead = a.shape[:-2]
        span, groups = 1, n // 2
        mg = self._staged
        while groups >= 1:
            view = a.reshape(*lead, L, groups, 2, span)
            w = self._inv[:, groups : 2 * groups].reshape(L, groups, 1)
            wf = self._inv_f[:, groups : 2 * groups].reshape(L, groups, 1)
            u, hi = view[..., 0, :], view[..., 1, :]
            d = u + (mg.q - hi)
            d = xp.minimum(d, d - mg.q)
            s = u + hi
            xp.minimum(s, s - mg.q, out=u)
            hi[...] = modular.mul_shoup(d, w, wf, mg)
            span *= 2
            groups //= 2
        return modular.mul(a, self._n_inv, m)

    def multiply(self, a_eval, b_eval):
        """Pointwise product of two forward transforms."""
        return modular.mul(a_eval, b_eval, self.moduli)


def _powers(base: int, count: int, q: int) -> np.ndarray:
    out = np.empty(count, dtype=np.uint64)
    x = 1
    for i in range(count):
        out[i] = x
        x = x * base % q
    return out
