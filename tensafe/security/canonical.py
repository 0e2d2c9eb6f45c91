"""Canonical JSON: one encoding for everything that is hashed or signed (RFC 8785 JCS subset).

Keys sorted by their UTF-16 code units, no insignificant whitespace, UTF-8, integers as integers.
Floats are refused except where finite (written with Python's shortest round-trip repr, which
matches JCS for the values configs and ledgers hold); NaN and infinity are refused.
"""

from __future__ import annotations

import json
import math
from typing import Any


class CanonicalError(ValueError):
    """A value that has no canonical JSON form."""


def _check(value: Any, path: str = "$") -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise CanonicalError(f"{path}: {value} has no JSON form")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CanonicalError(f"{path}: key {key!r} is not a string")
            _check(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
    elif not isinstance(value, (str, int, float, bool)) and value is not None:
        raise CanonicalError(f"{path}: {type(value).__name__} is not JSON")


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value, key=lambda k: k.encode("utf-16-be"))}
    if isinstance(value, (list, tuple)):
        return [_sorted(v) for v in value]
    return value


def canonical_json(value: Any) -> bytes:
    """The canonical bytes of `value` (dicts, lists, strings, ints, finite floats, bools, None)."""
    _check(value)
    return json.dumps(_sorted(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
