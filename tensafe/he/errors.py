"""Typed errors of the HE layer; each message says what to change."""

from __future__ import annotations

from tensafe.errors import UserError


class HEError(UserError):
    """Base class for every error the HE layer raises on bad input."""


class InsecureParameters(HEError):
    """A parameter set below 128-bit security (HE Standard table) without `allow_insecure: true`."""


class ParameterMismatch(HEError):
    """A ciphertext, key or context made under another parameter set (digests differ)."""


class SlotOverflow(HEError):
    """More tokens than the parameter set has slots."""


class LevelExhausted(HEError):
    """A rescale or multiplication asked for a level the modulus chain no longer has."""


class ValueOutOfRange(HEError):
    """A value too large for the parameter set's headroom: it would wrap modulo q and decrypt wrong."""


class SerializationError(HEError):
    """Bytes that are not a well-formed, intact TenSafe HE object of the expected kind."""


class BackendUnavailable(HEError):
    """The configured HE backend cannot run in this interpreter or on this machine."""
