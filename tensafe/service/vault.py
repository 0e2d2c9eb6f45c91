"""Checkpoints (and uploaded datasets) at rest: AES-256-GCM under the service's data key, each file
bound to what it is (tenant and name as associated data), so a file swapped for another tenant's or
another checkpoint's does not decrypt."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tensafe.errors import ConfigError
from tensafe.files import write_atomically

_MAGIC = b"TSV1"


class VaultError(Exception):
    """A stored file that is missing or does not decrypt (tampered, swapped or another key's)."""


def load_or_create_key(path: Path) -> bytes:
    """The 32-byte data key at `path`, created (mode 0600) on first use."""
    if path.exists():
        key = path.read_bytes()
        if len(key) != 32:
            raise ConfigError(
                "service.data_key_file", str(path), "must hold exactly 32 bytes (an AES-256 key)"
            )
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = AESGCM.generate_key(bit_length=256)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    return key


class Vault:
    def __init__(self, root: Path, key: bytes):
        self.root, self._aead = root, AESGCM(key)

    def _file(self, tenant: str, name: str) -> Path:
        digest = hashlib.sha256(f"{tenant}\0{name}".encode()).hexdigest()[:40]
        return self.root / tenant / f"{digest}.bin"

    def put(self, tenant: str, name: str, plaintext: bytes) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext, f"{tenant}\0{name}".encode())
        path = self._file(tenant, name)
        write_atomically(path, [_MAGIC, nonce, sealed])
        return str(path)

    def get(self, tenant: str, name: str) -> bytes:
        path = self._file(tenant, name)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise VaultError(f"{name}: stored file unreadable ({err.strerror})") from None
        if data[:4] != _MAGIC:
            raise VaultError(f"{name}: not a stored file")
        try:
            return self._aead.decrypt(data[4:16], data[16:], f"{tenant}\0{name}".encode())
        except InvalidTag:
            raise VaultError(f"{name}: stored file does not decrypt (tampered, or another key's)") from None
