"""The keystore: signing and recipient key pairs in a folder, and the trust store.

Layout (docs/trust.md, Keys)::

    root/                      0700
      signing/<key_id>.json    0600  hybrid signing key (Ed25519 + ML-DSA-65 seeds)
      recipient/<key_id>.json  0600  recipient key (X-Wing: ML-KEM-768 seed + X25519)
      trusted/<key_id>.json    0644  signing public keys trusted for packages, evidence, audit heads

A key's id is its public key's fingerprint (`crypto.SigningPublicKey.key_id`,
`crypto.RecipientPublicKey.key_id`, hex); each key also has a name, unique per kind. A key is
referred to by its id, a unique prefix of it (at least 8 hex digits) or its name. Key files are
canonical JSON: kind, name, created (UTC), the public key JSON and the private seeds (base64).

Security notes:

- File permissions. Folders are created 0700. A private key file is created once, with
  `os.open(O_CREAT | O_EXCL, 0o600)` (a temporary name linked into place, so a key file is never
  half-written and never replaces another); its mode is never widened afterwards. A private key
  file that group or others can access is refused on load (as ssh does): fix it with `chmod 600`.
  A trust store file that group or others can write is refused too. Like ssh's StrictModes,
  every folder from the keystore root down and every key file must be owned by the user running
  tensafe (or root), no folder may be writable by group or others, and none may be a symbolic
  link (key files are opened without following links): another local user cannot plant a key.
- One name, one key: a key name is unique among signing keys and trusted keys together, and a
  trust store holding two keys under one name is refused.
- The file keystore is the embedded default. A KMS (e.g. Vault transit) can hold the keys
  instead: the `Keystore` interface (`signer`, `recipient`, `trusted`, `export_public`) is the
  seam, and callers only ever see `crypto.Signer`, `crypto.Recipient` and public keys.
- Trust comes only from the trust store. A freshly generated signing key is not trusted until
  `tensafe keys trust` (or `generate --trust`) adds it; a public key that arrives with signed data
  is never trusted by itself. Check a key id out of band before trusting someone else's key.
- `export` writes public keys only; private seeds never leave their file through this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import stat
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tensafe.errors import UserError
from tensafe.security.canonical import canonical_json
from tensafe.security.crypto import (
    CryptoError,
    Recipient,
    RecipientPublicKey,
    Signer,
    SigningPublicKey,
    b64,
    unb64,
)

FORMAT = "tensafe-key-v1"
TRUST_FORMAT = "tensafe-trusted-key-v1"
KINDS = ("signing", "recipient")
MIN_PREFIX = 8
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX = re.compile(r"[0-9a-fA-F]+")
_POSIX = os.name == "posix"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_PUBLIC: dict[str, type[SigningPublicKey] | type[RecipientPublicKey]] = {
    "signing": SigningPublicKey, "recipient": RecipientPublicKey}
_SEEDS = {"signing": ("ed25519_seed", "ml_dsa_65_seed"), "recipient": ("ml_kem_768_seed", "x25519_seed")}


class KeystoreError(UserError):
    """A keystore operation that cannot be done as asked; the message says what to change."""


class UnknownKeyError(KeystoreError, LookupError):
    """A key reference that matches no key, or more than one; the message names what exists."""


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    """One keystore entry. `private` is False for a trusted public key held without its private
    half; `trusted` is only ever True for signing keys; `created` is None where unknown."""

    kind: str
    name: str
    key_id: str
    created: str | None
    trusted: bool
    private: bool = True

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Entry:
    kind: str
    name: str
    key_id: str
    created: str | None
    path: Path
    record: Mapping[str, Any]


def default_root() -> Path:
    """`$TENSAFE_KEYSTORE`, or `~/.tensafe/keys`."""
    env = os.environ.get("TENSAFE_KEYSTORE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".tensafe" / "keys"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise KeystoreError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                            "letter or digit")
    return name


def _owners() -> tuple[int, ...]:
    return (os.geteuid(), 0) if _POSIX else ()


def _check_owner(path: Path, info: os.stat_result) -> None:
    if _POSIX and info.st_uid not in _owners():
        raise KeystoreError(f"{path} belongs to user id {info.st_uid}, not to this user; a keystore must be "
                            "owned by the user who runs tensafe (or root)")


def _check_folder(folder: Path) -> None:
    """ssh-style StrictModes for one keystore folder: a real folder (not a link), owned by this user
    or root, that group and others cannot write."""
    try:
        info = os.lstat(folder)
    except OSError as err:
        raise KeystoreError(f"cannot use keystore folder {folder}: {err.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise KeystoreError(f"{folder} is a symbolic link; keystore folders must be real folders")
    if not stat.S_ISDIR(info.st_mode):
        raise KeystoreError(f"{folder} is not a folder")
    _check_owner(folder, info)
    mode = stat.S_IMODE(info.st_mode)
    if _POSIX and mode & 0o022:
        raise KeystoreError(f"keystore folder {folder} has mode {mode:04o}: group or others can write it, so "
                            f"they could plant keys (chmod 700 {folder})")


def _read(path: Path, forbidden: int, what: str) -> bytes:
    """The bytes of a regular file opened without following links; refused when its mode has any
    of the `forbidden` bits (checked on the open descriptor, so the file checked is the one read)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except OSError as err:
        if os.path.islink(path):
            raise KeystoreError(f"{path} is a symbolic link; {what} files must be regular files") from None
        raise KeystoreError(f"cannot read {what} file {path}: {err.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise KeystoreError(f"{path} is not a regular file")
        _check_owner(path, info)
        mode = stat.S_IMODE(info.st_mode)
        if _POSIX and mode & forbidden:
            if forbidden & 0o044:
                raise KeystoreError(f"{what} file {path} has mode {mode:04o}: group or others can access it; "
                                    f"it must be readable by its owner only (chmod 600 {path})")
            raise KeystoreError(f"{what} file {path} has mode {mode:04o}: group or others can write it "
                                f"(chmod 644 {path})")
        return handle.read()


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` holding `data`, created with `mode` (never widened later) and never replacing
    an existing file: written in full under a temporary name, then linked into place."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise KeystoreError(f"{path} exists already") from None
        except OSError:  # a filesystem without hard links
            if path.exists():
                raise KeystoreError(f"{path} exists already") from None
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    if _POSIX:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _parse(data: bytes, path: Path, what: str) -> dict:
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise KeystoreError(f"{what} file {path} is not JSON") from None
    if not isinstance(record, dict):
        raise KeystoreError(f"{what} file {path} is not a JSON object")
    return record


class Keystore:
    """Keys in a folder (see the module docstring for the layout and the security notes)."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"Keystore({str(self.root)!r})"

    # --- folders and files -----------------------------------------------------------------

    def _folder(self, part: str, create: bool) -> Path:
        folder = self.root / part
        if create:
            missing = [p for p in (folder, *folder.parents) if not p.exists()]
            for p in reversed(missing):
                try:
                    p.mkdir(mode=0o700)
                except FileExistsError:
                    pass
                except OSError as err:
                    raise KeystoreError(f"cannot create keystore folder {p}: {err.strerror}") from None
        self._check(folder)
        return folder

    def _check(self, folder: Path) -> None:
        """Every level from the keystore root down to `folder` passes `_check_folder`."""
        _check_folder(self.root)
        if folder != self.root:
            _check_folder(folder)

    def _files(self, part: str) -> list[Path]:
        folder = self.root / part
        if not os.path.lexists(folder):
            return []
        self._check(folder)
        return sorted(p for p in folder.iterdir() if p.suffix == ".json" and not p.name.startswith("."))

    def _load_private(self, path: Path, kind: str) -> _Entry:
        record = _parse(_read(path, 0o077, "private key"), path, "private key")
        if record.get("format") != FORMAT or record.get("kind") != kind:
            raise KeystoreError(f"{path} is not a {kind} key file ({FORMAT})")
        try:
            public = _PUBLIC[kind].from_json(record.get("public") or {})
        except CryptoError as err:
            raise KeystoreError(f"{path}: {err}") from None
        if path.stem != public.key_id:
            raise KeystoreError(f"{path} holds key {public.key_id}, not the key its file name says")
        name, created = record.get("name"), record.get("created")
        if not isinstance(name, str) or not isinstance(created, str):
            raise KeystoreError(f"{path} has no name or creation time")
        return _Entry(kind, name, public.key_id, created, path, record)

    def _load_trusted(self, path: Path) -> tuple[_Entry, SigningPublicKey]:
        record = _parse(_read(path, 0o022, "trust store"), path, "trust store")
        if record.get("format") != TRUST_FORMAT:
            raise KeystoreError(f"{path} is not a trust store entry ({TRUST_FORMAT})")
        try:
            public = SigningPublicKey.from_json(record.get("public") or {})
        except CryptoError as err:
            raise KeystoreError(f"{path}: {err}") from None
        if path.stem != public.key_id:
            raise KeystoreError(f"{path} holds key {public.key_id}, not the key its file name says")
        name = str(record["name"]) if isinstance(record.get("name"), str) else ""
        added = record.get("added") if isinstance(record.get("added"), str) else None
        return _Entry("signing", name, public.key_id, added, path, record), public

    def _entries(self, kind: str) -> list[_Entry]:
        return [self._load_private(p, kind) for p in self._files(kind)]

    def _trusted_entries(self) -> list[tuple[_Entry, SigningPublicKey]]:
        entries = [self._load_trusted(p) for p in self._files("trusted")]
        named: dict[str, str] = {}
        for entry, _ in entries:
            if entry.name and named.setdefault(entry.name, entry.key_id) != entry.key_id:
                raise KeystoreError(f"the trust store holds two keys named {entry.name!r} "
                                    f"({named[entry.name][:16]} and {entry.key_id[:16]}); remove the one "
                                    f"you did not add from {self.root / 'trusted'}")
        return entries

    # --- references ------------------------------------------------------------------------

    def _resolve(self, entries: list[_Entry], ref: str, what: str) -> _Entry:
        if not isinstance(ref, str) or not ref:
            raise UnknownKeyError(f"no {what} given: name a key id, a key id prefix or a key name")
        lowered = ref.lower()
        exact = [e for e in entries if e.key_id == lowered]
        if exact:
            return exact[0]
        hits = {e.path: e for e in entries if e.name == ref}
        if len(ref) >= MIN_PREFIX and _HEX.fullmatch(ref):
            hits.update({e.path: e for e in entries if e.key_id.startswith(lowered)})
        if len(hits) == 1:
            return next(iter(hits.values()))
        if hits:
            matches = ", ".join(_describe(e) for e in hits.values())
            raise UnknownKeyError(f"{what} {ref!r} is ambiguous: it matches {matches}; "
                                  "give more of the key id")
        hint = ""
        if _HEX.fullmatch(ref) and len(ref) < MIN_PREFIX:
            hint = f" (a key id prefix needs at least {MIN_PREFIX} hex digits)"
        if not entries:
            raise UnknownKeyError(f"no {what} {ref!r}{hint}: there are none in keystore {self.root}")
        shown = ", ".join(_describe(e) for e in entries[:10])
        more = f" and {len(entries) - 10} more" if len(entries) > 10 else ""
        raise UnknownKeyError(f"no {what} {ref!r}{hint} in keystore {self.root}; there are: {shown}{more}")

    # --- private keys ----------------------------------------------------------------------

    def _generate(self, kind: str, name: str, key: Signer | Recipient) -> None:
        _check_name(name)
        folder = self._folder(kind, create=True)
        taken = [e for e in self._entries(kind) if e.name == name]
        if taken:
            raise KeystoreError(f"there is a {kind} key named {name!r} already ({taken[0].key_id})")
        seeds = dict(zip(_SEEDS[kind], (b64(s) for s in key.seeds())))
        record = {"format": FORMAT, "kind": kind, "name": name, "created": _now(),
                  "public": key.public.to_json(), "private": seeds}
        _write_new(folder / f"{key.key_id}.json", canonical_json(record), 0o600)

    def generate_signing(self, name: str, trust: bool = False) -> Signer:
        """A new hybrid signing key named `name`; trusted only when `trust` is True."""
        _check_name(name)
        signer = Signer.generate()
        self._generate("signing", name, signer)
        if trust:
            self._add_trusted(signer.public, name)
        return signer

    def generate_recipient(self, name: str) -> Recipient:
        """A new recipient key (X-Wing) named `name`."""
        _check_name(name)
        recipient = Recipient.generate()
        self._generate("recipient", name, recipient)
        return recipient

    def _private(self, entry: _Entry) -> Signer | Recipient:
        private = entry.record.get("private")
        if not isinstance(private, Mapping):
            raise KeystoreError(f"{entry.path} holds no private key")
        try:
            seeds = [unb64(private.get(field, ""), field) for field in _SEEDS[entry.kind]]
            key = (Signer if entry.kind == "signing" else Recipient).from_seeds(*seeds)
        except (CryptoError, ValueError) as err:
            raise KeystoreError(f"{entry.path}: the private key is unusable ({err})") from None
        if key.key_id != entry.key_id:
            raise KeystoreError(f"{entry.path}: the private seeds do not belong to public key {entry.key_id}")
        return key

    def signer(self, ref: str) -> Signer:
        """The signing key `ref` names (key id, unique prefix of at least 8 hex digits, or name)."""
        key = self._private(self._resolve(self._entries("signing"), ref, "signing key"))
        assert isinstance(key, Signer)
        return key

    def recipient(self, ref: str) -> Recipient:
        """The recipient key `ref` names (key id, unique prefix of at least 8 hex digits, or name)."""
        key = self._private(self._resolve(self._entries("recipient"), ref, "recipient key"))
        assert isinstance(key, Recipient)
        return key

    def list(self) -> list[KeyInfo]:
        """Every key: signing keys, recipient keys, then trusted public keys held without a private
        half here. Nothing private is returned."""
        trusted = {entry.key_id: entry for entry, _ in self._trusted_entries()}
        infos = [KeyInfo(e.kind, e.name, e.key_id, e.created, e.kind == "signing" and e.key_id in trusted)
                 for kind in KINDS for e in self._entries(kind)]
        own = {info.key_id for info in infos}
        infos += [KeyInfo("signing", e.name, e.key_id, None, True, private=False)
                  for e in trusted.values() if e.key_id not in own]
        return infos

    def export_public(self, ref: str, kind: str | None = None) -> dict:
        """The public key JSON (with the key's name) of the key `ref` names; `kind` narrows the
        search to signing or recipient keys. Never contains private material."""
        if kind is not None and kind not in KINDS:
            raise KeystoreError(f"key kind {kind!r}: one of {', '.join(KINDS)}")
        kinds = (kind,) if kind else KINDS
        entries = [e for k in kinds for e in self._entries(k)]
        entry = self._resolve(entries, ref, f"{kind} key" if kind else "key")
        public = _PUBLIC[entry.kind].from_json(entry.record["public"])
        return {**public.to_json(), "name": entry.name}

    # --- trust store -----------------------------------------------------------------------

    def _add_trusted(self, public: SigningPublicKey, name: str) -> str:
        path = self._folder("trusted", create=True) / f"{public.key_id}.json"
        holders = [e for e in (*self._entries("signing"), *(e for e, _ in self._trusted_entries()))
                   if name and e.name == name and e.key_id != public.key_id]
        if holders:
            raise KeystoreError(f"a signing key named {name!r} exists already ({holders[0].key_id[:16]}); "
                                "one name means one key: trust this one under another name (--name)")
        if path.exists():
            _, held = self._load_trusted(path)
            if held != public:
                raise KeystoreError(f"{path} holds another key than its name says")
            return public.key_id
        record = {"format": TRUST_FORMAT, "name": name if _NAME.fullmatch(name or "") else "",
                  "added": _now(), "public": public.to_json()}
        try:
            _write_new(path, canonical_json(record), 0o644)
        except KeystoreError:
            if not path.exists():
                raise
        return public.key_id

    def trust(self, public_json_or_path: Mapping | str | os.PathLike, name: str | None = None) -> str:
        """Add a signing public key (its JSON, or a file holding it, as `export` writes) to the
        trust store; returns its key id. The JSON must name its key_id, and the id must match.
        `name` replaces the name the JSON carries; a name held by another key is refused."""
        data: Any = public_json_or_path
        where = "the public key"
        if not isinstance(data, Mapping):
            path = Path(data)
            where = str(path)
            try:
                text = path.read_text()
            except OSError as err:
                raise KeystoreError(f"cannot read public key file {path}: {err.strerror}") from None
            except UnicodeDecodeError:
                raise KeystoreError(f"{path} is not a public key file (not text)") from None
            try:
                data = json.loads(text)
            except ValueError:
                raise KeystoreError(f"{path} is not JSON; expected a public key from `tensafe keys export`") \
                    from None
        if isinstance(data, Mapping) and data.get("kind") == "recipient":
            raise KeystoreError(f"{where} is a recipient key; only signing public keys can be trusted")
        if not isinstance(data, Mapping) or not isinstance(data.get("key_id"), str):
            raise KeystoreError(f"{where} is not a signing public key with a key_id (tensafe keys export)")
        try:
            public = SigningPublicKey.from_json(data)
        except CryptoError as err:
            raise KeystoreError(f"{where} cannot be trusted: {err}") from None
        if name is not None:
            _check_name(name)
        else:
            name = data.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            own = [e for e in self._entries("signing") if e.key_id == public.key_id]
            name = own[0].name if own else ""
        return self._add_trusted(public, name)

    def untrust(self, ref: str) -> str:
        """Remove the trusted key `ref` names from the trust store; returns its key id. The private
        key, if it is held here, stays."""
        entry = self._resolve([e for e, _ in self._trusted_entries()], ref, "trusted key")
        try:
            entry.path.unlink()
        except OSError as err:
            raise KeystoreError(f"cannot remove {entry.path}: {err.strerror}") from None
        return entry.key_id

    def trusted(self) -> dict[str, SigningPublicKey]:
        """The trust store: key id -> signing public key, for `crypto.verify`."""
        return {entry.key_id: public for entry, public in self._trusted_entries()}


def _describe(entry: _Entry) -> str:
    label = f"{entry.kind} " if entry.kind else ""
    return f"{label}{entry.name or '(no name)'} ({entry.key_id[:16]})"
