"""The error both HTTP services (the OpenAI-compatible API and the HE evaluator) answer with, in
OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi.responses import JSONResponse

from tensafe.serving import protocol as p


class APIError(Exception):
    """An error the client caused (or a server fault), with the HTTP status it is answered with."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, dict(headers or {})
        self.body = p.ErrorBody(message=message, type=type_, param=param, code=code)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(p.ErrorResponse(error=err.body).model_dump(), status_code=err.status,
                        headers=err.headers or None)
