"""TSSP: one signed, optionally encrypted file per adapter (docs/trust.md).

Layout of a `.tssp` file:

    b"TSSP" | u16 format version | u32 header length | header (canonical JSON) | payload

The header is `{"statement": {"manifest", "recipients", "payload"}, "signatures": [...]}`.
- `manifest`: format version, package id, creation time, base model (name + digest), the LoRA
  config, the resolved training config, the privacy ledger, the audit head at packaging time, and
  every member's name, offset, size and SHA-256 (of the plaintext).
- `payload`: how the payload is stored (chunk size, chunk count, byte length, SHA-256 of the
  stored bytes, and the AEAD when encrypted).
- `recipients`: for each recipient key id, the data key sealed with HPKE X-Wing, `info` binding
  the format version and the manifest digest.
- `signatures`: hybrid Ed25519 + ML-DSA-65 over DSSE's PAE of the canonical statement, so the
  manifest, the recipients and the payload's digest are all signed.

Encrypted payloads are AES-256-GCM chunks under a fresh data key; each chunk's AAD binds the
manifest digest, its index and a final-chunk flag, so truncation and reordering fail to decrypt
even past the signed digest. Opening checks, in order: sizes and structure, the signatures
against the caller's trust store (never a key carried in the package), the payload digest, the
data key and every chunk, then every member's digest; only then are members handed over, in
memory or written to a fresh folder that appears whole (renamed into place) or not at all.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import struct
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tensafe.errors import UserError
from tensafe.files import write_atomically
from tensafe.security.canonical import NAME as CANONICAL_JSON
from tensafe.security.canonical import CanonicalError, canonical_json, parse_canonical
from tensafe.security.crypto import (
    KEM_ALGORITHM,
    SIGNATURE_ALGORITHMS,
    CryptoError,
    Recipient,
    RecipientPublicKey,
    Signature,
    Signer,
    SigningPublicKey,
    b64,
    signatures_from_dsse,
    unb64,
    verify,
)
from tensafe.security.events import PACKAGE_OPEN, PACKAGE_VERIFY_FAIL

MAGIC = b"TSSP"
FORMAT_VERSION = 2
PAYLOAD_TYPE = "application/vnd.tensafe.tssp.v2+json"
AEAD = "aes-256-gcm"
SUFFIX = ".tssp"
DEFAULT_CHUNK = 1 << 20
MAX_HEADER = 16 << 20  # a header holds configs and a ledger, never weights
MAX_CHUNK = 64 << 20


def is_package(path: str | os.PathLike) -> bool:
    """Whether `path` names a TSSP package (by its suffix, `.tssp`); anything else is a folder."""
    return Path(path).suffix == SUFFIX
MAX_MEMBERS = 256
_PREFIX = struct.Struct(">4sHI")
_TAG = 16
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ADAPTER_MEMBERS = ("adapter_config.json", "adapter_model.safetensors")
ALGORITHMS = {"signature": list(SIGNATURE_ALGORITHMS), "kem": KEM_ALGORITHM, "aead": AEAD,
              "digest": "sha-256", "canonical_json": CANONICAL_JSON}


class PackageError(UserError):
    """A package that cannot be built, verified or opened; nothing was written or loaded."""


@dataclass(frozen=True)
class Opened:
    """A verified (and decrypted) package: its manifest, members and the trusted signer."""

    manifest: dict
    members: dict[str, bytes]
    signer: SigningPublicKey
    encrypted: bool
    digest: str  # SHA-256 of the package file


def manifest_digest(manifest: Mapping) -> bytes:
    return hashlib.sha256(canonical_json(manifest)).digest()


def _info(digest: bytes) -> bytes:
    return b"tensafe-tssp-v%d\0" % FORMAT_VERSION + digest


def _aad(digest: bytes, index: int, final: bool) -> bytes:
    return digest + index.to_bytes(8, "big") + (b"\1" if final else b"\0")


def check_member_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise PackageError(f"member name {name!r} is not allowed (letters, digits, . _ -; no paths)")
    return name


# --- build -------------------------------------------------------------------------------------


def build_package(
    out: Path, members: Mapping[str, bytes], manifest_fields: Mapping[str, Any], signer: Signer,
    recipients: Sequence[RecipientPublicKey] = (), chunk_size: int = DEFAULT_CHUNK,
    version: int | None = None, expires_at: datetime | None = None,
) -> dict:
    """Write a package of `members` to `out` (atomically); returns its manifest. `version` (default:
    the build time in seconds since the epoch, so a signer's later builds rank higher) and
    `expires_at` are signed into the manifest's `release` for rollback protection."""
    if not members or len(members) > MAX_MEMBERS:
        raise PackageError(f"a package holds 1 to {MAX_MEMBERS} members, got {len(members)}")
    if not 1024 <= chunk_size <= MAX_CHUNK:
        raise PackageError(f"chunk size must be 1 KiB … {MAX_CHUNK >> 20} MiB")
    layout, offset = [], 0
    for name, data in members.items():
        layout.append({"name": check_member_name(name), "offset": offset, "size": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
        offset += len(data)
    now = datetime.now(timezone.utc)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
        raise PackageError(f"a release version is an integer >= 0, got {version!r}")
    if expires_at is not None and expires_at.utcoffset() is None:
        raise PackageError("a release expiry needs a time zone (UTC)")
    manifest = {
        **manifest_fields,
        "format_version": FORMAT_VERSION,
        "package_id": str(uuid.uuid4()),
        "created_at": now.isoformat(timespec="seconds"),
        "release": {"version": int(now.timestamp()) if version is None else version,
                    "expires_at": expires_at.isoformat(timespec="seconds") if expires_at else None},
        "members": layout,
    }
    digest = manifest_digest(manifest)
    plaintext = b"".join(members.values())
    chunks = [plaintext[i : i + chunk_size] for i in range(0, len(plaintext), chunk_size)] or [b""]
    sealed = []
    if recipients:
        key = AESGCM.generate_key(bit_length=256)
        aead = AESGCM(key)
        last = len(chunks) - 1
        chunks = [aead.encrypt(_nonce(i), c, _aad(digest, i, i == last)) for i, c in enumerate(chunks)]
        sealed = [{"key_id": r.key_id, "sealed_key": b64(r.seal(key, _info(digest)))} for r in recipients]
    stored = b"".join(chunks)
    statement = {
        "algorithms": ALGORITHMS,
        "manifest": manifest,
        "recipients": sealed,
        "payload": {"encrypted": bool(recipients), "aead": AEAD if recipients else None,
                    "chunk_size": chunk_size, "chunks": len(chunks), "length": len(stored),
                    "sha256": hashlib.sha256(stored).hexdigest()},
    }
    signature = signer.sign(PAYLOAD_TYPE, canonical_json(statement))
    header = canonical_json({"statement": statement, "signatures": signature.to_dsse()})
    if len(header) > MAX_HEADER:
        raise PackageError(f"the header would be {len(header)} bytes, over {MAX_HEADER}")
    write_atomically(out, [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)), header, stored])
    return manifest


def _nonce(index: int) -> bytes:
    return bytes(4) + index.to_bytes(8, "big")  # unique per chunk under a key used for one package


# --- read / verify / open ----------------------------------------------------------------------


def _parse(data: bytes) -> tuple[dict, list[Signature], bytes]:
    if len(data) < _PREFIX.size:
        raise PackageError(f"{len(data)} bytes is too short to be a TSSP package")
    magic, version, length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise PackageError("not a TSSP package (bad magic)")
    if version != FORMAT_VERSION:
        raise PackageError(f"TSSP format version {version}; this TenSafe reads version {FORMAT_VERSION}")
    if length > MAX_HEADER:
        raise PackageError(f"header of {length} bytes exceeds the {MAX_HEADER}-byte limit")
    if _PREFIX.size + length > len(data):
        raise PackageError("the file ends inside its header (truncated)")
    try:
        # The signature is checked over exactly these bytes: a header that is not the canonical
        # form of what it parses to (duplicate keys, unsigned extras, other encodings) is refused.
        header = parse_canonical(data[_PREFIX.size : _PREFIX.size + length])
    except CanonicalError as err:
        raise PackageError(f"the header is not {CANONICAL_JSON} canonical JSON: {err}") from None
    statement = header.get("statement") if isinstance(header, dict) else None
    if not isinstance(statement, dict) or not isinstance(header.get("signatures"), list):
        raise PackageError("the header needs a statement and signatures")
    extra = sorted(set(header) - {"statement", "signatures"})
    if extra:
        raise PackageError(f"the header holds unsigned fields {extra}")
    for key, kind in (("manifest", dict), ("recipients", list), ("payload", dict)):
        if not isinstance(statement.get(key), kind):
            raise PackageError(f"the statement's {key} is missing or not a {kind.__name__}")
    if statement.get("algorithms") != ALGORITHMS:
        raise PackageError(f"the package names algorithms {statement.get('algorithms')}; this TenSafe "
                           f"uses {ALGORITHMS}")
    try:
        signatures = signatures_from_dsse(header["signatures"])
    except CryptoError as err:
        raise PackageError(f"bad signature entry: {err}") from None
    return statement, signatures, data[_PREFIX.size + length :]


def verify_bytes(data: bytes, trusted: Mapping[str, SigningPublicKey]
                 ) -> tuple[dict, SigningPublicKey, bytes]:
    """Structure, signatures against `trusted`, and the stored payload's digest and size."""
    statement, signatures, stored = _parse(data)
    try:
        signer = verify(PAYLOAD_TYPE, canonical_json(statement), signatures, trusted)
    except CryptoError as err:
        raise PackageError(f"signature check failed: {err}") from None
    payload = statement["payload"]
    if payload.get("length") != len(stored):
        raise PackageError(f"payload is {len(stored)} bytes, the signed length is {payload.get('length')}")
    if hashlib.sha256(stored).hexdigest() != payload.get("sha256"):
        raise PackageError("payload digest does not match the signed digest (altered payload)")
    return statement, signer, stored


def read_package(path: Path, trusted: Mapping[str, SigningPublicKey], recipient: Recipient | None = None,
                 max_bytes: int = 16 << 30) -> Opened:
    """Verify and (for encrypted packages) decrypt `path` in memory; PackageError on any failure."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise PackageError(f"{path} is {size} bytes, over the {max_bytes}-byte limit")
        data = path.read_bytes()
    except OSError as err:
        raise PackageError(f"cannot read {path}: {err.strerror}") from None
    statement, signer, stored = verify_bytes(data, trusted)
    manifest, payload = statement["manifest"], statement["payload"]
    digest = manifest_digest(manifest)
    chunk_size, count = payload.get("chunk_size"), payload.get("chunks")
    if not isinstance(chunk_size, int) or not isinstance(count, int) or not 1 <= count <= len(stored) + 1:
        raise PackageError("bad payload layout in the statement")
    if payload.get("encrypted"):
        plaintext = _decrypt(stored, statement["recipients"], digest, chunk_size, count, recipient)
    else:
        plaintext = stored
    members = _members(manifest, plaintext)
    return Opened(manifest, members, signer, bool(payload.get("encrypted")), hashlib.sha256(data).hexdigest())


def _decrypt(stored: bytes, recipients: list, digest: bytes, chunk_size: int, count: int,
             recipient: Recipient | None) -> bytes:
    if recipient is None:
        raise PackageError("the package is encrypted; give a recipient key "
                           "(--recipient-key, or serving.recipient_key)")
    entry = next((r for r in recipients if isinstance(r, dict) and r.get("key_id") == recipient.key_id), None)
    if entry is None:
        ids = ", ".join(str(r.get("key_id", "?"))[:16] for r in recipients if isinstance(r, dict))
        raise PackageError(f"the package is not encrypted for recipient {recipient.key_id[:16]} "
                           f"(it is for: {ids})")
    try:
        key = recipient.open(unb64(entry.get("sealed_key", ""), "sealed key"), _info(digest))
    except CryptoError as err:
        raise PackageError(str(err)) from None
    aead, out, step = AESGCM(key), io.BytesIO(), chunk_size + _TAG
    if not (count - 1) * step + _TAG <= len(stored) <= count * step:
        raise PackageError("the payload does not have the signed number of chunks")
    bounds = [(i * step, min((i + 1) * step, len(stored))) for i in range(count)]
    for i, (start, end) in enumerate(bounds):
        try:
            out.write(aead.decrypt(_nonce(i), stored[start:end], _aad(digest, i, i == count - 1)))
        except InvalidTag:
            raise PackageError(f"chunk {i} does not decrypt (altered, reordered or truncated)") from None
    return out.getvalue()


def _members(manifest: dict, plaintext: bytes) -> dict[str, bytes]:
    layout = manifest.get("members")
    if not isinstance(layout, list) or not 1 <= len(layout) <= MAX_MEMBERS:
        raise PackageError("the manifest's member list is missing or too long")
    members, offset = {}, 0
    for entry in layout:
        if not isinstance(entry, dict):
            raise PackageError("a member entry is not an object")
        name = check_member_name(entry.get("name"))
        size = entry.get("size")
        if name in members or entry.get("offset") != offset or not isinstance(size, int) or size < 0:
            raise PackageError(f"member {name!r} has a bad offset or size, or appears twice")
        data = plaintext[offset : offset + size]
        if len(data) != size or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise PackageError(f"member {name!r} does not match its digest")
        members[name], offset = data, offset + size
    if offset != len(plaintext):
        raise PackageError("the payload holds bytes no member accounts for")
    return members


def open_to(path: Path, out_dir: Path, trusted: Mapping[str, SigningPublicKey],
            recipient: Recipient | None = None) -> Opened:
    """Verify, decrypt and write the members to `out_dir`, which must not exist yet; it appears
    complete or not at all."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise PackageError(f"{out_dir} exists; open into a new folder")
    opened = read_package(path, trusted, recipient)
    check_release(opened.manifest)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".part"))
    try:
        for name, data in opened.members.items():
            (staging / name).write_bytes(data)
        (staging / "manifest.json").write_text(json.dumps(opened.manifest, indent=2) + "\n")
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return opened


