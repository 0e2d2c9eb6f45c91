"""Circuit-private coefficient HE-LoRA: Δ within its derived bound in one round and in two, and what
a chosen query shows the key holder with and without the option: without it, one reply gives it
the encoded weights (its own â times ŵ) and whole blocks of them in the coefficients; with it, only
the outputs, under a flood far above the evaluator's own noise."""

from __future__ import annotations

import numpy as np
import pytest
from tensafe.kernels import modular

from tensafe.he import coefficient_wire, wire
from tensafe.he.circuit_private import (
    CircuitPrivateEvaluator,
    CircuitPrivateKeyHolder,
    CircuitPrivateParameters,
    circuit_private_delta,
    lift_bits,
    read_context,
)
from tensafe.he.coefficient import CoefficientParameters, choose_blocks, error_std
from tensafe.he.coefficient_lora import CoefficientEvaluator, CoefficientKeyHolder
from tensafe.he.errors import HEError, ParameterMismatch, SerializationError


def _factors(h, r, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(h, r)) / np.sqrt(h), rng.normal(size=(r, h)) / np.sqrt(r), 2.0


@pytest.mark.parametrize("n, h, r, tokens, rounds", [
    (4096, 64, 4, 1, 1), (4096, 576, 8, 16, 2), (4096, 576, 8, 1, 1), (8192, 1024, 16, 4, 2),
    (4096, 64, 4, 2048, 2),
])
def test_delta_is_s_x_a_b_within_the_bound(n, h, r, tokens, rounds):
    params = CircuitPrivateParameters.for_ring(n)
    holder = CircuitPrivateKeyHolder(params, rounds=rounds)
    a, b, s = _factors(h, r)
    evaluator = CircuitPrivateEvaluator(holder.public_context(), a, b, s)
    x = np.random.default_rng(tokens).normal(size=(tokens, h))
    delta, bound = circuit_private_delta(holder, evaluator, x)
    error = np.abs(delta - s * x @ a @ b)
    assert (error <= bound).all()
    assert bound.max() < 0.05 and error.max() > 1e-9


def test_the_parameters_are_within_the_he_standard_and_need_n_4096():
    params = CircuitPrivateParameters.for_ring(4096)
    assert [q.bit_length() for q in params.moduli] == [50, 50] and params.modulus.bit_length() <= 109
    with pytest.raises(HEError, match="N = 4096"):
        CircuitPrivateParameters.for_ring(2048)


def _chosen_query(private: bool):
    """The key holder's view of one reply to X = e_0 (one token, a unit in input 0): what it can
    compute with its own secret key and its own â."""
    h, r = 64, 4
    a, b, s = _factors(h, r, seed=5)
    x = np.zeros((1, h))
    x[0, 0] = 1.0
    if private:
        holder = CircuitPrivateKeyHolder(CircuitPrivateParameters.for_ring(4096), rounds=1)
        evaluator = CircuitPrivateEvaluator(holder.public_context(), a, b, s)
    else:
        holder = CoefficientKeyHolder(CoefficientParameters.for_ring(4096), rounds=1)
        evaluator = CoefficientEvaluator(holder.public_context(), a, b, s)
    upload, quantized = holder.upload(x, h)
    reply = evaluator.evaluate_bytes(upload, 1)
    return holder, evaluator, upload, reply, quantized


def test_without_the_option_one_reply_gives_the_key_holder_the_encoded_weights():
    holder, evaluator, upload, reply, _ = _chosen_query(private=False)
    params = holder.params
    _, _, seed = coefficient_wire.read_upload(upload, params, wire.DEFAULT_MAX_BYTES)
    _, ct = coefficient_wire.read_result(reply, params, wire.DEFAULT_MAX_BYTES)
    a_hat = holder.context.expand(seed, ct.a.shape[:1] + (1, params.ring_degree))[:, 0]  # its own â
    q = holder.context.moduli
    # the reply's â-half is â·ŵ: dividing by â (pointwise, in NTT form) gives ŵ, the weights
    inverse = np.array([pow(int(v), -1, params.modulus) for v in a_hat.ravel()], dtype=np.uint64)
    w_hat = modular.mul(ct.a[:, 0], inverse.reshape(a_hat.shape), q)
    weights = modular.center(holder.context._inverse(w_hat), q)
    blocks = choose_blocks(params.ring_degree, 1, 64, 64)
    m = blocks.inputs
    quantized = evaluator.stages[0].weights.values  # W = s·A·B quantized
    # coefficient k·m + m − 1 − j of the first output block holds Ŵ[j, k]: all of it, exactly
    recovered = np.array([[weights[0, k * m + m - 1 - j] for k in range(blocks.outputs)] for j in range(m)])
    np.testing.assert_array_equal(recovered, quantized[:m, : blocks.outputs])


