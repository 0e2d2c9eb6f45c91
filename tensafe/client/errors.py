"""What tensafe.client raises: one type per thing a caller handles differently."""

from __future__ import annotations


class TenSafeError(Exception):
    """Base of every error the SDK raises; `code` is the service's error code where it gave one."""

    def __init__(self, message: str, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message, self.code, self.status = message, code, status


class AuthenticationError(TenSafeError):
    """The API key was refused (401)."""


class NotFoundError(TenSafeError):
    """No such session, model, future, checkpoint or dataset for this API key (404)."""


class PermissionDeniedError(TenSafeError):
    """Asked for something the tenant's DP policy does not allow (403), e.g. less noise."""


class InvalidBatchError(TenSafeError):
    """The request or batch was refused as given (400, 413, 415): the message says what to change."""


class BudgetExhaustedError(TenSafeError):
    """The next step would take ε past the policy's budget; no step was taken."""


class ServerBusyError(TenSafeError):
    """The service stayed at capacity or unreachable through every retry."""


class UnsupportedVersionError(TenSafeError):
    """The service does not speak this SDK's protocol version (426)."""


class RequestFailedError(TenSafeError):
    """A request was accepted but failed on the service (its future resolved with an error)."""


_BY_STATUS: dict[int, type[TenSafeError]] = {
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    426: UnsupportedVersionError,
}


def for_status(status: int, message: str, code: str | None) -> TenSafeError:
    if code == "privacy_budget_exhausted":
        return BudgetExhaustedError(message, code, status)
    return _BY_STATUS.get(status, InvalidBatchError)(message, code, status)


def for_failure(message: str, category: str, code: str | None) -> TenSafeError:
    if code == "privacy_budget_exhausted":
        return BudgetExhaustedError(message, code)
    if code == "at_capacity":
        return ServerBusyError(message, code)
    if category == "user":
        return InvalidBatchError(message, code)
    return RequestFailedError(message, code)
