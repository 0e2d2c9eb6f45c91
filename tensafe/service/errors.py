"""The training service's one error type: what a client did wrong (or asked for that the policy
refuses), with the HTTP status it gets when refused up front. Inside a future it becomes a result
with category "user", which the tinker SDK raises as RequestFailedError without retrying.

Statuses are chosen for the tinker SDK's retry rules: 400, 401, 403, 404, 413, 415, 422 and 426
fail fast; 408, 409, 429 and 5xx are retried for minutes and 402 pauses for an hour, so a refusal
never uses those.
"""

from __future__ import annotations


class UserFault(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        assert status in (400, 401, 403, 404, 413, 415, 422, 426), status
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def not_found(what: str, ident: str) -> UserFault:
    """Unknown and another tenant's ids read the same: nothing says the id exists."""
    return UserFault(404, f"no {what} {ident!r} for this API key", code=f"{what.replace(' ', '_')}_not_found")
