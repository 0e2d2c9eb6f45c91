"""TenSafe's SDK for the training service (task=service): `ServiceClient(base_url, api_key)`."""

from tensafe.client.errors import (
    AuthenticationError,
    BudgetExhaustedError,
    InvalidBatchError,
    NotFoundError,
    PermissionDeniedError,
    RequestFailedError,
    ServerBusyError,
    TenSafeError,
    UnsupportedVersionError,
)
from tensafe.client.sdk import (
    AdamParams,
    APIFuture,
    DPConfig,
    Example,
    LoRAConfig,
    Retry,
    SamplingClient,
    SamplingParams,
    ServiceClient,
    TrainingClient,
    TrainingConfig,
)

__all__ = [
    "APIFuture",
    "AdamParams",
    "AuthenticationError",
    "BudgetExhaustedError",
    "DPConfig",
    "Example",
    "InvalidBatchError",
    "LoRAConfig",
    "NotFoundError",
    "PermissionDeniedError",
    "RequestFailedError",
    "Retry",
    "SamplingClient",
    "SamplingParams",
    "ServerBusyError",
    "ServiceClient",
    "TenSafeError",
    "TrainingClient",
    "TrainingConfig",
    "UnsupportedVersionError",
]
