"""RNS-CKKS on tensafe.kernels: keys, encryption, decryption, and the operations HE-LoRA uses.

Ciphertexts live in coefficient representation, so an evaluator never runs an NTT: ct×scalar,
additions, the exact modular GEMM and rescale are all coefficient-wise. Only the key holder
transforms (a·s at encryption, c1·s at decryption). Arrays are (count, 2, L, n) uint64 on `xp`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from tensafe.he.encoder import Encoder
from tensafe.he.errors import HEError, LevelExhausted, ParameterMismatch, ValueOutOfRange
from tensafe.he.params import CKKSParameters
from tensafe.kernels import compiled, modular, sampling
from tensafe.kernels.gemm import ModularMatmul
from tensafe.kernels.modular import Moduli
from tensafe.kernels.ntt import NTT
from tensafe.kernels.sampling import SEED_BYTES, ChaChaStream
from tensafe.kernels.xp import run_blocks, to_numpy

_MAX_INT_WEIGHT = 2.0**62
_BLOCK_WORDS = 1 << 16


@dataclass(frozen=True, repr=False)
class SecretKey:
    """The ternary secret s, in NTT form over the full chain. Never leaves the key holder."""

    params_digest: str
    s_eval: Any  # xp uint64 (L, n)
    s_coeffs: np.ndarray  # int64 (n,) in {−1, 0, 1}

    def __repr__(self) -> str:
        return f"SecretKey(params={self.params_digest[:12]}…)"


@dataclass(frozen=True)
class PublicKey:
    """(b, a) = (−a·s + e, a) in NTT form over the full chain; used for public-key encryption."""

    params_digest: str
    b_eval: Any
    a_eval: Any


@dataclass
class CiphertextBatch:
    """`count` ciphertexts at one level and scale; c1 == expand(seed) when `seed` is set."""

    data: Any  # xp uint64 (count, 2, L, n)
    scale: float
    seed: bytes | None = None

    @property
    def count(self) -> int:
        return self.data.shape[0]

    @property
    def level(self) -> int:
        return self.data.shape[2] - 1


class CKKSContext:
    """The scheme for one parameter set on one array module."""

    def __init__(self, params: CKKSParameters, xp: ModuleType = np):
        self.params, self.xp, self.n = params, xp, params.ring_degree
        self.moduli = Moduli.build(params.moduli, xp)
        self._ntt = NTT(self.n, self.moduli)
        self._levels = {len(params.moduli): (self.moduli, self._ntt)}
        self.encoder = Encoder(self.n)

    def at(self, count: int) -> tuple[Moduli, NTT]:
        """Moduli and NTT for the first `count` primes (level count − 1)."""
        if count not in self._levels:
            self._levels[count] = (self.moduli.prefix(count), self._ntt.prefix(count))
        return self._levels[count]

    # --- keys -------------------------------------------------------------------------------
    def generate_secret_key(self) -> SecretKey:
        s = sampling.ternary(ChaChaStream(), self.n)
        s_eval = self._ntt.forward(self._to_rns(s[None, :], len(self.moduli))[0])
        return SecretKey(self.params.digest, s_eval, s)

    def generate_public_key(self, sk: SecretKey) -> PublicKey:
        self._check_key(sk)
        stream = ChaChaStream()
        a_eval = self.xp.asarray(sampling.uniform_rns(stream, self.params.moduli, (self.n,)))
        e = sampling.discrete_gaussian(stream, self.n, self.params.sigma)
        e_eval = self._ntt.forward(self._to_rns(e[None, :], len(self.moduli))[0])
        b_eval = modular.sub(e_eval, self._ntt.multiply(a_eval, sk.s_eval), self.moduli)
        return PublicKey(self.params.digest, b_eval, a_eval)

    # --- encoding ---------------------------------------------------------------------------
    def encode(self, values: np.ndarray, scale: float, count: int | None = None):
        """(k, t) slot values → (k, L, n) residues of round(scale · m) over the first `count` primes."""
        values = self._check_values(values)
        return self._to_rns(self.encoder.encode(values, scale), count or len(self.moduli))

    def _check_values(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        limit = 2.0**self.params.value_bits
        if values.size and np.abs(values).max() >= limit:
            raise ValueOutOfRange(
                f"|value| = {np.abs(values).max():.4g} ≥ 2^{self.params.value_bits}: it would wrap modulo q; "
                "scale the inputs down or raise he.value_bits"
            )
        return values

    def _to_rns(self, coeffs: np.ndarray, count: int):
        m, _ = self.at(count)
        return modular.reduce_signed(self.xp.asarray(coeffs)[..., None, :], m)

    # --- encryption / decryption ------------------------------------------------------------
    def expand_seed(self, seed: bytes, rows: slice, primes: int):
        """The uniform c1 halves of fresh ciphertexts rows.start … rows.stop − 1 (coefficient form).

        Ciphertext j's half is drawn from the ChaCha20 stream of (seed, label j), so any block of a
        batch expands on its own.
        """
        moduli, n = self.params.moduli[:primes], self.n
        labels = range(rows.start, rows.stop)
        halves = [sampling.uniform_rns(ChaChaStream(seed, j), moduli, (n,)) for j in labels]
        return self.xp.asarray(np.stack(halves))

    def row_blocks(self, count: int, primes: int) -> list[slice]:
        """Blocks of ciphertexts of about 2^16 words per polynomial: the unit of work that stays in
        cache (fresh multi-hundred-megabyte temporaries cost more in page faults than in arithmetic)."""
        step = max(1, _BLOCK_WORDS // (primes * self.n))
        return [slice(s, min(count, s + step)) for s in range(0, count, step)]

    def encrypt_symmetric(self, sk: SecretKey, values: np.ndarray) -> CiphertextBatch:
        """Secret-key encryption of each row of `values`: (−a·s + m + e, a), with a expanded from a seed."""
        self._check_key(sk)
        values = self._check_values(values)
        m, ntt, xp = self.moduli, self._ntt, self.xp
        k, primes = values.shape[0], len(self.moduli)
        seed = os.urandom(SEED_BYTES)
        out = xp.empty((k, 2, primes, self.n), dtype=xp.uint64)

        def one(rows: slice) -> None:
            plain = self._to_rns(self.encoder.encode(values[rows], self.params.scale), primes)
            a = self.expand_seed(seed, rows, primes)
            e = self._to_rns(self._gaussian(ChaChaStream(), rows.stop - rows.start), primes)
            a_s = ntt.inverse(ntt.multiply(ntt.forward(a), sk.s_eval))
            out[rows, 0] = modular.sub(modular.add(plain, e, m), a_s, m)
            out[rows, 1] = a

        run_blocks(one, self.row_blocks(k, primes), xp)
        return CiphertextBatch(out, self.params.scale, seed)

    def encrypt_public(self, pk: PublicKey, values: np.ndarray) -> CiphertextBatch:
        """Public-key encryption of each row: (v·b + e0 + m, v·a + e1), v ternary."""
        self._check_key(pk)
        plain = self.encode(values, self.params.scale)
        zero = self._zero_encryptions(pk, plain.shape[0], len(self.moduli), plain)
        return CiphertextBatch(zero, self.params.scale)

    def _zero_encryptions(self, pk: PublicKey, k: int, primes: int, plain=None):
        m, ntt = self.at(primes)
        stream = ChaChaStream()
        v = ntt.forward(self._to_rns(sampling.ternary(stream, k * self.n).reshape(k, self.n), primes))
        e0, e1 = (self._to_rns(self._gaussian(stream, k), primes) for _ in range(2))
        c0 = modular.add(ntt.inverse(ntt.multiply(v, pk.b_eval[:primes])), e0, m)
        if plain is not None:
            c0 = modular.add(c0, plain, m)
        c1 = modular.add(ntt.inverse(ntt.multiply(v, pk.a_eval[:primes])), e1, m)
        return self.xp.stack([c0, c1], axis=1)

    def _gaussian(self, stream: ChaChaStream, k: int) -> np.ndarray:
        return sampling.discrete_gaussian(stream, k * self.n, self.params.sigma).reshape(k, self.n)

    def decrypt(self, sk: SecretKey, batch: CiphertextBatch) -> np.ndarray:
        """(count, slots) real slot values.

        Uses q0 alone when the message fits it (scale · 2^value_bits < q0/2), else exact CRT.
        """
        self._check_key(sk)
        q0 = self.params.moduli[0]
        primes = 1 if batch.scale * 2.0**self.params.value_bits < q0 / 2 else batch.level + 1
        m, ntt = self.at(primes)
        s = sk.s_eval[:primes]
        out = np.empty((batch.count, self.params.slots))

        def one(rows: slice) -> None:
            c = batch.data[rows, :, :primes]
            raw = modular.add(c[:, 0], ntt.inverse(ntt.multiply(ntt.forward(c[:, 1]), s)), m)
            if primes == 1:
                coeffs = to_numpy(modular.center(raw[:, 0], m))
            else:
                coeffs = _crt_center(to_numpy(raw), self.params.moduli[:primes])
            out[rows] = self.encoder.decode(coeffs, batch.scale)

        run_blocks(one, self.row_blocks(batch.count, primes), self.xp)
        return out

    # --- evaluation (public operations only) ------------------------------------------------
    def add(self, x: CiphertextBatch, y: CiphertextBatch) -> CiphertextBatch:
        if x.data.shape != y.data.shape or not math.isclose(x.scale, y.scale, rel_tol=1e-9):
            raise HEError(
                f"cannot add ciphertexts at (level {x.level}, scale {x.scale:.4g}) and "
                f"(level {y.level}, scale {y.scale:.4g})"
            )
        m, _ = self.at(x.level + 1)
        return CiphertextBatch(modular.add(x.data, y.data, m), x.scale)

    def integer_weights(self, weights: np.ndarray, level: int) -> tuple[np.ndarray, int]:
        """Real weights as integers at scale q_level (the prime the next rescale drops)."""
        if level < 1:
            raise LevelExhausted(
                "the ciphertexts are at level 0: no prime is left to rescale by; HE-LoRA uses "
                f"{self.params.depth} levels, use a parameter set with a longer chain"
            )
        q_last = self.params.moduli[level]
        scaled = np.rint(np.asarray(weights, dtype=np.float64) * q_last)
        if scaled.size and np.abs(scaled).max() >= _MAX_INT_WEIGHT:
            raise ValueOutOfRange(f"a weight of magnitude {np.abs(weights).max():.4g} is too large to encode")
        return scaled.astype(np.int64), q_last

    def mul_scalar(self, batch: CiphertextBatch, value: float) -> CiphertextBatch:
        """ct × scalar, encoded at scale q_level; the result's scale is scale · q_level (rescale next)."""
        (w,), q_last = self.integer_weights(np.array([value]), batch.level)
        m, _ = self.at(batch.level + 1)
        w_res = modular.scalar_residues(int(w), m)
        return CiphertextBatch(modular.mul(batch.data, w_res, m), batch.scale * q_last)

    def mul_plain(self, batch: CiphertextBatch, values: np.ndarray) -> CiphertextBatch:
        """ct × plaintext (slot-wise product), plaintext encoded at scale q_level; rescale next."""
        primes = batch.level + 1
        _, q_last = self.integer_weights(np.zeros(1), batch.level)
        m, ntt = self.at(primes)
        encoded = self.encoder.encode(np.asarray(values, dtype=np.float64)[None], q_last)
        plain = self._to_rns(encoded, primes)
        product = ntt.inverse(ntt.multiply(ntt.forward(batch.data), ntt.forward(plain)[:, None]))
        return CiphertextBatch(product, batch.scale * q_last)

    def rescale(self, batch: CiphertextBatch) -> CiphertextBatch:
        """Divide by the last prime with rounding and drop it: one level down."""
        if batch.level < 1:
            raise LevelExhausted("cannot rescale a level-0 ciphertext: the modulus chain is used up")
        m, _ = self.at(batch.level + 1)
        return CiphertextBatch(modular.divide_round_by_last(batch.data, m), batch.scale / m.values[-1])

    def linear_map(self, batch: CiphertextBatch, weights: np.ndarray) -> CiphertextBatch:
        """out_i = Σ_j ct_j · weights[j, i] as one exact modular GEMM, then one rescale.

        GEMM and rescale are both coefficient-wise, so they run fused over cache-sized blocks of
        coefficients and the unrescaled product is never held whole.
        """
        weights = np.asarray(weights, dtype=np.float64)
        if weights.ndim != 2 or weights.shape[0] != batch.count:
            raise HEError(f"weights of shape {weights.shape} do not map {batch.count} ciphertexts")
        integer, q_last = self.integer_weights(weights, batch.level)
        m, _ = self.at(batch.level + 1)
        if self.xp is np and compiled.available():
            w = np.ascontiguousarray(integer.T)
            magnitude = int(np.abs(w).max()) if w.size else 0
            fused = compiled.plan(m.values, magnitude.bit_length(), w.shape[1])
            if fused is not None:
                pool = lambda fn, blocks: run_blocks(fn, blocks, np)  # noqa: E731
                return CiphertextBatch(compiled.linear_map_rescale(batch.data, w, fused, pool), batch.scale)
        gemm = ModularMatmul(integer.T, m)
        rescaled = gemm(
            batch.data, epilogue=lambda block: modular.divide_round_by_last(block, m), rows_out=batch.level
        )
        return CiphertextBatch(rescaled, batch.scale)

    def _check_key(self, key) -> None:
        if key.params_digest != self.params.digest:
            raise ParameterMismatch(
                f"the key was made under parameter set {key.params_digest[:12]}…, this context uses "
                f"{self.params.name}; generate keys for he.params={self.params.name}"
            )


def _crt_center(residues: np.ndarray, moduli: tuple[int, ...]) -> np.ndarray:
    """Exact CRT of (k, L, n) residues to centred integers (as float64), via Python integers."""
    big_q = math.prod(moduli)
    basis = [(big_q // q) * pow(big_q // q, -1, q) for q in moduli]
    total = sum(residues[:, i].astype(object) * basis[i] for i in range(len(moduli))) % big_q
    centred = np.where(total > big_q // 2, total - big_q, total)
    return centred.astype(np.float64)
