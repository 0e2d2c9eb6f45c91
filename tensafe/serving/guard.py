"""The pure ASGI guard in front of TenSafe's HTTP apps: refusals before the body, the body's size and
deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from tensafe.serving.errors import APIError, error_response


class RequestGuard:
    """Pure ASGI middleware in front of the app (so that handlers still see a client disconnect):
    `refuse(request)` answers instead of the app when it returns a response (auth, Content-Length);
    then the body of every /v1/ request is read up to `limit` bytes before the app sees it, so a
    chunked body (no Content-Length) cannot be larger: over the limit the answer is a 413. A body
    that has not arrived whole `body_timeout_s` after the headers is a 408. `count(model, status)`, if
    given, is called once per /v1 request; `settings` name the limit and the timeout in errors."""

    def __init__(self, app, refuse: Callable[[Request], Response | None], limit: int, body_timeout_s: float,
                 count: Callable[[str, int], None] | None = None,
                 settings: tuple[str, str] = ("serving.max_body_bytes", "serving.body_timeout_s")):
        self.app, self.refuse, self.limit, self.count = app, refuse, limit, count
        self.body_timeout_s, self.settings = body_timeout_s, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.count is None or not scope["path"].startswith("/v1/"):
            return await self._guarded(scope, receive, send)
        count, status = self.count, []

        async def sending(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, sending)
        finally:  # every /v1 request, by the model a handler named (scope["state"]) and its status
            count(scope.get("state", {}).get("model", ""), status[0] if status else 499)

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
                    f"({self.settings[1]})"
                return await self._error(408, late, "request_timeout", scope, receive, send)
            if message["type"] != "http.request":
                return  # the client left before its body ended
            size += len(message.get("body", b""))
            if size > self.limit:
                large = f"request body over {self.limit} bytes ({self.settings[0]})"
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
