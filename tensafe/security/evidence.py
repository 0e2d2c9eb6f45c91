"""Evidence: a signed statement per training run and per serving session (docs/trust.md, Evidence).

A statement is an in-toto Statement v1::

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": ..., "digest": {"sha256": <hex>}}, ...],
     "predicateType": "https://tensafe.dev/evidence/training-run/v1" (or serving-session/v1),
     "predicate": {...}}

carried in a DSSE envelope ``{"payloadType": "application/vnd.in-toto+json", "payload":
base64(canonical JSON of the statement), "signatures": [...]}``. Each signature is the hybrid
Ed25519 + ML-DSA-65 signature (`crypto.Signer.sign`) over DSSE's pre-authentication encoding of
the payload type and the payload bytes.

Training statements name the adapter files (and any packages built from them) as subjects and
record the code version, the resolved config and its digest, the privacy ledger, the base model
digest and the eval figures. Serving statements name the adapters and packages served and
record the code version, the config digest, and the HE backend and parameter set actually used
for each HE adapter.

Attestation is pluggable (`AttestationProvider`). The provider that signs writes its
description into the predicate (`attestation`); a verifier accepts a description only from a
provider it can check. The only provider in this build is `SoftwareAttestation`: it signs with a
local evidence key and says so (`hardware_root_of_trust: false`). It attests what the software
recorded, not the platform it ran on. There is no hardware TEE provider: a statement claiming
any other provider, or a hardware root of trust, fails verification, because a TEE provider must
verify a real quote and none can be checked in this build.

Verification trusts only the caller's trust store (never a key carried in the envelope), requires
the payload to be the canonical encoding of the statement it decodes to, and checks the statement
shape. `verify_subjects` recomputes the digests of subject files found under a folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tensafe.errors import UserError
from tensafe.files import write_atomically
from tensafe.hexdigest import is_sha256_hex
from tensafe.security.canonical import CanonicalError, canonical_json, strict_loads
from tensafe.security.crypto import (
    CryptoError,
    Signature,
    Signer,
    SigningPublicKey,
    b64,
    signatures_from_dsse,
    unb64,
    verify,
)
from tensafe.security.events import EVIDENCE_CREATE

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
TRAINING_RUN = "https://tensafe.dev/evidence/training-run/v1"
SERVING_SESSION = "https://tensafe.dev/evidence/serving-session/v1"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_EVIDENCE_BYTES = 64 << 20  # an envelope holds configs and a ledger, never weights
_TIME_KEYS = {"started": ("started", "started_at", "start_time"),
              "finished": ("finished", "finished_at", "end_time", "ended")}


class EvidenceError(UserError):
    """Evidence that cannot be built, read or written as asked; the message says what to change."""


class EvidenceInvalid(EvidenceError):
    """Evidence that does not verify: bad or untrusted signature, altered payload, bad shape, or an
    attestation that cannot be checked. `tensafe evidence verify` exits 1 with the message."""


@dataclass(frozen=True)
class VerifiedEvidence:
    """A statement whose signature verified against the trust store. `attestation` is the
    verifying provider's own description of what the signature does (and does not) attest."""

    statement: dict
    signer_key_id: str
    attestation: dict

    @property
    def predicate_type(self) -> str:
        return self.statement["predicateType"]

    @property
    def subjects(self) -> list[dict]:
        return self.statement["subject"]


@dataclass(frozen=True)
class SubjectCheck:
    """One subject checked against a file: status is ok, mismatch, missing or skipped (a name that
    is not a relative path inside the folder, so no file was read for it)."""

    name: str
    status: str
    expected: str
    actual: str | None = None


@dataclass(frozen=True)
class SubjectReport:
    base_dir: Path
    checks: list[SubjectCheck] = field(default_factory=list)

    def _with(self, status: str) -> list[SubjectCheck]:
        return [c for c in self.checks if c.status == status]

    @property
    def matched(self) -> list[SubjectCheck]:
        return self._with("ok")

    @property
    def mismatched(self) -> list[SubjectCheck]:
        return self._with("mismatch")

    @property
    def missing(self) -> list[SubjectCheck]:
        return self._with("missing") + self._with("skipped")

    @property
    def ok(self) -> bool:
        """No subject file differs from its digest, and at least one subject file was found."""
        return not self.mismatched and bool(self.matched)


