"""The compiled (numba) kernels equal the NumPy reference bit for bit; the reference is checked
against Python integers in test_gemm and test_modular."""

from __future__ import annotations

import numpy as np
import pytest
from tensafe.kernels import compiled, modular
from tensafe.kernels.gemm import ModularMatmul
from tensafe.kernels.modular import Moduli
from tensafe.kernels.ntt import NTT
from tensafe.kernels.primes import ntt_primes
from tensafe.kernels.xp import run_blocks

from tensafe.he.ckks import CKKSContext
from tensafe.he.params import preset

N = 1 << 12
CHAINS = {
    "tensafe n8192": preset("n8192").moduli,  # 42 + 23 + 23 bits
    "textbook": preset("n8192_uniform").moduli,  # 42 + 32 + 32
    "50-bit": tuple(ntt_primes(50, N, 3)),
    "two primes": (ntt_primes(45, N, 1)[0], ntt_primes(30, N, 1)[0]),
}


def _pool(fn, blocks):
    run_blocks(fn, blocks, np)


def _reference(x, w, moduli):
    m = Moduli.build(moduli)
    rescale = lambda block: modular.divide_round_by_last(block, m)  # noqa: E731
    return ModularMatmul(w, m)(x, epilogue=rescale, rows_out=len(moduli) - 1)


def _residues(rng, moduli, k, n, extremes=False):
    rows = [rng.integers(0, q, size=(k, 2, n), dtype=np.uint64) for q in moduli]
    x = np.stack(rows, axis=2)
    if extremes:  # 0, 1 and q − 1 in every prime
        x[0, :, :, :3] = np.array([[0, 1, q - 1] for q in moduli], dtype=np.uint64)
        x[-1] = np.array(moduli, dtype=np.uint64)[None, :, None] - 1
    return x


def test_the_kernels_compile_here():
    assert compiled.available(), "numba is a dependency: the evaluator's CPU path is compiled"


SHAPES = [(1024, 16, 1024), (16, 1024, 512), (1, 1, 1000), (37, 5, 777), (300, 40, 2048)]  # k, m, n


@pytest.mark.parametrize("chain", sorted(CHAINS))
@pytest.mark.parametrize("k, m, n", SHAPES)
def test_linear_map_rescale_equals_the_numpy_reference(chain, k, m, n):
    moduli = CHAINS[chain]
    rng = np.random.default_rng(k * 7919 + m * 31 + n)
    x = _residues(rng, moduli, k, n, extremes=True)
    bits = 24
    w = rng.integers(-(1 << bits) + 1, 1 << bits, size=(m, k)).astype(np.int64)
    w[0, : min(k, 2)] = [(1 << bits) - 1, -(1 << bits) + 1][: min(k, 2)]  # the largest magnitudes
    plan = compiled.plan(moduli, bits, k)
    assert plan is not None
    assert np.array_equal(compiled.linear_map_rescale(x, w, plan, _pool), _reference(x, w, moduli))


def test_wide_sums_split_residues_into_more_limbs():
    moduli = CHAINS["50-bit"]
    plan = compiled.plan(moduli, 24, 1 << 16)
    assert plan is not None and list(plan.limbs) == [3, 3, 3]
    rng = np.random.default_rng(5)
    k = 1 << 16
    x = _residues(rng, moduli, k, 4)
    w = rng.integers(-(1 << 24) + 1, 1 << 24, size=(2, k)).astype(np.int64)
    assert np.array_equal(compiled.linear_map_rescale(x, w, plan, _pool), _reference(x, w, moduli))


def test_shapes_outside_the_bounds_have_no_plan():
    assert compiled.plan(CHAINS["tensafe n8192"], 32, 16) is None  # weights beyond int32
    assert compiled.plan((ntt_primes(30, N, 1)[0], ntt_primes(45, N, 1)[0]), 20, 16) is None  # q_last/2 ≥ q0
    assert compiled.plan(CHAINS["50-bit"], 31, 1 << 30) is None  # no limb width keeps the sums exact


