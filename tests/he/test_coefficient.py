"""Coefficient-encoded products: the packing is exact, the block optimiser respects t·m·n ≤ N,
the parameter sets meet the HE Standard, and a decrypted ct × pt product equals X·W within the
derived error bound with zero rotations and key switches."""

from __future__ import annotations

import os

import numpy as np
import pytest
from tensafe.kernels.primes import ntt_primes

from tensafe.he.coefficient import (
    Blocks,
    CoefficientContext,
    CoefficientParameters,
    check_capacity,
    choose_blocks,
    decode_outputs,
    encode_inputs,
    encode_weights,
    error_std,
)
from tensafe.he.counters import OpCounters
from tensafe.he.errors import InsecureParameters, ValueOutOfRange
from tensafe.he.params import HE_STANDARD_MAX_LOG_Q


def _negacyclic(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a·b mod (x^N + 1) over the integers (object arithmetic: no overflow)."""
    n = a.shape[-1]
    full = np.convolve(a.astype(object), b.astype(object))
    out = full[:n].copy()
    out[: full.size - n] -= full[n:]
    return out


@pytest.mark.parametrize(
    "n, tokens, h_in, h_out, blocks",
    [
        (64, 3, 5, 2, Blocks(4, 4, 4)),  # t·m·n = N exactly, with padding on every axis
        (64, 8, 8, 1, Blocks(8, 8, 1)),
        (32, 1, 32, 1, Blocks(1, 32, 1)),  # one token, one output: the inner product
        (32, 32, 1, 1, Blocks(32, 1, 1)),  # tokens = N
    ],
)
def test_the_packing_puts_every_inner_product_at_its_coefficient(n, tokens, h_in, h_out, blocks):
    rng = np.random.default_rng(n + tokens)
    x = rng.integers(-100, 100, size=(tokens, h_in))
    w = rng.integers(-100, 100, size=(h_in, h_out))
    xs, ws = encode_inputs(x, blocks, n), encode_weights(w, blocks, n)
    big_t, big_i, big_o = blocks.counts(tokens, h_in, h_out)
    assert xs.shape == (big_t, big_i, n) and ws.shape == (big_i, big_o, n)
    y = np.array(
        [
            [sum(_negacyclic(xs[tb, ib], ws[ib, ob]) for ib in range(big_i)) for ob in range(big_o)]
            for tb in range(big_t)
        ],
        dtype=np.int64,
    )
    np.testing.assert_array_equal(decode_outputs(y, blocks, tokens, h_out), x @ w)


@pytest.mark.parametrize("n", [2048, 4096, 8192, 16384])
@pytest.mark.parametrize(
    "tokens, h_in, h_out", [(1, 576, 8), (16, 576, 8), (16, 8, 576), (256, 4096, 64), (4096, 64, 16)]
)
def test_the_block_optimiser_fits_the_ring_and_covers_the_matrix(n, tokens, h_in, h_out):
    blocks = choose_blocks(n, tokens, h_in, h_out)
    assert blocks.tokens * blocks.inputs * blocks.outputs <= n
    big_t, big_i, big_o = blocks.counts(tokens, h_in, h_out)
    assert (
        big_t * blocks.tokens >= tokens and big_i * blocks.inputs >= h_in and big_o * blocks.outputs >= h_out
    )


@pytest.mark.parametrize("n", [2048, 4096, 8192, 16384])
def test_the_parameter_sets_are_within_the_he_standard(n):
    params = CoefficientParameters.for_ring(n)
    assert params.modulus.bit_length() <= HE_STANDARD_MAX_LOG_Q[n]
    assert (params.modulus - 1) % (2 * n) == 0


def test_a_modulus_beyond_the_he_standard_is_refused():
    with pytest.raises(InsecureParameters, match="HE Standard"):
        CoefficientParameters(1024, ntt_primes(40, 1024, 1)[0])


@pytest.mark.parametrize(
    "n, tokens, h_in, h_out",
    [(2048, 1, 576, 8), (2048, 16, 576, 8), (2048, 16, 8, 576), (4096, 5, 100, 33), (2048, 2048, 1, 1)],
)
def test_a_decrypted_product_is_x_times_w_within_the_error_bound(n, tokens, h_in, h_out):
    rng = np.random.default_rng(tokens + h_in)
    params = CoefficientParameters.for_ring(n)
    context = CoefficientContext(params)
    blocks = choose_blocks(n, tokens, h_in, h_out)
    x = rng.integers(-(2**20), 2**20, size=(tokens, h_in))
    w = rng.integers(-(2**14), 2**14, size=(h_in, h_out))
    check_capacity(params, 2**20, w, blocks)
    key = context.generate_secret_key()
    ct = context.encrypt(key, encode_inputs(x, blocks, n), os.urandom(32))
    counters = OpCounters()
    out = context.multiply(ct, context.plain_weights(encode_weights(w, blocks, n)), counters)
    y = decode_outputs(context.decrypt(key, out), blocks, tokens, h_out)
    error = np.abs(y - x @ w)
    std = error_std(w, blocks)
    assert error.max() <= 7 * std
    assert error.std() > 0.2 * std  # the bound is not loose by orders of magnitude
    big_t, big_i, big_o = blocks.counts(tokens, h_in, h_out)
    assert counters.ct_plain_mults == big_t * big_i * big_o
    assert counters.rotations == counters.key_switches == counters.rescales == 0


def test_the_seed_expands_to_the_a_half_and_a_product_that_would_wrap_is_refused():
    params = CoefficientParameters.for_ring(2048)
    context = CoefficientContext(params)
    key, seed = context.generate_secret_key(), os.urandom(32)
    ct = context.encrypt(key, np.zeros((1, 1, 2048), dtype=np.int64), seed)
    np.testing.assert_array_equal(context.expand(seed, (1, 1, 2048)), ct.a)
    blocks = choose_blocks(2048, 1, 576, 8)
    with pytest.raises(ValueOutOfRange, match="fewer bits"):
        check_capacity(params, 2**30, np.full((576, 8), 2**14), blocks)
