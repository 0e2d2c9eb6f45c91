"""The key holder's side of the HE evaluator service (`he_service`): an `EvaluatorTransport` over
HTTP, so activations leave the key holder only as ciphertexts.

A decode step makes several rounds per layer, one after another, so the client is urllib3's
connection pool (kept-alive connections, one per calling thread): its per-request cost is a
fraction of httpx's, which matters at hundreds of rounds per forward."""

from __future__ import annotations

import contextlib
import threading
from urllib.parse import quote

import urllib3
from pydantic import BaseModel, ValidationError
from urllib3 import exceptions as http

from tensafe.he import wire
from tensafe.he.errors import HEError, by_code
from tensafe.serving.he_lora import ModuleInfo
from tensafe.serving.he_protocol import OCTET_STREAM, SessionOpened
from tensafe.serving.protocol import ErrorResponse


class HTTPEvaluators:
    """The evaluator as its own service (`tensafe task=he_evaluator`), reached over HTTP. `url` is the
    service's base (…/v1/he may be included)."""

    protects_activations = True

    def __init__(self, url: str, api_key: str, timeout_s: float = 300):
        self.url = url.rstrip("/").removesuffix("/v1/he")
        self.timeout_s = timeout_s
        self._base = urllib3.util.parse_url(self.url).path or ""
        self._pool = urllib3.connection_from_url(self.url, maxsize=8, block=False, retries=False,
                                                 timeout=urllib3.Timeout(connect=min(timeout_s, 10.0),
                                                                         read=timeout_s))
        self._headers = {"authorization": f"Bearer {api_key}"}
        self._session: str | None = None
        self._context: bytes | None = None
        self._reopen = threading.Lock()
        self.last_counters: dict[str, int] = {}

    def _call(self, method: str, path: str, data: bytes | None = None) -> urllib3.BaseHTTPResponse:
        headers = self._headers if data is None else {**self._headers, "content-type": OCTET_STREAM}
        url = f"{self._base}/v1/he{path}"
        try:
            try:
                reply = self._pool.urlopen(method, url, body=data, headers=headers)
            except http.ProtocolError:  # a kept-alive connection the service had closed: once more, afresh
                reply = self._pool.urlopen(method, url, body=data, headers=headers)
        except http.NewConnectionError as err:
            raise HEError(f"cannot reach the HE evaluator at {self.url}: {err}") from None
        except http.TimeoutError:
            raise HEError(f"the HE evaluator at {self.url} gave no answer in {self.timeout_s} s") from None
        except http.HTTPError as err:
            raise HEError(f"cannot reach the HE evaluator at {self.url}: {err}") from None
        if 200 <= reply.status < 300:
            return reply
        try:
            body = ErrorResponse.model_validate_json(reply.data).error
            message, code = body.message, body.code
        except ValidationError:
            message, code = reply.data[:200].decode(errors="replace") or str(reply.reason), None
        error = by_code(code)(f"HE evaluator at {self.url}: {message} (HTTP {reply.status})")
        error.status, error.wire_code = reply.status, code
        raise error

    def _parse(self, reply: urllib3.BaseHTTPResponse, model: type[BaseModel]):
        try:
            return model.model_validate_json(reply.data)
        except ValidationError as err:
            raise HEError(f"the HE evaluator at {self.url} sent a malformed {model.__name__}: "
                          f"{err.errors()[0]['msg'] if err.errors() else err}") from None

    def open(self, public_context: bytes) -> dict[str, ModuleInfo]:
        if self._session is not None:
            self._delete()
        opened = self._parse(self._call("POST", "/sessions", bytes(public_context)), SessionOpened)
        self._session, self._context = opened.session, bytes(public_context)
        return {name: ModuleInfo(m.h_in, m.r, m.h_out, m.input_bound, m.weight_scales)
                for name, m in opened.modules.items()}

    def evaluate(self, module: str, data: bytes, stage: int | None = None) -> bytes:
        """One round on the service; safe to call from several threads at once (one session)."""
        path = f"/modules/{quote(module, safe='')}" + ("" if stage is None else f"/stages/{stage}")
        return self._post(path, bytes(data)).data

    def evaluate_group(self, modules: list[str], data: list[bytes], stage: int) -> list[bytes]:
        """Coefficient stage `stage` for `modules` in one request (one upload for all, or one each)."""
        path = f"/stages/{stage}?modules={quote(','.join(modules), safe=',')}"
        reply = self._post(path, b"".join(bytes(d) for d in data))
        frames = wire.split(reply.data, len(modules), wire.DEFAULT_MAX_BYTES)
        if len(frames) != len(modules):
            raise HEError(f"the HE evaluator at {self.url} sent {len(frames)} results for "
                          f"{len(modules)} modules")
        return [bytes(frame) for frame in frames]

    def _post(self, path: str, body: bytes) -> urllib3.BaseHTTPResponse:
        """POST `body` to `path` in the session; an evicted session is reopened with the same
        context once (even with several threads calling) and the request retried once."""
        session, context = self._session, self._context
        if session is None or context is None:
            raise HEError(f"no open session with the HE evaluator at {self.url}; call open() first")
        try:
            reply = self._call("POST", f"/sessions/{session}{path}", body)
        except HEError as err:
            if err.wire_code != "session_not_found":
                raise
            with self._reopen:
                if self._session == session:
                    self._session = None
                    self.open(context)
            reply = self._call("POST", f"/sessions/{self._session}{path}", body)
        self._counters(reply)
        return reply

    def _counters(self, reply: urllib3.BaseHTTPResponse) -> None:
        self.last_counters = {k.removeprefix("x-tensafe-").replace("-", "_"): int(v)
                              for k, v in reply.headers.items() if k.startswith("x-tensafe-")}

    def _delete(self) -> None:
        session, self._session = self._session, None
        with contextlib.suppress(HEError):  # already evicted, or the service is gone: nothing to free
            self._call("DELETE", f"/sessions/{session}")

    def close(self) -> None:
        if self._session is not None:
            self._delete()
        self._pool.close()

    def __repr__(self) -> str:
        return f"HTTPEvaluators({self.url}; activations leave the key holder only encrypted)"