def release_of(manifest: Mapping) -> tuple[int, datetime | None]:
    """The package's signed (version, expiry); PackageError when the manifest has none."""
    release = manifest.get("release")
    if not isinstance(release, Mapping) or not isinstance(release.get("version"), int) \
            or isinstance(release.get("version"), bool) or release["version"] < 0:
        raise PackageError("the manifest has no release version (rollback protection needs one)")
    expires = release.get("expires_at")
    if expires is None:
        return release["version"], None
    try:
        when = datetime.fromisoformat(expires) if isinstance(expires, str) else None
    except ValueError:
        when = None
    if when is None or when.utcoffset() is None:
        raise PackageError(f"the manifest's expiry {expires!r} is not a UTC timestamp")
    return release["version"], when


def check_release(manifest: Mapping, now: datetime | None = None) -> int:
    """The package's version, after refusing an expired package."""
    version, expires = release_of(manifest)
    if expires is not None and (now or datetime.now(timezone.utc)) >= expires:
        raise PackageError(f"the package expired at {expires.isoformat()}; ask its signer for a newer one")
    return version


@dataclass
class PackageTrust:
    """What a verifier brings to a package: its trusted signing keys, its recipient key, where to
    record what happened (an audit hook taking (event, data)), and the bindings a loader enforces:

    - `base_model_digest`: the digest of the model being served; a package made for another base
      model is refused.
    - `served_version(adapter, signer)`: the highest release version of `signer`'s packages served
      so far under the adapter name `adapter` (None: never); an older one is refused (rollback).
    """

    trusted: Mapping[str, SigningPublicKey]
    recipient: Recipient | None = None
    record: Callable[[str, dict], None] | None = None
    base_model_digest: str | None = None
    served_version: Callable[[str, str], int | None] | None = None

    def open(self, path: Path, key: str, adapter: str | None = None) -> Opened:
        """The verified package at `path` to be served as `adapter`, or a ConfigError blaming
        config key `key` (recorded)."""
        from tensafe.errors import ConfigError

        try:
            opened = read_package(path, self.trusted, self.recipient)
            version = check_release(opened.manifest)
            self._check_bindings(opened, version, adapter)
        except PackageError as err:
            self._record(PACKAGE_VERIFY_FAIL, {"path": str(path), "reason": str(err)})
            raise ConfigError(key, str(path), f"package refused: {err}") from None
        self._record(PACKAGE_OPEN, {"path": str(path), "package_id": opened.manifest.get("package_id"),
                                      "signer": opened.signer.key_id, "encrypted": opened.encrypted,
                                      "version": version})
        return opened

    def _check_bindings(self, opened: Opened, version: int, adapter: str | None) -> None:
        base = opened.manifest.get("base_model")
        made_for = base.get("digest") if isinstance(base, Mapping) else None
        if self.base_model_digest is not None and made_for != self.base_model_digest:
            raise PackageError(f"the package was made for base model {made_for!r}, this server runs "
                               f"{self.base_model_digest!r}")
        if adapter is not None and self.served_version is not None:
            served = self.served_version(adapter, opened.signer.key_id)
            if served is not None and version < served:
                raise PackageError(f"rollback: release {version} is older than release {served} of the same "
                                   f"signer already served as {adapter!r}")

    def _record(self, event: str, data: dict) -> None:
        if self.record is not None:
            self.record(event, data)


