"""The HE-LoRA evaluator as its own HTTP service (`tensafe task=he_evaluator`).

The service holds one adapter's factors A, B and scale s in plaintext. A key holder opens a session by
posting its public context, which also chooses the packing: a CKKS context (the parameter set's digest
and its public key) for slot packing, a coefficient context (ring, prime, input bits; no key at all) for
coefficient packing. No secret key, no evaluation keys. With slot packing it posts one ciphertext batch
per adapted module and gets the encrypted delta s·X·A·B back; with coefficient packing it posts stage 1
(X, gets X·A encrypted), decrypts and re-encrypts, and posts stage 2 (U, gets U·s·B encrypted). The
service never holds a secret key and cannot decrypt; what it does not protect (the key holder can learn
the adapter from its own queries) is stated in docs/he_lora.md.

    GET    /health                                                     liveness, unauthenticated
    GET    /v1/he/info                                                 EvaluatorInfo
    POST   /v1/he/sessions                                             public context → SessionOpened
    POST   /v1/he/sessions/{session}/modules/{module}                  slots: batch → encrypted delta
    POST   /v1/he/sessions/{session}/modules/{module}/stages/{stage}   coefficients: stage 1 or 2
    POST   /v1/he/sessions/{session}/stages/{stage}?modules=a,b        the same for several modules:
                                                                       one upload for all, or one each,
                                                                       back to back; results likewise
    DELETE /v1/he/sessions/{session}                                   SessionClosed

Every /v1 route needs `Authorization: Bearer <key>`, checked before a body is read. Messages are
`he_protocol`'s; errors are `errors.APIError`s, with an HE error's stable code for bad HE input.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tensafe.he import wire
from tensafe.he.backends.base import CKKSBackend
from tensafe.he.coefficient import COEFFICIENT_BACKENDS
from tensafe.he.errors import HEError
from tensafe.serving.adapters import Adapter
from tensafe.serving.auth import BearerKeys
from tensafe.serving.errors import APIError, error_response, refusal
from tensafe.serving.guard import RequestGuard
from tensafe.serving.he_lora import (
    COEFFICIENT_CONTEXTS,
    PACKINGS,
    AnyEvaluator,
    build_evaluators,
    evaluate_group_on,
    module_info,
)
from tensafe.serving.he_protocol import (
    OCTET_STREAM,
    EvaluatorInfo,
    ModuleOffer,
    ModuleShape,
    ParameterSet,
    SessionClosed,
    SessionOpened,
)


@dataclass
class _Session:
    """One key holder's evaluators (built for its public context); one call at a time per module."""

    evaluators: dict[str, AnyEvaluator]
    locks: dict[str, threading.Lock]


