"""The TenSafe HE envelope: a versioned, size-limited, checksummed frame around a backend payload.

    magic "TSHE" | version u16 | kind u8 | backend u8 | parameter-set digest (32 B) |
    payload length u64 | payload | SHA-256 of everything before it (32 B)

The digest binds every object to one parameter set; a frame of another kind (a secret key where a
ciphertext batch is expected) is refused before its payload is parsed. The checksum catches
truncation and corruption; it is not a signature: authenticity is the transport's job (TLS,
signed packages).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from typing import Protocol

import numpy as np

from tensafe.he.errors import ParameterMismatch, SerializationError

MAGIC = b"TSHE"
VERSION = 2  # 2: OpenFHE payloads carry residues, not OpenFHE serializations
_HEADER = struct.Struct("<4sHBB32sQ")
_TRAILER = 32
DEFAULT_MAX_BYTES = 1 << 31  # he.max_message_bytes


class Parameters(Protocol):
    """What a frame binds to: a parameter set's name and digest (CKKS or coefficient-encoded)."""

    @property
    def name(self) -> str: ...

    @property
    def digest(self) -> str: ...


class Kind(enum.IntEnum):
    CIPHERTEXT_BATCH = 1
    PUBLIC_CONTEXT = 2
    SECRET_KEY = 3
    COEFFICIENT_CONTEXT = 4  # coefficient packing: the ring, the prime and the key holder's input bits
    COEFFICIENT_UPLOAD = 5  # seeded ciphertexts from the key holder
    COEFFICIENT_RESULT = 6  # an evaluator's products, back to the key holder
    PRIVATE_CONTEXT = 7  # circuit-private coefficient packing: the ring, two primes, a public key
    PRIVATE_UPLOAD = 8  # its seeded, lifted ciphertexts
    PRIVATE_RESULT = 9  # its re-randomised, flooded results: the output coefficients of b, all of a


class BackendId(enum.IntEnum):
    KERNELS = 1  # ckks_numpy and ckks_cupy share one format
    OPENFHE = 2


def pack(kind: Kind, backend: BackendId, params: Parameters, *parts) -> bytearray:
    """One frame around the concatenated payload `parts` (bytes-like), built in a single buffer."""
    views = [memoryview(p).cast("B") for p in parts]
    frame = open_frame(kind, backend, params, sum(len(v) for v in views))
    pos = _HEADER.size
    for view in views:
        frame[pos : pos + len(view)] = view
        pos += len(view)
    return seal(frame)


def open_frame(kind: Kind, backend: BackendId, params: Parameters, length: int) -> bytearray:
    """A frame with its header written and `length` payload bytes (from `payload_offset`) for the
    caller to fill in place; `seal` it afterwards."""
    frame = bytearray(_HEADER.size + length + _TRAILER)
    _HEADER.pack_into(frame, 0, MAGIC, VERSION, kind, backend, bytes.fromhex(params.digest), length)
    return frame


payload_offset = _HEADER.size


def seal(frame: bytearray) -> bytearray:
    """Write the checksum of a frame from `open_frame` once its payload is in place."""
    frame[-_TRAILER:] = hashlib.sha256(memoryview(frame)[:-_TRAILER]).digest()
    return frame


def kind_of(data) -> Kind:
    """The kind a frame says it is (unchecked: `unpack` checks everything); for a receiver that
    accepts more than one kind, before it chooses the parameters to check the frame against."""
    data = memoryview(data).cast("B")
    if len(data) < _HEADER.size or bytes(data[:4]) != MAGIC:
        raise SerializationError("not a TenSafe HE message (bad magic bytes or truncated header)")
    kind = _HEADER.unpack_from(data)[2]
    if kind not in Kind._value2member_map_:
        raise SerializationError(f"unknown HE message kind {kind}")
    return Kind(kind)


