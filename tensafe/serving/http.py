"""The HTTP/1.1 protocol under the API: uvicorn's h11 protocol with a deadline on request headers.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) and caps connections
(`limit_concurrency`), but a client that opens a connection and sends nothing, or dribbles its
headers a byte at a time, holds a connection forever. This protocol gives every request
`header_timeout_s` from the moment the connection opens (or the previous response ends) for its
headers to arrive whole; past it the connection gets a 408 and is closed. The body's deadline is
the API's own (`serving.body_timeout_s`, enforced where the body is read).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

_LATE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's `http=` protocol class with this header deadline."""
    return type("TenSafeHTTP", (_HeaderDeadline,), {"header_timeout_s": float(header_timeout_s)})


class _HeaderDeadline(H11Protocol):
    header_timeout_s = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.header_timeout_s, self._late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _late(self) -> None:
        self._deadline = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.write(_LATE)
            self.transport.close()
