"""The HE-LoRA evaluator as its own HTTP service (`tensafe task=he_evaluator`), and its client transport.

The service holds one adapter's factors A, B and scale s in plaintext. A key holder opens a session by
posting its public context (the parameter set's digest and its public key: no secret key, no evaluation
keys), then posts one serialized ciphertext batch per adapted module and gets the encrypted delta
s·X·A·B back. The service never holds a secret key and cannot decrypt; what it does not protect (the
key holder can learn A·B from its own queries) is stated in docs/he_lora.md.

    GET    /health                                      liveness, unauthenticated
    GET    /v1/he/info                                  adapter, backend, parameter set, wire version, modules
    POST   /v1/he/sessions                              public context → {session, modules}
    POST   /v1/he/sessions/{session}/modules/{module}   ciphertext batch → encrypted delta
    DELETE /v1/he/sessions/{session}

Every /v1 route needs `Authorization: Bearer <key>`. Bodies are application/octet-stream in the
versioned TenSafe HE wire format. Errors are JSON {"error": {"message", "type", "code"}}; for bad HE
input the code is the error's class name (ParameterMismatch, SerializationError, ...), which the
client re-raises as the same typed error.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from urllib.parse import quote

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tensafe.he import wire
from tensafe.he.backends.base import CKKSBackend
from tensafe.he.errors import HEError
from tensafe.he.lora import Evaluator
from tensafe.serving.adapters import Adapter
from tensafe.serving.auth import BearerKeys
from tensafe.serving.he_lora import ModuleInfo, build_evaluators, module_info

OCTET_STREAM = "application/octet-stream"
_HE_ERRORS = {cls.__name__: cls for cls in (HEError, *HEError.__subclasses__())}


class _Refused(Exception):
    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type_


def _error(status: int, message: str, code: str | None, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status_code=status)


@dataclass
class _Session:
    """One key holder's evaluators (built for its public context); one call at a time per module."""

    evaluators: dict[str, Evaluator]
    locks: dict[str, threading.Lock]


