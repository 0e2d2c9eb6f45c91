"""Bearer API keys for every TenSafe HTTP service: stored as SHA-256 digests, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from tensafe.errors import ConfigError
from tensafe.hexdigest import is_sha256_hex


def hash_api_key(key: str) -> str:
    """What configs and key files store: the SHA-256 of the key, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def load_key_hashes(digests: list[str], key_file: str | None, key: str) -> list[str]:
    """The accepted digests: `digests` plus one per line of `key_file`; `key` is the config prefix
    (e.g. "serving") named in errors. A service never runs without at least one."""
    hashes = [h.lower() for h in digests]
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise ConfigError(f"{key}.api_key_file", key_file, "no such file")
        lines = [ln.strip().lower() for ln in path.read_text().splitlines() if ln.strip()]
        if not all(is_sha256_hex(ln) for ln in lines):
            raise ConfigError(f"{key}.api_key_file", key_file, "every line must be a SHA-256 hex digest")
        hashes += lines
    if not hashes:
        raise ConfigError(
            f"{key}.api_key_sha256", [], f"set at least one API key's SHA-256 (or {key}.api_key_file); "
            "the server does not run without authentication"
        )
    return hashes


def check_separate(api_hashes: list[str], admin_hashes: list[str], shared_allowed: bool) -> None:
    """Refuse a key that is both a user key and an admin key, unless the config says so."""
    shared = sorted(set(h.lower() for h in api_hashes) & set(h.lower() for h in admin_hashes))
    if shared and not shared_allowed:
        raise ConfigError("serving.admin_key_sha256", f"{shared[0][:12]}…",
                          "is also a user API key; give admins their own keys, or set "
                          "serving.admin_keys_may_serve=true to allow it")


class BearerKeys:
    """Checks an Authorization header against the accepted digests in constant time per digest."""

    def __init__(self, hex_digests: list[str]):
        self._digests = [bytes.fromhex(h) for h in hex_digests]

    def accepts(self, authorization: str | None) -> bool:
        header = authorization or ""
        token = header[7:] if header.lower().startswith("bearer ") else ""
        digest = hashlib.sha256(token.encode()).digest()
        matched = False
        for accepted in self._digests:
            matched |= hmac.compare_digest(digest, accepted)
        return bool(token) and matched
