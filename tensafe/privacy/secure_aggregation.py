"""Secure aggregation of integer vectors among the workers of one job (docs/distributed.md).

Every worker holds an integer vector (its quantized clipped sum plus its share of the noise); the
job learns their sum modulo 2^k and nothing else about any one of them:

- **Session.** At the start of every attempt each worker makes fresh X25519 (agreement) and
  Ed25519 (signing) keys and publishes its `PartyCard`. The session id hashes the run id and all
  cards, so a restarted attempt is a new session with new keys.
- **Masks.** Workers i < j that are neighbours in the session's graph share a secret
  HKDF(X25519(i, j)). The mask of step s and chunk c is the AES-128-CTR keystream under the key
  HKDF(secret, session, s, c), read as integers mod 2^k; i adds it and j subtracts it, so masks
  cancel in the sum. A key is used for exactly one (session, step, chunk): `Party.mask` refuses a
  (step, chunk) it already masked, and a new attempt has new keys, so a keystream is never reused.
- **Neighbours.** SecAgg+ (Bell et al., CCS 2020): the graph is a circulant (Harary) graph of even
  degree k on a permutation of the ranks drawn from the session id, so each worker derives k masks
  rather than n − 1. A worker's vector stays hidden unless all of its neighbours collude.
- **Sum and integrity.** Before the sum each worker publishes a signed commitment to its masked
  vector (SHA-256). The masked vectors are then added exactly (as int64, each below 2^k). Last,
  each worker publishes a signed linear sketch A·m of its masked vector, for a matrix A derived
  from the commitments and the digest of the sum; every worker checks that the sketches add up to
  A·sum. A missing, duplicated or badly signed commitment or sketch, or a vector tampered with on
  the way into the sum, raises `AggregationError`: nothing is silently summed. (A forged sum passes
  with probability at most 2^-64: four rows of 16-bit coefficients.)

Dropout is not recovered within a step: Ray restarts the whole worker group when a worker dies,
and the restarted attempt opens a new session.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tensafe.kernels.sampling import ChaChaStream

PROTOCOL = b"tensafe/secagg/v1"
CHUNK = 1 << 20  # coordinates per chunk: keeps the float64 sketch exact (2^16 · 2^16 · 2^20 < 2^53)
SKETCH_ROWS = 4
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw
_CARD = struct.Struct("<I32s32s")
_HEADER = struct.Struct("<32sQII32s")  # session, step, chunk, rank, digest
_SIGNATURE = 64


class AggregationError(RuntimeError):
    """The aggregate cannot be trusted: a share is missing, duplicated, forged or tampered with."""


@dataclass(frozen=True)
class PartyCard:
    """A worker's public keys for one session."""

    rank: int
    agreement: bytes  # X25519 public key
    signing: bytes  # Ed25519 public key

    def to_bytes(self) -> bytes:
        return _CARD.pack(self.rank, self.agreement, self.signing)

    @classmethod
    def from_bytes(cls, data: bytes) -> PartyCard:
        if len(data) != _CARD.size:
            raise AggregationError(f"a party card has {_CARD.size} bytes, got {len(data)}")
        rank, agreement, signing = _CARD.unpack(data)
        return cls(rank, agreement, signing)


@dataclass
class PartyKeys:
    """Fresh key pairs for one session; never stored."""

    agreement: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    signing: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    def card(self, rank: int) -> PartyCard:
        return PartyCard(
            rank,
            self.agreement.public_key().public_bytes(*_RAW),
            self.signing.public_key().public_bytes(*_RAW),
        )


def default_degree(n: int) -> int:
    """SecAgg+'s neighbour count: 2⌈log₂ n⌉ (even), or everyone else when that is fewer."""
    return min(n - 1, 2 * math.ceil(math.log2(n))) if n > 1 else 0


