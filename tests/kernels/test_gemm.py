"""Exact modular GEMM of a signed integer matrix against RNS residues, checked with Python integers."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from tensafe.kernels.gemm import EXACT_BITS, ModularMatmul, plan_limbs
from tensafe.kernels.modular import Moduli
from tensafe.kernels.primes import ntt_primes

Q50 = tuple(ntt_primes(50, 1 << 12, 2))
CHAINS = {
    "50-bit": Q50,
    "mixed": (Q50[0], ntt_primes(30, 1 << 12, 1)[0], 65537),
    "max": ((1 << 50) - 1, Q50[1]),
}


def _reference(w: np.ndarray, x: np.ndarray, values) -> np.ndarray:
    """Σ_j W[i, j] · X[j, ..., l, c] mod q_l in Python integers; X is (k, ..., L, n)."""
    k = w.shape[1]
    w_rows = w.tolist()
    flat = x.reshape(k, -1, len(values), x.shape[-1])  # (k, B, L, n)
    columns = flat.transpose(1, 2, 3, 0).tolist()  # [B][L][n] → list of the k entries
    out = [  # [m][B][L][n]
        [
            [
                [sum(a * b for a, b in zip(w_row, column)) % q for column in row]
                for q, row in zip(values, batch)
            ]
            for batch in columns
        ]
        for w_row in w_rows
    ]
    return np.array(out, dtype=np.uint64).reshape(w.shape[0], *x.shape[1:])


def _residues(rng: random.Random, values, k: int, n: int, lead=()) -> np.ndarray:
    count = k * math.prod(lead)
    rows = [[[rng.randrange(q) for _ in range(n)] for q in values] for _ in range(count)]
    return np.array(rows, dtype=np.uint64).reshape(k, *lead, len(values), n)


def _weights(rng: random.Random, m: int, k: int, bound: int) -> np.ndarray:
    w = [[rng.randint(-bound, bound) for _ in range(k)] for _ in range(m)]
    flat = [v for row in w for v in row]
    # Make sure both extremes occur, so the limb plan sees the full magnitude.
    flat[0], flat[-1] = bound, -bound
    return np.array(flat, dtype=np.int64).reshape(m, k)


def _check(got, expected):
    assert got.dtype == np.uint64
    assert got.shape == expected.shape
    bad = np.argwhere(got != expected)
    assert bad.size == 0, f"{bad.shape[0]} mismatches, first at {bad[0].tolist()}"


@pytest.mark.parametrize("k", [1, 2, 3, 7, 64, 255, 256, 257, 1000, 4096])
@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_matmul_with_23_bit_weights_equals_python_sum(k, chain):
    values = CHAINS[chain]
    rng = random.Random(k)
    n = 3 if k > 256 else 8
    w = _weights(rng, 2 if k > 256 else 4, k, 1 << 23)
    x = _residues(rng, values, k, n)
    _check(ModularMatmul(w, Moduli.build(values))(x), _reference(w, x, values))


@pytest.mark.parametrize("k", [1, 5, 300, 4096])
def test_matmul_with_40_bit_weights_splits_w_into_limbs(k):
    values = CHAINS["50-bit"]
    rng = random.Random(1000 + k)
    w = _weights(rng, 2, k, 1 << 40)
    x = _residues(rng, values, k, 3)
    mm = ModularMatmul(w, Moduli.build(values))
    assert all(plan.w_limbs > 1 for plan in mm.plans)
    _check(mm(x), _reference(w, x, values))


@pytest.mark.parametrize("k", [3, 4096])
def test_matmul_with_62_bit_weights(k):
    values = CHAINS["max"]
    rng = random.Random(2000 + k)
    w = _weights(rng, 2, k, (1 << 62) - 1)
    x = _residues(rng, values, k, 2)
    _check(ModularMatmul(w, Moduli.build(values))(x), _reference(w, x, values))


@pytest.mark.parametrize("k", [1, 17, 4096])
def test_matmul_with_ternary_weights(k):
    values = CHAINS["mixed"]
    rng = random.Random(3000 + k)
    w = _weights(rng, 3, k, 1)
    x = _residues(rng, values, k, 4)
    _check(ModularMatmul(w, Moduli.build(values))(x), _reference(w, x, values))


def test_matmul_with_zero_weights_is_zero():
    values = CHAINS["50-bit"]
    x = _residues(random.Random(4), values, 9, 5)
    got = ModularMatmul(np.zeros((2, 9), dtype=np.int64), Moduli.build(values))(x)
    _check(got, np.zeros((2, len(values), 5), dtype=np.uint64))


@pytest.mark.parametrize("magnitude", [1, (1 << 23) - 1, 1 << 23, 1 << 40, (1 << 62) - 1])
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("chain", ["50-bit", "max"])
def test_maximal_sums_all_q_minus_1_times_all_max_weights(magnitude, sign, chain):
    values = CHAINS[chain]
    k, n = 4096, 2
    w = np.full((2, k), sign * magnitude, dtype=np.int64)
    w[1, ::2] = -w[1, ::2]  # second row alternates signs
    x = np.array([[[q - 1] * n for q in values]] * k, dtype=np.uint64)
    expected = np.array(
        [[[sign * magnitude * k * (q - 1) % q] * n for q in values], [[0] * n for _ in values]],
        dtype=np.uint64,
    )
    _check(_reference(w, x, values), expected)
    _check(ModularMatmul(w, Moduli.build(values))(x), expected)


def test_matmul_over_leading_batch_axes():
    values = CHAINS["mixed"]
    rng = random.Random(6)
    k = 33
    w = _weights(rng, 3, k, 1 << 23)
    x = _residues(rng, values, k, 5, lead=(2, 3))
    got = ModularMatmul(w, Moduli.build(values))(x)
    assert got.shape == (3, 2, 3, len(values), 5)
    _check(got, _reference(w, x, values))


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32, np.uint32, np.int64])
def test_matmul_accepts_any_integer_weight_dtype(dtype):
    values = CHAINS["50-bit"]
    rng = random.Random(7)
    info = np.iinfo(dtype)
    w = np.array(
        [[rng.randint(int(info.min), int(info.max)) for _ in range(10)] for _ in range(2)], dtype=dtype
    )
    w[0, 0], w[1, 1] = info.min, info.max
    x = _residues(rng, values, 10, 4)
    _check(ModularMatmul(w, Moduli.build(values))(x), _reference(w.astype(np.int64), x, values))


@pytest.mark.parametrize("target", [1, 7, 40, 1 << 18])
def test_blocks_cover_all_columns_and_match_one_call(target):
    values = CHAINS["mixed"]
    rng = random.Random(8)
    k, n = 20, 37
    w = _weights(rng, 4, k, 1 << 40)
    x = _residues(rng, values, k, n, lead=(2,))
    mm = ModularMatmul(w, Moduli.build(values))
    whole = mm(x)
    _check(whole, _reference(w, x, values))
    slices = mm.column_blocks(x, target_elements=target)
    if target < 1 << 18:
        assert len(slices) > 1
    covered = []
    for cols in slices:
        covered += list(range(n))[cols]
        _check(mm.product(x[..., cols]), whole[..., cols])
    assert covered == list(range(n))  # in order, no gaps, no overlap
    _check(mm(x, target_elements=target), whole)


@pytest.mark.parametrize("k", [1, 2, 3, 100, 1024, 4096, 4097, 1 << 20, (1 << 30) + 1])
def test_plan_limbs_keeps_every_gemm_exact_and_covers_all_bits(k):
    for w_bits in range(1, 66):
        for x_bits in (2, 17, 30, 36, 49, 50):
            try:
                plan = plan_limbs(w_bits, x_bits, k)
            except ValueError:
                # Refused only when no split can be exact: even 1-bit W limbs leave no X bits.
                assert EXACT_BITS - math.ceil(math.log2(max(k, 2))) - 1 < 1
                continue
            assert k * 2**plan.w_limb_bits * 2**plan.x_limb_bits <= 2**EXACT_BITS
            assert plan.w_limbs * plan.w_limb_bits >= w_bits
            assert plan.x_limbs * plan.x_limb_bits >= x_bits
            assert plan.w_limb_bits >= 1 and plan.x_limb_bits >= 1
            assert plan.products == plan.w_limbs * plan.x_limbs


def test_plan_limbs_refuses_when_no_exact_split_exists():
    with pytest.raises(ValueError):
        plan_limbs(8, 50, 1 << 51)


def test_shape_mismatch_raises():
    values = CHAINS["50-bit"]
    mm = ModularMatmul(np.ones((2, 5), dtype=np.int64), Moduli.build(values))
    x = np.zeros((4, len(values), 8), dtype=np.uint64)
    with pytest.raises(ValueError):
        mm(x)
    with pytest.raises(ValueError):
        mm.column_blocks(x)


def test_non_integer_or_non_matrix_weights_are_refused():
    m = Moduli.build(CHAINS["50-bit"])
    with pytest.raises(TypeError):
        ModularMatmul(np.ones((2, 3), dtype=np.float64), m)
    with pytest.raises(TypeError):
        ModularMatmul(np.ones(3, dtype=np.int64), m)


def _edge_residues(values) -> np.ndarray:
    return np.array([[[q - 1, 12345] for q in values], [[1, 2] for _ in values]], dtype=np.uint64)


def test_uint64_weights_at_or_above_2_63_are_refused():
    """They do not fit int64, where the limb split works: a wrapped cast would be a wrong product."""
    values = CHAINS["50-bit"]
    with pytest.raises(ValueError, match="fit int64"):
        ModularMatmul(np.array([[2**64 - 1, 0], [2**63, 1]], dtype=np.uint64), Moduli.build(values))


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_the_int64_min_weight_is_exact():
    """−2^63 has no positive int64 counterpart; its product is still exact."""
    values = CHAINS["50-bit"]
    w, x = np.array([[-(2**63), 1]], dtype=np.int64), _edge_residues(values)
    _check(ModularMatmul(w, Moduli.build(values))(x), _reference(w, x, values))
