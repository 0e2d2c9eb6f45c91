"""task=serve: load the model and its adapters and serve them through the OpenAI-compatible API."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate

from tensafe.tasks.context import RunContext


def run(ctx: RunContext) -> dict[str, Any]:
    import uvicorn

    from tensafe.serving.app import ServerLimits, create_app
    from tensafe.serving.auth import load_key_hashes

    serving = ctx.cfg.serving
    hashes = load_key_hashes(serving.api_key_sha256, serving.api_key_file, "serving")
    engine = instantiate(ctx.raw.serving.build)(ctx.cfg)
    limits = ServerLimits(serving.max_prompt_tokens, serving.max_tokens, serving.max_body_bytes)
    app = create_app(engine, ctx.cfg.model.name, hashes, limits, serving.admin_key_sha256)
    print(f"serving {ctx.cfg.model.name} and adapters {sorted(serving.adapters)} "
          f"on http://{serving.host}:{serving.port}/v1", flush=True)
    uvicorn.run(app, host=serving.host, port=serving.port, log_level="warning",
                timeout_graceful_shutdown=serving.shutdown_timeout_s)
    return {"model": ctx.cfg.model.name, "adapters": sorted(serving.adapters)}
