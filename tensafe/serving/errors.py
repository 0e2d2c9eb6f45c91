"""The error both HTTP services (the OpenAI-compatible API and the HE evaluator) answer with, in
OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi.responses import JSONResponse

from tensafe.serving import protocol as p
from tensafe.serving.auth import BearerKeys


class APIError(Exception):
    """An error the client caused (or a server fault), with the HTTP status it is answered with."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, dict(headers or {})
        self.body = p.ErrorBody(message=message, type=type_, param=param, code=code)


def refusal(headers: Mapping[str, str], keys: BearerKeys, max_body_bytes: int) -> APIError | None:
    """Why a /v1 request is refused before its body is read: no accepted key (401), or a
    Content-Length that is not a byte count (400) or is over `max_body_bytes` (413)."""
    if not keys.accepts(headers.get("authorization")):
        return APIError(401, "invalid or missing API key (Authorization: Bearer …)", "authentication_error",
                        code="invalid_api_key")
    length = headers.get("content-length")
    if length is not None and not length.isdigit():
        return APIError(400, f"Content-Length {length[:32]!r} is not a byte count",
                        code="invalid_content_length")
    if length is not None and int(length) > max_body_bytes:
        return APIError(413, f"request body over {max_body_bytes} bytes", code="request_too_large")
    return None


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(p.ErrorResponse(error=err.body).model_dump(), status_code=err.status,
                        headers=err.headers or None)
