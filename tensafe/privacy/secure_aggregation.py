"""Secure aggregation of integer vectors among the workers of one job (docs/distributed.md).

Every worker holds an integer vector (its quantized clipped sum plus its share of the noise); the
job learns their sum modulo 2^k and nothing else about any one of them:

- **Session.** At the start of every attempt each worker makes fresh X25519 (agreement) and
  Ed25519 (signing) keys and publishes its `PartyCard`. The session id hashes the run id and all
  cards, so a restarted attempt is a new session with new keys.
- **Masks.** Workers i < j that are neighbours in the session's graph share a secret
  HKDF(X25519(i, j)). The mask of step s and chunk c is the AES-128-CTR keystream under the key
  HKDF(secret, session, s, c), read as 32-bit words when k ≤ 32 (64-bit ones above) mod 2^k; i
  adds it and j subtracts it, so masks cancel in the sum. A key is used for exactly one
  (session, step, chunk): `Party.mask` refuses a (step, chunk) it already masked, and a new
  attempt has new keys, so a keystream is never reused.
- **Neighbours.** SecAgg+ (Bell et al., CCS 2020): the graph is a circulant (Harary) graph of even
  degree k on a permutation of the ranks drawn from the session id, so each worker derives k masks
  rather than n − 1. A worker's vector stays hidden unless all of its neighbours collude.
- **Sum and integrity.** The masked vectors are added exactly (as int64, each below 2^k). Once a
  worker holds the step's sum it publishes one signed random challenge; the challenges of all
  workers seed the sketch coefficients, which nobody can know while any sum is still in transit
  (each worker's own challenge is drawn after its sum arrived). Each worker then publishes a
  signed sketch of its masked vector: for each of four rows, the bilinear form uᵀ M v of the
  vector laid out as a SKETCH_WIDTH-column matrix M. Every worker checks that the sketches add
  up to its sum's. A missing, duplicated, replayed or badly signed challenge or sketch, or a
  vector tampered with on the way into the sum, raises `AggregationError`: nothing is silently
  summed. A nonzero error E passes a row only if uᵀ E v = 0, a nonzero polynomial of degree 2 in
  16-bit coefficients: probability ≤ 2/2^16 (Schwartz–Zippel), so ≤ 2^-60 for the four rows. (A
  worker that lies about its own sketch only changes its own input, which secure aggregation does
  not vouch for.)

Dropout is not recovered within a step: Ray restarts the whole worker group when a worker dies,
and the restarted attempt opens a new session.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tensafe.kernels.sampling import ChaChaStream

PROTOCOL = b"tensafe/secagg/v1"
CHUNK = 1 << 20  # coordinates per chunk (each chunk is masked, summed and checked on its own)
SKETCH_ROWS = 4
_MASK_BLOCK = 1 << 15  # coordinates of keystream made at a time: 256 KiB, within a core's cache
_SKETCH_BLOCK = 32  # matrix rows sketched at a time: 256 KiB of float64 per digit
_DIGIT = 26  # bits of an entry per float64 product: 2^26 · 2^16 · 2^10 < 2^53, exact in float64
SKETCH_WIDTH = 1 << 10  # columns of the sketch's matrix layout
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


@dataclass(frozen=True)
class SketchKey:
    """The sketch's coefficients for one (session, step, chunk, transcript): per row, u over the
    matrix layout's rows and v over its SKETCH_WIDTH columns, each in [0, 2^16)."""

    u: np.ndarray  # SKETCH_ROWS × rows, int64
    v: np.ndarray  # SKETCH_WIDTH × SKETCH_ROWS, float64

    @classmethod
    def derive(cls, session_id: bytes, step: int, chunk: int, transcript: bytes, size: int) -> SketchKey:
        rows = -(-size // SKETCH_WIDTH)
        label = PROTOCOL + b"/sketch" + session_id + struct.pack("<QI", step, chunk)
        seed = hashlib.sha256(label + transcript)
        words = np.frombuffer(
            ChaChaStream(seed.digest()).bytes(2 * SKETCH_ROWS * (rows + SKETCH_WIDTH)), dtype=np.uint16
        )
        u = words[: SKETCH_ROWS * rows].reshape(SKETCH_ROWS, rows).astype(np.int64)
        v = words[SKETCH_ROWS * rows :].reshape(SKETCH_ROWS, SKETCH_WIDTH).T.astype(np.float64)
        return cls(u, v)

    def sketch(self, values: np.ndarray, bits: int) -> list[int]:
        """uᵀ M v per row, exactly, for M the entries of `values` (non-negative integers below
        2^bits) laid out in SKETCH_WIDTH columns, zero-padded: each entry's _DIGIT-bit digits go
        through one float64 product with v (sums < 2^26 · 2^16 · 2^10 = 2^52, exact), a cache-sized
        block of rows at a time; the digits' sums, split in 21-bit halves, then meet u in int64."""
        rows = self.u.shape[1]
        flat = np.ascontiguousarray(values)
        if flat.size != rows * SKETCH_WIDTH:
            flat = np.concatenate([flat, np.zeros(rows * SKETCH_WIDTH - flat.size, dtype=flat.dtype)])
        matrix, word = flat.reshape(rows, SKETCH_WIDTH), flat.dtype.type
        digits, low_bits = -(-bits // _DIGIT), word((1 << _DIGIT) - 1)
        inner = np.empty((rows, digits, SKETCH_ROWS), dtype=np.int64)  # each < 2^52
        for start in range(0, rows, _SKETCH_BLOCK):
            block = matrix[start : start + _SKETCH_BLOCK]
            for g in range(digits):
                part = block >> word(_DIGIT * g) if g else block
                if g < digits - 1:
                    part = part & low_bits
                inner[start : start + _SKETCH_BLOCK, g] = part.astype(np.float64) @ self.v
        high, low = inner >> 21, inner & ((1 << 21) - 1)
        out = []
        for r in range(SKETCH_ROWS):
            u = self.u[r]
            h, lo = u @ high[:, :, r], u @ low[:, :, r]  # per digit, each < 2^16 · 2^31 · rows < 2^63
            out.append(sum(((int(h[g]) << 21) + int(lo[g])) << (_DIGIT * g) for g in range(digits)))
        return out


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
        # masks are words of 32 bits where the modulus allows (half the keystream), else 64
        self.word = np.dtype(np.uint32 if modulus_bits <= 32 else np.uint64)
        self.modulus_mask = self.word.type((1 << modulus_bits) - 1)
        self._sum_bits = modulus_bits + (n - 1).bit_length()  # a sum of n masked words is below 2^this
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
        self._lock = threading.Lock()
        self._challenged: dict[int, bytes] = {}  # own challenge per step, until sketched
        self._buffers = threading.local()  # per thread: the keystream block's input and output

    # --- masking ------------------------------------------------------------------------------

    def _add_stream(self, out: np.ndarray, peer: int, step: int, chunk: int) -> None:
        """out ± the keystream of (peer, step, chunk) as words, mod 2^32 or 2^64, a cache-sized
        block at a time into a reused buffer (fresh d-word buffers cost more than AES itself)."""
        info = PROTOCOL + b"/mask" + struct.pack("<QI", step, chunk)
        key = _hkdf(self._secrets[peer], self.session_id, info, 16)
        encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        size = self.word.itemsize
        local = self._buffers.__dict__
        if local.get("size") != size:
            local["size"] = size
            local["zeros"], local["block"] = bytes(size * _MASK_BLOCK), bytearray(size * _MASK_BLOCK + 16)
        zeros, block = local["zeros"], local["block"]
        combine = np.add if self.rank < peer else np.subtract
        for start in range(0, out.size, _MASK_BLOCK):
            part = out[start : start + _MASK_BLOCK]
            written = encryptor.update_into(zeros[: size * part.size], block)
            combine(part, np.frombuffer(block, dtype=self.word, count=written // size), out=part)

    def mask(self, step: int, chunk: int, values: np.ndarray) -> np.ndarray:
        """`values` (integers, of any sign) mod 2^k plus this party's pairwise masks, mod 2^k, as
        `self.word`s. Each (step, chunk) can be masked once per session."""
        with self._lock:
            if (step, chunk) in self._masked:
                raise AggregationError(
                    f"step {step} chunk {chunk} was already masked in this session; a mask is never reused"
                )
            self._masked.add((step, chunk))
        out = values.astype(self.word)  # two's complement, reduced mod 2^32 or 2^64
        for peer in self.neighbours:
            self._add_stream(out, peer, step, chunk)
        np.bitwise_and(out, self.modulus_mask, out=out)
        return out

    # --- challenges and sketches ---------------------------------------------------------------

    def _signed(self, payload: bytes) -> bytes:
        return payload + self.keys.signing.sign(payload)

    def challenge(self, step: int, chunks: int) -> bytes:
        """A signed fresh random challenge for step `step` (of `chunks` chunks), drawn once this
        party holds the step's sum."""
        message = self._signed(_HEADER.pack(self.session_id, step, chunks, self.rank, os.urandom(32)))
        self._challenged[step] = message
        return message

    def _verified(self, messages: Sequence[bytes], step: int, chunks: int, what: str) -> list[bytes]:
        """The payloads of one signed message per rank for (session, step, chunks), in rank order."""
        many = "sketches" if what == "sketch" else f"{what}s"
        if len(messages) != self.n:
            raise AggregationError(f"step {step}: {len(messages)} {many} for {self.n} parties")
        payloads: list[bytes | None] = [None] * self.n
        for message in messages:
            payload, signature = message[:-_SIGNATURE], message[-_SIGNATURE:]
            if len(payload) < _HEADER.size:
                raise AggregationError(f"step {step}: a {what} is truncated")
            session, m_step, m_chunks, rank, _ = _HEADER.unpack(payload[: _HEADER.size])
            if session != self.session_id or (m_step, m_chunks) != (step, chunks) or not 0 <= rank < self.n:
                raise AggregationError(f"step {step}: a {what} belongs to another session or step")
            if payloads[rank] is not None:
                raise AggregationError(f"step {step}: two {many} from rank {rank}")
            try:
                self._verifiers[rank].verify(signature, payload)
            except InvalidSignature:
                raise AggregationError(f"step {step}: rank {rank}'s {what} is not signed by it") from None
            payloads[rank] = payload
        return [p for p in payloads if p is not None]

    def _seed(self, step: int, chunks: int, challenges: Sequence[bytes]) -> bytes:
        """The sketch seed of a step: every rank's verified challenge, in rank order."""
        return hashlib.sha256(b"".join(self._verified(challenges, step, chunks, "challenge"))).digest()

    def sketch(
        self, step: int, masked: Sequence[np.ndarray], challenges: Sequence[bytes], map_chunks: Any = map
    ) -> bytes:
        """One signed message with the sketch of each of this party's masked chunks, under the
        coefficients the challenges seed; `map_chunks` (e.g. a thread pool's map) runs the chunks."""
        chunks = len(masked)
        seed = self._seed(step, chunks, challenges)
        mine = self._challenged.pop(step, None)
        if mine is None or mine not in challenges:
            raise AggregationError(f"step {step}: this party's challenge is not the one it made")

        def one(c: int) -> bytes:
            key = SketchKey.derive(self.session_id, step, c, seed, masked[c].size)
            return b"".join(v.to_bytes(16, "little") for v in key.sketch(masked[c], self.bits))

        body = b"".join(map_chunks(one, range(chunks)))
        digest = hashlib.sha256(body).digest()
        return self._signed(_HEADER.pack(self.session_id, step, chunks, self.rank, digest) + body)

    def unmask(
        self,
        step: int,
        challenges: Sequence[bytes],
        totals: Sequence[np.ndarray],
        sketches: Sequence[bytes],
        map_chunks: Any = map,
    ) -> list[np.ndarray]:
        """Each chunk's sum mod 2^k as signed integers in [-2^(k-1), 2^(k-1)), once verified; the
        int64 `totals` (the exact sums of the masked words) are centred in place."""
        chunks = len(totals)
        seed = self._seed(step, chunks, challenges)
        size = 16 * SKETCH_ROWS
        bodies = []
        for body in self._verified(sketches, step, chunks, "sketch"):
            values = body[_HEADER.size :]
            if (
                len(values) != size * chunks
                or hashlib.sha256(values).digest() != body[_HEADER.size - 32 : _HEADER.size]
            ):
                raise AggregationError(f"step {step}: a sketch is malformed")
            bodies.append(values)

        def one(c: int) -> np.ndarray:
            total = totals[c]
            if total.dtype != np.int64 or total.view(np.uint64).max(initial=0) >= self.n << self.bits:
                raise AggregationError(f"step {step} chunk {c}: the sum is out of range: tampered")
            claimed = [
                sum(int.from_bytes(b[c * size + 16 * r : c * size + 16 * (r + 1)], "little") for b in bodies)
                for r in range(SKETCH_ROWS)
            ]
            key = SketchKey.derive(self.session_id, step, c, seed, total.size)
            if claimed != key.sketch(total, self._sum_bits):
                raise AggregationError(
                    f"step {step} chunk {c}: the sum is not the sum of the workers' vectors: "
                    "a share was tampered with or left out"
                )
            return self._centred(total)

        return list(map_chunks(one, range(chunks)))

    def _centred(self, total: np.ndarray) -> np.ndarray:
        # ((total + 2^(k-1)) mod 2^k) - 2^(k-1), in place in uint64 (which wraps), read as int64
        half, words = np.uint64(1 << (self.bits - 1)), total.view(np.uint64)
        np.add(words, half, out=words)
        np.bitwise_and(words, np.uint64((1 << self.bits) - 1), out=words)
        np.subtract(words, half, out=words)
        return total
