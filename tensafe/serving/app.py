"""The OpenAI-compatible HTTP API over an engine: the routes, API-key auth, body limits and deadlines,
and the error handlers. The generation routes' work is `completions.Completions` and `chat.Chat`
(their shared half is `generation.Generation`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tensafe.observability.metrics import CONTENT_TYPE, ServingMetrics
from tensafe.serving import protocol as p
from tensafe.serving.auth import BearerKeys
from tensafe.serving.base import AdapterError, Engine
from tensafe.serving.chat import Chat
from tensafe.serving.completions import Completions
from tensafe.serving.errors import APIError, error_response, refusal
from tensafe.serving.generation import ServerLimits
from tensafe.serving.guard import RequestGuard


def _param(loc) -> str | None:
    """The parameter a pydantic error location names: its fields and indexes, without the union
    members' tags pydantic adds (a type name, or a chat message's role after its index)."""
    parts: list[str] = []
    previous = None
    for part in loc:
        tag = not isinstance(part, int) and (
            not str(part).isidentifier() or str(part) in _TYPE_TAGS
            or (isinstance(previous, int) and str(part) in _ROLES))
        if not tag:
            parts.append(str(part))
        previous = part
    return ".".join(parts) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_ROLES = {"system", "developer", "user", "assistant", "tool"}
_STATUS_TEXT = {400: "invalid request", 401: "missing or wrong API key", 404: "no such model",
                408: "the body did not arrive in time", 413: "body too large",
                429: "too many sequences in flight for this key", 500: "generation failed",
                504: "the request ran past serving.request_timeout_s"}


@dataclass(frozen=True)
class Exposure:
    """What a client without a key may see. `/health` is always open and says only "ok"; `/ready`
    adds the in-flight count for a keyed client only. `metrics`: "key" (an API or admin key, as a
    Prometheus scraper's bearer token), "public", or "off" (served elsewhere, e.g. their own port).
    `docs`: serve /docs, /redoc and /openapi.json (anonymously); the admin routes are never listed."""

    metrics: Literal["key", "public", "off"] = "key"
    docs: bool = False


def create_app(engine: Engine, base_model: str, api_key_hashes: list[str],
               limits: ServerLimits | None = None, admin_key_hashes: Sequence[str] = (),
               exposure: Exposure = Exposure(), metrics: ServingMetrics | None = None) -> FastAPI:
    """The API over `engine`. Admin routes (/v1/admin) take only `admin_key_hashes`' keys and are
    off (403) without any; `exposure` says what anonymous clients see."""
    keys, admin_keys = BearerKeys(api_key_hashes), BearerKeys(list(admin_key_hashes))
    limits = limits or ServerLimits()
    metrics = metrics or ServingMetrics(lambda: engine.in_flight)
    engine.observe_he(lambda name, stage, secs: metrics.he_lora_latency.labels(name, stage).observe(secs))

    def drafts(adapter: str | None, proposed: int, accepted: int) -> None:
        model = adapter or base_model
        metrics.draft_tokens.labels(model, "accepted").inc(accepted)
        metrics.draft_tokens.labels(model, "rejected").inc(proposed - accepted)

    engine.observe_speculation(drafts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    docs: dict[str, Any] = {} if exposure.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="TenSafe", lifespan=lifespan, **docs)

    def keyed(request: Request) -> bool:
        header = request.headers.get("authorization")
        return keys.accepts(header) or admin_keys.accepts(header)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        metrics.errors.labels(getattr(request.state, "model", ""), err.body.type).inc()
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, f"the body is not valid JSON: {first.get('msg', '')}",
                                           code="invalid_json"))
        param = _param(first.get("loc", ())[1:])
        if first.get("type") == "extra_forbidden":
            return error_response(APIError(400, f"{param}: not a parameter of this API; remove it",
                                           param=param, code="unknown_parameter"))
        message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        # a 405 keeps its Allow header
        return error_response(APIError(err.status_code, str(err.detail), headers=err.headers))

    def refuse(request: Request) -> Response | None:
        """Why a request is answered before the app sees it: a missing key, a bad Content-Length."""
        if request.url.path.startswith("/v1/admin"):
            if not admin_key_hashes:
                return error_response(APIError(403, "the admin API is off; set serving.admin_key_sha256",
                                               "permission_error"))
            if not admin_keys.accepts(request.headers.get("authorization")):
                return error_response(APIError(401, "invalid or missing admin key (Authorization: Bearer …)",
                                               "authentication_error", code="invalid_api_key"))
        elif request.url.path.startswith("/v1/"):
            refused = refusal(request.headers, keys, limits.max_body_bytes)
            if refused is not None:
                return error_response(refused)
        return None

    app.add_middleware(RequestGuard, refuse=refuse, limit=limits.max_body_bytes,
                       count=lambda model, status: metrics.requests.labels(model, str(status)).inc(),
                       body_timeout_s=limits.body_timeout_s)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", include_in_schema=False)
    async def ready(request: Request):
        if not engine.ready:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return {"status": "ready", "in_flight": engine.in_flight} if keyed(request) else {"status": "ready"}

    if exposure.metrics != "off":
        @app.get("/metrics", include_in_schema=False)
        async def prometheus(request: Request):
            if exposure.metrics == "key" and not keyed(request):
                raise APIError(401, "/metrics needs an API key (Authorization: Bearer …); serving.metrics="
                               "public opens it", "authentication_error", code="invalid_api_key")
            return Response(metrics.render(), media_type=CONTENT_TYPE)

    def errors(*statuses: int) -> dict:
        """OpenAPI entries of the error statuses a route answers (in OpenAI's error shape)."""
        return {s: {"model": p.ErrorResponse, "description": _STATUS_TEXT[s]} for s in (401, *statuses)}

    generation = {**errors(400, 404, 408, 413, 429, 500, 504),
                  200: {"content": {"text/event-stream": {"schema": {  # each event: a JSON chunk, or [DONE]
                        "type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"],
                  }}},
                        "description": "the completion; server-sent events when `stream` is true"}}

    @app.get("/v1/models", responses=errors())
    async def models() -> p.ModelList:
        created = p.now()
        cards = [p.ModelCard(id=base_model, created=created, root=base_model)]
        cards += [
            p.ModelCard(id=a, created=created, root=base_model, parent=base_model) for a in engine.adapters
        ]
        return p.ModelList(data=cards)

    @app.get("/v1/models/{model_id}", responses=errors(404))
    async def model_card(model_id: str) -> p.ModelCard:
        parent = None if model_id == base_model else base_model
        if parent is not None and model_id not in engine.adapters:
            raise APIError(404, f"model {model_id!r} does not exist; GET /v1/models lists them",
                           param="model", code="model_not_found")
        return p.ModelCard(id=model_id, created=p.now(), root=base_model, parent=parent)

    per_key: dict[str, int] = {}  # sequences in flight per API key (its SHA-256), for both routes
    completion_handler = Completions(engine, base_model, limits, metrics, per_key)
    chat_handler = Chat(engine, base_model, limits, metrics, per_key)


    @app.post("/v1/admin/adapters", status_code=201, include_in_schema=False)
    async def load_adapter(req: p.LoadAdapterRequest) -> p.ModelCard:
        if req.name == base_model:
            raise APIError(400, f"{req.name!r} is the base model's name; choose another", param="name")
        try:
            await engine.load_adapter(req.name, req.path)
        except AdapterError as err:
            raise APIError(400, str(err), param="path") from None
        return p.ModelCard(id=req.name, created=p.now(), root=base_model, parent=base_model)

    @app.delete("/v1/admin/adapters/{name}", include_in_schema=False)
    async def unload_adapter(name: str):
        if name not in engine.adapters:
            raise APIError(404, f"no adapter named {name!r} is loaded", param="name", code="model_not_found")
        try:
            await engine.unload_adapter(name)
        except AdapterError as err:
            raise APIError(404, str(err), param="name", code="model_not_found") from None
        metrics.forget(name)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/completions", responses=generation)
    async def completions(req: p.CompletionRequest, request: Request):
        return await completion_handler.create(req, request)

    @app.post("/v1/chat/completions", responses=generation)
    async def chat(req: p.ChatCompletionRequest, request: Request):
        return await chat_handler.create(req, request)


    def openapi() -> dict:
        """FastAPI's document without the 422 it adds to every route with a body: this API answers
        validation errors with a 400 in OpenAI's shape."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise it
    return app
