"""task=serve: load the model and its adapters and serve them through the OpenAI-compatible API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tensafe.errors import ConfigError
from tensafe.tasks.context import RunContext


def api_key_hashes(serving) -> list[str]:
    hashes = [h.lower() for h in serving.api_key_sha256]
    if serving.api_key_file:
        path = Path(serving.api_key_file)
        if not path.is_file():
            raise ConfigError("serving.api_key_file", serving.api_key_file, "no such file")
        lines = [ln.strip().lower() for ln in path.read_text().splitlines() if ln.strip()]
        bad = [ln for ln in lines if len(ln) != 64 or any(c not in "0123456789abcdef" for c in ln)]
        if bad:
            raise ConfigError(
                "serving.api_key_file", serving.api_key_file, "every line must be a SHA-256 hex digest"
            )
        hashes += lines
    if not hashes:
        raise ConfigError(
            "serving.api_key_sha256", [], "set at least one API key's SHA-256 (or serving.api_key_file); "
            "the server does not run without authentication"
        )
    return hashes


def load_adapters(model, adapters: dict[str, str]):
    """The base model with every named adapter folder loaded (PEFT), or the base model alone."""
    if not adapters:
        return model
    from peft import PeftModel

    for name, folder in adapters.items():
        if not (Path(folder) / "adapter_config.json").is_file():
            raise ConfigError(
                f"serving.adapters.{name}", folder, "not an adapter folder (no adapter_config.json)"
            )
    (first, path), *rest = adapters.items()
    model = PeftModel.from_pretrained(model, path, adapter_name=first, is_trainable=False)
    for name, folder in rest:
        model.load_adapter(folder, adapter_name=name, is_trainable=False)
    return model


def run(ctx: RunContext) -> dict[str, Any]:
    import uvicorn

    from tensafe.models.loader import load_model
    from tensafe.serving.app import ServerLimits, create_app
    from tensafe.serving.engine import EmbeddedEngine

    serving = ctx.cfg.serving
    hashes = api_key_hashes(serving)
    loaded = load_model(ctx.cfg.model, seed=ctx.cfg.seed)
    model = load_adapters(loaded.model, serving.adapters)
    engine = EmbeddedEngine(model, loaded.tokenizer, list(serving.adapters), serving.max_running,
                            serving.prefill_chunk)
    limits = ServerLimits(serving.max_prompt_tokens, serving.max_tokens, serving.max_body_bytes)
    app = create_app(engine, ctx.cfg.model.name, hashes, limits)
    print(f"serving {ctx.cfg.model.name} and adapters {sorted(serving.adapters)} "
          f"on http://{serving.host}:{serving.port}/v1", flush=True)
    uvicorn.run(app, host=serving.host, port=serving.port, log_level="warning",
                timeout_graceful_shutdown=serving.shutdown_timeout_s)
    return {"model": ctx.cfg.model.name, "adapters": sorted(serving.adapters)}
