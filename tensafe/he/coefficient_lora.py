"""HE-LoRA with coefficient-encoded products: Δ = s·X·A·B in two rounds with the key holder, or in one.

Two rounds (the default). Stage 1: the key holder quantizes X per token (row i at scale
2^bits / max_j |X[i, j]|, so an outlier token costs only its own precision), encrypts it in
coefficient blocks, and the evaluator multiplies by its quantized A. The key holder decrypts
U = X·A (tokens × r), requantizes it per token and encrypts it again. Stage 2: the evaluator
multiplies by its quantized s·B, and the key holder decrypts Δ.
One round (the key holder's context asks for it): the evaluator multiplies X by its quantized
dense W = s·A·B (h_in × h_out) in its only stage: h_out/r times the products of stage 1, and
larger messages, for half the round trips: for links where a round trip costs more than that.
Each stage is `CoefficientContext.multiply`: ct × pt products and additions, no rotations, no key
switches, no evaluation keys.

The error of each stage has three parts, bounded per output entry (`StageBound`): the inputs'
rounding (half a unit of each row's scale, times Σ_j |W[j, k]|), the weights' rounding (half a
unit of the weight scale, times Σ_j |X[i, j]|), and the encryption noise at 7σ of `error_std`,
divided by both scales. Stage 2's bound adds stage 1's, carried through |s·B|.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tensafe.he import coefficient_wire, wire
from tensafe.he.coefficient import (
    Ciphertexts,
    CoefficientContext,
    CoefficientParameters,
    SecretKey,
    check_capacity,
    choose_blocks,
    decode_outputs,
    encode_inputs,
    encode_weights,
    error_std,
)
from tensafe.he.counters import OpCounters
from tensafe.he.errors import HEError, ValueOutOfRange

NOISE_TAIL = 7.0  # σ of the encryption noise counted in the bound
INPUT_BITS = 22  # the key holder's per-token quantization of X and U
WEIGHT_BITS = (8, 20)  # the evaluator quantizes each weight matrix to the most bits that fit q


@dataclass(frozen=True)
class RowQuantized:
    """values ≈ x · scales[:, None], integers of at most `bits` bits."""

    values: np.ndarray  # int64 (rows × cols)
    scales: np.ndarray  # float64 (rows,)


def quantize_rows(x: np.ndarray, bits: int) -> RowQuantized:
    peak = np.abs(x).max(axis=1)
    scales = np.where(peak > 0, (2.0**bits - 1) / np.where(peak > 0, peak, 1.0), 1.0)
    return RowQuantized(np.rint(x * scales[:, None]).astype(np.int64), scales)


@dataclass(frozen=True)
class QuantizedWeights:
    values: np.ndarray  # int64 (h_in × h_out)
    scale: float
    source: np.ndarray  # float64: the weights as given (for the bound)


def quantize_weights(w: np.ndarray, bits: int) -> QuantizedWeights:
    peak = float(np.abs(w).max())
    scale = (2.0**bits - 1) / peak if peak > 0 else 1.0
    return QuantizedWeights(np.rint(w * scale).astype(np.int64), scale, np.asarray(w, dtype=np.float64))


def stage_bound(x: np.ndarray, scales: np.ndarray, weights: QuantizedWeights, noise_std: float) -> np.ndarray:
    """Per output entry, the bound on |decoded − x @ w| of one stage (x as the key holder holds it)."""
    w = weights.source
    inputs_rounding = 0.5 / scales[:, None] * np.abs(w).sum(axis=0)[None, :]
    weights_rounding = 0.5 / weights.scale * np.abs(x).sum(axis=1)[:, None]
    noise = NOISE_TAIL * noise_std / (scales[:, None] * weights.scale)
    return inputs_rounding + weights_rounding + noise


class CoefficientStage:
    """The evaluator's side of one stage: quantized weights, their encodings by block shape."""

    def __init__(self, context: CoefficientContext, w: np.ndarray, weight_bits: int):
        self.context, self.weights = context, quantize_weights(np.asarray(w, np.float64), weight_bits)
        self._encoded: dict[object, np.ndarray] = {}

    def apply(self, ct: Ciphertexts, tokens: int, counters: OpCounters | None = None) -> Ciphertexts:
        n = self.context.params.ring_degree
        blocks = choose_blocks(n, tokens, *self.weights.values.shape)
        if blocks not in self._encoded:
            self._encoded[blocks] = self.context.plain_weights(encode_weights(self.weights.values, blocks, n))
        return self.context.multiply(ct, self._encoded[blocks], counters)


