"""The HE evaluator service's JSON messages, shared by the service (`he_service`) and its client
(`he_client`). Ciphertexts and public contexts travel as application/octet-stream bodies in the
versioned TenSafe HE wire format (`tensafe.he.wire`); errors are `errors.APIError`s whose `code`,
for bad HE input, is the error class's stable code (`tensafe.he.errors.by_code`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

OCTET_STREAM = "application/octet-stream"


class ModuleShape(BaseModel):
    h_in: int
    r: int
    h_out: int


class ModuleOffer(ModuleShape):
    """A served module, for one session: its shape and, for slot packing, the largest |x| it takes
    without wrapping; for coefficient packing, the scales of its quantized weights per stage (A and
    s·B in two rounds, W = s·A·B in one)."""

    input_bound: float | None = None
    weight_scales: tuple[float, ...] | None = None


class ParameterSet(BaseModel):
    name: str
    digest: str


class EvaluatorInfo(BaseModel):
    """GET /v1/he/info."""

    adapter: str
    backend: str
    params: ParameterSet
    wire_version: int
    packings: list[str]  # the public contexts a session may open with: slots, coefficients
    max_message_bytes: int
    modules: dict[str, ModuleShape]


class SessionOpened(BaseModel):
    """POST /v1/he/sessions."""

    session: str
    modules: dict[str, ModuleOffer]


class SessionClosed(BaseModel):
    """DELETE /v1/he/sessions/{session}."""

    session: str
    closed: Literal[True] = True