class _Sessions:
    """Open sessions, least recently used first, at most `limit` of them."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open: OrderedDict[str, _Session] = OrderedDict()

    def add(self, session: _Session) -> str:
        name = secrets.token_urlsafe(24)
        self._open[name] = session
        while len(self._open) > self.limit:
            self._open.popitem(last=False)
        return name

    def get(self, name: str) -> _Session:
        found = self._open.get(name)
        if found is None:
            raise APIError(404, f"no session {name!r}: closed, or evicted by {self.limit} newer ones; "
                           "open a new one", code="session_not_found")
        self._open.move_to_end(name)
        return found

    def close(self, name: str) -> None:
        self.get(name)
        del self._open[name]

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, name: str) -> bool:
        return name in self._open


def create_evaluator_app(
    adapter: Adapter, make_backend: Callable[[], CKKSBackend], api_key_hashes: list[str],
    modules: list[str] | None = None, max_sessions: int = 8,
    max_message_bytes: int = wire.DEFAULT_MAX_BYTES, body_timeout_s: float = 30.0,
) -> FastAPI:
    """The evaluator service for `adapter` (`modules`: all by default); a request body over
    `max_message_bytes` is a 413, one not whole `body_timeout_s` after its headers a 408.
    `app.state.info` is what GET /v1/he/info answers; `app.state.sessions` holds the open sessions
    (`max_sessions` at most)."""
    if max_sessions < 1:
        raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
    missing = sorted(set(modules or ()) - set(adapter.modules))
    if missing:
        raise HEError(f"adapter {adapter.name!r} has no modules {missing}; it has {sorted(adapter.modules)}")
    served = {name: adapter.modules[name] for name in (modules or sorted(adapter.modules))}
    keys = BearerKeys(api_key_hashes)
    probe = make_backend()
    packings = [p for p in PACKINGS if p == "slots" or probe.name in COEFFICIENT_BACKENDS]
    info = EvaluatorInfo(
        adapter=adapter.name, backend=probe.name,
        params=ParameterSet(name=probe.params.name, digest=probe.params.digest),
        wire_version=wire.VERSION, packings=packings, max_message_bytes=max_message_bytes,
        modules={name: ModuleShape(h_in=f.shape[0], r=f.shape[1], h_out=f.shape[2])
                 for name, f in served.items()},
    )
    sessions = _Sessions(max_sessions)
    # No /docs, /redoc or /openapi.json: the evaluator's clients are key holders with the wire format.
    app = FastAPI(title="TenSafe HE-LoRA evaluator", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.info, app.state.sessions = info, sessions

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(HEError)
    async def _he_error(request: Request, err: HEError):
        return error_response(APIError(400, str(err), code=err.code))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        return error_response(APIError(err.status_code, str(err.detail), headers=err.headers))

    def refuse(request: Request) -> Response | None:
        refused = refusal(request.headers, keys, max_message_bytes) if request.url.path.startswith("/v1/") \
            else None
        return None if refused is None else error_response(refused)

    # Pure ASGI (not @app.middleware, which costs a task and a stream per request): every round of
    # a forward passes here. It also reads the body whole, within max_message_bytes and in time.
    app.add_middleware(RequestGuard, refuse=refuse, limit=max_message_bytes, body_timeout_s=body_timeout_s,
                       settings=("he.max_message_bytes", "task.body_timeout_s"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/he/info")
    async def get_info() -> EvaluatorInfo:
        return info

    @app.post("/v1/he/sessions")
    async def open_session(request: Request) -> SessionOpened:
        context = await request.body()
        if wire.kind_of(context) in COEFFICIENT_CONTEXTS and "coefficients" not in packings:
            raise APIError(400, f"this evaluator runs {probe.name}, which serves slot packing only: open the "
                           "session with a CKKS public context (he.packing=slots)", code="packing_not_served")
        evaluators = await asyncio.to_thread(build_evaluators, served, make_backend, context,
                                             max_message_bytes)
        name = sessions.add(_Session(evaluators, {module: threading.Lock() for module in evaluators}))
        return SessionOpened(session=name, modules={module: ModuleOffer(**asdict(m))
                                                    for module, m in module_info(evaluators).items()})

    async def run(session: str, names: list[str], stage: int | None, request: Request) -> Response:
        """`names`' evaluators on the body's frames (one for all, or one each), their results back
        to back, and the operation counters in x-tensafe-* headers."""
        found = sessions.get(session)
        unknown = sorted(set(names) - set(found.evaluators))
        if unknown or len(set(names)) != len(names):
            raise APIError(404, f"modules must be distinct served modules; not served: {unknown}; "
                           f"modules: {sorted(found.evaluators)}", code="module_not_found")
        body = await request.body()
        frames = [bytes(f) for f in wire.split(body, len(names), max_message_bytes)]

        def compute():
            for name in sorted(names):  # one lock order for every request: no deadlock
                found.locks[name].acquire()
            try:
                return evaluate_group_on(found.evaluators, names, frames, stage)
            finally:
                for name in names:
                    found.locks[name].release()

        out, counters = await asyncio.to_thread(compute)
        headers = {f"x-tensafe-{k.replace('_', '-')}": str(v) for k, v in counters.as_dict().items()}
        return Response(b"".join(bytes(o) for o in out), media_type=OCTET_STREAM, headers=headers)

    def stage_number(stage: str) -> int:
        if stage not in ("1", "2"):
            raise APIError(404, f"coefficient packing has stages 1 and 2, not {stage!r}",
                           code="stage_not_found")
        return int(stage)

    @app.post("/v1/he/sessions/{session}/modules/{module}")
    async def evaluate(session: str, module: str, request: Request):
        return await run(session, [module], None, request)

    @app.post("/v1/he/sessions/{session}/modules/{module}/stages/{stage}")
    async def evaluate_stage(session: str, module: str, stage: str, request: Request):
        return await run(session, [module], stage_number(stage), request)

    @app.post("/v1/he/sessions/{session}/stages/{stage}")
    async def evaluate_group(session: str, stage: str, request: Request, modules: str = ""):
        number, names = stage_number(stage), [name for name in modules.split(",") if name]
        if not names:
            raise APIError(400, "name the modules: ?modules=a,b", code="modules_missing")
        return await run(session, names, number, request)

    @app.delete("/v1/he/sessions/{session}")
    async def close_session(session: str) -> SessionClosed:
        sessions.close(session)
        return SessionClosed(session=session)

    return app