class CoefficientKeyHolder:
    """The key holder's side: quantize, encrypt, decrypt, decode; holds the secret key."""

    def __init__(
        self, params: CoefficientParameters, input_bits: int = INPUT_BITS,
        max_message_bytes: int = wire.DEFAULT_MAX_BYTES, rounds: int = 2,
    ):
        if rounds not in coefficient_wire.ROUNDS:
            raise HEError(f"coefficient HE-LoRA runs in 1 or 2 rounds, not {rounds}")
        self.context, self.input_bits, self.rounds = CoefficientContext(params), input_bits, rounds
        self.max_message_bytes = max_message_bytes
        self._secret: SecretKey = self.context.generate_secret_key()

    @property
    def params(self) -> CoefficientParameters:
        return self.context.params

    def public_context(self) -> bytearray:
        """What an evaluator needs: the ring, the prime, the input bits and the rounds. No key of any kind."""
        return coefficient_wire.pack_context(self.params, self.input_bits, self.rounds)

    def upload(self, x: np.ndarray, h_out: int) -> tuple[bytearray, RowQuantized]:
        """X (tokens × h_in) quantized per token and encrypted for a product with h_out outputs,
        serialized as b and the seed of the uniform halves; the quantization, for `download`."""
        x = checked_activations(x)
        n = self.params.ring_degree
        quantized = quantize_rows(x, self.input_bits)
        blocks = choose_blocks(n, x.shape[0], x.shape[1], h_out)
        seed = os.urandom(coefficient_wire.SEED_BYTES)
        ct = self.context.encrypt(self._secret, encode_inputs(quantized.values, blocks, n), seed)
        return coefficient_wire.pack_upload(self.params, x.shape[0], ct.b, seed), quantized

    def decrypt(
        self, ct: Ciphertexts, quantized: RowQuantized, weights_scale: float, h_in: int, h_out: int
    ) -> np.ndarray:
        """The (tokens × h_out) product from an evaluator's result, after checking it is shaped like one.
        The evaluator is honest but curious: a crafted reply decrypts to a function of the key, so
        what a reply decrypts to is never shown to the evaluator."""
        tokens = quantized.values.shape[0]
        blocks = choose_blocks(self.params.ring_degree, tokens, h_in, h_out)
        big_t, _, big_o = blocks.counts(tokens, h_in, h_out)
        if ct.b.shape[:2] != (big_t, big_o) or ct.a.shape != ct.b.shape or not ct.ntt:
            raise HEError(f"the reply is not a coefficient HE-LoRA result: {ct.b.shape[:2]} blocks, "
                          f"expected {(big_t, big_o)} for {tokens} tokens and {h_out} outputs")
        values = decode_outputs(self.context.decrypt(self._secret, ct), blocks, tokens, h_out)
        return values / (quantized.scales[:, None] * weights_scale)

    def download(
        self, data: bytes, quantized: RowQuantized, weights_scale: float, h_in: int, h_out: int
    ) -> np.ndarray:
        """`decrypt` of a serialized result."""
        tokens, ct = coefficient_wire.read_result(data, self.params, self.max_message_bytes)
        if tokens != quantized.values.shape[0]:
            raise HEError(f"the reply is for {tokens} tokens, {quantized.values.shape[0]} were sent")
        return self.decrypt(ct, quantized, weights_scale, h_in, h_out)


def most_weight_bits(w: np.ndarray, fits: Callable[[np.ndarray], None]) -> int | None:
    """The most bits within `WEIGHT_BITS` whose quantized weights `fits` accepts (it raises
    `ValueOutOfRange` otherwise), or None."""
    for bits in range(WEIGHT_BITS[1], WEIGHT_BITS[0] - 1, -1):
        try:
            fits(quantize_weights(w, bits).values)
        except ValueOutOfRange:
            continue
        return bits
    return None


def checked_activations(x) -> np.ndarray:
    """X as float64, refused unless a finite (tokens × hidden) matrix with at least one token."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or not x.shape[0] or not np.isfinite(x).all():
        raise HEError(f"activations must be a finite (tokens × hidden) matrix, got shape {x.shape}")
    return x


def checked_factors(a, b, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """A (h_in × r) and B (r × h_out) as float64, refused unless shaped so and finite."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise HEError(f"LoRA factors must be A (h_in × r) and B (r × h_out), got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all() and math.isfinite(scale)):
        raise HEError("LoRA factors and scale must be finite")
    return a, b


def check_stage(stage: int, rounds: int) -> None:
    """Refuse a stage the session's rounds do not have (1 or 2 in two rounds, 1 in one)."""
    if not 1 <= stage <= rounds:
        raise HEError(f"this coefficient session runs {rounds} round(s): stage "
                      f"{' or '.join(str(i + 1) for i in range(rounds))}, not {stage}")


def weight_bits(w: np.ndarray, params: CoefficientParameters, input_bits: int) -> int:
    """The most bits (within `WEIGHT_BITS`) the weights may be quantized to so that no result can
    wrap modulo q, for any block shape (`check_capacity`)."""
    bits = most_weight_bits(w, lambda values: check_capacity(params, 2.0**input_bits, values))
    if bits is not None:
        return bits
    raise ValueOutOfRange(
        f"a {w.shape[0]} × {w.shape[1]} weight matrix does not fit the {params.modulus.bit_length()}-bit "
        f"modulus at {WEIGHT_BITS[0]} weight bits and {input_bits} input bits: lower the key holder's "
        "input bits or use he.packing=slots"
    )


