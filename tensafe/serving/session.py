"""One serving session's trust and record, shared by both engines.

Every engine (embedded or vLLM) is built with a `ServingSession` and goes through it for each
adapter it is asked to serve, at start or through the admin API: `open` checks the source (bare
folders refused unless unsigned adapters are allowed; packages verified against the trust store,
bound to the base model, not expired, not rolled back) and reads it; `loaded`, `refused` and
`unloaded` write the audit records; at the end `evidence` signs a statement of everything served.
So both engines record and attest the same things, through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tensafe.security.context import SecurityContext
from tensafe.security.events import ADAPTER_LOAD, ADAPTER_LOAD_REFUSED, ADAPTER_UNLOAD
from tensafe.security.package import is_package
from tensafe.serving.adapters import Adapter, adapter_record, check_signed, materialize, read_adapter


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ServingSession:
    """`security`: the keystore and audit log (None: nothing is recorded and packages cannot be
    served); `allow_unsigned`: serve bare adapter folders too; `base_model_digest`: packages made
    for another base model are refused (None: not checked; an engine that cannot compute the
    digest refuses packages itself, as the vLLM engine does with a local model_path)."""

    security: SecurityContext | None
    allow_unsigned: bool = True
    base_model_digest: str | None = None
    served: list[dict] = field(default_factory=list)  # every adapter loaded, in order (the evidence)
    started: str = field(default_factory=_now)

    def trust(self, source: str | Path):
        """The package trust for `source`, or None for a folder."""
        if not is_package(source) or self.security is None:
            return None
        return self.security.package_trust(self.base_model_digest)

    def open(self, name: str, source: str | Path, key: str) -> Adapter:
        """The adapter `source` holds, if this session may serve it; a ConfigError naming `key`
        (and an `adapter_load_refused` record) if not."""
        return self._checked(name, source, key, lambda: read_adapter(name, source, key, self.trust(source)))

    def open_on_disk(self, name: str, source: str | Path, key: str) -> tuple[Adapter, str]:
        """As `open`, and a folder holding the adapter's files for an engine that loads from disk
        (a package's decrypted copy: `adapters.remove_materialized` deletes it)."""
        return self._checked(name, source, key, lambda: materialize(name, source, self.trust(source), key))

    def _checked(self, name: str, source: str | Path, key: str, read):
        try:
            check_signed(source, self.allow_unsigned, key)
            return read()
        except Exception as err:
            self.refused(name, source, err)
            raise

    def loaded(self, adapter: Adapter, he: dict | None = None) -> dict:
        """Record that `adapter` is served from now on (`he`: the HE parameters it runs under)."""
        record = adapter_record(adapter, he)
        self.served.append(record)
        self._record(ADAPTER_LOAD, record)
        return record

    def refused(self, name: str, source: str | Path, reason: Any) -> None:
        self._record(ADAPTER_LOAD_REFUSED, {"adapter": name, "path": str(source), "reason": str(reason)})

    def unloaded(self, name: str) -> None:
        self._record(ADAPTER_UNLOAD, {"adapter": name})

    def _record(self, event: str, data: dict) -> None:
        if self.security is not None:
            self.security.record(event, data)

    def evidence(self, config_digest: str, out_dir: Path) -> Path | None:
        """Sign a statement of this session (what was served, under which HE parameters) to
        `out_dir/evidence.json` and the audit head to `out_dir/audit_head.json`; None when nothing
        was served or no signing key is configured."""
        if not self.served or self.security is None:
            return None
        from tensafe.security.evidence import serving_statement

        adapters = [{"name": r["adapter"], "digest": r["digest"], "package_id": r["package_id"],
                     "he": r["he"]} for r in self.served]
        session: dict[str, Any] = {"config_digest": config_digest, "started": self.started,
                                   "finished": _now(), "adapters": adapters}
        session["audit_head"] = self.security.audit_head()
        path = self.security.evidence(serving_statement(session), out_dir / "evidence.json")
        self.security.sign_head(out_dir / "audit_head.json")
        return path
