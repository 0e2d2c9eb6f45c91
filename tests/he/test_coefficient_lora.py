"""HE-LoRA over coefficient-encoded products, through the serialized protocol: Δ equals float64
s·X·A·B within the derived bound over shapes, token counts and rings, in two rounds and in one;
an outlier token costs only its own precision; no rotation or key switch runs; malformed or
foreign messages are refused; and what a chosen query shows the key holder, written down as a test."""

from __future__ import annotations

import numpy as np
import pytest

from tensafe.he import coefficient_wire, wire
from tensafe.he.coefficient import CoefficientParameters, choose_blocks, decode_outputs
from tensafe.he.coefficient_lora import (
    WEIGHT_BITS,
    CoefficientEvaluator,
    CoefficientKeyHolder,
    coefficient_delta,
    weight_bits,
)
from tensafe.he.counters import OpCounters
from tensafe.he.errors import HEError, ParameterMismatch, SerializationError, ValueOutOfRange


def _roles(n, h, r, seed=0, rounds=2):
    rng = np.random.default_rng(seed)
    holder = CoefficientKeyHolder(CoefficientParameters.for_ring(n), rounds=rounds)
    a, b, s = rng.normal(size=(h, r)) / np.sqrt(h), rng.normal(size=(r, h)) / np.sqrt(r), 2.0
    return holder, CoefficientEvaluator(holder.public_context(), a, b, s), s * a @ b


@pytest.mark.parametrize(
    "n, h, r, tokens",
    [(2048, 64, 4, 1), (2048, 576, 8, 16), (2048, 64, 4, 2048), (4096, 1024, 16, 4), (4096, 576, 8, 64),
     (8192, 4096, 64, 16), (16384, 1024, 64, 64), (8192, 576, 16, 256)],
)
def test_delta_is_s_x_a_b_within_the_bound(n, h, r, tokens):
    holder, evaluator, product = _roles(n, h, r)
    x = np.random.default_rng(tokens).normal(size=(tokens, h))
    counters = OpCounters()
    delta, bound = coefficient_delta(holder, evaluator, x, counters)
    error = np.abs(delta - x @ product)
    assert (error <= bound).all()
    assert bound.max() < 0.05 and error.max() > 1e-9  # a real computation with a useful bound
    assert counters.ct_plain_mults > 0
    assert counters.rotations == counters.key_switches == counters.rescales == 0


@pytest.mark.parametrize("n, h, r, tokens", [(2048, 64, 4, 1), (2048, 576, 8, 16), (4096, 1024, 16, 4),
                                             (2048, 64, 4, 2048)])
def test_one_round_with_the_dense_w_is_s_x_a_b_within_its_bound(n, h, r, tokens):
    holder, evaluator, product = _roles(n, h, r, rounds=1)
    assert len(evaluator.stages) == len(evaluator.weight_scales) == 1
    assert evaluator.stages[0].weights.values.shape == (h, h)  # W = s·A·B, not the factors
    x = np.random.default_rng(tokens).normal(size=(tokens, h))
    counters = OpCounters()
    delta, bound = coefficient_delta(holder, evaluator, x, counters)
    error = np.abs(delta - x @ product)
    assert (error <= bound).all()
    assert bound.max() < 0.05 and error.max() > 1e-9
    assert counters.rotations == counters.key_switches == counters.rescales == 0
    upload, _ = holder.upload(x, h)
    with pytest.raises(HEError, match="1 round"):  # one stage only
        evaluator.evaluate_bytes(upload, 2)


def test_an_outlier_token_costs_only_its_own_precision():
    holder, evaluator, product = _roles(2048, 576, 8)
    x = np.random.default_rng(1).normal(size=(16, 576))
    _, plain_bound = coefficient_delta(holder, evaluator, x)
    x[0, 5] = 500.0
    delta, bound = coefficient_delta(holder, evaluator, x)
    assert (np.abs(delta - x @ product) <= bound).all()
    assert bound[0].max() > 10 * plain_bound[0].max()  # the outlier's own row is coarser
    np.testing.assert_allclose(bound[1:], plain_bound[1:], rtol=0.05)  # every other row keeps its bound


def test_weights_get_the_most_bits_that_fit_the_modulus_and_a_matrix_that_cannot_fit_is_refused():
    params = CoefficientParameters.for_ring(2048)
    w = np.random.default_rng(0).normal(size=(576, 8))
    assert weight_bits(w, params, 22) == WEIGHT_BITS[1]  # small sums: the most bits
    assert weight_bits(w, params, 22) > weight_bits(np.ones((4096, 8)), params, 22)  # long sums: fewer
    with pytest.raises(ValueOutOfRange, match="he.packing=slots"):
        weight_bits(np.ones((1 << 16, 8)), params, 30)


