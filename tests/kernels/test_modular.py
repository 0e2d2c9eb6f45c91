"""RNS modular arithmetic on uint64 arrays, bit-exact against Python integers."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
from tensafe.kernels import modular
from tensafe.kernels.modular import MAX_MODULUS_BITS, Moduli
from tensafe.kernels.primes import ntt_primes

Q50 = ntt_primes(50, 1 << 16, 3)  # the largest NTT primes the kernels allow
Q30 = ntt_primes(30, 1 << 12, 2)

# Moduli chains, one row of residues per modulus: small, ~30-bit, 50-bit, the largest value allowed
# (2^50 − 1, composite: the arithmetic does not need primality), even and power-of-two moduli.
CHAINS = {
    "small": (3, 5, 17, 97, 65537),
    "30-bit": (*Q30, (1 << 31) - 1),
    "50-bit": tuple(Q50),
    "max": ((1 << 50) - 1, (1 << 50) - 3, (1 << 49) + 1),
    "mixed": (Q50[0], Q30[0], 7681, 4, 1 << 40),
}


def _edges(q: int) -> list[int]:
    return sorted({v % q for v in (0, 1, 2, q // 2, q // 2 + 1, q - 2, q - 1)})


def _operands(values, count: int, seed: int):
    """Residue arrays (L, count) a, b: every pair of edge values, then random residues."""
    rng = random.Random(seed)
    rows_a, rows_b = [], []
    for q in values:
        pairs = [(x, y) for x in _edges(q) for y in _edges(q)]
        pairs += [(rng.randrange(q), rng.randrange(q)) for _ in range(count - len(pairs))]
        rows_a.append([x for x, _ in pairs])
        rows_b.append([y for _, y in pairs])
    return np.array(rows_a, dtype=np.uint64), np.array(rows_b, dtype=np.uint64)


def _elementwise(values, a, b, op):
    return np.array(
        [
            [op(int(x), int(y), q) for x, y in zip(ra, rb)]
            for q, ra, rb in zip(values, a.tolist(), b.tolist())
        ],
        dtype=np.uint64,
    )


def _check(got, expected):
    assert got.dtype == np.uint64
    assert got.shape == expected.shape
    bad = np.argwhere(got != expected)
    assert bad.size == 0, f"first mismatch at {bad[0].tolist()}: got {got[tuple(bad[0])]}"


chain_ids = pytest.mark.parametrize("name", sorted(CHAINS))


@chain_ids
def test_add_equals_python_sum_mod_q(name):
    values = CHAINS[name]
    m = Moduli.build(values)
    a, b = _operands(values, 400, seed=1)
    _check(modular.add(a, b, m), _elementwise(values, a, b, lambda x, y, q: (x + y) % q))


@chain_ids
def test_sub_equals_python_difference_mod_q(name):
    values = CHAINS[name]
    m = Moduli.build(values)
    a, b = _operands(values, 400, seed=2)
    _check(modular.sub(a, b, m), _elementwise(values, a, b, lambda x, y, q: (x - y) % q))


@chain_ids
def test_mul_equals_python_product_mod_q(name):
    values = CHAINS[name]
    m = Moduli.build(values)
    a, b = _operands(values, 2000, seed=4)
    expected = _elementwise(values, a, b, lambda x, y, q: x * y % q)
    _check(modular.mul(a, b, m), expected)
    # The cached float64 copy of b gives the same result.
    _check(modular.mul(a, b, m, b_float=b.astype(np.float64)), expected)


@chain_ids
def test_mul_of_all_q_minus_1_is_one(name):
    values = CHAINS[name]
    m = Moduli.build(values)
    a = np.array([[q - 1] * 64 for q in values], dtype=np.uint64)
    _check(modular.mul(a, a, m), np.ones_like(a))


@pytest.mark.parametrize("name", ["50-bit", "max", "30-bit"])
def test_mul_is_exact_where_the_product_is_next_to_a_multiple_of_q(name):
    # a·b ≡ 0, ±1, ±2 (mod q) with a·b ~ q²: the float64 quotient estimate sits on the edge of the floor.
    values = CHAINS[name]
    m = Moduli.build(values)
    rng = random.Random(5)
    rows_a, rows_b = [], []
    for q in values:
        row_a, row_b = [], []
        while len(row_a) < 1000:
            x = rng.randrange(q // 2, q)
            try:
                inverse = pow(x, -1, q)
            except ValueError:
                continue
            row_a.append(x)
            row_b.append(rng.choice((0, 1, 2, q - 1, q - 2)) * inverse % q)
        rows_a.append(row_a)
        rows_b.append(row_b)
    a, b = np.array(rows_a, dtype=np.uint64), np.array(rows_b, dtype=np.uint64)
    _check(modular.mul(a, b, m), _elementwise(values, a, b, lambda x, y, q: x * y % q))


def test_operations_broadcast_over_leading_axes():
    values = CHAINS["50-bit"]
    m = Moduli.build(values)
    a0, b0 = _operands(values, 96, seed=6)
    # (L, 96) → (2, 3, L, 16): non-contiguous views with two leading axes.
    a = a0.reshape(len(values), 2, 3, 16).transpose(1, 2, 0, 3)
    b = b0.reshape(len(values), 2, 3, 16).transpose(1, 2, 0, 3)
    for op, ref in (
        (modular.add, lambda x, y, q: (x + y) % q),
        (modular.sub, lambda x, y, q: (x - y) % q),
        (modular.mul, lambda x, y, q: x * y % q),
    ):
        got = op(a, b, m)
        assert got.shape == (2, 3, len(values), 16)
        for i in range(2):
            for j in range(3):
                _check(got[i, j], _elementwise(values, a[i, j], b[i, j], ref))


@chain_ids
def test_reduce_signed_equals_python_modulo(name):
    values = CHAINS[name]
    m = Moduli.build(values)
    rng = random.Random(7)
    fixed = [0, 1, -1, 2**63 - 1, -(2**63), 2**62, -(2**62), 2**50, -(2**50)]
    for q in values:
        fixed += [q, -q, q - 1, -(q - 1), q + 1, -q - 1, 3 * q, -3 * q, q * q if q * q < 2**63 else q]
    x = fixed + [rng.randrange(-(2**63), 2**63) for _ in range(300)]
    x += [rng.randrange(-(2**52), 2**52) for _ in range(300)]
    row = np.array(x, dtype=np.int64)
    expected = np.array([[v % q for v in x] for q in values], dtype=np.uint64)
    _check(modular.reduce_signed(row, m), expected)  # one row broadcasts to every modulus
    _check(modular.reduce_signed(np.tile(row, (len(values), 1)), m), expected)


@chain_ids
def test_center_gives_the_representative_in_half_open_interval(name):
    values = CHAINS[name]
    m = Moduli.build(values)
    a, _ = _operands(values, 400, seed=8)
    expected = np.array(
        [[r if r <= q // 2 else r - q for r in row] for q, row in zip(values, a.tolist())], dtype=np.int64
    )
    for q, row in zip(values, expected.tolist()):
        assert all(-q < 2 * r <= q for r in row)
    got = modular.center(a, m)
    assert got.dtype == np.int64
    assert np.array_equal(got, expected)
    assert np.array_equal(modular.center(a.astype(np.int64), m), expected)  # int64 input too
    _check(modular.reduce_signed(got, m), a)  # centring is invertible


@chain_ids
def test_scalar_residues_of_big_and_negative_integers(name):
    values = CHAINS[name]
    m = Moduli.build(values)
    for v in (0, 1, -1, 2**200 + 12345, -(2**200) - 3, 2**63, -(2**64), values[0] * values[-1]):
        got = modular.scalar_residues(v, m)
        assert got.shape == (len(values), 1)
        _check(got, np.array([[v % q] for q in values], dtype=np.uint64))


def test_moduli_build_refuses_moduli_of_50_bits_or_more_and_trivial_ones():
    for bad in (1 << MAX_MODULUS_BITS, (1 << MAX_MODULUS_BITS) + 1, 1 << 60, 2**64 - 59, 2, 1, 0, -7):
        with pytest.raises(ValueError):
            Moduli.build([Q50[0], bad])
    m = Moduli.build([(1 << MAX_MODULUS_BITS) - 1, 3])
    assert m.values == ((1 << 50) - 1, 3)
    assert len(m) == 2
    assert m.q.dtype == np.uint64 and m.q.shape == (2, 1)
    assert m.q_signed.dtype == np.int64 and m.q_inverse.dtype == np.float64


def test_moduli_prefix_is_the_first_moduli():
    m = Moduli.build(CHAINS["mixed"])
    p = m.prefix(2)
    assert p.values == CHAINS["mixed"][:2]
    assert p.q.reshape(-1).tolist() == list(CHAINS["mixed"][:2])


# divide_round_by_last ------------------------------------------------------------------------------

RESCALE_CHAINS = {
    "50-bit x3": tuple(Q50),
    "mixed": (Q30[0], Q50[1], Q50[0]),
    "two": (Q50[2], Q30[1]),
    "small last": (Q50[0], Q50[1], 65537),
    "composite 2^50-1": ((1 << 50) - 1, Q50[1], Q50[0]),
}


def _rescale_inputs(values, seed: int) -> list[int]:
    """Integers in [0, Q): random, edge values, centred values near ±Q/2, and rounding boundaries."""
    rng = random.Random(seed)
    big_q = 1
    for q in values:
        big_q *= q
    q_last = values[-1]
    half = q_last // 2
    x = [0, 1, 2, big_q - 1, big_q - 2, big_q // 2, big_q // 2 + 1, big_q // 2 - 1, q_last - 1, q_last]
    x += [(big_q // 2 + d) % big_q for d in range(-3 * q_last, 3 * q_last, max(1, q_last // 5))]
    for _ in range(60):
        k = rng.randrange(big_q // q_last)
        # x/q_last = k ± (just under/over one half) and exact multiples.
        x += [(k * q_last + d) % big_q for d in (0, half, half + 1, -half, -half - 1, q_last - 1)]
    x += [rng.randrange(big_q) for _ in range(400)]
    return x


@pytest.mark.parametrize("name", sorted(RESCALE_CHAINS))
def test_divide_round_by_last_equals_rounded_quotient_of_crt_integer(name):
    values = RESCALE_CHAINS[name]
    m = Moduli.build(values)
    q_last, rest = values[-1], values[:-1]
    big_q = 1
    for q in values:
        big_q *= q
    xs = _rescale_inputs(values, seed=len(name))
    residues = np.array([[x % q for x in xs] for q in values], dtype=np.uint64)
    got = modular.divide_round_by_last(residues, m)

    expected = []
    for x in xs:
        centred = x - big_q if 2 * x > big_q else x  # the CRT integer in (−Q/2, Q/2]
        remainder = (x % q_last) - q_last if 2 * (x % q_last) > q_last else x % q_last
        assert (centred - remainder) % q_last == 0
        rounded = (centred - remainder) // q_last
        # q_last is odd, so there are no ties: this is round(x / q_last).
        assert abs(Fraction(centred, q_last) - rounded) < Fraction(1, 2)
        # The [0, Q) representative rounds to a value congruent modulo Q / q_last.
        assert (rounded - round(Fraction(x, q_last))) % (big_q // q_last) == 0
        expected.append([rounded % q for q in rest])
    _check(got, np.array(expected, dtype=np.uint64).T)


def test_divide_round_by_last_over_leading_axes():
    values = RESCALE_CHAINS["mixed"]
    m = Moduli.build(values)
    xs = _rescale_inputs(values, seed=11)[:240]
    residues = np.array([[x % q for x in xs] for q in values], dtype=np.uint64)
    batch = residues.reshape(len(values), 2, 3, 40).transpose(1, 2, 0, 3)
    got = modular.divide_round_by_last(batch, m)
    assert got.shape == (2, 3, len(values) - 1, 40)
    flat = modular.divide_round_by_last(residues, m)
    assert np.array_equal(got, flat.reshape(len(values) - 1, 2, 3, 40).transpose(1, 2, 0, 3))