# --- attestation providers ---------------------------------------------------------------------


@runtime_checkable
class AttestationProvider(Protocol):
    """Who signs evidence and what that signature attests. `sign` puts `describe()` into the
    statement's predicate as `attestation` and returns the DSSE envelope; `verify` checks an
    envelope against the trust store and returns what it verified. A provider that claims a
    hardware root of trust must verify a real quote in `verify`, and fail when it cannot."""

    name: str

    def describe(self) -> dict: ...

    def sign(self, statement: dict) -> dict: ...

    def verify(self, envelope: Any, trusted: Mapping[str, SigningPublicKey]) -> VerifiedEvidence: ...


class SoftwareAttestation:
    """Signs with a local evidence key (hybrid Ed25519 + ML-DSA-65). No hardware root of trust:
    the signature says which key holder vouches for what the software recorded, nothing about the
    platform. `signer` may be None for a provider used only to verify."""

    name = "software"

    def __init__(self, signer: Signer | None = None):
        self._signer = signer

    def describe(self) -> dict:
        return {"provider": self.name, "hardware_root_of_trust": False,
                "note": "signed with a local evidence key; this attests what the software recorded, "
                        "not the platform it ran on"}

    def sign(self, statement: dict) -> dict:
        if self._signer is None:
            raise EvidenceError("software attestation: no evidence signing key given "
                                "(`tensafe keys generate signing --name NAME --trust`)")
        try:
            check_statement(statement)
        except EvidenceInvalid as err:
            raise EvidenceError(f"cannot sign: {err}") from None
        claimed = {**statement, "predicate": {**statement["predicate"], "attestation": self.describe()}}
        try:
            payload = canonical_json(claimed)
        except CanonicalError as err:
            raise EvidenceError(f"the statement has no canonical JSON form: {err}") from None
        signature = self._signer.sign(PAYLOAD_TYPE, payload)
        return {"payloadType": PAYLOAD_TYPE, "payload": b64(payload), "signatures": signature.to_dsse()}

    def verify(self, envelope: Any, trusted: Mapping[str, SigningPublicKey]) -> VerifiedEvidence:
        statement, key = _open(envelope, trusted)
        return self._accept(statement, key)

    def _accept(self, statement: dict, key: SigningPublicKey) -> VerifiedEvidence:
        claim = statement["predicate"].get("attestation")
        if not isinstance(claim, Mapping) or claim.get("provider") != self.name:
            raise EvidenceInvalid("the statement does not name the software attestation provider")
        if claim.get("hardware_root_of_trust") is not False:
            raise EvidenceInvalid("the statement claims a hardware root of trust, but it is signed by a "
                                  "software evidence key; nothing here checked a platform quote")
        return VerifiedEvidence(statement, key.key_id, self.describe())


# --- statements --------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_dir() -> Path:
    import tensafe

    return Path(tensafe.__file__).resolve().parent


