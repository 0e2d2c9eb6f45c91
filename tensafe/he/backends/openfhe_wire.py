"""OpenFHE objects on the wire without OpenFHE's parser ever reading a byte from the network.

OpenFHE's binary deserializer (cereal) trusts its input: a length field of 2^62, a polymorphic id
or a modulus of zero in a checksum-valid frame raises SIGFPE, SIGSEGV, an uncaught C++ exception,
or allocates gigabytes. So the TenSafe OpenFHE payloads carry numbers only, and the receiver
builds every OpenFHE object from a serialization it made itself:

- A ciphertext travels as its RNS residues, 2 elements × towers × N unsigned 64-bit integers in
  OpenFHE's evaluation form, with the level (towers = depth + 1 − level) and the key tag.
- A public key travels as its key tag and its residues (2 × (depth + 1) × N).

The receiver keeps one `Template` per object shape: OpenFHE's serialization of an object it
created (a ciphertext encrypted under the session's public key at that level; a throwaway key
pair of its own context), with the byte ranges of the residues located. Every received residue is
checked against its tower's modulus, then written into a copy of the template, and only that
copy goes to OpenFHE's deserializer: every structural byte (lengths, ids, parameters, the
context) is the receiver's own, so a crafted frame can choose residues in [0, q) and nothing
else. A frame's size is fixed by its count and level, so memory is bounded by the frame's length.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import numpy as np

from tensafe.he.errors import HEError, SerializationError

_U64 = struct.Struct("<Q")
_TAG = re.compile(rb"[0-9a-f]{8,64}")
_RESIDUE = np.dtype("<u8")
TAG_FIELD = 64  # bytes: a key tag, zero-padded (keeps the residues that follow 8-byte aligned)


@dataclass(frozen=True)
class Template:
    """OpenFHE's serialization of one object of a shape, and where its residues lie in it."""

    blob: bytes
    regions: tuple[tuple[int, int], ...]  # byte ranges, element-major then tower (q0 first)
    moduli: np.ndarray  # (towers,) uint64: tower t's modulus
    ring_degree: int
    tag: tuple[int, int] | None = None  # byte range of the key tag, for keys

    @property
    def towers(self) -> int:
        return len(self.moduli)

    @property
    def elements(self) -> int:
        return len(self.regions) // self.towers

    @property
    def residue_count(self) -> int:
        return len(self.regions) * self.ring_degree


def locate(blob: bytes, ring_degree: int, moduli, elements: int = 2) -> tuple[tuple[int, int], ...]:
    """Byte ranges of the residue vectors of a serialized OpenFHE object made here (trusted input).

    cereal writes each tower as `u64 N | N × u64 residues | u64 modulus`, towers in order, element
    after element; the header bytes between towers vary (objects written in full or as back
    references), so each tower is found by its length prefix and the modulus that follows it.
    """
    n_prefix, regions, pos = _U64.pack(ring_degree), [], 0
    for _ in range(elements):
        for q in moduli:
            modulus = _U64.pack(int(q))
            while True:
                at = blob.find(n_prefix, pos)
                if at < 0:
                    raise HEError(
                        "he=openfhe: this OpenFHE's serialization has no tower layout TenSafe knows "
                        "(u64 N, N residues, modulus); another OpenFHE version?"
                    )
                end = at + _U64.size + _U64.size * ring_degree
                if blob[end : end + _U64.size] == modulus:
                    regions.append((at + _U64.size, end))
                    pos = end + _U64.size
                    break
                pos = at + 1
    return tuple(regions)


def template(blob: bytes, ring_degree: int, moduli, elements: int = 2, tag: bytes | None = None) -> Template:
    """The template of one of this side's own objects (`tag`: its key tag, for a public key)."""
    tag_range = None
    if tag is not None:
        marker = _U64.pack(len(tag)) + tag
        at = blob.find(marker)
        if at < 0 or blob.find(marker, at + 1) >= 0:
            raise HEError("he=openfhe: the key tag is not where TenSafe expects it in OpenFHE's output")
        tag_range = (at + _U64.size, at + len(marker))
    regions = locate(blob, ring_degree, moduli, elements)
    return Template(bytes(blob), regions, np.asarray(moduli, dtype=np.uint64), ring_degree, tag_range)


def residues(blob: bytes, ring_degree: int, moduli, elements: int = 2) -> np.ndarray:
    """The residues of one of this side's own serialized objects, (elements·towers·N,) uint64."""
    regions = locate(blob, ring_degree, moduli, elements)
    view = memoryview(blob)
    return np.concatenate([np.frombuffer(view[s:e], dtype=_RESIDUE) for s, e in regions])


def pack_tag(tag: str) -> bytes:
    """A key tag in its fixed-size field (ASCII, zero-padded)."""
    raw = tag.encode()
    if not _TAG.fullmatch(raw):
        raise HEError(f"he=openfhe: key tag {tag[:80]!r} is not the hex identifier TenSafe expects")
    return raw.ljust(TAG_FIELD, b"\0")


def unpack_tag(field: bytes | memoryview, what: str) -> bytes:
    """A received key tag field, checked to be what `pack_tag` writes."""
    tag = bytes(field).rstrip(b"\0")
    if not _TAG.fullmatch(tag) or bytes(field) != tag.ljust(TAG_FIELD, b"\0"):
        raise SerializationError(f"{what}: the key tag is not a hex identifier of 8 to 64 characters")
    return tag


def check_residues(values: np.ndarray, moduli: np.ndarray, what: str) -> None:
    """Refuse any residue at or above its tower's modulus. `values`: (..., towers, N)."""
    bad = values >= moduli[:, None]
    if bad.any():
        index = np.argwhere(bad)[0]
        raise SerializationError(
            f"{what}: residue {tuple(int(i) for i in index)} is not below its tower's modulus"
        )


def build(t: Template, values: np.ndarray, tag: bytes | None = None) -> bytes:
    """A copy of the template's serialization with `values` ((elements·towers·N,) uint64, already
    checked) as its residues, and `tag` as its key tag (same length as the template's)."""
    out = bytearray(t.blob)
    flat = np.ascontiguousarray(values, dtype=_RESIDUE).data.cast("B")
    step = t.ring_degree * _U64.size
    for k, (start, end) in enumerate(t.regions):
        out[start:end] = flat[k * step : (k + 1) * step]
    if tag is not None:
        if t.tag is None:
            raise SerializationError("openfhe: this template holds no key tag")
        start, end = t.tag
        if len(tag) != end - start:
            raise SerializationError(f"openfhe key tag: {len(tag)} characters, OpenFHE writes {end - start}")
        out[start:end] = tag
    return bytes(out)
