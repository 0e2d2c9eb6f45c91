"""Typed errors of the HE layer; each message says what to change.

Each class has a stable `code`, the name it travels under between an HE evaluator service and its
client (`by_code` maps it back): renaming a class never changes the protocol.
"""

from __future__ import annotations

from typing import ClassVar

from tensafe.errors import UserError


class HEError(UserError):
    """Base class for every error the HE layer raises on bad input. Raised by an evaluator service's
    client, it also carries the HTTP `status` and the `wire_code` the service answered."""

    code: ClassVar[str] = "he_error"
    status: int | None = None
    wire_code: str | None = None


class InsecureParameters(HEError):
    """A parameter set below 128-bit security (HE Standard table) without `allow_insecure: true`."""

    code = "insecure_parameters"


class ParameterMismatch(HEError):
    """A ciphertext, key or context made under another parameter set (digests differ)."""

    code = "parameter_mismatch"


class SlotOverflow(HEError):
    """More tokens than the parameter set has slots."""

    code = "slot_overflow"


class LevelExhausted(HEError):
    """A rescale or multiplication asked for a level the modulus chain no longer has."""

    code = "level_exhausted"


class ValueOutOfRange(HEError):
    """A value too large for the parameter set's headroom: it would wrap modulo q and decrypt wrong."""

    code = "value_out_of_range"


class SerializationError(HEError):
    """Bytes that are not a well-formed, intact TenSafe HE object of the expected kind."""

    code = "serialization_error"


class BackendUnavailable(HEError):
    """The configured HE backend cannot run in this interpreter or on this machine."""

    code = "backend_unavailable"


_BY_CODE = {cls.code: cls for cls in (
    HEError, InsecureParameters, ParameterMismatch, SlotOverflow, LevelExhausted, ValueOutOfRange,
    SerializationError, BackendUnavailable,
)}


def by_code(code: str | None) -> type[HEError]:
    """The error class a wire code names (HEError for a code this version does not know)."""
    return _BY_CODE.get(code or "", HEError)