def create_evaluator_app(
    adapter: Adapter, make_backend: Callable[[], CKKSBackend], api_key_hashes: list[str],
    modules: list[str] | None = None, max_sessions: int = 8,
    max_message_bytes: int = wire.DEFAULT_MAX_BYTES,
) -> FastAPI:
    """The evaluator service for `adapter` (`modules`: all by default). `app.state.info` is what
    GET /v1/he/info answers; `app.state.sessions` holds the open sessions, least recently used first,
    at most `max_sessions` of them."""
    if max_sessions < 1:
        raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
    missing = sorted(set(modules or ()) - set(adapter.modules))
    if missing:
        raise HEError(f"adapter {adapter.name!r} has no modules {missing}; it has {sorted(adapter.modules)}")
    served = {name: adapter.modules[name] for name in (modules or sorted(adapter.modules))}
    keys = BearerKeys(api_key_hashes)
    probe = make_backend()
    info = {
        "adapter": adapter.name, "backend": probe.name,
        "params": {"name": probe.params.name, "digest": probe.params.digest},
        "wire_version": wire.VERSION, "max_message_bytes": max_message_bytes,
        "modules": {name: dict(zip(("h_in", "r", "h_out"), f.shape)) for name, f in served.items()},
    }
    sessions: OrderedDict[str, _Session] = OrderedDict()
    # No /docs, /redoc or /openapi.json: the evaluator's clients are key holders with the wire format.
    app = FastAPI(title="TenSafe HE-LoRA evaluator", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.info, app.state.sessions = info, sessions

    @app.exception_handler(_Refused)
    async def _refused(request: Request, err: _Refused):
        return _error(err.status, err.message, err.code, err.type)

    @app.exception_handler(HEError)
    async def _he_error(request: Request, err: HEError):
        return _error(400, str(err), type(err).__name__)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        return _error(err.status_code, str(err.detail), None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if not keys.accepts(request.headers.get("authorization")):
                return _error(401, "invalid or missing API key (Authorization: Bearer …)", "invalid_api_key",
                              "authentication_error")
            length = request.headers.get("content-length")
            if length is not None and not length.isdigit():
                return _error(400, f"Content-Length {length[:32]!r} is not a number of bytes",
                              "invalid_content_length")
            if length is not None and int(length) > max_message_bytes:
                return _error(413, f"request body over {max_message_bytes} bytes", "request_too_large")
        return await call_next(request)

    async def body_of(request: Request) -> bytes:
        parts, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_message_bytes:
                    raise _Refused(413, f"request body over {max_message_bytes} bytes", "request_too_large")
                parts.append(chunk)
        except ClientDisconnect:
            raise _Refused(400, "the client disconnected mid-body", "client_disconnected") from None
        return b"".join(parts)

    def session_of(session: str) -> _Session:
        found = sessions.get(session)
        if found is None:
            raise _Refused(404, f"no session {session!r}: closed, or evicted by {max_sessions} newer ones; "
                           "open a new one", "session_not_found")
        sessions.move_to_end(session)
        return found

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/he/info")
    async def get_info():
        return info

    @app.post("/v1/he/sessions")
    async def open_session(request: Request):
        context = await body_of(request)
        evaluators = await asyncio.to_thread(
            build_evaluators, served, make_backend, context, max_message_bytes
        )
        session = secrets.token_urlsafe(24)
        sessions[session] = _Session(evaluators, {name: threading.Lock() for name in evaluators})
        while len(sessions) > max_sessions:
            sessions.popitem(last=False)
        return {"session": session,
                "modules": {name: asdict(m) for name, m in module_info(evaluators).items()}}

    @app.post("/v1/he/sessions/{session}/modules/{module}")
    async def evaluate(session: str, module: str, request: Request):
        found = session_of(session)
        if module not in found.evaluators:
            raise _Refused(404, f"module {module!r} is not served; modules: {sorted(found.evaluators)}",
                           "module_not_found")
        evaluator, lock, data = found.evaluators[module], found.locks[module], await body_of(request)

        def run():
            with lock:
                return evaluator.evaluate_bytes(data), evaluator.last_counters

        out, counters = await asyncio.to_thread(run)
        headers = {f"x-tensafe-{k.replace('_', '-')}": str(v) for k, v in counters.as_dict().items()}
        return Response(bytes(out), media_type=OCTET_STREAM, headers=headers)

    @app.delete("/v1/he/sessions/{session}")
    async def close_session(session: str):
        session_of(session)
        del sessions[session]
        return {"session": session, "closed": True}

    return app


class HTTPEvaluators:
    """The evaluator as its own service (`tensafe task=he_evaluator`), reached over HTTP: activations
    leave the key holder only as ciphertexts. `url` is the service's base (…/v1/he may be included)."""

    protects_activations = True

    def __init__(self, url: str, api_key: str, timeout_s: float = 300):
        self.url = url.rstrip("/").removesuffix("/v1/he")
        self.timeout_s = timeout_s
        self._client = httpx.Client(base_url=self.url + "/v1/he", timeout=timeout_s,
                                    headers={"authorization": f"Bearer {api_key}"})
        self._session: str | None = None
        self._context: bytes | None = None
        self.last_counters: dict[str, int] = {}

    def _call(self, method: str, path: str, data: bytes | None = None) -> httpx.Response:
        headers = None if data is None else {"content-type": OCTET_STREAM}
        try:
            reply = self._client.request(method, path, content=None if data is None else bytes(data),
                                         headers=headers)
        except httpx.TimeoutException:
            raise HEError(f"the HE evaluator at {self.url} gave no answer in {self.timeout_s} s") from None
        except httpx.TransportError as err:
            raise HEError(f"cannot reach the HE evaluator at {self.url}: {err}") from None
        if reply.is_success:
            return reply
        try:
            body = reply.json()["error"]
            message, code = str(body["message"]), body.get("code")
        except (ValueError, KeyError, TypeError):
            message, code = reply.text[:200] or reply.reason_phrase, None
        kind = _HE_ERRORS.get(code, HEError)
        error = kind(f"HE evaluator at {self.url}: {message} (HTTP {reply.status_code})")
        error.status, error.code = reply.status_code, code
        raise error

    def open(self, public_context: bytes) -> dict[str, ModuleInfo]:
        if self._session is not None:
            self._delete()
        reply = self._call("POST", "/sessions", bytes(public_context)).json()
        self._session, self._context = reply["session"], bytes(public_context)
        return {name: ModuleInfo(m["h_in"], m["r"], m["h_out"], m["input_bound"])
                for name, m in reply["modules"].items()}

    def evaluate(self, module: str, data: bytes) -> bytes:
        if self._session is None or self._context is None:
            raise HEError(f"no open session with the HE evaluator at {self.url}; call open() first")
        try:
            reply = self._call("POST", f"/sessions/{self._session}/modules/{quote(module, safe='')}", data)
        except HEError as err:
            if getattr(err, "code", None) != "session_not_found":
                raise
            self._session = None  # evicted by newer sessions: reopen with the same context, retry once
            self.open(self._context)
            reply = self._call("POST", f"/sessions/{self._session}/modules/{quote(module, safe='')}", data)
        self.last_counters = {k.removeprefix("x-tensafe-").replace("-", "_"): int(v)
                              for k, v in reply.headers.items() if k.startswith("x-tensafe-")}
        return reply.content

    def _delete(self) -> None:
        session, self._session = self._session, None
        with contextlib.suppress(HEError):  # already evicted, or the service is gone: nothing to free
            self._call("DELETE", f"/sessions/{session}")

    def close(self) -> None:
        if self._session is not None:
            self._delete()
        self._client.close()

    def __repr__(self) -> str:
        return f"HTTPEvaluators({self.url}; activations leave the key holder only encrypted)"
