"""What jobs use of the security layer, built once from the `security` config: the keystore, the
audit chain (records go to the configured tenant), package building and package trust."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from functools import cached_property
from pathlib import Path

from tensafe.errors import ConfigError
from tensafe.security.crypto import CryptoError, RecipientPublicKey, Signer
from tensafe.security.events import ADAPTER_LOAD, KEY_USE, PACKAGE_CREATE


class SecurityContext:
    def __init__(self, cfg):
        self.cfg = cfg

    @cached_property
    def keystore(self):
        from tensafe.security.keys import Keystore, default_root

        return Keystore(Path(self.cfg.keystore) if self.cfg.keystore else default_root())

    @cached_property
    def audit(self):
        from tensafe.security.audit import AuditChain, default_db

        return AuditChain(Path(self.cfg.audit_db) if self.cfg.audit_db else default_db())

    def record(self, event: str, data: dict) -> None:
        self.audit.append(self.cfg.tenant, event, data)

    def audit_head(self) -> dict:
        """This tenant's audit tree head now (what a package carries, signed with it)."""
        return self.audit.tree_head(self.cfg.tenant)

    def signer(self, purpose: str) -> Signer:
        if not self.cfg.signing_key:
            raise ConfigError("security.signing_key", None, f"a signing key is needed to {purpose}: "
                              "`tensafe keys generate signing --name NAME --trust`, then set it")
        return self.keystore.signer(self.cfg.signing_key)

    def recipients(self) -> list[RecipientPublicKey]:
        keys = []
        for path in self.cfg.package_recipients:
            try:
                keys.append(RecipientPublicKey.from_json(json.loads(Path(path).read_text())))
            except (OSError, ValueError, CryptoError) as err:
                raise ConfigError("security.package_recipients", path,
                                  f"not a recipient public key file (tensafe keys export): {err}") from None
        return keys

    def package_trust(self, base_model_digest: str | None = None):
        """Trusted signing keys, this machine's recipient key, the audit chain as the record and as
        the memory of the releases served (rollback protection), bound to `base_model_digest`."""
        from tensafe.security.package import PackageTrust

        recipient = self.keystore.recipient(self.cfg.recipient_key) if self.cfg.recipient_key else None
        return PackageTrust(self.keystore.trusted(), recipient, self.record, base_model_digest,
                            self.served_version)

    def served_version(self, adapter: str, signer: str) -> int | None:
        """The highest release of `signer`'s packages this tenant has served as `adapter`, read from
        the audit chain's adapter_load records."""
        versions = [r.data.get("version") for r in self.audit.records(self.cfg.tenant)
                    if r.event == ADAPTER_LOAD and r.data.get("adapter") == adapter
                    and r.data.get("signer") == signer and isinstance(r.data.get("version"), int)]
        return max(versions, default=None)

    def package_run(self, run_dir: Path, out: Path) -> dict:
        """Build `out` (.tssp) from a training run folder, signed and (if configured) encrypted;
        records `package_create` and puts the audit head at packaging time in the manifest."""
        from tensafe.security.package import build_package, run_manifest

        members, fields = run_manifest(run_dir)
        signer, recipients = self.signer("sign packages"), self.recipients()
        fields["audit_head"] = self.audit_head()
        days = self.cfg.package_valid_days
        expires = datetime.now(timezone.utc) + timedelta(days=days) if days is not None else None
        manifest = build_package(out, members, fields, signer, recipients, version=self.cfg.package_version,
                                 expires_at=expires)
        self.record(PACKAGE_CREATE, {"path": str(out), "package_id": manifest["package_id"],
                                       "signer": signer.key_id, "recipients": [r.key_id for r in recipients],
                                       "members": {m["name"]: m["sha256"] for m in manifest["members"]}})
        self.record(KEY_USE, {"key_id": signer.key_id, "purpose": "sign package", "path": str(out)})
        return manifest

    def sign_head(self, out: Path | None = None) -> Path | None:
        """Sign this tenant's audit tree head (done at the end of every run that has a signing key)
        and write it to `out`, an anchor outside the database: `tensafe audit verify --anchor out`
        then catches a later truncation, rollback or rewrite of the history up to here."""
        if not self.cfg.signing_key:
            return None
        from tensafe.security.audit import write_head

        head = self.audit.sign_head(self.cfg.tenant, self.signer("sign the audit head"))
        return write_head(head, out) if out is not None else None

    def evidence(self, statement: dict, path: Path) -> Path | None:
        """Sign `statement` (software attestation, security.signing_key) to `path`, recording
        `evidence_create`; None, with nothing written, when no signing key is configured."""
        from tensafe.security.evidence import SoftwareAttestation, create_evidence

        if not self.cfg.signing_key:
            return None
        create_evidence(statement, path, SoftwareAttestation(self.signer("sign evidence")), self.record)
        return path