def test_the_context_carries_no_key_and_the_upload_is_uniform_to_the_evaluator():
    holder = CoefficientKeyHolder(CoefficientParameters.for_ring(2048))
    context = holder.public_context()
    assert len(context) == wire.payload_offset + 20 + 32  # N, q, the input bits and rounds; nothing else
    params, bits, rounds = coefficient_wire.read_context(context, wire.DEFAULT_MAX_BYTES)
    assert (params, bits, rounds) == (holder.params, holder.input_bits, 2)
    x = np.zeros((16, 576))
    x[:, 0] = 1.0  # a message as far from uniform as it gets
    upload, _ = holder.upload(x, 8)
    _, b, _ = coefficient_wire.read_upload(upload, holder.params, wire.DEFAULT_MAX_BYTES)
    # b = m + e − a·s is uniform mod q to anyone without s: χ² over 16 equal bins (15 degrees of
    # freedom; 60 is exceeded by uniform data with probability below 1e-6)
    counts = np.bincount((b.ravel() * 16 // holder.params.modulus).astype(np.int64), minlength=16)
    expected = b.size / 16
    assert ((counts - expected) ** 2 / expected).sum() < 60


def test_malformed_foreign_or_misshapen_messages_are_refused():
    holder, evaluator, _ = _roles(2048, 1024, 4)
    x = np.random.default_rng(2).normal(size=(16, 1024))
    upload, xq = holder.upload(x, 4)
    tampered = bytearray(upload)
    tampered[wire.payload_offset + 40] ^= 1
    with pytest.raises(SerializationError, match="checksum"):
        evaluator.evaluate_bytes(tampered, 1)
    with pytest.raises(HEError, match="2 round.*stage 1 or 2, not 3"):
        evaluator.evaluate_bytes(upload, 3)
    with pytest.raises(HEError, match="blocks"):  # an upload for stage 1's width sent to stage 2
        evaluator.evaluate_bytes(upload, 2)
    reply = evaluator.evaluate_bytes(upload, 1)
    with pytest.raises(SerializationError, match="expected a coefficient_upload"):
        evaluator.evaluate_bytes(reply, 1)  # a result is not an upload
    other = CoefficientKeyHolder(CoefficientParameters.for_ring(4096))
    with pytest.raises(ParameterMismatch):
        other.download(reply, xq, evaluator.weight_scales[0], 1024, 4)
    with pytest.raises(HEError, match="tokens"):
        holder.download(reply, holder.upload(x[:2], 4)[1], evaluator.weight_scales[0], 1024, 4)
    bad_bits = coefficient_wire.pack_context(holder.params, 40)
    with pytest.raises(HEError, match="input bits"):
        CoefficientEvaluator(bad_bits, np.ones((64, 4)), np.ones((4, 64)), 1.0)
    with pytest.raises(HEError, match="3 rounds"):
        CoefficientEvaluator(coefficient_wire.pack_context(holder.params, 22, 3), np.ones((64, 4)),
                             np.ones((4, 64)), 1.0)
    with pytest.raises(HEError, match="1 or 2 rounds"):
        CoefficientKeyHolder(holder.params, rounds=0)
    too_large = wire.pack(wire.Kind.COEFFICIENT_UPLOAD, wire.BackendId.KERNELS, holder.params,
                          np.array([3, 1, 1], dtype="<u4").tobytes(), bytes(32),
                          np.full(2048 * 7, 0xFF, dtype=np.uint8))
    with pytest.raises(SerializationError, match="not below the modulus"):
        evaluator.evaluate_bytes(too_large, 1)


def test_a_chosen_query_shows_the_key_holder_a_whole_block_of_the_adapter():
    """What the threat model concedes, made concrete: without circuit privacy the returned
    ciphertexts hold far more than X·A. One query with X = e_0 (one token, a unit in input 0)
    decrypts to the encoded weight block itself: every entry of A in the block, at once."""
    holder, evaluator, _ = _roles(2048, 64, 4)
    x = np.zeros((1, 64))
    x[0, 0] = 1.0
    upload, _ = holder.upload(x, 4)
    _, ct = coefficient_wire.read_result(evaluator.evaluate_bytes(upload, 1), holder.params,
                                         wire.DEFAULT_MAX_BYTES)
    raw = holder.context.decrypt(holder._secret, ct)  # the key holder's own view of every coefficient
    blocks = choose_blocks(2048, 1, 64, 4)
    m, n = blocks.inputs, blocks.outputs
    scale = 2.0**holder.input_bits - 1  # e_0's row scale: its peak 1 maps to the largest integer
    quantized_a = evaluator.stages[0].weights.values
    # coefficient k·m + m − 1 − j holds scale · Â[j, k] for every j, k of the block (± the noise)
    recovered = np.array([[raw[0, 0, k * m + m - 1 - j] for k in range(n)] for j in range(m)]) / scale
    assert np.abs(recovered - quantized_a[:m, :n]).max() < 1e-4 * np.abs(quantized_a).max()
    useful = decode_outputs(raw, blocks, 1, 4)  # what the protocol needs: X·Â, one row
    assert useful.size == n and recovered.size == m * n == 64 * 4


@pytest.mark.parametrize("n", [2048, 4096, 8192, 16384])
def test_the_bound_holds_over_the_grid_of_shapes_and_token_counts(n):
    """Every h ∈ {64, 576, 1024, 4096}, r ∈ {4, 8, 16, 64} at this ring, for 1, 7 and 64 tokens and
    for as many tokens as one product's blocks can hold (N / h, at least 1), in two rounds."""
    for h in (64, 576, 1024, 4096):
        for r in (4, 8, 16, 64):
            holder, evaluator, product = _roles(n, h, r, seed=h + r)
            for tokens in sorted({1, 7, 64, max(1, n // h)}):
                x = np.random.default_rng(tokens * h + r).normal(size=(tokens, h))
                delta, bound = coefficient_delta(holder, evaluator, x)
                error = np.abs(delta - x @ product)
                assert (error <= bound).all(), (n, h, r, tokens, float((error / bound).max()))
