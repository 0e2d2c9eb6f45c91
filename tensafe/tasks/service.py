"""task=service: the remote training service (docs/service.md). The official `tinker` SDK and
tensafe.client drive DP-SGD LoRA training of the configured model through it; the DP policy is the
server's, per tenant (service.tenants, service.policy)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from tensafe.config.schema import ServiceConfig, ServicePolicy, ServiceTask
from tensafe.errors import ConfigError
from tensafe.tasks.context import RunContext


def state_dir(cfg: ServiceConfig) -> Path:
    if cfg.state_dir:
        return Path(cfg.state_dir)
    return Path(os.environ.get("TENSAFE_SERVICE_DIR") or Path.home() / ".tensafe" / "service")


def tenant_keys(cfg: ServiceConfig) -> tuple[dict[str, str], dict[str, ServicePolicy]]:
    """API key digest → tenant, and each tenant's policy; a digest given to two tenants is refused."""
    from tensafe.serving.auth import load_key_hashes

    if not cfg.tenants:
        raise ConfigError(
            "service.tenants",
            {},
            "name at least one tenant with an API key, e.g. "
            "service.tenants={acme:{api_key_sha256:[<sha256 of a tml-… key>]}} "
            "(`tensafe keys api-key` makes one)",
        )
    digests: dict[str, str] = {}
    policies: dict[str, ServicePolicy] = {}
    for name, tenant in cfg.tenants.items():
        for digest in load_key_hashes(tenant.api_key_sha256, tenant.api_key_file, f"service.tenants.{name}"):
            if digests.setdefault(digest, name) != name:
                raise ConfigError(
                    f"service.tenants.{name}.api_key_sha256",
                    f"{digest[:12]}…",
                    f"is also tenant {digests[digest]!r}'s key; every key belongs to one tenant",
                )
        policies[name] = tenant.policy or cfg.policy
    return digests, policies


def run(ctx: RunContext) -> dict[str, Any]:
    ctx.task_config(ServiceTask)
    cfg = ctx.cfg.service
    digests, policies = tenant_keys(cfg)
    import uvicorn

    from tensafe.security.context import SecurityContext
    from tensafe.service.app import Tenants, create_service_app
    from tensafe.service.runtime import RESTARTED, Runtime
    from tensafe.service.store import Store
    from tensafe.service.vault import Vault, load_or_create_key
    from tensafe.serving.http import protocol

    root = state_dir(cfg)
    store = Store(root / "service.sqlite3")
    failed = store.recover(RESTARTED)
    key = load_or_create_key(Path(cfg.data_key_file) if cfg.data_key_file else root / "data.key")
    security = SecurityContext(ctx.cfg.security)

    def record(tenant: str, event: str, data: dict) -> None:
        security.audit.append(tenant, event, data)

    def package(tenant: str, run: Path, out: Path) -> dict:
        # the tenant's own chain: its package_create record and the audit head its package carries
        tenant_security = SecurityContext(ctx.cfg.security.model_copy(update={"tenant": tenant}))
        return tenant_security.package_run(run, out)

    runtime = Runtime(
        cfg, ctx.cfg.model, store, Vault(root / "blobs", key), policies, record, package, ctx.config_digest
    )
    app = create_service_app(
        runtime, Tenants(digests), cfg.sdk_versions, cfg.max_body_bytes, cfg.max_samples_per_request
    )
    print(
        f"training service for {ctx.cfg.model.name} on http://{cfg.host}:{cfg.port}/api/v1 "
        f"(tenants {sorted(policies)}, state {root}; {failed} unfinished requests failed at restart)",
        flush=True,
    )
    try:
        uvicorn.run(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level="warning",
            timeout_graceful_shutdown=math.ceil(cfg.shutdown_timeout_s),
            timeout_keep_alive=math.ceil(cfg.timeout_keep_alive_s),
            limit_concurrency=cfg.max_connections,
            http=protocol(cfg.header_timeout_s),
        )
    finally:
        runtime.close()
        store.close()
    return {"model": ctx.cfg.model.name, "state_dir": str(root), "tenants": sorted(policies)}
