"""task=serve: load the model and its adapters and serve them through the OpenAI-compatible API."""

from __future__ import annotations

import math
import signal
from typing import Any

from hydra.utils import instantiate

from tensafe.tasks.context import RunContext


class _Stopped(Exception):
    """SIGTERM after uvicorn's graceful shutdown."""


def _stopped(signum, frame) -> None:
    raise _Stopped(signum)


def run(ctx: RunContext) -> dict[str, Any]:
    import uvicorn
    from prometheus_client import start_http_server

    from tensafe.observability.metrics import ServingMetrics
    from tensafe.serving.app import Exposure, ServerLimits, create_app
    from tensafe.serving.auth import check_separate, load_key_hashes
    from tensafe.serving.http import protocol

    serving = ctx.cfg.serving
    hashes = load_key_hashes(serving.api_key_sha256, serving.api_key_file, "serving")
    check_separate(hashes, serving.admin_key_sha256, serving.admin_keys_may_serve)
    engine = instantiate(ctx.raw.serving.build)(ctx.cfg)
    limits = ServerLimits(serving.max_prompt_tokens, serving.max_tokens, serving.max_body_bytes,
                          serving.max_sequences_per_request, serving.max_sequences_per_key,
                          serving.request_timeout_s, serving.body_timeout_s)
    metrics = ServingMetrics(lambda: engine.in_flight)
    app = create_app(engine, ctx.cfg.model.name, hashes, limits, serving.admin_key_sha256,
                     Exposure(serving.metrics, serving.docs), metrics)
    if serving.metrics_port is not None:
        start_http_server(serving.metrics_port, addr=serving.host, registry=metrics.registry)
    print(f"serving {ctx.cfg.model.name} and adapters {sorted(serving.adapters)} "
          f"on http://{serving.host}:{serving.port}/v1", flush=True)
    # uvicorn finishes in-flight requests on SIGTERM/SIGINT, then re-raises the signal with the
    # handler found at start; this one turns it into an exception, so the session's evidence is
    # still written and the process exits 0 after a graceful stop
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        uvicorn.run(app, host=serving.host, port=serving.port, log_level="warning",
                    timeout_graceful_shutdown=math.ceil(serving.shutdown_timeout_s),
                    timeout_keep_alive=math.ceil(serving.timeout_keep_alive_s),
                    limit_concurrency=serving.max_connections, http=protocol(serving.header_timeout_s))
    except (_Stopped, KeyboardInterrupt):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    evidence = engine.session.evidence(ctx.config_digest, ctx.output_dir)  # what this session served
    result = {"model": ctx.cfg.model.name, "adapters": sorted(serving.adapters),
              "evidence": str(evidence) if evidence else None}
    ctx.write_metrics(result)
    return result
