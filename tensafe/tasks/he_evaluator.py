"""task=he_evaluator: one adapter's HE-LoRA evaluator as its own HTTP service (see serving/he_service.py).

It holds the adapter's factors in plaintext and only public contexts of key holders; it never sees
a secret key or an activation in the clear. Key holders reach it with `HTTPEvaluators`.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

from tensafe.config.schema import HEEvaluatorTask
from tensafe.errors import ConfigError
from tensafe.security.events import ADAPTER_LOAD, ADAPTER_LOAD_REFUSED
from tensafe.security.package import is_package
from tensafe.tasks.context import RunContext


def run(ctx: RunContext) -> dict[str, Any]:
    task, he = ctx.task_config(HEEvaluatorTask), ctx.cfg.he
    if he.backend == "off":
        raise ConfigError("he", "off", "task=he_evaluator needs an HE backend, e.g. he=ckks_numpy")
    import uvicorn

    from tensafe.he.backends import build_backend
    from tensafe.he.params import resolve_parameters
    from tensafe.security.context import SecurityContext
    from tensafe.serving.adapters import adapter_record, read_adapter
    from tensafe.serving.auth import load_key_hashes
    from tensafe.serving.he_service import create_evaluator_app

    hashes = load_key_hashes(task.api_key_sha256, task.api_key_file, "task")
    source = Path(task.adapter)
    name = task.adapter_name or (source.stem if is_package(source) else source.resolve().name)
    security = SecurityContext(ctx.cfg.security)
    # A package is verified and opened as the engine does (trust store, recipient key, rollback).
    trust = security.package_trust() if is_package(source) else None
    try:
        adapter = read_adapter(name, task.adapter, "task.adapter", trust)
    except ConfigError as err:
        security.record(ADAPTER_LOAD_REFUSED, {"adapter": name, "path": task.adapter, "reason": str(err)})
        raise
    security.record(ADAPTER_LOAD, adapter_record(adapter))
    params = resolve_parameters(he.params, he.max_tokens, he.precision_bits, he.value_bits, he.allow_insecure)
    make_backend = partial(build_backend, he.backend, params)  # one backend instance per evaluator
    app = create_evaluator_app(adapter, make_backend, hashes, task.modules, task.max_sessions,
                               he.max_message_bytes, task.body_timeout_s)
    modules = sorted(app.state.info.modules)
    print(f"HE evaluator for adapter {name} ({', '.join(modules)}) on http://{task.host}:{task.port}/v1/he",
          flush=True)
    uvicorn.run(app, host=task.host, port=task.port, log_level="warning",
                timeout_graceful_shutdown=math.ceil(task.shutdown_timeout_s))
    return {"adapter": name, "modules": modules, "backend": he.backend, "params": params.name}