def _check_size(data: memoryview, max_bytes: int) -> None:
    if len(data) > max_bytes:
        raise SerializationError(
            f"HE message of {len(data)} bytes exceeds he.max_message_bytes={max_bytes}; "
            "send fewer ciphertexts per message or raise the limit"
        )


def split(data, max_frames: int, max_bytes: int) -> list[memoryview]:
    """The frames of a body that holds 1 … `max_frames` of them back to back (each frame's header
    says its length), unchecked inside: `unpack` checks each one. Anything but whole frames is
    refused."""
    data = memoryview(data).cast("B")
    _check_size(data, max_bytes)
    frames: list[memoryview] = []
    pos = 0
    while pos < len(data):
        if len(frames) == max_frames:
            raise SerializationError(f"more than {max_frames} HE frames in one body; refused")
        if len(data) - pos < _HEADER.size + _TRAILER:
            raise SerializationError("HE message truncated: a frame shorter than its header")
        end = pos + _HEADER.size + _HEADER.unpack_from(data, pos)[5] + _TRAILER
        if end > len(data):
            raise SerializationError("HE message truncated: a frame runs past the body")
        frames.append(data[pos:end])
        pos = end
    if not frames:
        raise SerializationError("HE message truncated: the body is empty")
    return frames


def unpack(data, kind: Kind, backend: BackendId, params: Parameters, max_bytes: int) -> memoryview:
    """A read-only view of the payload of a frame, after every check; raises a typed error naming
    what is wrong."""
    data = memoryview(data).cast("B")
    _check_size(data, max_bytes)
    if len(data) < _HEADER.size + _TRAILER:
        raise SerializationError(f"HE message truncated: {len(data)} bytes is shorter than a header")
    magic, version, got_kind, got_backend, digest, length = _HEADER.unpack_from(data)
    if bytes(magic) != MAGIC:
        raise SerializationError("not a TenSafe HE message (bad magic bytes)")
    if version != VERSION:
        raise SerializationError(f"HE message format version {version} is not supported (this is {VERSION})")
    if got_kind != kind:
        name = Kind(got_kind).name if got_kind in Kind._value2member_map_ else str(got_kind)
        raise SerializationError(f"expected a {kind.name.lower()} message, got {name.lower()}; refused")
    if got_backend != backend:
        raise SerializationError(
            f"HE message comes from backend {got_backend}, this side runs {backend.name.lower()}; "
            "both sides must use the same he= backend"
        )
    if digest.hex() != params.digest:
        raise ParameterMismatch(
            f"HE message was made under parameter set {digest.hex()[:12]}…, this side uses "
            f"{params.name} ({params.digest[:12]}…); both sides must use the same he.params"
        )
    expected = _HEADER.size + length + _TRAILER
    if len(data) != expected:
        raise SerializationError(f"HE message truncated or padded: {len(data)} bytes, header says {expected}")
    body = data[:-_TRAILER]
    if not hmac.compare_digest(hashlib.sha256(body).digest(), bytes(data[-_TRAILER:])):
        raise SerializationError("HE message corrupted or tampered: checksum mismatch")
    return body[_HEADER.size :].toreadonly()


def residue_bytes(q: int) -> int:
    """Bytes per residue modulo q on the wire."""
    return (q.bit_length() + 7) // 8


def pack_residues(row: np.ndarray, width: int) -> np.ndarray:
    """Residues as `width` little-endian bytes each (a flat uint8 array)."""
    return np.ascontiguousarray(row, dtype="<u8").reshape(-1, 1).view(np.uint8)[:, :width].reshape(-1)


def unpack_residues(data: np.ndarray, width: int, n: int) -> np.ndarray:
    """The inverse of `pack_residues`: (len / width / n, n) uint64 residues."""
    full = np.zeros((data.size // width, 8), dtype=np.uint8)
    full[:, :width] = data.reshape(-1, width)
    return full.view("<u8").reshape(-1, n).astype(np.uint64)
