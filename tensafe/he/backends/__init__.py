"""HE backends by config name (`he=`). Each class imports its array library or OpenFHE lazily."""

from __future__ import annotations

from tensafe.he.backends.base import CKKSBackend
from tensafe.he.backends.kernels import CupyCKKSBackend, KernelCKKSBackend
from tensafe.he.backends.openfhe_backend import OpenFHEBackend
from tensafe.he.errors import HEError
from tensafe.he.params import CKKSParameters, resolve_parameters

BACKENDS: dict[str, type[CKKSBackend]] = {
    cls.name: cls for cls in (KernelCKKSBackend, CupyCKKSBackend, OpenFHEBackend)
}


def build_backend(name: str, params: CKKSParameters) -> CKKSBackend:
    if name not in BACKENDS:
        raise HEError(f"he={name!r}: not an HE backend; choose one of {sorted(BACKENDS)} (or off)")
    return BACKENDS[name](params)


def backend_from_config(he) -> CKKSBackend | None:
    """The backend an `he` config group chooses (None for he=off), with its parameter set resolved."""
    if he.backend == "off":
        return None
    params = resolve_parameters(he.params, he.max_tokens, he.precision_bits, he.value_bits, he.allow_insecure)
    return build_backend(he.backend, params)
