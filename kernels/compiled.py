"""Compiled CPU kernels (numba) for the evaluator's hot path, bit-exact with the NumPy reference.

`linear_map_rescale(x, W, moduli)` is `ModularMatmul(W, moduli)(x)` followed by
`modular.divide_round_by_last`, fused: each block of coefficients is multiplied, reduced and
rescaled while it is in cache, in exact 64-bit integer arithmetic (no float64 limb GEMMs, no
elementwise passes over the unreduced product).

Arithmetic, per output coefficient and prime q (all values int64, products wrapping mod 2^64):
- the residues x < q are cut into `limbs` limbs of `bits` bits, so that every partial sum
  Σ_j W_ij · limb_j stays below 2^62 in magnitude (|W| < 2^w, k terms: w + bits + log2 k ≤ 62);
- the limb sums S_b are recombined as T = Σ_b S_b 2^(b·bits): exactly modulo 2^64 in wrapping
  integers, and approximately in float64, whose error is below q/4 by the choice of `bits`; the
  float quotient ⌊T/q⌋ is then off by at most one, and T − ⌊T/q⌋·q, exact modulo 2^64, is the
  true remainder after one conditional correction either way;
- the rescale by the last prime follows `divide_round_by_last` (centred remainder, subtraction,
  Shoup multiplication by q_last^-1), so the result equals the reference bit for bit.

`ntt_forward` / `ntt_inverse` are the negacyclic NTT of `tensafe.kernels.ntt` butterfly for
butterfly: the same Shoup products (float64 quotient estimate biased down, exact wrapping
remainder, one conditional subtraction) in the same order, so they equal the NumPy transform bit
for bit, a polynomial at a time while it is in cache.

`product_sum(a, w, q)` is the coefficient packing's ct × pt step, Σ_i a[t, i] · w[i, o] pointwise
mod q, with `modular.mul`'s quotient estimate and one reduction per addition.

NumPy remains the reference and the fallback: `available()` is False where numba does not import,
and `plan` returns None for shapes outside the bounds above (the caller uses the NumPy path).
Kernels release the GIL; the caller runs blocks of coefficients (or polynomials) on its thread pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from tensafe.kernels import modular

numba: Any
try:
    import numba
except ImportError:  # the NumPy path is used
    numba = None

TILE = 16  # output rows accumulated together (TILE × BLOCK int64 sums stay in L1)
MAX_LIMBS = 3  # limbs per residue (each below 2^31, multiplied as 32 × 32 → 64 bits)
BLOCK = 512  # coefficients per inner block (the TILE × BLOCK sums of 3 limbs stay in L2)
_SUM_BITS = 62  # |partial sums| < 2^62


def available() -> bool:
    return numba is not None


@dataclass(frozen=True)
class Plan:
    """Per prime: limb count and width; constants of the reduction and of the rescale."""

    q: np.ndarray  # int64 (L,)
    q_inverse: np.ndarray  # float64 (L,): 1/q
    limbs: np.ndarray  # int64 (L,)
    bits: np.ndarray  # int64 (L,)
    last_inverse: np.ndarray  # int64 (L − 1,): q_last^-1 mod q_i
    last_shoup: np.ndarray  # float64 (L − 1,): (1 − 2^-51)·q_last^-1 / q_i


def plan(moduli: tuple[int, ...], weight_bits: int, k: int) -> Plan | None:
    """The limb split of each prime for W of `weight_bits` (magnitude) over k rows, or None when
    no split keeps the sums and the float estimate inside their bounds."""
    if len(moduli) < 2 or moduli[-1] // 2 >= min(moduli[:-1]):
        return None  # the rescale's single conditional add needs q_last/2 < q_i
    if weight_bits > 31:
        return None  # weights are multiplied as int32
    budget = min(31, _SUM_BITS - weight_bits - max(1, math.ceil(math.log2(max(k, 2)))))
    limbs, bits = [], []
    for q in moduli:
        qb = q.bit_length()
        for count in range(1, MAX_LIMBS + 1):
            width = math.ceil(qb / count)
            # float error of T: < Σ_b 2^(62−52) 2^(b·width) ≤ 2^(11 + (count−1)·width) ≤ q/4
            if width <= budget and 11 + (count - 1) * width <= qb - 3:
                limbs.append(count)
                bits.append(width)
                break
        else:
            return None
    q_last = moduli[-1]
    inverses = [pow(q_last, -1, q) for q in moduli[:-1]]
    return Plan(
        q=np.array(moduli, dtype=np.int64),
        q_inverse=1.0 / np.array(moduli, dtype=np.float64),
        limbs=np.array(limbs, dtype=np.int64),
        bits=np.array(bits, dtype=np.int64),
        last_inverse=np.array(inverses, dtype=np.int64),
        last_shoup=np.array(inverses, dtype=np.float64) * (modular.DOWN / np.array(moduli[:-1], np.float64)),
    )


def linear_map_rescale(x: np.ndarray, w: np.ndarray, p: Plan, run_blocks) -> np.ndarray:
    """round((W @ x) / q_last) mod the other primes: x uint64 (k, E, L, n) → (m, E, L − 1, n).

    `run_blocks(fn, blocks)` runs `fn(slice)` over slices of the coefficient axis (a thread pool)."""
    k, e, rows, n = x.shape
    out = np.empty((w.shape[0], e, rows - 1, n), dtype=np.uint64)
    xs = x.view(np.int64)
    w = np.ascontiguousarray(w, dtype=np.int32)
    step = max(BLOCK, -(-n // 16) // BLOCK * BLOCK)  # ~16 tasks for the pool, whole inner blocks

    def one(cols: slice) -> None:
        _map_rescale(
            xs,
            w,
            p.q,
            p.q_inverse,
            p.limbs,
            p.bits,
            p.last_inverse,
            p.last_shoup,
            cols.start,
            cols.stop,
            out,
            BLOCK,
            TILE,
        )

    run_blocks(one, [slice(s, min(n, s + step)) for s in range(0, n, step)])
    return out


def _kernel(fn):
    if numba is None:
        return fn
    return numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")(fn)


@_kernel
def _map_rescale(
    x, w, q, q_inverse, limbs, bits, last_inverse, last_shoup, start, stop, out, block, tile_rows
):  # pragma: no cover
    k, elements, rows = x.shape[0], x.shape[1], x.shape[2]
    m = w.shape[0]
    sums = np.empty((MAX_LIMBS, tile_rows, block), dtype=np.int64)
    limb = np.empty((MAX_LIMBS, block), dtype=np.int32)
    value = np.empty((rows, tile_rows, block), dtype=np.int64)
    exact = np.empty(block, dtype=np.int64)
    estimate = np.empty(block, dtype=np.float64)
    centred = np.empty(block, dtype=np.int64)
    q_last = q[rows - 1]
    half_last = q_last // 2
    for n0 in range(start, stop, block):
        width = min(block, stop - n0)
        for e in range(elements):
            for i0 in range(0, m, tile_rows):
                tile = min(tile_rows, m - i0)
                for t in range(rows):
                    s, count = bits[t], limbs[t]
                    mask = (np.int64(1) << s) - 1
                    sums[:count, :tile, :width] = 0
                    for j in range(k):
                        row = x[j, e, t, n0 : n0 + width]
                        for b in range(count):  # the limbs of a block of residues
                            shift = b * s
                            for c in range(width):
                                limb[b, c] = np.int32((row[c] >> shift) & mask)
                        for ii in range(tile):
                            wij = np.int64(w[i0 + ii, j])
                            for b in range(count):
                                _mac(sums[b, ii], wij, limb[b], width)
                    _reduce(sums, count, s, q[t], q_inverse[t], tile, width, value[t], exact, estimate)
                for ii in range(tile):
                    for c in range(width):  # the centred remainder by the last prime
                        last = value[rows - 1, ii, c]
                        centred[c] = last - q_last if last > half_last else last
                    for t in range(rows - 1):
                        qt, inv, shoup = q[t], last_inverse[t], last_shoup[t]
                        for c in range(width):
                            low = centred[c] + qt if centred[c] < 0 else centred[c]
                            d = value[t, ii, c] - low
                            d = d + qt if d < 0 else d
                            r = d * inv - np.int64(float(d) * shoup) * qt
                            out[i0 + ii, e, t, n0 + c] = r - qt if r >= qt else r


@_kernel
def _mac(acc, weight, limb, width):  # pragma: no cover
    for c in range(width):
        acc[c] += weight * np.int64(limb[c])


@_kernel
def _reduce(sums, count, s, qt, qi, tile, width, value, exact, estimate):  # pragma: no cover
    """value = Σ_b sums[b] 2^(b·s) mod qt: exact in wrapping int64, quotient from the float64 estimate."""
    for ii in range(tile):
        for c in range(width):
            exact[c] = sums[0, ii, c]
            estimate[c] = float(sums[0, ii, c])
        for b in range(1, count):
            shift = b * s
            scale = float(np.int64(1) << shift)
            for c in range(width):
                exact[c] += sums[b, ii, c] << shift
                estimate[c] += float(sums[b, ii, c]) * scale
        for c in range(width):
            r = exact[c] - np.int64(math.floor(estimate[c] * qi)) * qt
            r = r + qt if r < 0 else r
            value[ii, c] = r - qt if r >= qt else r


def unpack_residues(data: np.ndarray, width: int, modulus: int, out: np.ndarray) -> bool:
    """`out` (rows × n uint64, any strides) from `data`: rows·n residues of `width` little-endian
    bytes each. Returns False (out then partly written) when a residue is not below `modulus`."""
    return _unpack(data, width, np.uint64(modulus), out)


def pack_residues(values: np.ndarray, width: int, out: np.ndarray) -> None:
    """The inverse of `unpack_residues`: `values` (rows × n uint64) into `out` (rows·n·width bytes)."""
    _pack(values, width, out)


@_kernel
def _unpack(data, width, modulus, out):  # pragma: no cover
    rows, n = out.shape
    ok = True
    pos = 0
    for i in range(rows):
        for c in range(n):
            v = np.uint64(0)
            for b in range(width):
                v |= np.uint64(data[pos + b]) << np.uint64(8 * b)
            pos += width
            ok &= v < modulus
            out[i, c] = v
    return ok


@_kernel
def _pack(values, width, out):  # pragma: no cover
    rows, n = values.shape
    pos = 0
    for i in range(rows):
        for c in range(n):
            v = values[i, c]
            for b in range(width):
                out[pos + b] = np.uint8((v >> np.uint64(8 * b)) & np.uint64(0xFF))
            pos += width


def ntt_forward(a: np.ndarray, fwd: np.ndarray, fwd_shoup: np.ndarray, q: np.ndarray) -> None:
    """`NTT.forward` in place on `a` (polys × L × n uint64, C-contiguous): Cooley–Tukey with the
    bit-reversed ψ powers `fwd` (L × n) and their Shoup constants; `q` the L moduli (uint64)."""
    _ntt_forward(a, fwd, fwd_shoup, q)


def ntt_inverse(
    a: np.ndarray,
    inv: np.ndarray,
    inv_shoup: np.ndarray,
    q: np.ndarray,
    q_inverse: np.ndarray,
    n_inverse: np.ndarray,
) -> None:
    """`NTT.inverse` in place: Gentleman–Sande, then the product by n^-1 (`modular.mul`)."""
    _ntt_inverse(a, inv, inv_shoup, q, q_inverse, n_inverse)


@_kernel
def _ntt_forward(a, fwd, fwd_f, q):  # pragma: no cover
    polys, moduli, n = a.shape
    for p in range(polys):
        for t in range(moduli):
            qt, row = q[t], a[p, t]
            span, groups = n, 1
            while groups < n:
                span //= 2
                for j in range(groups):
                    w, wf = fwd[t, groups + j], fwd_f[t, groups + j]
                    for k in range(2 * j * span, (2 * j + 1) * span):
                        u, hi = row[k], row[k + span]
                        v = hi * w - np.uint64(np.float64(hi) * wf) * qt
                        v = min(v, v - qt)
                        d = u + (qt - v)
                        row[k + span] = min(d, d - qt)
                        s = u + v
                        row[k] = min(s, s - qt)
                groups *= 2


@_kernel
def _ntt_inverse(a, inv, inv_f, q, q_inverse, n_inverse):  # pragma: no cover
    polys, moduli, n = a.shape
    for p in range(polys):
        for t in range(moduli):
            qt, row = q[t], a[p, t]
            span, groups = 1, n // 2
            while groups >= 1:
                for j in range(groups):
                    w, wf = inv[t, groups + j], inv_f[t, groups + j]
                    for k in range(2 * j * span, (2 * j + 1) * span):
                        u, hi = row[k], row[k + span]
                        d = u + (qt - hi)
                        d = min(d, d - qt)
                        s = u + hi
                        row[k] = min(s, s - qt)
                        r = d * w - np.uint64(np.float64(d) * wf) * qt
                        row[k + span] = min(r, r - qt)
                span *= 2
                groups //= 2
            b, qi = n_inverse[t], q_inverse[t]
            bf = np.float64(b)
            for k in range(n):
                x = row[k]
                r = x * b - np.uint64(np.float64(x) * bf * qi) * qt
                row[k] = min(r, r - qt)


def product_sum(a: np.ndarray, w: np.ndarray, q: int, q_inverse: float) -> np.ndarray:
    """out[t, o] = Σ_i a[t, i] · w[i, o] mod q, pointwise over the last axis: a (T × I × n) and w
    (I × O × n) residues below q < 2^50 (uint64, C-contiguous); `q_inverse` = (1 − 2^-51)/q."""
    out = np.empty((a.shape[0], w.shape[1], a.shape[2]), dtype=np.uint64)
    _product_sum(a, w, np.uint64(q), np.float64(q_inverse), out)
    return out


@_kernel
def _product_sum(a, w, q, qi, out):  # pragma: no cover
    rows, inputs, n = a.shape
    outputs = w.shape[1]
    for t in range(rows):
        for o in range(outputs):
            acc = out[t, o]
            acc[:] = 0
            for i in range(inputs):
                x, y = a[t, i], w[i, o]
                for c in range(n):
                    r = x[c] * y[c] - np.uint64(np.float64(x[c]) * np.float64(y[c]) * qi) * q
                    r = min(r, r - q)
                    s = acc[c] + r
                    acc[c] = min(s, s - q)