def test_the_context_uses_the_compiled_path_and_falls_back_to_numpy(monkeypatch):
    params = preset("n4096")
    ctx = CKKSContext(params, np)
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (20, params.slots))
    batch = ctx.encrypt_symmetric(ctx.generate_secret_key(), x)
    weights = rng.uniform(-1, 1, (20, 6))
    calls = []
    real = compiled.linear_map_rescale
    monkeypatch.setattr(compiled, "linear_map_rescale", lambda *a: calls.append(1) or real(*a))
    fast = ctx.linear_map(batch, weights)
    monkeypatch.setattr(compiled, "available", lambda: False)
    slow = ctx.linear_map(batch, weights)
    assert calls == [1] and np.array_equal(fast.data, slow.data) and fast.scale == slow.scale


@pytest.mark.parametrize("q", [255, 65537, *preset("n8192").moduli[:2], (1 << 50) - 1])
def test_residues_pack_and_unpack_like_the_numpy_path(q):
    from tensafe.he.wire import pack_residues, residue_bytes, unpack_residues

    width, n = residue_bytes(q), 640
    rng = np.random.default_rng(q % 1000)
    values = rng.integers(0, q, size=(3, n), dtype=np.uint64)
    values[0, :2] = [0, q - 1]
    packed = np.empty(values.size * width, dtype=np.uint8)
    compiled.pack_residues(values, width, packed)
    assert np.array_equal(packed, pack_residues(values, width))
    target = np.zeros((3, 2, n), dtype=np.uint64)[:, 1]  # a strided destination, as in a batch
    assert compiled.unpack_residues(packed, width, q, target)
    assert np.array_equal(target, unpack_residues(packed, width, n)) and np.array_equal(target, values)
    if width < 8 and q < (1 << (8 * width)) - 1:
        bad = packed.copy()
        bad[width : 2 * width] = 0xFF  # residue 1 becomes 2^(8·width) − 1 ≥ q
        assert not compiled.unpack_residues(bad, width, q, target)


@pytest.mark.skipif(not compiled.available(), reason="numba is not installed")
@pytest.mark.parametrize(
    "n, chain", [(8, [(30, 1)]), (2048, [(49, 1)]), (4096, [(45, 3)]), (8192, [(50, 1), (36, 1)])]
)
def test_the_compiled_ntt_equals_the_numpy_ntt(n, chain):
    moduli = Moduli.build(tuple(q for bits, count in chain for q in ntt_primes(bits, n, count)))
    fast, reference = NTT(n, moduli), NTT(n, moduli, compiled=False)
    assert fast.compiled and not reference.compiled
    rng = np.random.default_rng(n)
    a = np.stack([rng.integers(0, q, size=(5, 3, n), dtype=np.uint64) for q in moduli.values], axis=2)
    a[0, 0, :, :] = np.array(moduli.values, dtype=np.uint64).reshape(-1, 1) - 1  # the largest residues
    forward = fast.forward(a)
    np.testing.assert_array_equal(forward, reference.forward(a))
    np.testing.assert_array_equal(fast.inverse(forward), reference.inverse(forward))
    np.testing.assert_array_equal(fast.inverse(forward), a)
    low = fast.prefix(1)
    assert low.compiled
    np.testing.assert_array_equal(low.forward(a[..., :1, :]), reference.prefix(1).forward(a[..., :1, :]))



@pytest.mark.parametrize("ring, rows, inputs, outputs", [(2048, 1, 9, 4), (2048, 2, 70, 3), (4096, 1, 1, 9)])
def test_the_compiled_coefficient_products_equal_the_numpy_ones(ring, rows, inputs, outputs):
    from tensafe.he.coefficient import Ciphertexts, CoefficientContext, CoefficientParameters

    params = CoefficientParameters.for_ring(ring)
    fast, reference = CoefficientContext(params), CoefficientContext(params, compiled=False)
    assert fast.ntt.compiled and not reference.ntt.compiled
    rng = np.random.default_rng(rows * inputs)
    q = params.modulus
    ct = Ciphertexts(rng.integers(0, q, (rows, inputs, ring), dtype=np.uint64),
                     rng.integers(0, q, (rows, inputs, ring), dtype=np.uint64))
    weights = fast.plain_weights(rng.integers(-(2**20), 2**20, (inputs, outputs, ring)))
    got, expected = fast.multiply(ct, weights), reference.multiply(ct, weights)
    assert np.array_equal(got.b, expected.b) and np.array_equal(got.a, expected.a)