def inspect_bytes(data: bytes) -> dict:
    """The header as stored, UNVERIFIED (for looking, not for trusting)."""
    statement, signatures, stored = _parse(data)
    return {"verified": False, "signers": [s.key_id for s in signatures], "stored_payload_bytes": len(stored),
            **statement}


# --- packaging a training run ------------------------------------------------------------------


def adapter_members(adapter_dir: Path) -> dict[str, bytes]:
    folder = Path(adapter_dir)
    missing = [m for m in ADAPTER_MEMBERS if not (folder / m).is_file()]
    if missing:
        raise PackageError(f"{folder} is not an adapter folder (missing {', '.join(missing)})")
    return {m: (folder / m).read_bytes() for m in ADAPTER_MEMBERS}


def run_manifest(run_dir: Path) -> tuple[dict[str, bytes], dict]:
    """Members and manifest fields from a task=train output folder (adapter/, resolved_config.yaml,
    privacy_ledger.json, metrics.json), or from a bare adapter folder (fields it lacks are null)."""
    from omegaconf import OmegaConf

    run = Path(run_dir)
    adapter = run / "adapter" if (run / "adapter").is_dir() else run
    members = adapter_members(adapter)

    def load(name: str, reader):
        return reader(run / name) if (run / name).is_file() else None

    try:
        lora = json.loads(members["adapter_config.json"])
        config = load("resolved_config.yaml", lambda p: OmegaConf.to_container(OmegaConf.load(p)))
        ledger = load("privacy_ledger.json", lambda p: json.loads(p.read_text()))
        metrics = load("metrics.json", lambda p: json.loads(p.read_text())) or {}
    except (OSError, ValueError) as err:
        raise PackageError(f"cannot read the run folder {run}: {err}") from None
    model = (config or {}).get("model", {})
    fields = {
        "base_model": {"name": model.get("name"), "hf_id": model.get("hf_id"),
                       "digest": metrics.get("base_model_digest")},
        "lora_config": lora,
        "training_config": config,
        "privacy_ledger": ledger,
    }
    return members, fields
