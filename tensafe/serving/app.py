"""The OpenAI-compatible HTTP API over an engine: routes, API-key auth, limits, errors, SSE."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tensafe.observability.metrics import CONTENT_TYPE, ServingMetrics
from tensafe.serving import protocol as p
from tensafe.serving.auth import BearerKeys, hash_api_key
from tensafe.serving.base import AdapterError, Engine, SamplingParams, TokenEvent, TokenLogprob
from tensafe.serving.errors import APIError, error_response
from tensafe.serving.tools import (
    ChatTemplate,
    call_schema,
    new_call_id,
    template_messages,
    template_tools,
)
from tensafe.serving.tools import tool_calls as parse_tool_calls

log = logging.getLogger(__name__)
def _field_name(part) -> bool:
    """Whether a pydantic error location part names a field or an index (not a union member's type)."""
    return isinstance(part, int) or (str(part).isidentifier() and str(part) not in _TYPE_TAGS)


def _finish(reason: str | None) -> Any:
    """A finished choice's reason as the API reports it: stop, length or tool_calls (an error
    ends the request before any choice carries it)."""
    if reason not in (None, "stop", "length", "tool_calls"):
        raise ValueError(f"not an OpenAI finish reason: {reason!r}")
    return reason


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_DEADLINE, _GONE = -1, -2  # what a request's watchdog puts in its event queue
_STATUS_TEXT = {400: "invalid request", 401: "missing or wrong API key", 404: "no such model",
                408: "the body did not arrive in time", 413: "body too large",
                429: "too many sequences in flight for this key", 500: "generation failed",
                504: "the request ran past serving.request_timeout_s"}


@dataclass(frozen=True)
class ServerLimits:
    """What one request, and one API key, may ask of the server."""

    max_prompt_tokens: int = 2048
    max_tokens: int = 1024
    max_body_bytes: int = 1 << 20  # enforced on the bytes read, whatever Content-Length says
    max_sequences_per_request: int = 32  # prompts × n
    max_sequences_per_key: int = 64  # sequences in flight for one API key
    request_timeout_s: float = 600.0  # no request outlives this: it ends with an error
    body_timeout_s: float = 30.0  # a request's body arrives whole within this, or it is a 408


@dataclass(frozen=True)
class Exposure:
    """What a client without a key may see. `/health` is always open and says only "ok"; `/ready`
    adds the in-flight count for a keyed client only. `metrics`: "key" (an API or admin key, as a
    Prometheus scraper's bearer token), "public", or "off" (served elsewhere, e.g. their own port).
    `docs`: serve /docs, /redoc and /openapi.json (anonymously); the admin routes are never listed."""

    metrics: Literal["key", "public", "off"] = "key"
    docs: bool = False


class _Guard:
    """Pure ASGI middleware in front of the app (so that handlers still see a client disconnect):
    `refuse(request)` answers instead of the app when it returns a response (auth, Content-Length);
    then the body of every /v1/ request is read up to `limit` bytes before the app sees it, so a
    chunked body (no Content-Length) cannot be larger: over the limit the answer is a 413. A body
    that has not arrived whole `body_timeout_s` after the headers is a 408."""

    def __init__(self, app, refuse: Callable[[Request], Response | None], limit: int,
                 count: Callable[[str, int], None], body_timeout_s: float):
        self.app, self.refuse, self.limit, self.count = app, refuse, limit, count
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not scope["path"].startswith("/v1/"):
            return await self._guarded(scope, receive, send)
        status = []

        async def sending(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, sending)
        finally:  # every /v1 request, by the model a handler named (scope["state"]) and its status
            self.count(scope.get("state", {}).get("model", ""), status[0] if status else 499)

    async def _guarded(self, scope, receive, send):
        refusal = self.refuse(Request(scope))
        if refusal is not None:
            return await refusal(scope, receive, send)
        if not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                late = f"the request body did not arrive within {self.body_timeout_s:g} s " \
                    "(serving.body_timeout_s)"
                return await self._error(408, late, "request_timeout", scope, receive, send)
            if message["type"] != "http.request":
                return  # the client left before its body ended
            size += len(message.get("body", b""))
            if size > self.limit:
                large = f"request body over {self.limit} bytes (serving.max_body_bytes)"
                return await self._error(413, large, "request_too_large", scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal whole
            if whole is not None:
                message, whole = whole, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _error(status: int, message: str, code: str, scope, receive, send) -> None:
        await error_response(APIError(status, message, code=code, headers={"connection": "close"}))(
            scope, receive, send)


def create_app(engine: Engine, base_model: str, api_key_hashes: list[str],
               limits: ServerLimits = ServerLimits(), admin_key_hashes: Sequence[str] = (),
               exposure: Exposure = Exposure(), metrics: ServingMetrics | None = None) -> FastAPI:
    """The API over `engine`. Admin routes (/v1/admin) take only `admin_key_hashes`' keys and are
    off (403) without any; `exposure` says what anonymous clients see."""
    keys, admin_keys = BearerKeys(api_key_hashes), BearerKeys(list(admin_key_hashes))
    metrics = metrics or ServingMetrics(lambda: engine.in_flight)
    engine.observe_he(lambda name, stage, secs: metrics.he_lora_latency.labels(name, stage).observe(secs))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    docs: dict[str, Any] = {} if exposure.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="TenSafe", lifespan=lifespan, **docs)
    per_key: dict[str, int] = {}  # sequences in flight per API key (its SHA-256)

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
        loc = [str(x) for x in first.get("loc", ())[1:] if _field_name(x)]
        param = ".".join(loc) or None
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
            if not keys.accepts(request.headers.get("authorization")):
                return error_response(APIError(401, "invalid or missing API key (Authorization: Bearer …)",
                                               "authentication_error", code="invalid_api_key"))
            length = request.headers.get("content-length")
            if length is not None and not length.isdigit():
                return error_response(APIError(400, f"Content-Length {length[:32]!r} is not a byte count",
                                               code="invalid_content_length"))
            if length is not None and int(length) > limits.max_body_bytes:
                return error_response(APIError(413, f"request body over {limits.max_body_bytes} bytes",
                                               code="request_too_large"))
        return None

    app.add_middleware(_Guard, refuse=refuse, limit=limits.max_body_bytes,
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

    def adapter_for(model: str) -> str | None:
        if model == base_model:
            return None
        if model in engine.adapters:
            return model
        raise APIError(404, f"model {model!r} does not exist; GET /v1/models lists them", param="model",
                       code="model_not_found")

    def response_schema(req: p._Sampling) -> dict | None:
        return req.response_format.output_schema() if req.response_format is not None else None

    async def checked_schema(schema: dict | None, param: str) -> str | None:
        """`schema` as JSON text once the grammar engine has compiled it (a 400 naming `param` if not)."""
        if schema is None:
            return None
        if "json_schema" not in engine.supports:
            raise APIError(400, f"{param}: structured outputs are not supported by this engine; remove it",
                           param=param, code="unsupported_parameter")
        problem = await asyncio.to_thread(engine.grammars.check, schema)
        if problem is not None:
            raise APIError(400, f"{param}: this JSON schema cannot constrain generation: {problem[:500]}",
                           param=param, code="invalid_schema")
        return json.dumps(schema)

    def format_param(req: p._Sampling) -> str:
        given = req.response_format
        schema_given = given is not None and given.type == "json_schema"
        return "response_format.json_schema.schema" if schema_given else "response_format"

    def sampling(req: p._Sampling, max_tokens: int | None, prompts: int, logprobs: int | None = None,
                 json_schema: str | None = None) -> SamplingParams:
        refused = req.unsupported()
        if refused is None and logprobs is not None and "logprobs" not in engine.supports:
            refused = "logprobs"
        if refused is not None:
            raise APIError(400, f"{refused} is not supported by this server; remove it or send its "
                           "neutral value", param=refused, code="unsupported_parameter")
        if prompts * req.n > limits.max_sequences_per_request:
            raise APIError(400, f"{prompts} prompt(s) × n={req.n} is {prompts * req.n} sequences, over this "
                           f"server's limit of {limits.max_sequences_per_request} per request",
                           param="n", code="too_many_sequences")
        max_tokens = max_tokens or limits.max_tokens
        if max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens}",
                           param="max_tokens")
        bias = tuple((int(token), float(value)) for token, value in (req.logit_bias or {}).items())
        check_ids([token for token, _ in bias], "logit_bias")
        return SamplingParams(max_tokens, req.temperature, req.top_p, req.seed, tuple(req.stop_strings()),
                              req.presence_penalty, req.frequency_penalty, bias, logprobs, json_schema)

    def check_ids(ids: list[int], param: str) -> None:
        """Refuse token ids outside the tokenizer's vocabulary (ids are ≥ 0 by the request schema)."""
        if ids and max(ids) >= len(engine.tokenizer):
            raise APIError(400, f"{param}: token id {max(ids)} is not in the vocabulary "
                           f"({len(engine.tokenizer)} tokens)", param=param)

    def token_text(token: int) -> str:
        return engine.tokenizer.decode([token], skip_special_tokens=False)

    def completion_logprobs(items: list[TokenLogprob], start: int = 0) -> p.CompletionLogprobs:
        """OpenAI's completion logprobs; `start`: the text offset of the first token (after an echo)."""
        tokens = [token_text(t.token) for t in items]
        offsets, at = [], start
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return p.CompletionLogprobs(
            tokens=tokens, token_logprobs=[t.logprob for t in items], text_offset=offsets,
            top_logprobs=[{token_text(i): v for i, v in t.top} for t in items],
        )

    def chat_logprobs(items: list[TokenLogprob]) -> p.ChoiceLogprobs:
        def top(i: int, v: float) -> p.TopLogprob:
            text = token_text(i)
            return p.TopLogprob(token=text, logprob=v, bytes=list(text.encode("utf-8")))

        return p.ChoiceLogprobs(content=[
            p.ChatTokenLogprob(**top(t.token, t.logprob).model_dump(),
                               top_logprobs=[top(i, v) for i, v in t.top])
            for t in items
        ])

    def check_prompt(ids: list[int]) -> list[int]:
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, over this server's limit of "
                           f"{limits.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
        return ids

    async def run(request: Request, prompts: list[list[int]], adapter: str | None, params: SamplingParams,
                  n: int) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(choice index, event) for prompt × n sequences, interleaved as they are produced. The
        request ends with an error at `request_timeout_s`, and is abandoned (its sequences leave
        the engine) when the client disconnects."""
        label = adapter or base_model
        arrived, first = time.perf_counter(), None
        key = hash_api_key(request.headers.get("authorization", "").removeprefix("Bearer ").strip())
        count = len(prompts) * n
        if per_key.get(key, 0) + count > limits.max_sequences_per_key:
            raise APIError(429, f"this API key has {per_key.get(key, 0)} sequences in flight; the limit is "
                           f"{limits.max_sequences_per_key}: wait for some to finish", "rate_limit_error",
                           code="rate_limit_exceeded")
        per_key[key] = per_key.get(key, 0) + count
        metrics.tokens.labels(label, "prompt").inc(sum(len(ids) for ids in prompts))
        merged: asyncio.Queue = asyncio.Queue()
        jobs = []
        for i, ids in enumerate(prompts):
            for j in range(n):
                seed = None if params.seed is None else params.seed + j
                seq_params = dataclasses.replace(params, seed=seed)

                async def pump(index=i * n + j, ids=ids, seq_params=seq_params):
                    try:
                        async for event in engine.generate(ids, adapter, seq_params):
                            await merged.put((index, event))
                    except Exception as err:  # noqa: BLE001  (an engine fault ends this request, said)
                        log.exception("generation of choice %d failed", index)
                        await merged.put((index, TokenEvent("", 0, "error", f"{type(err).__name__}: {err}")))

                jobs.append(asyncio.create_task(pump()))
        done = 0
        produced: dict[int, int] = {}  # completion tokens so far, per unfinished choice
        deadline = arrived + limits.request_timeout_s

        async def watchdog():
            """Once a second at most: the deadline, and whether the client is still there."""
            while True:
                await asyncio.sleep(max(0.0, min(1.0, deadline - time.perf_counter())))
                if time.perf_counter() >= deadline:
                    return await merged.put((_DEADLINE, None))
                if await request.is_disconnected():
                    return await merged.put((_GONE, None))

        jobs.append(asyncio.create_task(watchdog()))
        try:
            while done < len(jobs) - 1:
                index, event = await merged.get()
                if index == _DEADLINE:
                    raise APIError(504, f"the request ran past serving.request_timeout_s="
                                   f"{limits.request_timeout_s:g} s and was stopped", "server_error",
                                   code="timeout")
                if index == _GONE:
                    return  # nobody is waiting for the answer: stop generating it
                if event.finish_reason == "error":
                    raise APIError(500, f"generation failed: {event.error}", "server_error")
                if first is None:
                    first = time.perf_counter()
                    metrics.time_to_first_token.labels(label).observe(first - arrived)
                if event.finish_reason is not None:
                    done += 1
                    produced.pop(index, None)
                    metrics.tokens.labels(label, "completion").inc(event.completion_tokens)
                else:
                    produced[index] = event.completion_tokens
                yield index, event
            metrics.latency.labels(label).observe(time.perf_counter() - arrived)
        finally:
            if produced:  # a client that left (or a deadline): its tokens were generated all the same
                metrics.tokens.labels(label, "completion").inc(sum(produced.values()))
            per_key[key] -= count
            if not per_key[key]:
                del per_key[key]
            for job in jobs:
                job.cancel()

    async def collect(request, prompts, adapter, params, n):
        """Whole texts, finish reasons, token counts and token logprobs per choice index."""
        texts, finish, tokens, logprobs = {}, {}, {}, {}
        async for index, ev in run(request, prompts, adapter, params, n):
            texts[index] = texts.get(index, "") + ev.text
            logprobs.setdefault(index, []).extend(ev.logprobs)
            if ev.finish_reason is not None:
                finish[index], tokens[index] = ev.finish_reason, ev.completion_tokens
        return texts, finish, tokens, logprobs

    async def streamed(request, req: p._Sampling, prompts, adapter, params, chunk, choice):
        """Stream chunks: one per event (`chunk([choice(index, event)])`), then usage if asked for."""
        tokens: dict[int, int] = {}
        async for index, ev in run(request, prompts, adapter, params, req.n):
            yield chunk([choice(index, ev)])
            if ev.finish_reason is not None:
                tokens[index] = ev.completion_tokens
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], usage(prompts, sum(tokens.values())))

    def usage(prompts: list[list[int]], completion: int) -> p.Usage:
        prompt_tokens = sum(len(ids) for ids in prompts)
        return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                       total_tokens=prompt_tokens + completion)

    def sse(chunks: AsyncIterator, model: str) -> StreamingResponse:
        async def body():
            try:
                async for chunk in chunks:
                    yield f"data: {chunk.model_dump_json()}\n\n"
            except APIError as err:  # headers are sent: the error travels as an event, as OpenAI's does
                metrics.errors.labels(model, err.body.type).inc()
                yield f"data: {p.ErrorResponse(error=err.body).model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

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
        request.state.model = req.model
        adapter = adapter_for(req.model)
        given = req.prompts()
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs would need the prompt's log-probabilities, which this "
                           "server does not compute; drop one of them", param="echo",
                           code="unsupported_parameter")
        schema = await checked_schema(response_schema(req), format_param(req))
        params = sampling(req, req.max_tokens, len(given), req.logprobs, schema)
        check_ids([i for ids in given if not isinstance(ids, str) for i in ids], "prompt")

        def encode() -> tuple[list[list[int]], list[str]]:  # off the event loop: long prompts stall nothing
            ids = [engine.tokenizer(t).input_ids if isinstance(t, str) else list(t) for t in given]
            texts = [t if isinstance(t, str) else engine.tokenizer.decode(t) for t in given]
            return ids, texts if req.echo else []

        encoded, texts = await asyncio.to_thread(encode)
        prompts = [check_prompt(ids) for ids in encoded]
        rid, created = p.new_id("cmpl"), p.now()
        if req.stream:

            def chunk(choices: list[p.CompletionChoice], totals: p.Usage | None = None):
                return p.CompletionResponse(
                    id=rid, created=created, model=req.model, choices=choices, usage=totals
                )

            def choice(index: int, ev: TokenEvent) -> p.CompletionChoice:
                lp = completion_logprobs(list(ev.logprobs)) if params.logprobs is not None else None
                return p.CompletionChoice(index=index, text=ev.text, finish_reason=_finish(ev.finish_reason),
                                          logprobs=lp)

            async def with_echo():
                if req.echo:  # the prompts' text first, as its own chunk per choice
                    for index in range(len(given) * req.n):
                        yield chunk([p.CompletionChoice(index=index, text=texts[index // req.n],
                                                        finish_reason=None)])
                async for item in streamed(request, req, prompts, adapter, params, chunk, choice):
                    yield item

            return sse(with_echo(), req.model)
        texts_out, finish, tokens, logprobs = await collect(request, prompts, adapter, params, req.n)
        choices = []
        for i in sorted(finish):
            echo = texts[i // req.n] if req.echo else ""
            lp = completion_logprobs(logprobs[i]) if params.logprobs is not None else None
            choices.append(p.CompletionChoice(index=i, text=echo + texts_out[i], finish_reason=finish[i],
                                              logprobs=lp))
        return p.CompletionResponse(id=rid, created=created, model=req.model, choices=choices,
                                    usage=usage(prompts, sum(tokens.values())))

    template = ChatTemplate(engine.tokenizer)

    async def chat_schema(req: p.ChatCompletionRequest) -> str | None:
        """The structured output a chat request asks for: its response_format, or its forced tool call."""
        mode = req.tool_mode()
        if mode != "none" and not template.renders_tools:
            raise APIError(400, f"tools: the chat template of {base_model!r} does not show tools to the "
                           "model, so it cannot call them; remove tools (or send tool_choice \"none\")",
                           param="tools", code="unsupported_parameter")
        if mode == "auto":
            raise APIError(400, "tool_choice: \"auto\" needs a parser of this model's own tool-call format, "
                           "which this server does not have; send \"required\" or {\"type\": \"function\", "
                           "\"function\": {\"name\": …}} (the call is then generated under its JSON schema), "
                           "or \"none\"", param="tool_choice", code="unsupported_parameter")
        if mode == "none":
            return await checked_schema(response_schema(req), format_param(req))
        if response_schema(req) is not None:
            raise APIError(400, "response_format: a forced tool call is generated under its own schema; send "
                           "one of response_format and tool_choice", param="response_format")
        return await checked_schema(call_schema(req), "tools")

    @app.post("/v1/chat/completions", responses=generation)
    async def chat(req: p.ChatCompletionRequest, request: Request):
        request.state.model = req.model
        adapter = adapter_for(req.model)
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling(req, req.max_completion_tokens or req.max_tokens, 1, top, await chat_schema(req))
        calling = req.tool_mode() in ("required", "named")
        if any(m.tool_calls for m in req.messages) and not template.renders_tool_calls:
            raise APIError(400, f"messages: the chat template of {base_model!r} does not show earlier tool "
                           "calls to the model; send those turns as text", param="messages",
                           code="unsupported_parameter")
        messages = template_messages(req.messages)
        tools = template_tools(req.tools) if req.tools and template.renders_tools else None

        def encode():
            try:
                return template.render(messages, tools)
            except Exception as err:  # noqa: BLE001  (the template's own check, e.g. role order)
                raise APIError(400, f"messages: the chat template of {base_model!r} cannot render them: "
                               f"{type(err).__name__}: {str(err)[:300]}", param="messages") from None

        prompts = [check_prompt(await asyncio.to_thread(encode))]
        rid, created = p.new_id("chatcmpl"), p.now()
        if req.stream:

            def chunk(choices: list[p.ChatChunkChoice], totals: p.Usage | None = None):
                return p.ChatCompletionChunk(
                    id=rid, created=created, model=req.model, choices=choices, usage=totals
                )

            pending: dict[int, str] = {}  # "required" calls: the array's text until it is whole
            started: set[int] = set()  # named calls whose first piece (id and name) is sent

            def choice(index: int, ev: TokenEvent) -> p.ChatChunkChoice:
                lp = chat_logprobs(list(ev.logprobs)) if params.logprobs is not None else None
                finish = ev.finish_reason
                if not calling:
                    delta = p.Delta(content=ev.text or None)
                elif isinstance(req.tool_choice, p.NamedToolChoice):
                    first = index not in started
                    started.add(index)
                    delta = p.Delta(tool_calls=[p.ToolCallDelta(
                        index=0, id=new_call_id() if first else None, type="function" if first else None,
                        function=p.FunctionCallDelta(name=req.tool_choice.function.name if first else None,
                                                     arguments=ev.text))])
                    finish = "tool_calls" if finish == "stop" else finish
                else:
                    pending[index] = pending.get(index, "") + ev.text
                    delta = p.Delta()
                    if finish == "stop":
                        delta, finish = p.Delta(tool_calls=[p.ToolCallDelta(
                            index=k, id=c.id, type="function", function=p.FunctionCallDelta(
                                name=c.function.name, arguments=c.function.arguments))
                            for k, c in enumerate(parse_tool_calls(req, pending.pop(index)))]), "tool_calls"
                    elif finish is not None:  # cut short: the text so far, as content
                        delta = p.Delta(content=pending.pop(index) or None)
                return p.ChatChunkChoice(index=index, delta=delta, finish_reason=_finish(finish), logprobs=lp)

            async def with_role_first():
                for i in range(req.n):  # OpenAI's first chunk of each choice carries the role
                    yield chunk([p.ChatChunkChoice(index=i, delta=p.Delta(role="assistant", content=""))])
                async for item in streamed(request, req, prompts, adapter, params, chunk, choice):
                    yield item

            return sse(with_role_first(), req.model)
        texts_out, finish, tokens, logprobs = await collect(request, prompts, adapter, params, req.n)
        choices = []
        for i in sorted(finish):
            message, reason = p.AssistantMessage(content=texts_out[i]), finish[i]
            if calling and reason == "stop":
                calls = parse_tool_calls(req, texts_out[i])
                message, reason = p.AssistantMessage(content=None, tool_calls=calls), "tool_calls"
            lp = chat_logprobs(logprobs[i]) if params.logprobs is not None else None
            choices.append(p.ChatChoice(index=i, message=message, finish_reason=reason, logprobs=lp))
        return p.ChatCompletionResponse(id=rid, created=created, model=req.model, choices=choices,
                                        usage=usage(prompts, sum(tokens.values())))

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
