"""Coefficient-encoded HE-LoRA messages inside the TenSafe HE envelope (`tensafe.he.wire`).

    context  (COEFFICIENT_CONTEXT): N u32 | q u64 | input_bits u32 | rounds u32
    upload   (COEFFICIENT_UPLOAD):  tokens u32 | T u32 | I u32 | seed (32 B) | b: T·I·N residues
    result   (COEFFICIENT_RESULT):  tokens u32 | T u32 | O u32 | b̂: T·O·N residues | â: T·O·N residues

Residues take ⌈log2 q / 8⌉ little-endian bytes each. An upload carries only b (coefficient form)
and the seed of its uniform halves (`CoefficientContext.expand`, NTT form), so it is half the size
of a full ciphertext batch; a result carries both halves in NTT form.
Every frame is bound to the parameter set's digest; a residue not below q is refused.
"""

from __future__ import annotations

import struct

import numpy as np

from tensafe.he import wire
from tensafe.he.coefficient import Ciphertexts, CoefficientParameters
from tensafe.he.errors import HEError, SerializationError

_CONTEXT = struct.Struct("<IQII")
_BATCH = struct.Struct("<III")
SEED_BYTES = 32
INPUT_BITS_RANGE = (8, 30)  # what a key holder may quantize its activations to
ROUNDS = (1, 2)  # 2: X·A, then U·s·B; 1: X·W with W = s·A·B


def pack_context(params: CoefficientParameters, input_bits: int, rounds: int = 2) -> bytearray:
    return wire.pack(
        wire.Kind.COEFFICIENT_CONTEXT,
        wire.BackendId.KERNELS,
        params,
        _CONTEXT.pack(params.ring_degree, params.modulus, input_bits, rounds),
    )


def read_context(data: bytes, max_bytes: int) -> tuple[CoefficientParameters, int, int]:
    """The parameter set (checked against the HE Standard), the key holder's input bits and the
    rounds it asks for."""
    view = memoryview(data).cast("B")
    if wire.kind_of(view) != wire.Kind.COEFFICIENT_CONTEXT or len(view) < wire.payload_offset + _CONTEXT.size:
        raise SerializationError("expected a coefficient_context message; refused")
    n, q, _, _ = _CONTEXT.unpack_from(view, wire.payload_offset)
    params = CoefficientParameters(n, q)
    payload = wire.unpack(view, wire.Kind.COEFFICIENT_CONTEXT, wire.BackendId.KERNELS, params, max_bytes)
    if len(payload) != _CONTEXT.size:
        raise SerializationError(f"a coefficient context is {_CONTEXT.size} bytes, got {len(payload)}")
    input_bits, rounds = _CONTEXT.unpack(payload)[2:]
    low, high = INPUT_BITS_RANGE
    if not low <= input_bits <= high:
        raise HEError(f"a coefficient context's input bits must lie in [{low}, {high}], got {input_bits}")
    if rounds not in ROUNDS:
        raise HEError(f"a coefficient context asks for {rounds} rounds; coefficient HE-LoRA has 1 or 2")
    return params, input_bits, rounds


def pack_upload(params: CoefficientParameters, tokens: int, b: np.ndarray, seed: bytes) -> bytearray:
    width = wire.residue_bytes(params.modulus)
    return wire.pack(
        wire.Kind.COEFFICIENT_UPLOAD,
        wire.BackendId.KERNELS,
        params,
        _BATCH.pack(tokens, *b.shape[:2]),
        seed,
        wire.pack_residues(b, width),
    )


def read_upload(data: bytes, params: CoefficientParameters, max_bytes: int) -> tuple[int, np.ndarray, bytes]:
    """(tokens, b (T, I, N), seed)."""
    payload = wire.unpack(data, wire.Kind.COEFFICIENT_UPLOAD, wire.BackendId.KERNELS, params, max_bytes)
    tokens, big_t, big_i = _header(payload)
    body = payload[_BATCH.size :]
    seed, residues = bytes(body[:SEED_BYTES]), body[SEED_BYTES:]
    return tokens, _residues(residues, params, (big_t, big_i)), seed


def pack_result(params: CoefficientParameters, tokens: int, ct: Ciphertexts) -> bytearray:
    width = wire.residue_bytes(params.modulus)
    return wire.pack(
        wire.Kind.COEFFICIENT_RESULT,
        wire.BackendId.KERNELS,
        params,
        _BATCH.pack(tokens, *ct.b.shape[:2]),
        wire.pack_residues(ct.b, width),
        wire.pack_residues(ct.a, width),
    )


def read_result(data: bytes, params: CoefficientParameters, max_bytes: int) -> tuple[int, Ciphertexts]:
    """(tokens, ciphertexts (T, O, N))."""
    payload = wire.unpack(data, wire.Kind.COEFFICIENT_RESULT, wire.BackendId.KERNELS, params, max_bytes)
    tokens, big_t, big_o = _header(payload)
    body = payload[_BATCH.size :]
    half = len(body) // 2
    if len(body) % 2:
        raise SerializationError("a coefficient result holds two equal halves; refused")
    b = _residues(body[:half], params, (big_t, big_o))
    return tokens, Ciphertexts(b, _residues(body[half:], params, (big_t, big_o)), ntt=True)


def _header(payload: memoryview) -> tuple[int, int, int]:
    if len(payload) < _BATCH.size:
        raise SerializationError("coefficient batch truncated: no header")
    tokens, rows, cols = _BATCH.unpack_from(payload)
    if not (tokens and rows and cols):
        raise SerializationError(f"coefficient batch of {tokens} tokens in {rows} × {cols} blocks; refused")
    return tokens, rows, cols


def _residues(data: memoryview, params: CoefficientParameters, blocks: tuple[int, int]) -> np.ndarray:
    n, width = params.ring_degree, wire.residue_bytes(params.modulus)
    expected = blocks[0] * blocks[1] * n * width
    if len(data) != expected:
        raise SerializationError(
            f"coefficient batch of {blocks[0]} × {blocks[1]} polynomials needs "
            f"{expected} bytes of residues, got {len(data)}"
        )
    values = wire.unpack_residues(np.frombuffer(data, dtype=np.uint8), width, n)
    if values.size and values.max() >= params.modulus:
        raise SerializationError("a residue is not below the modulus; refused")
    return values.reshape(*blocks, n)