class CoefficientEvaluator:
    """Owns A (h_in × r), B (r × h_out) and s in plaintext, and only a key holder's public context;
    in two rounds stage 1 multiplies encrypted X by A, stage 2 encrypted U by s·B; in one round the
    only stage multiplies encrypted X by W = s·A·B."""

    def __init__(
        self, public_context: bytes, a: np.ndarray, b: np.ndarray, scale: float,
        max_message_bytes: int = wire.DEFAULT_MAX_BYTES,
    ):
        if not isinstance(public_context, (bytes, bytearray, memoryview)):
            raise HEError("an evaluator takes the key holder's public context as bytes, nothing else")
        params, input_bits, rounds = coefficient_wire.read_context(bytes(public_context), max_message_bytes)
        a, b = checked_factors(a, b, scale)
        context = CoefficientContext(params)
        self.params, self.max_message_bytes, self.rounds = params, max_message_bytes, rounds
        self.shape = (a.shape[0], a.shape[1], b.shape[1])
        factors = (a, scale * b) if rounds == 2 else (a @ (scale * b),)
        self.stages = tuple(CoefficientStage(context, w, weight_bits(w, params, input_bits)) for w in factors)
        self.last_counters = OpCounters()

    @property
    def weight_scales(self) -> tuple[float, ...]:
        """The scales of the quantized weights of each stage (A and s·B, or W), which the key holder
        divides out when decoding."""
        return tuple(stage.weights.scale for stage in self.stages)

    def evaluate_bytes(self, data: bytes, stage: int) -> bytearray:
        """Stage `stage` (1 or 2 in two rounds, 1 in one) on a serialized upload; the serialized result."""
        check_stage(stage, self.rounds)
        step = self.stages[stage - 1]
        tokens, b, seed = coefficient_wire.read_upload(data, self.params, self.max_message_bytes)
        h_in, h_out = step.weights.values.shape
        blocks = choose_blocks(self.params.ring_degree, tokens, h_in, h_out)
        big_t, big_i, _ = blocks.counts(tokens, h_in, h_out)
        if b.shape[:2] != (big_t, big_i):
            raise HEError(f"stage {stage} takes {big_t} × {big_i} blocks for {tokens} tokens of width {h_in},"
                          f" got {b.shape[0]} × {b.shape[1]}")
        counters = OpCounters()
        out = step.apply(Ciphertexts(b, step.context.expand(seed, b.shape)), tokens, counters)
        self.last_counters = counters
        return coefficient_wire.pack_result(self.params, tokens, out)


def coefficient_delta(
    holder: CoefficientKeyHolder, evaluator: CoefficientEvaluator, x: np.ndarray,
    counters: OpCounters | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(Δ, bound): s·X·A·B through the evaluator's stages, serialized, with the key holder between
    them, and the bound on |Δ − s·X·A·B| per entry. Both roles run here: a measurement, not a
    deployment."""
    n, sigma, tokens = holder.params.ring_degree, holder.params.sigma, x.shape[0]
    if evaluator.rounds == 1:
        (dense,) = evaluator.stages
        h, h_out = dense.weights.values.shape
        upload, xq = holder.upload(x, h_out)
        delta = holder.download(_stage(evaluator, upload, 1, counters), xq, dense.weights.scale, h, h_out)
        noise = error_std(dense.weights.values, choose_blocks(n, tokens, h, h_out), sigma)
        return delta, stage_bound(x, xq.scales, dense.weights, noise)
    first, second = evaluator.stages
    (h, r), h_out = first.weights.values.shape, second.weights.values.shape[1]
    upload, xq = holder.upload(x, r)
    u = holder.download(_stage(evaluator, upload, 1, counters), xq, first.weights.scale, h, r)
    noise1 = error_std(first.weights.values, choose_blocks(n, tokens, h, r), sigma)
    bound1 = stage_bound(x, xq.scales, first.weights, noise1)
    upload, uq = holder.upload(u, h_out)
    delta = holder.download(_stage(evaluator, upload, 2, counters), uq, second.weights.scale, r, h_out)
    noise2 = error_std(second.weights.values, choose_blocks(n, tokens, r, h_out), sigma)
    # stage 2 sees u = x·A + ε₁ (|ε₁| ≤ bound1): its own bound at |u| + bound1, plus ε₁ through |s·B|
    carried = bound1 @ np.abs(second.weights.source)
    bound2 = stage_bound(np.abs(u) + bound1, uq.scales, second.weights, noise2)
    return delta, bound2 + carried


def _stage(evaluator: CoefficientEvaluator, upload: bytes, stage: int, counters: OpCounters | None) -> bytes:
    out = evaluator.evaluate_bytes(upload, stage)
    if counters is not None:
        counters += evaluator.last_counters
    return out