def neighbour_graph(n: int, degree: int, session_id: bytes) -> list[frozenset[int]]:
    """The session's circulant graph of `degree` on a permutation of range(n) drawn from the
    session id: every rank's set of neighbours (symmetric, no self-loops)."""
    if n < 1:
        raise ValueError(f"a session has at least one party, got {n}")
    if degree >= n - 1:
        return [frozenset(range(n)) - {i} for i in range(n)]
    if degree < 1 or degree % 2:
        raise ValueError(f"the neighbour degree is even and >= 2 below n - 1, got {degree} for n={n}")
    stream = ChaChaStream(hashlib.sha256(PROTOCOL + b"/graph" + session_id).digest())
    order = list(range(n))
    for i in range(n - 1, 0, -1):  # Fisher-Yates; modulo bias of a 64-bit word is below 2^-50
        j = int(stream.words(1)[0] % np.uint64(i + 1))
        order[i], order[j] = order[j], order[i]
    position = {rank: p for p, rank in enumerate(order)}
    return [
        frozenset(
            order[(position[i] + offset) % n] for offset in range(-degree // 2, degree // 2 + 1) if offset
        )
        for i in range(n)
    ]


def _hkdf(secret: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def _sketch_matrix(session_id: bytes, step: int, chunk: int, transcript: bytes, size: int) -> np.ndarray:
    seed = hashlib.sha256(PROTOCOL + b"/sketch" + session_id + struct.pack("<QI", step, chunk) + transcript)
    words = np.frombuffer(ChaChaStream(seed.digest()).bytes(2 * SKETCH_ROWS * size), dtype=np.uint16)
    return words.reshape(SKETCH_ROWS, size).astype(np.float64)


def _sketch(matrix: np.ndarray, values: np.ndarray) -> list[int]:
    """A·v exactly, for v of int64 entries in [0, 2^63): the four 16-bit limbs of every entry
    (little-endian words) in one matrix product, each of its sums below 2^53."""
    limbs = np.ascontiguousarray(values, dtype="<i8").view("<u2").reshape(-1, 4).astype(np.float64)
    sums = matrix @ limbs  # rows × 4
    return [sum(int(sums[r, limb]) << (16 * limb) for limb in range(4)) for r in range(SKETCH_ROWS)]


class Party:
    """One worker's side of a session: masks its vectors and checks everyone else's."""

    def __init__(
        self,
        run_id: str,
        keys: PartyKeys,
        cards: Sequence[PartyCard],
        rank: int,
        modulus_bits: int,
        degree: int | None = None,
    ):
        n = len(cards)
        if sorted(c.rank for c in cards) != list(range(n)):
            raise AggregationError(f"the session's cards must hold ranks 0..{n - 1} once each")
        if keys.card(rank) != cards[rank]:
            raise AggregationError(f"rank {rank}'s card in the session is not this party's")
        if not 2 <= modulus_bits <= 62 or n * (1 << modulus_bits) >= 1 << 63:
            raise ValueError(f"modulus_bits={modulus_bits} with {n} parties overflows the int64 sum")
        self.rank, self.n, self.bits = rank, n, modulus_bits
        self.modulus_mask = np.uint64((1 << modulus_bits) - 1)
        self.cards = sorted(cards, key=lambda c: c.rank)
        self.keys = keys
        self.session_id = hashlib.sha256(
            PROTOCOL + b"/session" + run_id.encode() + b"".join(c.to_bytes() for c in self.cards)
        ).digest()
        self.degree = default_degree(n) if degree is None else min(degree, n - 1)
        self.neighbours = sorted(neighbour_graph(n, self.degree, self.session_id)[rank])
        self._verifiers = [Ed25519PublicKey.from_public_bytes(c.signing) for c in self.cards]
        self._secrets = {
            j: _hkdf(
                keys.agreement.exchange(X25519PublicKey.from_public_bytes(self.cards[j].agreement)),
                self.session_id,
                PROTOCOL + b"/pair" + struct.pack("<II", min(rank, j), max(rank, j)),
                32,
            )
            for j in self.neighbours
        }
        self._masked: set[tuple[int, int]] = set()
        self._buffers: dict[int, tuple[bytes, bytearray]] = {}  # keystream input and output per size
        self._matrix_of: tuple[bytes, np.ndarray] | None = None  # the last sketch matrix, by seed

    # --- masking ------------------------------------------------------------------------------

    def _stream_into(self, peer: int, step: int, chunk: int, zeros: bytes, buffer: bytearray) -> np.ndarray:
        """The keystream of (peer, step, chunk) as uint64 words, written into `buffer` (reused:
        a fresh 8·d-byte allocation per neighbour costs more in page faults than AES itself)."""
        info = PROTOCOL + b"/mask" + struct.pack("<QI", step, chunk)
        key = _hkdf(self._secrets[peer], self.session_id, info, 16)
        encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        written = encryptor.update_into(zeros, buffer)
        return np.frombuffer(buffer, dtype=np.uint64, count=written // 8)

    def mask(self, step: int, chunk: int, values: np.ndarray) -> np.ndarray:
        """`values` (integers mod 2^k, as uint64) plus this party's pairwise masks, mod 2^k.
        Each (step, chunk) can be masked once per session."""
        if (step, chunk) in self._masked:
            raise AggregationError(
                f"step {step} chunk {chunk} was already masked in this session; a mask is never reused"
            )
        self._masked.add((step, chunk))
        out = values.astype(np.uint64) & self.modulus_mask
        if values.size not in self._buffers:
            self._buffers[values.size] = bytes(8 * values.size), bytearray(8 * values.size + 16)
        zeros, buffer = self._buffers[values.size]
        for peer in self.neighbours:
            stream = self._stream_into(peer, step, chunk, zeros, buffer)
            (np.add if self.rank < peer else np.subtract)(out, stream, out=out)  # uint64 wraps mod 2^64
        np.bitwise_and(out, self.modulus_mask, out=out)
        return out

    # --- commitments and sketches ---------------------------------------------------------------

    def _signed(self, payload: bytes) -> bytes:
        return payload + self.keys.signing.sign(payload)

    def commit(self, step: int, chunk: int, masked: np.ndarray) -> bytes:
        digest = hashlib.sha256(masked.astype(np.uint64).tobytes()).digest()
        return self._signed(_HEADER.pack(self.session_id, step, chunk, self.rank, digest))

    def _verified(self, messages: Sequence[bytes], step: int, chunk: int, what: str) -> list[bytes]:
        """The payloads of one signed message per rank for (session, step, chunk), in rank order."""
        if len(messages) != self.n:
            raise AggregationError(f"step {step} chunk {chunk}: {len(messages)} {what}s for {self.n} parties")
        payloads: list[bytes | None] = [None] * self.n
        for message in messages:
            payload, signature = message[:-_SIGNATURE], message[-_SIGNATURE:]
            if len(payload) < _HEADER.size:
                raise AggregationError(f"step {step} chunk {chunk}: a {what} is truncated")
            session, m_step, m_chunk, rank, _ = _HEADER.unpack(payload[: _HEADER.size])
            if session != self.session_id or (m_step, m_chunk) != (step, chunk) or not 0 <= rank < self.n:
                raise AggregationError(
                    f"step {step} chunk {chunk}: a {what} belongs to another session or step"
                )
            if payloads[rank] is not None:
                raise AggregationError(f"step {step} chunk {chunk}: two {what}s from rank {rank}")
            try:
                self._verifiers[rank].verify(signature, payload)
            except InvalidSignature:
                raise AggregationError(
                    f"step {step} chunk {chunk}: rank {rank}'s {what} is not signed by it"
                ) from None
            payloads[rank] = payload
        return [p for p in payloads if p is not None]

    def sketch(
        self, step: int, chunk: int, masked: np.ndarray, commitments: Sequence[bytes], total: np.ndarray
    ) -> bytes:
        """Signed A·masked, A drawn from the commitments and the sum (after both are fixed)."""
        self._verified(commitments, step, chunk, "commitment")
        own = hashlib.sha256(masked.astype(np.uint64).tobytes()).digest()
        if _HEADER.unpack(self._own(commitments)[: _HEADER.size])[4] != own:
            raise AggregationError(f"step {step} chunk {chunk}: this party's commitment is not of its vector")
        matrix = self._matrix(step, chunk, commitments, total)
        body = b"".join(v.to_bytes(16, "little") for v in _sketch(matrix, masked.astype(np.int64)))
        digest = hashlib.sha256(body).digest()
        return self._signed(_HEADER.pack(self.session_id, step, chunk, self.rank, digest) + body)

    def _own(self, commitments: Sequence[bytes]) -> bytes:
        for message in commitments:
            if _HEADER.unpack(message[: _HEADER.size])[3] == self.rank:
                return message
        raise AggregationError("this party's own commitment is missing")

    def _matrix(self, step: int, chunk: int, commitments: Sequence[bytes], total: np.ndarray) -> np.ndarray:
        ordered = sorted(commitments, key=lambda m: _HEADER.unpack(m[: _HEADER.size])[3])
        transcript = hashlib.sha256(b"".join(ordered) + total.astype(np.int64).tobytes()).digest()
        seed = struct.pack("<QI", step, chunk) + transcript
        if self._matrix_of is None or self._matrix_of[0] != seed:  # sketch, then unmask, use one
            self._matrix_of = seed, _sketch_matrix(self.session_id, step, chunk, transcript, total.size)
        return self._matrix_of[1]

    def unmask(
        self,
        step: int,
        chunk: int,
        commitments: Sequence[bytes],
        total: np.ndarray,
        sketches: Sequence[bytes],
    ) -> np.ndarray:
        """The sum mod 2^k as signed integers in [-2^(k-1), 2^(k-1)), once the sum is verified."""
        self._verified(commitments, step, chunk, "commitment")
        bodies = self._verified(sketches, step, chunk, "sketch")
        total = np.asarray(total, dtype=np.int64)
        if total.min(initial=0) < 0 or total.max(initial=0) >= self.n << self.bits:
            raise AggregationError(f"step {step} chunk {chunk}: the sum is out of range: tampered")
        claimed = [0] * SKETCH_ROWS
        for body in bodies:
            values = body[_HEADER.size :]
            if (
                len(values) != 16 * SKETCH_ROWS
                or hashlib.sha256(values).digest() != body[_HEADER.size - 32 : _HEADER.size]
            ):
                raise AggregationError(f"step {step} chunk {chunk}: a sketch is malformed")
            for r in range(SKETCH_ROWS):
                claimed[r] += int.from_bytes(values[16 * r : 16 * (r + 1)], "little")
        if claimed != _sketch(self._matrix(step, chunk, commitments, total), total):
            raise AggregationError(
                f"step {step} chunk {chunk}: the sum is not the sum of the committed vectors: "
                "a share was tampered with or left out"
            )
        wrapped = total.astype(np.uint64) & self.modulus_mask
        signed = wrapped.astype(np.int64)
        signed[wrapped >= np.uint64(1 << (self.bits - 1))] -= np.int64(1 << self.bits)
        return signed