def code_identity() -> dict:
    """The tensafe version (installed metadata) and, when the source tree is a git checkout, its
    commit and whether files under the package differ from it (changed or untracked)."""
    from importlib import metadata

    try:
        version: str | None = metadata.version("tensafe")
    except metadata.PackageNotFoundError:
        import tensafe

        version = getattr(tensafe, "__version__", None)
    code: dict[str, Any] = {"name": "tensafe", "version": version}
    source = _source_dir()
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return code
    commit = head.stdout.strip()
    if head.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", commit):
        code["git_commit"] = commit
        try:
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal", "--", "."],
                                    cwd=source, capture_output=True, text=True, timeout=10)
            if status.returncode == 0:
                code["git_dirty"] = bool(status.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return code


def _subject(name: str, digest: str) -> dict:
    return {"name": name, "digest": {"sha256": digest}}


def _file_subject(path: Path, run_dir: Path) -> dict:
    try:
        name = path.resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        name = path.name
    try:
        return _subject(name, _sha256_file(path))
    except OSError as err:
        raise EvidenceError(f"cannot read {path}: {err.strerror}") from None


def _finite(value: Any) -> Any:
    """A figure as canonical JSON can hold it: NaN and infinities become null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _times(record: Mapping) -> dict:
    times = {}
    for key, names in _TIME_KEYS.items():
        found = next((record[n] for n in names if record.get(n) is not None), None)
        if found is not None:
            times[key] = str(found)
    return times


def training_statement(run_dir: Path, cfg_digest: str, resolved_config: dict, metrics: dict,
                       ledger: dict | None, packages: list[Path], audit_head: dict | None = None) -> dict:
    """The training-run statement (unsigned) for a task=train output folder: subjects are the
    adapter files under `run_dir/adapter` and the `packages`, named relative to `run_dir` where
    they lie inside it (else by file name). `audit_head`, the audit tree head when the statement
    is made, makes the evidence an anchor of the audit log (`tensafe audit verify --anchor`)."""
    run = Path(run_dir)
    adapter = run / "adapter"
    missing = [m for m in ADAPTER_FILES if not (adapter / m).is_file()]
    if missing:
        raise EvidenceError(f"{run} is not a training run folder: {adapter} lacks {', '.join(missing)}")
    subjects = [_file_subject(adapter / m, run) for m in ADAPTER_FILES]
    for package in packages:
        if not Path(package).is_file():
            raise EvidenceError(f"package {package} does not exist")
        subjects.append(_file_subject(Path(package), run))
    metrics = dict(metrics or {})
    eval_figures = {k: _finite(v) for k, v in sorted(metrics.items())
                    if k.startswith("eval_") and (v is None or isinstance(v, (int, float)))}
    privacy = {k: _finite(metrics[k]) for k in ("mechanism", "epsilon", "delta", "noise_multiplier",
                                                 "max_grad_norm", "sample_rate", "steps", "accountant",
                                                 "stopped_by_budget") if k in metrics}
    model = (resolved_config or {}).get("model") or {}
    predicate: dict[str, Any] = {
        "code": code_identity(),
        "config": {"digest": cfg_digest, "resolved": resolved_config},
        "base_model": {"name": model.get("name"), "hf_id": model.get("hf_id"),
                       "digest": metrics.get("base_model_digest")},
        "dataset_digest": metrics.get("dataset_digest"),
        "privacy": privacy,
        "privacy_ledger": ledger,
        "eval": eval_figures,
        "run": _times(metrics),
    }
    if audit_head is not None:
        predicate["audit_head"] = audit_head
    return {"_type": STATEMENT_TYPE, "subject": subjects, "predicateType": TRAINING_RUN,
            "predicate": predicate}


def he_parameters(backend: str, params: Any) -> dict:
    """The HE entry of a serving session from a backend name and a `CKKSParameters` (or anything
    with name, ring_degree and moduli)."""
    return {"backend": backend, "params": params.name, "ring_degree": int(params.ring_degree),
            "moduli_bits": [int(q).bit_length() for q in params.moduli]}


def _he_entry(adapter: str, he: Mapping) -> dict:
    if not isinstance(he, Mapping):
        raise EvidenceError(f"serving session: adapter {adapter!r}: he must be a mapping")
    bits = he.get("moduli_bits")
    if bits is None and he.get("moduli") is not None:
        bits = [int(q).bit_length() for q in he["moduli"]]
    backend, params, degree = he.get("backend"), he.get("params"), he.get("ring_degree")
    if isinstance(params, Mapping):  # {"name", "ring_degree", "moduli_bits"|"moduli"}
        degree = params.get("ring_degree", degree)
        if bits is None:
            bits = params.get("moduli_bits") or [int(q).bit_length() for q in params.get("moduli") or []]
        params = params.get("name")
    if not isinstance(backend, str) or not isinstance(params, str) or not isinstance(degree, int) \
            or not isinstance(bits, list) or not bits or not all(isinstance(b, int) for b in bits):
        raise EvidenceError(f"serving session: adapter {adapter!r}: he needs backend, params (name), "
                            "ring_degree and moduli_bits (or moduli)")
    return {"adapter": adapter, "backend": backend, "params": params, "ring_degree": degree,
            "moduli_bits": bits}


def serving_statement(session: dict) -> dict:
    """The serving-session statement (unsigned). `session`::

        {"config_digest": str, "started": str, "finished": str | None,
         "adapters": [{"name": str, "digest": sha256 hex (package or adapter weights),
                       "package_id": str (optional), "he": None | {"backend", "params",
                       "ring_degree", "moduli_bits"} (see `he_parameters`)}]}
    """
    if not isinstance(session, Mapping):
        raise EvidenceError("serving session: expected a mapping")
    adapters = session.get("adapters")
    if not isinstance(adapters, list) or not adapters:
        raise EvidenceError("serving session: no adapters or packages served; nothing to attest")
    subjects, served, he = [], [], []
    for item in adapters:
        name, digest = (item.get("name"), item.get("digest")) if isinstance(item, Mapping) else (None, None)
        if not isinstance(name, str) or not name or not isinstance(digest, str) \
                or not is_sha256_hex(digest):
            raise EvidenceError(f"serving session: adapter entry {item!r} needs a name and a sha256 "
                                "hex digest")
        subjects.append(_subject(name, digest))
        served.append({"name": name, "package_id": item.get("package_id"), "he": item.get("he") is not None})
        if item.get("he") is not None:
            he.append(_he_entry(name, item["he"]))
    predicate = {
        "code": code_identity(),
        "config": {"digest": session.get("config_digest")},
        "adapters": served,
        "he": he,
        "session": _times(session),
    }
    if session.get("audit_head") is not None:  # the audit tree head when the session ended
        predicate["audit_head"] = session["audit_head"]
    return {"_type": STATEMENT_TYPE, "subject": subjects, "predicateType": SERVING_SESSION,
            "predicate": predicate}


def check_statement(statement: Any) -> dict:
    """`statement` if it has the in-toto Statement v1 shape this module signs; EvidenceInvalid
    naming the first problem otherwise."""
    if not isinstance(statement, Mapping):
        raise EvidenceInvalid("the statement is not a JSON object")
    if statement.get("_type") != STATEMENT_TYPE:
        raise EvidenceInvalid(f"statement _type {statement.get('_type')!r} is not {STATEMENT_TYPE}")
    subjects = statement.get("subject")
    if not isinstance(subjects, list) or not subjects:
        raise EvidenceInvalid("the statement has no subjects")
    for i, subject in enumerate(subjects):
        if not isinstance(subject, Mapping) or not isinstance(subject.get("name"), str) \
                or not subject["name"]:
            raise EvidenceInvalid(f"subject {i} has no name")
        digest = subject.get("digest")
        if not isinstance(digest, Mapping) or not isinstance(digest.get("sha256"), str) \
                or not is_sha256_hex(digest["sha256"]):
            raise EvidenceInvalid(f"subject {subject['name']!r} has no sha256 digest "
                                  "(64 lowercase hex digits)")
    if not isinstance(statement.get("predicateType"), str) or not statement["predicateType"]:
        raise EvidenceInvalid("the statement has no predicateType")
    if not isinstance(statement.get("predicate"), Mapping):
        raise EvidenceInvalid("the statement has no predicate object")
    return dict(statement)


# --- envelopes ---------------------------------------------------------------------------------


def sign_statement(statement: dict, provider: AttestationProvider) -> dict:
    """The DSSE envelope of `statement` as `provider` signs it (with its attestation description
    in the predicate). A statement of the wrong shape is refused before anything is signed."""
    try:
        check_statement(statement)
    except EvidenceInvalid as err:
        raise EvidenceError(f"cannot sign: {err}") from None
    return provider.sign(statement)


def decode_envelope(envelope: Any) -> tuple[dict, bytes, list[Signature]]:
    """The statement, payload bytes and signatures of an envelope, NOT verified."""
    if not isinstance(envelope, Mapping):
        raise EvidenceInvalid("not a DSSE envelope (expected a JSON object)")
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise EvidenceInvalid(f"payloadType {envelope.get('payloadType')!r} is not {PAYLOAD_TYPE}")
    if not isinstance(envelope.get("payload"), str):
        raise EvidenceInvalid("the envelope has no payload")
    raw = envelope.get("signatures")
    if not isinstance(raw, list) or not raw:
        raise EvidenceInvalid("the envelope has no signatures")
    try:
        payload = unb64(envelope["payload"], "payload")
        signatures = signatures_from_dsse(raw)
    except CryptoError as err:
        raise EvidenceInvalid(str(err)) from None
    try:
        statement = strict_loads(payload)
    except CanonicalError as err:
        raise EvidenceInvalid(f"the payload is not JSON: {err}") from None
    return statement, payload, signatures


def _open(envelope: Any, trusted: Mapping[str, SigningPublicKey]) -> tuple[dict, SigningPublicKey]:
    statement, payload, signatures = decode_envelope(envelope)
    try:
        key = verify(PAYLOAD_TYPE, payload, signatures, trusted)
    except CryptoError as err:
        raise EvidenceInvalid(str(err)) from None
    statement = check_statement(statement)
    try:
        canonical = canonical_json(statement)
    except CanonicalError:
        canonical = b""
    if canonical != payload:
        raise EvidenceInvalid("the payload is not the canonical JSON of its statement")
    return statement, key


def verify_envelope(envelope: Any, trusted: Mapping[str, SigningPublicKey]) -> VerifiedEvidence:
    """The verified statement of `envelope`: its payload type, a signature by a key in `trusted`
    (never a key in the envelope), the canonical payload, the statement shape, and an attestation
    claim that a provider of this build can check (only `software`). EvidenceInvalid otherwise."""
    statement, key = _open(envelope, trusted)
    claim = statement["predicate"].get("attestation")
    provider = claim.get("provider") if isinstance(claim, Mapping) else None
    if provider != SoftwareAttestation.name:
        raise EvidenceInvalid(f"attestation provider {provider!r} cannot be verified in this build (only "
                              "'software'); a hardware TEE claim needs a provider that checks a real quote")
    return SoftwareAttestation()._accept(statement, key)


def _safe_relative(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return not name.startswith("/") and ":" not in name and all(p not in ("", ".", "..") for p in parts)


def verify_subjects(statement: Mapping, base_dir: Path) -> SubjectReport:
    """Recompute the digest of each subject file found under `base_dir` (by its relative name);
    names that are not plain relative paths are skipped, absent files reported missing."""
    base = Path(base_dir)
    checks = []
    for subject in statement["subject"]:
        name, expected = subject["name"], subject["digest"]["sha256"]
        if not _safe_relative(name):
            checks.append(SubjectCheck(name, "skipped", expected))
            continue
        path = base / name
        if not path.is_file():
            checks.append(SubjectCheck(name, "missing", expected))
            continue
        try:
            actual = _sha256_file(path)
        except OSError as err:
            raise EvidenceError(f"cannot read {path}: {err.strerror}") from None
        checks.append(SubjectCheck(name, "ok" if actual == expected else "mismatch", expected, actual))
    return SubjectReport(base, checks)


def write_evidence(path: Path, envelope: dict) -> None:
    """Write `envelope` to `path` as JSON, atomically (whole or not at all)."""
    try:
        write_atomically(path, (json.dumps(envelope, indent=2, sort_keys=True) + "\n").encode())
    except OSError as err:
        raise EvidenceError(f"cannot write {path}: {err.strerror}") from None


def create_evidence(statement: dict, path: Path, provider: AttestationProvider,
                    record: Callable[[str, dict], None] | None = None) -> dict:
    """Sign `statement`, write the envelope to `path` and (with `record`, e.g.
    `SecurityContext.record`) append an `evidence_create` audit record; returns the envelope."""
    envelope = sign_statement(statement, provider)
    write_evidence(path, envelope)
    if record is not None:
        signed, _, signatures = decode_envelope(envelope)
        record(EVIDENCE_CREATE, {
            "path": str(path), "predicate_type": signed["predicateType"], "provider": provider.name,
            "signers": [s.key_id for s in signatures],
            "subjects": {s["name"]: s["digest"]["sha256"] for s in signed["subject"]},
            "payload_sha256": hashlib.sha256(unb64(envelope["payload"], "payload")).hexdigest()})
    return envelope


def read_evidence(path: Path) -> Any:
    """The JSON in `path`; EvidenceError (exit 2) when it cannot be read or is not a JSON object."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_EVIDENCE_BYTES:
            raise EvidenceError(f"{path} is larger than {MAX_EVIDENCE_BYTES >> 20} MiB; not an evidence file")
        data = path.read_bytes()
    except OSError as err:
        raise EvidenceError(f"cannot read {path}: {err.strerror}") from None
    try:
        envelope = strict_loads(data)
    except CanonicalError as err:
        raise EvidenceError(f"{path} is not JSON ({err}); expected a DSSE evidence envelope") from None
    if not isinstance(envelope, dict):
        raise EvidenceError(f"{path} is not a JSON object; expected a DSSE evidence envelope")
    return envelope
