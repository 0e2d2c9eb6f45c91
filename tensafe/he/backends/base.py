"""The narrow interface every CKKS backend implements for HE-LoRA.

Key-holder operations take the backend's secret-key object; evaluator operations take only the
public context (the parameter set and the key holder's public key, which names the session; no
evaluator operation needs more than ciphertexts and plaintext weights). Ciphertexts travel
as `CiphertextBatch`-like objects of the backend: one ciphertext per packed column, all at the
same level and scale.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from tensafe.he.counters import OpCounters
from tensafe.he.params import CKKSParameters


class CKKSBackend(ABC):
    """One CKKS implementation: own kernels (NumPy/CuPy) or OpenFHE."""

    name: ClassVar[str]

    def __init__(self, params: CKKSParameters):
        self.params = params

    # --- key holder -------------------------------------------------------------------------
    @abstractmethod
    def generate_keys(self) -> tuple[Any, Any]:
        """(secret key, public context). Only the public context may leave the key holder."""

    @abstractmethod
    def encrypt(self, secret: Any, columns: np.ndarray) -> Any:
        """Encrypt each row of `columns` (n × t, t ≤ slots, float64) into the slots of one ciphertext."""

    @abstractmethod
    def decrypt(self, secret: Any, batch: Any) -> np.ndarray:
        """Decrypt every ciphertext of `batch`; returns (n × slots) float64 (real parts)."""

    def chain(self) -> tuple[int, ...]:
        """The modulus chain this backend really uses, q0 first (OpenFHE picks its own primes)."""
        return self.params.moduli

    def secret_slot_norm2(self, secret: Any) -> float | None:
        """max_j |s(ζ_j)|² of the secret key, for precision bounds; None where the key is opaque."""
        return None

    # --- evaluator --------------------------------------------------------------------------
    @abstractmethod
    def linear_map(self, public: Any, batch: Any, weights: np.ndarray, counters: OpCounters) -> Any:
        """out_i = Σ_j batch_j · weights[j, i] (ct×scalar products and additions), then one rescale.

        `weights` is (n_in × n_out) float64; the result has n_out ciphertexts one level lower at the
        same scale. Counts every scheme operation into `counters`.
        """

    # --- wire -------------------------------------------------------------------------------
    @abstractmethod
    def batch_to_bytes(self, batch: Any) -> bytearray: ...

    def adopt(self, public: Any, batch: Any) -> Any:
        """A batch fresh from `batch_from_bytes`, made ready for fast arithmetic in this context
        (bit-for-bit the same ciphertexts). The default: nothing to do."""
        return batch

    @abstractmethod
    def batch_from_bytes(self, public: Any, data: bytes, max_bytes: int) -> Any: ...

    @abstractmethod
    def public_to_bytes(self, public: Any) -> bytearray: ...

    @abstractmethod
    def public_from_bytes(self, data: bytes, max_bytes: int) -> Any: ...

    @abstractmethod
    def batch_info(self, batch: Any) -> tuple[int, int, float]:
        """(number of ciphertexts, level, scale) of a batch."""
