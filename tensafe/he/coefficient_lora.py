"""HE-LoRA with coefficient-encoded products: Δ = s·X·A·B in two rounds with the key holder.

Stage 1: the key holder quantizes X per token (row i at scale 2^bits / max_j |X[i, j]|, so an
outlier token costs only its own precision), encrypts it in coefficient blocks, and the
evaluator multiplies by its quantized A. The key holder decrypts U = X·A (tokens × r),
requantizes it per token and encrypts it again. Stage 2: the evaluator multiplies by its
quantized s·B, and the key holder decrypts Δ. Each stage is `CoefficientContext.multiply`: ct × pt
products and additions, no rotations, no key switches, no evaluation keys.

The error of each stage has three parts, bounded per output entry (`StageBound`): the inputs'
rounding (half a unit of each row's scale, times Σ_j |W[j, k]|), the weights' rounding (half a
unit of the weight scale, times Σ_j |X[i, j]|), and the encryption noise at 7σ of `error_std`,
divided by both scales. Stage 2's bound adds stage 1's, carried through |s·B|.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

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
from tensafe.he.errors import HEError

NOISE_TAIL = 7.0  # σ of the encryption noise counted in the bound


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

    def __init__(self, params: CoefficientParameters, input_bits: int):
        self.context, self.input_bits = CoefficientContext(params), input_bits
        self._secret: SecretKey = self.context.generate_secret_key()

    def encrypt(self, x: np.ndarray, h_out: int) -> tuple[Ciphertexts, RowQuantized]:
        """X (tokens × h_in) quantized per token and encrypted for a product with h_out outputs."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or not np.isfinite(x).all():
            raise HEError(f"activations must be a finite (tokens × hidden) matrix, got shape {x.shape}")
        n = self.context.params.ring_degree
        quantized = quantize_rows(x, self.input_bits)
        blocks = choose_blocks(n, x.shape[0], x.shape[1], h_out)
        encoded = encode_inputs(quantized.values, blocks, n)
        return self.context.encrypt(self._secret, encoded, os.urandom(32)), quantized

    def decrypt(
        self, ct: Ciphertexts, quantized: RowQuantized, weights_scale: float, h_in: int, h_out: int
    ) -> np.ndarray:
        tokens = quantized.values.shape[0]
        blocks = choose_blocks(self.context.params.ring_degree, tokens, h_in, h_out)
        values = decode_outputs(self.context.decrypt(self._secret, ct), blocks, tokens, h_out)
        return values / (quantized.scales[:, None] * weights_scale)


def two_stage_delta(
    holder: CoefficientKeyHolder,
    stage1: CoefficientStage,
    stage2: CoefficientStage,
    x: np.ndarray,
    counters: OpCounters | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(Δ, bound): s·X·A·B through both stages with the key holder between them, and the bound
    on |Δ − s·X·A·B| per entry. Both roles run here: a measurement, not a deployment."""
    h, r = stage1.weights.values.shape
    h_out = stage2.weights.values.shape[1]
    params, tokens = holder.context.params, x.shape[0]
    first = choose_blocks(params.ring_degree, tokens, h, r)
    second = choose_blocks(params.ring_degree, tokens, r, h_out)
    check_capacity(params, 2.0**holder.input_bits, stage1.weights.values, first)
    check_capacity(params, 2.0**holder.input_bits, stage2.weights.values, second)
    ct, xq = holder.encrypt(x, r)
    u = holder.decrypt(stage1.apply(ct, tokens, counters), xq, stage1.weights.scale, h, r)
    bound1 = stage_bound(x, xq.scales, stage1.weights, error_std(stage1.weights.values, first, params.sigma))
    ct2, uq = holder.encrypt(u, h_out)
    delta = holder.decrypt(stage2.apply(ct2, tokens, counters), uq, stage2.weights.scale, r, h_out)
    noise2 = error_std(stage2.weights.values, second, params.sigma)
    # stage 2 sees u = x·A + ε₁ (|ε₁| ≤ bound1): its own bound at |u| + bound1, plus ε₁ through |s·B|
    carried = bound1 @ np.abs(stage2.weights.source)
    bound2 = stage_bound(np.abs(u) + bound1, uq.scales, stage2.weights, noise2)
    return delta, bound2 + carried
