"""HE-LoRA roles: the key holder encrypts activations and decrypts deltas; the evaluator computes
Δ = s · X·A·B on ciphertexts with A, B and s in plaintext.

Packing is column-wise over tokens (MOAI): ciphertext j holds X[:, j] for all tokens in the
batch, so stage 1 (U_k = Σ_j ct_j · A[j, k]) and stage 2 (Δ_i = Σ_k U_k · s·B[k, i]) are
ct × scalar products and additions only: two levels, zero rotations, zero key switches, and no
evaluation keys at all. The evaluator never receives, holds or parses a secret key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensafe.he import wire
from tensafe.he.backends.base import CKKSBackend
from tensafe.he.counters import OpCounters
from tensafe.he.errors import HEError, LevelExhausted, SlotOverflow, ValueOutOfRange
from tensafe.he.params import HE_LORA_DEPTH, CKKSParameters

ERROR_TAIL_SIGMAS = 7.0  # P(|N(0,1)| > 7) ≈ 2.6e-12 per output element


class KeyHolder:
    """Owns the secret key and the activations; packs, encrypts, decrypts and unpacks."""

    def __init__(self, backend: CKKSBackend, max_message_bytes: int = wire.DEFAULT_MAX_BYTES):
        self.backend, self.params, self.max_message_bytes = backend, backend.params, max_message_bytes
        self._secret, self._public = backend.generate_keys()

    def secret_slot_norm2(self) -> float | None:
        """max_j |s(ζ_j)|² of this key (for `error_bound`), where the backend exposes the key."""
        return self.backend.secret_slot_norm2(self._secret)

    def public_context(self) -> bytearray:
        """What an evaluator needs: the parameter set's digest and the public key. No secret."""
        return self.backend.public_to_bytes(self._public)

    def encrypt(self, x: np.ndarray, input_bound: float) -> Any:
        """Encrypt activations X (tokens × h_in) for an evaluator whose largest safe input is
        `input_bound` (its `Evaluator.input_bound`, which the service reports per module): larger
        inputs would make its output wrap modulo q0 silently, so they are refused here.
        Ciphertext j holds column X[:, j] in its slots."""
        x = self.check(x, input_bound)
        return self.backend.encrypt(self._secret, x.T)

    def check(self, x: np.ndarray, input_bound: float) -> np.ndarray:
        """X as float64 if it fits the slots and every |x| ≤ `input_bound`."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or not np.isfinite(x).all():
            raise HEError(f"activations must be a finite (tokens × hidden) matrix, got shape {x.shape}")
        if x.shape[0] > self.params.slots:
            raise SlotOverflow(
                f"{x.shape[0]} tokens exceed the {self.params.slots} slots of {self.params.name}; "
                "split the batch or choose a larger ring (he.params, or he.params=auto)"
            )
        bound = min(float(input_bound), 2.0**self.params.value_bits)
        if x.size and np.abs(x).max() > bound:
            raise ValueOutOfRange(
                f"max |activation| = {np.abs(x).max():.4g} exceeds {bound:.4g}, the largest input this "
                f"adapter can take without wrapping modulo q; raise he.value_bits"
            )
        return x

    def decrypt(self, batch: Any, tokens: int, outputs: int | None = None) -> np.ndarray:
        """Decrypt an evaluator's result into Δ (tokens × h_out), after checking it is shaped like one:
        `outputs` ciphertexts (h_out, when known), two levels below a fresh batch, at the scale Δ.

        The evaluator is trusted to be honest but curious: it learns nothing from the ciphertexts,
        but a reply it crafts (say c0 = 0, c1 = 1) decrypts to a function of the secret key. The
        structural checks refuse replies that are not HE-LoRA results; the deltas a reply decrypts
        to must never be shown to the evaluator."""
        count, level, scale = self.backend.batch_info(batch)
        expected_level = self.params.depth - HE_LORA_DEPTH
        if (outputs is not None and count != outputs) or level != expected_level \
                or not 0.5 <= scale / self.params.scale <= 2.0:
            raise HEError(
                f"the reply is not an HE-LoRA result: {count} ciphertexts at level {level} and scale "
                f"2^{math.log2(scale) if scale > 0 else float('-inf'):.1f}, expected "
                f"{outputs if outputs is not None else 'h_out'} at level {expected_level} and scale "
                f"2^{math.log2(self.params.scale):.1f}"
            )
        delta = self.backend.decrypt(self._secret, batch)[:, :tokens].T
        if not np.isfinite(delta).all():
            raise HEError("the reply decrypts to non-finite values; refused")
        return delta

    def to_bytes(self, batch: Any) -> bytearray:
        return self.backend.batch_to_bytes(batch)

    def from_bytes(self, data: bytes) -> Any:
        return self.backend.batch_from_bytes(self._public, data, self.max_message_bytes)


class Evaluator:
    """Owns A (h_in × r), B (r × h_out) and s in plaintext, and only a public context."""

    def __init__(
        self, backend: CKKSBackend, public_context: bytes, a: np.ndarray, b: np.ndarray, scale: float,
        max_message_bytes: int = wire.DEFAULT_MAX_BYTES,
    ):
        if not isinstance(public_context, (bytes, bytearray, memoryview)):
            raise HEError("an evaluator takes the key holder's public context as bytes, nothing else")
        self.backend, self.params, self.max_message_bytes = backend, backend.params, max_message_bytes
        self._public = backend.public_from_bytes(bytes(public_context), max_message_bytes)
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise HEError(f"LoRA factors must be A (h_in × r) and B (r × h_out), got {a.shape} and {b.shape}")
        if not (np.isfinite(a).all() and np.isfinite(b).all() and math.isfinite(scale)):
            raise HEError("LoRA factors and scale must be finite")
        if self.params.depth < HE_LORA_DEPTH:
            raise LevelExhausted(
                f"HE-LoRA needs {HE_LORA_DEPTH} levels; parameter set {self.params.name} "
                f"has {self.params.depth}"
            )
        self.a, self.sb = a, scale * b
        self.input_bound = input_bound(self.params, self.a, self.sb)
        self.last_counters = OpCounters()

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.a.shape[0], self.a.shape[1], self.sb.shape[1]

    def evaluate(self, batch: Any) -> Any:
        """Δ under encryption: stage 1 (·A, rescale), stage 2 (·s·B, rescale)."""
        count, level, _ = self.backend.batch_info(batch)
        if count != self.a.shape[0]:
            raise HEError(
                f"the batch has {count} ciphertexts, this adapter's input width is {self.a.shape[0]}"
            )
        if level < HE_LORA_DEPTH:
            raise LevelExhausted(
                f"ciphertexts at level {level} cannot take {HE_LORA_DEPTH} rescales; send fresh ones"
            )
        counters = OpCounters()
        u = self.backend.linear_map(self._public, batch, self.a, counters)
        delta = self.backend.linear_map(self._public, u, self.sb, counters)
        self.last_counters = counters
        return delta

    def load(self, data: bytes) -> Any:
        """A key holder's serialized batch, checked against this evaluator's parameter set."""
        return self.backend.adopt(self._public, self.backend.batch_from_bytes(self._public, data,
                                                                                self.max_message_bytes))

    def dump(self, batch: Any) -> bytearray:
        return self.backend.batch_to_bytes(batch)

    def evaluate_bytes(self, data: bytes) -> bytes:
        """The service form: a serialized batch in, a serialized delta out."""
        return self.dump(self.evaluate(self.load(data)))


def input_bound(params: CKKSParameters, a: np.ndarray, sb: np.ndarray) -> float:
    """The largest |x| for which no value of the computation (X, X·A, X·A·sB) reaches 2^value_bits,
    in the worst case over inputs (ℓ1 column norms)."""
    gain_1 = float(np.abs(a).sum(axis=0).max())
    gain_2 = gain_1 * float(np.abs(sb).sum(axis=0).max())
    return 2.0**params.value_bits / max(1.0, gain_1, gain_2)


@dataclass(frozen=True)
class ErrorBound:
    """|decrypted Δ − s·X·A·B| ≤ noise + quantization, per output element."""

    noise_std: float  # per-slot standard deviation of the encryption and rescale noise
    quantization: float  # exact, deterministic error from rounding A and s·B to integers / q_i
    bound: float  # ERROR_TAIL_SIGMAS · noise_std + quantization


def default_secret_slot_norm2(ring_degree: int) -> float:
    """A bound on max_j |s(ζ_j)|² that a random ternary key exceeds with probability < e^-10.

    Each |s(ζ_j)|² is close to exponential with mean 2N/3 (s has i.i.d. coefficients of variance
    2/3), so the maximum over N/2 slots stays below mean · (ln(N/2) + 10) but for that probability.
    """
    return 2 * ring_degree / 3 * (math.log(ring_degree / 2) + 10)


def error_bound(
    params: CKKSParameters, x: np.ndarray, a: np.ndarray, sb: np.ndarray,
    secret_slot_norm2: float | None = None, chain: tuple[int, ...] | None = None,
) -> ErrorBound:
    """The precision bound derived from the parameter set (Δ, N, σ, the rescale primes) and the key.

    A polynomial e with i.i.d. coefficients of variance v adds, in the real part of slot j, noise
    of variance N·v/2. Fresh secret-key encryption: v = σ² + 1/12 (Gaussian error + encoding
    rounding). A rescale adds τ0 + τ1·s with τ uniform in [−½, ½], whose slot-j variance is
    N/24 · (1 + |s(ζ_j)|²): it depends on the key, so the bound takes the key's worst slot,
    `secret_slot_norm2` = max_j |s(ζ_j)|² (the key holder knows it exactly; without it a bound that
    holds for all but a e^-10 fraction of keys is used). All at scale Δ. `chain` is the modulus
    chain the backend really used (default: the parameter set's).
    """
    n, delta = params.ring_degree, params.scale
    s2 = secret_slot_norm2 if secret_slot_norm2 is not None else default_secret_slot_norm2(n)
    q_stage1, q_stage2 = (chain or params.moduli)[-1], (chain or params.moduli)[-2]
    fresh = n / 2 * (params.sigma**2 + 1 / 12) / delta**2
    rescale = n / 24 * (1 + s2) / delta**2
    a_hat, sb_hat = np.rint(a * q_stage1) / q_stage1, np.rint(sb * q_stage2) / q_stage2
    var_u = (a_hat**2).sum(axis=0) * fresh + rescale
    var_delta = (sb_hat**2 * var_u[:, None]).sum(axis=0) + rescale
    noise_std = float(np.sqrt(var_delta.max()))
    quantization = float(np.abs(x @ a_hat @ sb_hat - x @ a @ sb).max())
    return ErrorBound(noise_std, quantization, ERROR_TAIL_SIGMAS * noise_std + quantization)
