"""SHA-256 hex digests: the one check of their form, and the pydantic type of config fields."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def is_sha256_hex(text: str) -> bool:
    """64 lowercase hex digits (what `hashlib.sha256(...).hexdigest()` writes)."""
    return isinstance(text, str) and SHA256_HEX.fullmatch(text) is not None


def _checked(text: str) -> str:
    if not is_sha256_hex(text.lower()):
        raise ValueError(f"{text[:12]!r}… is not a SHA-256 hex digest")
    return text.lower()


Sha256Hex = Annotated[str, AfterValidator(_checked)]  # a config field: any case, kept lowercase
