"""The own-kernel CKKS backend (tensafe.kernels on NumPy or CuPy) behind the CKKSBackend interface.

Payload of a ciphertext batch (inside the tensafe.he.wire envelope):
    count u32 | level u8 | scale f64 | seeded u8 | [seed 32 B] | c0 rows | [c1 rows]
Each row (one prime) is count·N residues packed little-endian in ⌈bits(q)/8⌉ bytes each. A fresh
batch carries the seed of its uniform halves instead of c1, which halves the upload.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tensafe.he import wire
from tensafe.he.backends.base import CKKSBackend
from tensafe.he.ckks import CiphertextBatch, CKKSContext, PublicKey, SecretKey
from tensafe.he.counters import OpCounters
from tensafe.he.errors import BackendUnavailable, SerializationError
from tensafe.he.params import CKKSParameters
from tensafe.kernels import compiled
from tensafe.kernels.sampling import SEED_BYTES
from tensafe.kernels.xp import array_module, run_blocks, to_numpy

_BATCH_HEAD = struct.Struct("<IBdB")


@dataclass(frozen=True)
class KernelPublicContext:
    """What an evaluator holds: the parameter set and the key holder's public key. No secret."""

    params: CKKSParameters
    public_key: PublicKey


class KernelCKKSBackend(CKKSBackend):
    """RNS-CKKS on tensafe.kernels; `array_module` is numpy (he=ckks_numpy) or cupy (he=ckks_cupy)."""

    name: ClassVar[str] = "ckks_numpy"
    array_module_name: ClassVar[str] = "numpy"

    def __init__(self, params: CKKSParameters):
        super().__init__(params)
        try:
            xp = array_module(self.array_module_name)
        except (ImportError, RuntimeError) as err:
            raise BackendUnavailable(
                f"he={self.name} needs {self.array_module_name} on a CUDA device ({err}); "
                "use he=ckks_numpy here"
            ) from None
        self.ctx = CKKSContext(params, xp)

    # --- key holder -------------------------------------------------------------------------
    def generate_keys(self) -> tuple[SecretKey, KernelPublicContext]:
        sk = self.ctx.generate_secret_key()
        return sk, KernelPublicContext(self.params, self.ctx.generate_public_key(sk))

    def encrypt(self, secret: SecretKey, columns: np.ndarray) -> CiphertextBatch:
        return self.ctx.encrypt_symmetric(secret, columns)

    def decrypt(self, secret: SecretKey, batch: CiphertextBatch) -> np.ndarray:
        return self.ctx.decrypt(secret, batch)

    def secret_slot_norm2(self, secret: SecretKey) -> float:
        return float((np.abs(self.ctx.encoder.to_slots(secret.s_coeffs.astype(np.float64))) ** 2).max())

    # --- evaluator --------------------------------------------------------------------------
    def linear_map(self, public, batch: CiphertextBatch, weights: np.ndarray, counters: OpCounters):
        out = self.ctx.linear_map(batch, weights)
        n_in, n_out = np.shape(weights)
        counters.ct_scalar_mults += n_in * n_out
        counters.additions += (n_in - 1) * n_out
        counters.rescales += n_out
        counters.levels_used += 1
        return out

    def batch_info(self, batch: CiphertextBatch) -> tuple[int, int, float]:
        return batch.count, batch.level, batch.scale

    # --- wire -------------------------------------------------------------------------------
    def batch_to_bytes(self, batch: CiphertextBatch) -> bytearray:
        seeded = batch.seed is not None
        head = _BATCH_HEAD.pack(batch.count, batch.level, batch.scale, seeded) + (batch.seed or b"")
        sections, size = self._sections(batch.count, batch.level, seeded)
        kind, backend = wire.Kind.CIPHERTEXT_BATCH, wire.BackendId.KERNELS
        frame = wire.open_frame(kind, backend, self.params, len(head) + size)
        frame[wire.payload_offset : wire.payload_offset + len(head)] = head
        body = np.frombuffer(frame, dtype=np.uint8, count=size, offset=wire.payload_offset + len(head))

        def one(rows: slice) -> None:
            for poly, i, width, base in sections:
                block = to_numpy(batch.data[rows, poly, i])
                start = base + rows.start * self.params.ring_degree * width
                if compiled.available():
                    compiled.pack_residues(block, width, body[start : start + block.size * width])
                else:
                    body[start : start + block.size * width] = wire.pack_residues(block, width)

        run_blocks(one, self.ctx.row_blocks(batch.count, batch.level + 1), np)
        return wire.seal(frame)

    def batch_from_bytes(
        self, public, data: bytes, max_bytes: int = wire.DEFAULT_MAX_BYTES
    ) -> CiphertextBatch:
        kind, backend = wire.Kind.CIPHERTEXT_BATCH, wire.BackendId.KERNELS
        payload = wire.unpack(data, kind, backend, self.params, max_bytes)
        if len(payload) < _BATCH_HEAD.size:
            raise SerializationError("ciphertext batch truncated: no batch header")
        count, level, scale, seeded = _BATCH_HEAD.unpack_from(payload)
        if level > self.params.depth or seeded > 1 or not (scale > 0) or count < 1:
            raise SerializationError(f"ciphertext batch header invalid (count {count}, level {level})")
        offset, n = _BATCH_HEAD.size, self.params.ring_degree
        seed = None
        if seeded:
            seed, offset = bytes(payload[offset : offset + SEED_BYTES]), offset + SEED_BYTES
        sections, size = self._sections(count, level, bool(seeded))
        if len(payload) != offset + size:
            raise SerializationError(
                f"ciphertext batch is {len(payload)} bytes, its header implies {offset + size}"
            )
        body = np.frombuffer(payload, dtype=np.uint8, offset=offset)
        xp = self.ctx.xp
        out = xp.empty((count, 2, level + 1, n), dtype=xp.uint64)
        out_of_range: list[int] = []

        def one(rows: slice) -> None:
            for poly, i, width, base in sections:
                start = base + rows.start * n * width
                data = body[start : start + (rows.stop - rows.start) * n * width]
                q = self.params.moduli[i]
                if xp is np and compiled.available():
                    if not compiled.unpack_residues(data, width, q, out[rows, poly, i]):
                        out_of_range.append(q)
                        return
                    continue
                block = wire.unpack_residues(data, width, n)
                if (block >= np.uint64(q)).any():
                    out_of_range.append(q)
                    return
                out[rows, poly, i] = xp.asarray(block)
            if seed is not None:
                out[rows, 1] = self.ctx.expand_seed(seed, rows, level + 1)

        run_blocks(one, self.ctx.row_blocks(count, level + 1), xp)
        if out_of_range:
            raise SerializationError(f"ciphertext batch holds a residue ≥ its modulus {out_of_range[0]}")
        return CiphertextBatch(out, scale, seed)

    def _sections(self, count: int, level: int, seeded: bool) -> tuple[list[tuple[int, int, int, int]], int]:
        """(poly, prime index, bytes per residue, byte offset) of each packed row, and the total size."""
        sections, offset = [], 0
        for poly in (0,) if seeded else (0, 1):
            for i, q in enumerate(self.params.moduli[: level + 1]):
                width = wire.residue_bytes(q)
                sections.append((poly, i, width, offset))
                offset += count * self.params.ring_degree * width
        return sections, offset

    def public_to_bytes(self, public: KernelPublicContext) -> bytearray:
        keys = (public.public_key.b_eval, public.public_key.a_eval)
        rows = [wire.pack_residues(to_numpy(k)[i], 8) for k in keys
                for i in range(len(self.params.moduli))]
        return wire.pack(wire.Kind.PUBLIC_CONTEXT, wire.BackendId.KERNELS, self.params, *rows)

    def public_from_bytes(self, data: bytes, max_bytes: int = wire.DEFAULT_MAX_BYTES) -> KernelPublicContext:
        payload = wire.unpack(data, wire.Kind.PUBLIC_CONTEXT, wire.BackendId.KERNELS, self.params, max_bytes)
        n, L = self.params.ring_degree, len(self.params.moduli)
        if len(payload) != 2 * L * n * 8:
            raise SerializationError(f"public context is {len(payload)} bytes, expected {2 * L * n * 8}")
        keys = np.frombuffer(payload, dtype="<u8").reshape(2, L, n).astype(np.uint64)
        if (keys >= np.array(self.params.moduli, dtype=np.uint64)[None, :, None]).any():
            raise SerializationError("public context holds a residue ≥ its modulus")
        xp = self.ctx.xp
        pk = PublicKey(self.params.digest, xp.asarray(keys[0]), xp.asarray(keys[1]))
        return KernelPublicContext(self.params, pk)


class CupyCKKSBackend(KernelCKKSBackend):
    """The same kernels with xp = CuPy (he=ckks_cupy)."""

    name: ClassVar[str] = "ckks_cupy"
    array_module_name: ClassVar[str] = "cupy"

