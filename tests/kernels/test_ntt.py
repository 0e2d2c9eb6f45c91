"""Negacyclic NTT over RNS residues, checked against polynomial evaluation and schoolbook products."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tensafe.kernels.modular import Moduli
from tensafe.kernels.ntt import NTT, bit_reverse
from tensafe.kernels.primes import ntt_primes, primitive_root_of_unity

N_MAX = 256
# Three moduli of different sizes (50, 36 and 20 bits), all ≡ 1 mod 2·256, so they serve every n ≤ 256.
CHAIN = (ntt_primes(50, N_MAX, 1)[0], ntt_primes(36, N_MAX, 1)[0], ntt_primes(20, N_MAX, 1)[0])
MODULI = Moduli.build(CHAIN)
_NTTS: dict[int, NTT] = {}


def _ntt(n: int) -> NTT:
    if n not in _NTTS:
        _NTTS[n] = NTT(n, MODULI)
    return _NTTS[n]


def _random_poly(rng: random.Random, n: int, values=CHAIN) -> list[list[int]]:
    return [[rng.randrange(q) for _ in range(n)] for q in values]


def _array(rows) -> np.ndarray:
    return np.array(rows, dtype=np.uint64)


def _negacyclic(a: list[int], b: list[int], q: int) -> list[int]:
    """Schoolbook a·b mod (X^n + 1, q)."""
    n = len(a)
    out = [0] * n
    for i, x in enumerate(a):
        if x == 0:
            continue
        for j, y in enumerate(b):
            k = i + j
            if k < n:
                out[k] += x * y
            else:
                out[k - n] -= x * y
    return [c % q for c in out]


def _edge_polys(n: int, rng: random.Random) -> dict[str, list[list[int]]]:
    return {
        "random": _random_poly(rng, n),
        "all q-1": [[q - 1] * n for q in CHAIN],
        "zero": [[0] * n for _ in CHAIN],
        "one": [[1] + [0] * (n - 1) for _ in CHAIN],
        "X^(n-1)": [[0] * (n - 1) + [1] for _ in CHAIN],
        "-X^(n-1)": [[0] * (n - 1) + [q - 1] for q in CHAIN],
        "alternating 0 / q-1": [[(q - 1) * (i % 2) for i in range(n)] for q in CHAIN],
    }


@pytest.mark.parametrize("n", [2, 4, 8, 64, 256])
def test_inverse_of_forward_is_identity(n):
    rng = random.Random(n)
    ntt = _ntt(n)
    for name, rows in _edge_polys(n, rng).items():
        a = _array(rows)
        assert np.array_equal(ntt.inverse(ntt.forward(a)), a), name
        assert np.array_equal(ntt.forward(ntt.inverse(a)), a), name


@pytest.mark.parametrize("n", [2, 8, 16, 32])
def test_forward_output_i_is_evaluation_at_psi_to_2_bitrev_i_plus_1(n):
    rng = random.Random(100 + n)
    ntt = _ntt(n)
    logn = n.bit_length() - 1
    for rows in (_random_poly(rng, n), [[q - 1] * n for q in CHAIN], [list(range(n)) for _ in CHAIN]):
        got = ntt.forward(_array(rows))
        assert got.dtype == np.uint64 and got.shape == (len(CHAIN), n)
        for row, q, coefficients in zip(got.tolist(), CHAIN, rows):
            psi = primitive_root_of_unity(2 * n, q)
            expected = []
            for i in range(n):
                point = pow(psi, 2 * bit_reverse(i, logn) + 1, q)
                value = 0
                for c in reversed(coefficients):  # Horner
                    value = (value * point + c) % q
                expected.append(value)
            assert row == expected


@pytest.mark.parametrize("n", [2, 8, 64, 256])
def test_pointwise_product_of_transforms_is_negacyclic_convolution(n):
    rng = random.Random(200 + n)
    ntt = _ntt(n)
    polys = _edge_polys(n, rng)
    pairs = [
        ("random", "random2"),
        ("all q-1", "all q-1"),
        ("random", "all q-1"),
        ("X^(n-1)", "X^(n-1)"),
        ("-X^(n-1)", "X^(n-1)"),
        ("alternating 0 / q-1", "all q-1"),
        ("random", "zero"),
        ("random", "one"),
    ]
    polys["random2"] = _random_poly(rng, n)
    for left, right in pairs:
        a, b = polys[left], polys[right]
        product = ntt.inverse(ntt.multiply(ntt.forward(_array(a)), ntt.forward(_array(b))))
        expected = [_negacyclic(ra, rb, q) for ra, rb, q in zip(a, b, CHAIN)]
        assert product.tolist() == expected, (left, right)


def test_monomial_products_wrap_with_a_sign_change():
    n = 16
    ntt = _ntt(n)
    for i in range(n):
        for j in (0, 1, n - 1 - i, n - i if i else 0, n - 1):
            x_i = _array([[int(k == i) for k in range(n)] for _ in CHAIN])
            x_j = _array([[int(k == j) for k in range(n)] for _ in CHAIN])
            got = ntt.inverse(ntt.multiply(ntt.forward(x_i), ntt.forward(x_j)))
            expected = [[0] * n for _ in CHAIN]
            for row, q in zip(expected, CHAIN):
                row[(i + j) % n] = 1 if i + j < n else q - 1  # X^n = −1
            assert got.tolist() == expected, (i, j)


def test_forward_and_inverse_do_not_modify_their_input():
    rng = random.Random(3)
    ntt = _ntt(64)
    a = _array(_random_poly(rng, 64))
    before = a.copy()
    ntt.forward(a)
    ntt.inverse(a)
    assert np.array_equal(a, before)


@pytest.mark.parametrize("k", [1, 2])
def test_prefix_equals_transform_over_first_moduli(k):
    n = 128
    rng = random.Random(40 + k)
    full = _ntt(n)
    sub = full.prefix(k)
    direct = NTT(n, MODULI.prefix(k))
    assert sub.moduli.values == CHAIN[:k]
    a = _array(_random_poly(rng, n, CHAIN[:k]))
    b = _array(_random_poly(rng, n, CHAIN[:k]))
    fa, fb = sub.forward(a), sub.forward(b)
    assert np.array_equal(fa, direct.forward(a))
    assert np.array_equal(sub.inverse(a), direct.inverse(a))
    assert np.array_equal(sub.inverse(fa), a)
    # The lower level's rows equal the first rows of the full transform.
    padded = np.concatenate([a, _array(_random_poly(rng, n, CHAIN[k:]))])
    assert np.array_equal(full.forward(padded)[:k], fa)
    expected = [_negacyclic(ra, rb, q) for ra, rb, q in zip(a.tolist(), b.tolist(), CHAIN[:k])]
    assert sub.inverse(sub.multiply(fa, fb)).tolist() == expected


def test_leading_batch_axes_transform_each_polynomial_independently():
    n, batch = 32, 3
    rng = random.Random(5)
    ntt = _ntt(n)
    a = _array([[_random_poly(rng, n) for _ in range(2)] for _ in range(batch)])
    a[1, 0] = _array([[q - 1] * n for q in CHAIN])
    assert a.shape == (batch, 2, len(CHAIN), n)
    forward = ntt.forward(a)
    assert forward.shape == a.shape
    for i in range(batch):
        for j in range(2):
            assert np.array_equal(forward[i, j], ntt.forward(a[i, j]))
    assert np.array_equal(ntt.inverse(forward), a)
    # A non-contiguous view of the batch transforms the same way.
    view = a[::2, ::-1]
    assert np.array_equal(ntt.forward(view), forward[::2, ::-1])


def test_large_batches_transform_like_each_polynomial_alone():
    # 134 polynomials of 3 × 256 residues: more than one cache-sized block, the last one partial.
    n = 256
    rng = random.Random(6)
    ntt = _ntt(n)
    a = np.array(
        [[rng.randrange(q) for _ in range(n)] for _ in range(134) for q in CHAIN], dtype=np.uint64
    ).reshape(67, 2, len(CHAIN), n)
    a[66, 1] = _array([[q - 1] * n for q in CHAIN])
    before = a.copy()
    forward = ntt.forward(a)
    assert np.array_equal(a, before)
    assert forward.shape == a.shape
    for i in range(67):
        for j in range(2):
            assert np.array_equal(forward[i, j], ntt.forward(a[i, j])), (i, j)
    assert np.array_equal(ntt.inverse(forward), a)
    assert np.array_equal(a, before)
    assert np.array_equal(ntt.forward(a[::-1]), forward[::-1])


@pytest.mark.parametrize("n", [0, 1, 3, 6, 12, 100, 255])
def test_refuses_ring_degree_that_is_not_a_power_of_two(n):
    with pytest.raises(ValueError):
        NTT(n, MODULI)


def test_refuses_modulus_that_is_not_one_mod_2n():
    # 7681 = 15 · 512 + 1 supports n ≤ 256 but not n = 512.
    NTT(256, Moduli.build([7681]))
    with pytest.raises(ValueError):
        NTT(512, Moduli.build([7681]))
