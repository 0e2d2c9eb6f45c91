"""The audit log's event vocabulary (docs/trust.md): every record names one of these."""

from __future__ import annotations

TRAIN_START = "train_start"
TRAIN_END = "train_end"
CHECKPOINT = "checkpoint"
BUDGET_STOP = "budget_stop"
PACKAGE_CREATE = "package_create"
PACKAGE_OPEN = "package_open"
PACKAGE_VERIFY_FAIL = "package_verify_fail"
ADAPTER_LOAD = "adapter_load"
ADAPTER_UNLOAD = "adapter_unload"
ADAPTER_LOAD_REFUSED = "adapter_load_refused"
KEY_CREATE = "key_create"
KEY_USE = "key_use"
EVIDENCE_CREATE = "evidence_create"
# the training service (task=service), in the chain of the tenant the request came from
SERVICE_SESSION = "service_session"
SERVICE_MODEL = "service_model"
SERVICE_STEP = "service_step"
SERVICE_SAVE = "service_save"
SERVICE_BUDGET_REFUSED = "service_budget_refused"
SERVICE_DATASET = "service_dataset"
EVENTS = frozenset({
    TRAIN_START, TRAIN_END, CHECKPOINT, BUDGET_STOP, PACKAGE_CREATE, PACKAGE_OPEN, PACKAGE_VERIFY_FAIL,
    ADAPTER_LOAD, ADAPTER_UNLOAD, ADAPTER_LOAD_REFUSED, KEY_CREATE, KEY_USE, EVIDENCE_CREATE,
    SERVICE_SESSION, SERVICE_MODEL, SERVICE_STEP, SERVICE_SAVE, SERVICE_BUDGET_REFUSED, SERVICE_DATASET,
})