def test_with_the_option_the_key_holder_gets_the_outputs_only_under_a_flood():
    holder, evaluator, upload, reply, quantized = _chosen_query(private=True)
    params, n = holder.params, holder.params.ring_degree
    payload = wire.unpack(reply, wire.Kind.PRIVATE_RESULT, wire.BackendId.KERNELS, params,
                          wire.DEFAULT_MAX_BYTES)
    tokens, big_t, big_o, t, outputs = np.frombuffer(bytes(payload[:20]), dtype="<u4")
    residue = 7  # bytes per 50-bit residue
    # of the b-half only the t·n output coefficients per block travel, with the whole a-half:
    # the other N − t·n linear combinations of the weights are never sent
    assert len(payload) == 20 + int(big_t * big_o) * 2 * residue * (int(t * outputs) + n)
    assert int(t * outputs) < n // 8
    # the a-half is re-randomised: dividing it by the key holder's own â no longer gives weights
    start = 20 + int(big_t * big_o * t * outputs) * 2 * residue
    a_half = np.frombuffer(bytes(payload[start:]), dtype=np.uint8)
    values = wire.unpack_residues(a_half, residue, n).astype(np.float64) / params.moduli[0]
    counts = np.bincount((values[0] * 16).astype(np.int64), minlength=16)  # χ² on 16 bins: uniform
    assert ((counts - n / 16) ** 2 / (n / 16)).sum() < 60
    # the outputs: Δ = s·e_0·A·B = W[0, :] (quantized), under a flood 2^40 over the product noise
    delta = holder.download(reply, quantized, evaluator.weight_scales[0], 64, 64)
    exact = evaluator.stages[0].source[0]
    error = delta[0] - exact
    assert np.abs(error).max() < 1e-3 * np.abs(exact).max()  # still useful
    # the same query answered twice: the two floods differ far beyond the products' own noise
    again = holder.download(evaluator.evaluate_bytes(upload, 1), quantized, evaluator.weight_scales[0],
                            64, 64)
    lift = 2.0 ** lift_bits(holder.params, holder.input_bits, 64)
    spread = np.abs(again[0] - delta[0]) * quantized.scales[0] * evaluator.weight_scales[0] * lift
    own = error_std(evaluator.stages[0].values, choose_blocks(n, 1, 64, 64), params.sigma)
    assert np.median(spread) > 2.0**30 * own  # in the lifted integers: a flood, not the products' noise


def test_foreign_or_malformed_messages_are_refused():
    params = CircuitPrivateParameters.for_ring(4096)
    holder = CircuitPrivateKeyHolder(params, rounds=2)
    a, b, s = _factors(64, 4)
    context = holder.public_context()
    assert read_context(context, wire.DEFAULT_MAX_BYTES)[1:3] == (holder.input_bits, 2)
    evaluator = CircuitPrivateEvaluator(context, a, b, s)
    x = np.random.default_rng(1).normal(size=(3, 64))
    upload, xq = holder.upload(x, 4)
    with pytest.raises(HEError, match="2 round.*not 3"):
        evaluator.evaluate_bytes(upload, 3)
    with pytest.raises(HEError, match="blocks"):
        evaluator.evaluate_bytes(upload, 2)  # stage 1's width sent to stage 2
    tampered = bytearray(upload)
    tampered[wire.payload_offset + 60] ^= 1
    with pytest.raises(SerializationError, match="checksum"):
        evaluator.evaluate_bytes(tampered, 1)
    reply = evaluator.evaluate_bytes(upload, 1)
    with pytest.raises(SerializationError, match="expected a private_upload"):
        evaluator.evaluate_bytes(reply, 1)
    other = CircuitPrivateKeyHolder(CircuitPrivateParameters.for_ring(8192))
    with pytest.raises(ParameterMismatch):
        other.download(reply, xq, evaluator.weight_scales[0], 64, 4)
    with pytest.raises(HEError, match="not this upload's result"):
        holder.download(reply, holder.upload(x[:1], 4)[1], evaluator.weight_scales[0], 64, 4)
    with pytest.raises(SerializationError, match="private_context"):
        CircuitPrivateEvaluator(CoefficientKeyHolder(CoefficientParameters.for_ring(4096)).public_context(),
                                a, b, s)


@pytest.mark.parametrize("n", [4096, 8192])
def test_the_bound_holds_over_a_grid_of_shapes(n):
    params = CircuitPrivateParameters.for_ring(n)
    for h in (64, 576, 1024, 4096):
        for r in (4, 64):
            holder = CircuitPrivateKeyHolder(params, rounds=2)
            a, b, s = _factors(h, r, seed=h + r)
            evaluator = CircuitPrivateEvaluator(holder.public_context(), a, b, s)
            for tokens in (1, 16):
                x = np.random.default_rng(tokens + h).normal(size=(tokens, h))
                delta, bound = circuit_private_delta(holder, evaluator, x)
                error = np.abs(delta - s * x @ a @ b)
                assert (error <= bound).all(), (n, h, r, tokens)
                assert bound.max() < 0.05
