"""Canonical JSON: RFC 8785 (JSON Canonicalization Scheme) for everything that is hashed or signed,
and the strict parser that reads it back.

`canonical_json` is the maintained `rfc8785` package (ECMAScript number formatting, keys sorted by
UTF-16 code units, integers within ±(2^53 − 1)). `parse_canonical` accepts only bytes that *are*
the canonical form of what they parse to, so a verifier checks the bytes on disk, never a
re-serialisation: duplicate keys, NaN and infinities, out-of-range numbers, whitespace, other
key orders and nesting deeper than `MAX_DEPTH` are refused with a CanonicalError, not a crash.
"""

from __future__ import annotations

import json
import math
from typing import Any

import rfc8785

NAME = "RFC 8785"
MAX_DEPTH = 64  # headers, records and statements nest a handful of levels


class CanonicalError(ValueError):
    """A value that has no canonical JSON form, or bytes that are not canonical JSON."""


def _depth_ok(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Any
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 bytes of `value` (dicts, lists, strings, ints, finite floats, bools, None)."""
    if not _depth_ok(value, MAX_DEPTH):
        raise CanonicalError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as err:
        raise CanonicalError(str(err)) from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise CanonicalError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise CanonicalError(f"number {text[:24]} is out of range")
    return value


def _constant(name: str) -> Any:
    raise CanonicalError(f"{name} is not JSON")


def strict_loads(data: bytes | str) -> Any:
    """JSON with no duplicate keys, no NaN or infinities and bounded nesting; CanonicalError otherwise."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        value = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_float=_finite, parse_constant=_constant
        )
    except CanonicalError:
        raise
    except UnicodeDecodeError:
        raise CanonicalError("not UTF-8") from None
    except RecursionError:
        raise CanonicalError(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:  # JSONDecodeError, and ints past Python's digit limit
        raise CanonicalError(f"not JSON ({str(err)[:80]})") from None
    if not _depth_ok(value, MAX_DEPTH):
        raise CanonicalError(f"nested deeper than {MAX_DEPTH} levels")
    return value


def parse_canonical(data: bytes) -> Any:
    """The value whose RFC 8785 form is exactly `data`; CanonicalError for anything else."""
    value = strict_loads(data)
    if canonical_json(value) != bytes(data):
        raise CanonicalError(f"not in {NAME} canonical form (the bytes differ from their canonical encoding)")
    return value
