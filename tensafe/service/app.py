"""The training service's HTTP API (FastAPI): the Tinker protocol under /api/v1 for the official
`tinker` SDK, and TenSafe's extensions under /api/v1/tensafe for tensafe.client.

Every route but /api/v1/healthz needs an API key (X-API-Key, as the tinker SDK sends it, or
Authorization: Bearer); the key's tenant scopes everything the request can name. Request headers
and keys are never logged, and telemetry is accepted and discarded.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import hmac
import logging
import uuid
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from tensafe import __version__
from tensafe.security import events
from tensafe.service import tinker_proto, wire
from tensafe.service.errors import UserFault
from tensafe.service.learner import LOSS_FNS, Learner
from tensafe.service.policy import dp_request, effective_policy, sampled_policy
from tensafe.service.runtime import Runtime

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
TENSAFE_SDK = "tensafe-"  # tensafe.client's sdk_version prefix; it always speaks this server's protocol
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class Tenants:
    """API key digests → tenant names, compared in constant time per digest."""

    def __init__(self, digests: dict[str, str]):
        self._digests = [(bytes.fromhex(d), tenant) for d, tenant in digests.items()]

    def tenant(self, request: Request) -> str:
        key = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if not key and auth.lower().startswith("bearer "):
            key = auth[7:]
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for accepted, tenant in self._digests:
            if hmac.compare_digest(digest, accepted):
                found = tenant
        if not key or found is None:
            raise UserFault(
                401, "invalid or missing API key (X-API-Key or Authorization: Bearer)", code="invalid_api_key"
            )
        return found


def _error(status: int, message: str, code: str | None, param: str | None) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    body = wire.ErrorResponse(error=wire.ErrorBody(message=message, type=kind, code=code, param=param))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status)


def _problems(err: ValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    text = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()[:5])
    return text, param


async def _body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise UserFault(413, f"request body over service.max_body_bytes={limit}", code="request_too_large")
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > limit:
            raise UserFault(
                413, f"request body over service.max_body_bytes={limit}", code="request_too_large"
            )
    body = bytes(received)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding == "zstd":
        import zstandard

        try:
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=limit)
        except zstandard.ZstdError as err:
            raise UserFault(
                400, f"the zstd body does not decompress ({err})", code="malformed_body"
            ) from None
        if len(body) > limit:
            raise UserFault(
                413, f"decompressed body over service.max_body_bytes={limit}", code="request_too_large"
            )
    elif encoding != "identity":
        raise UserFault(
            415,
            f"Content-Encoding {encoding!r} is not accepted (identity or zstd)",
            code="unsupported_encoding",
        )
    return body


async def _json(request: Request, model: type[M], limit: int) -> M:
    body = await _body(request, limit)
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as err:
        text, param = _problems(err)
        raise UserFault(
            400, f"invalid {model.__name__}: {text}", code="invalid_request", param=param
        ) from None


def _checked_name(name: str | None, fallback: str) -> str:
    name = name or fallback
    if not name or len(name) > 128 or set(name) - _NAME_CHARS:
        raise UserFault(
            400, f"path={name!r}: a checkpoint name is 1-128 letters, digits, '.', '_' or '-'", param="path"
        )
    return name


def _save_name(runtime: Runtime, tenant: str, req: wire.SaveWeightsRequest, kind: str, fallback: str) -> str:
    try:
        return _checked_name(req.path, fallback)
    except UserFault as err:
        runtime.refuse(tenant, req.model_id, req.seq_id, kind, err)
        raise


def _client_batches(runtime: Runtime, tenant: str, model_id: str):
    slot = runtime.slot(tenant, model_id)
    if slot.policy.sampling == "poisson":
        raise UserFault(
            400,
            f"model {model_id!r} trains on dataset {slot.policy.dataset_id} by server-side "
            "sampling, so its steps are the server's: use train_step (tensafe.client), not "
            "forward_backward and optim_step",
            code="server_sampled_model",
        )
    return slot


def _loss_fn(name: str) -> None:
    if name not in LOSS_FNS:
        raise UserFault(
            400,
            f"loss_fn={name!r} is not supported; this service trains with {list(LOSS_FNS)} "
            "(the loss whose per-example gradients DP-SGD clips)",
            code="unsupported_loss_fn",
            param="loss_fn",
        )


def create_service_app(
    runtime: Runtime, tenants: Tenants, sdk_versions: list[str], max_body_bytes: int, max_samples: int
) -> FastAPI:
    app = FastAPI(
        title="TenSafe training service", version=__version__, docs_url=None, redoc_url=None, openapi_url=None
    )
    store = runtime.store

    @app.exception_handler(UserFault)
    async def _fault(request: Request, err: UserFault) -> JSONResponse:
        return _error(err.status, err.message, err.code, err.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {err.errors()[0].get('msg')}", "invalid_request", None)

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception) -> JSONResponse:
        log.error("%s %s failed: %s", request.method, request.url.path, type(err).__name__, exc_info=err)
        return _error(500, "internal error; the request was not completed", "internal_error", None)

    def json(model: BaseModel) -> JSONResponse:
        return JSONResponse(model.model_dump(exclude_none=True))

    @app.get("/api/v1/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # --- sessions --------------------------------------------------------------------------------

    @app.post("/api/v1/client/config")
    async def client_config(request: Request) -> JSONResponse:
        tenants.tenant(request)
        return json(wire.ClientConfig())

    @app.post("/api/v1/client/dynamic_config")
    async def dynamic_config(request: Request) -> dict[str, Any]:
        tenants.tenant(request)
        return {}

    @app.get("/api/v1/get_server_capabilities")
    async def capabilities(request: Request) -> dict[str, Any]:
        tenants.tenant(request)
        return {"supported_models": [{"model_name": n} for n in sorted(runtime.base_names)]}

    @app.post("/api/v1/create_session")
    async def create_session(request: Request) -> JSONResponse:
        tenant = tenants.tenant(request)
        req = await _json(request, wire.CreateSessionRequest, max_body_bytes)
        version = req.sdk_version
        if not version.startswith(TENSAFE_SDK) and not any(
            fnmatch.fnmatchcase(version, p) for p in sdk_versions
        ):
            raise UserFault(
                426,
                f"tinker SDK {version} is not supported by this service; supported versions: "
                f"{', '.join(sdk_versions)} (service.sdk_versions)",
                code="unsupported_sdk_version",
            )
        session_id = str(uuid.uuid4())
        store.add_session(session_id, tenant, version)
        runtime.record(tenant, events.SERVICE_SESSION, {"session_id": session_id, "sdk_version": version})
        return json(wire.CreateSessionResponse(session_id=session_id))

    @app.post("/api/v1/session_heartbeat")
    async def heartbeat(request: Request) -> JSONResponse:
        tenant = tenants.tenant(request)
        req = await _json(request, wire.SessionRef, max_body_bytes)
        if not store.touch_session(tenant, req.session_id):
            raise UserFault(404, f"no session {req.session_id!r} for this API key", code="session_not_found")
        return json(wire.HeartbeatResponse())

    @app.post("/api/v1/sessions/{session_id}/finish")
    async def finish(session_id: str, request: Request) -> dict[str, str]:
        tenant = tenants.tenant(request)
        await runtime.finish_session(tenant, session_id)
        return {"status": "finished"}

    @app.post("/api/v1/telemetry")
    async def telemetry(request: Request) -> dict[str, str]:
        # The SDK's events can carry request headers, API key included: read and dropped unparsed.
        tenants.tenant(request)
        await _body(request, max_body_bytes)
        return {"status": "accepted"}

    # --- models ----------------------------------------------------------------------------------

    @app.post("/api/v1/create_model")
    async def create_model(request: Request) -> JSONResponse:
        tenant = tenants.tenant(request)
        req = await _json(request, wire.CreateModelRequest, max_body_bytes)
        if req.lora_config is None:
            raise UserFault(
                400, "lora_config is required: this service trains LoRA adapters", param="lora_config"
            )
        asked = dp_request(req.optimizer_config, req.dp)
        if req.dataset_id is not None:
            if req.batch_size is None:
                raise UserFault(
                    400,
                    "batch_size is required with dataset_id (the expected Poisson batch)",
                    param="batch_size",
                )
            info = runtime.dataset_info(tenant, req.dataset_id)
            policy = sampled_policy(
                runtime.policies[tenant], asked, info.dataset_id, info.size, req.batch_size
            )
        else:
            policy = effective_policy(runtime.policies[tenant], asked)
        request_id, model_id = await runtime.create_model(
            tenant, req.session_id, req.model_seq_id, req.lora_config, req.base_model, policy
        )
        return json(wire.UntypedFuture(request_id=request_id, model_id=model_id))

    @app.post("/api/v1/load_weights")
    async def load_weights(request: Request) -> JSONResponse:
        tenant = tenants.tenant(request)
        req = await _json(request, wire.LoadWeightsRequest, max_body_bytes)
        if req.session_id is None or req.model_seq_id is None:
            raise UserFault(
                400,
                "load_weights creates a model from a checkpoint: give session_id and "
                "model_seq_id (loading into an existing model is not supported)",
                param="session_id",
            )
        request_id, model_id = await runtime.load_model(
            tenant, req.session_id, req.model_seq_id, req.path, req.optimizer
        )
        return json(wire.UntypedFuture(request_id=request_id, model_id=model_id))

    @app.post("/api/v1/get_info")
    async def get_info(request: Request) -> JSONResponse:
        tenant = tenants.tenant(request)
        req = await _json(request, wire.ModelRef, max_body_bytes)
        row = store.model(tenant, req.model_id)
        if row is None:
            raise UserFault(404, f"no model {req.model_id!r} for this API key", code="model_not_found")
        cfg = runtime.model_cfg
        return json(
            wire.GetInfoResponse(
                model_data=wire.ModelData(
                    arch="llama", model_name=row.spec["base_model"], tokenizer_id=cfg.hf_id
                ),
                model_id=row.model_id,
                lora_rank=row.spec["lora"]["rank"],
                model_name=row.spec["base_model"],
            )
        )

    # --- training steps --------------------------------------------------------------------------

    async def step(request: Request, forward_only: bool) -> JSONResponse:
        tenant = tenants.tenant(request)
        body = await _body(request, max_body_bytes)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == tinker_proto.PROTOBUF:
            parsed = tinker_proto.decode_step(body)
        elif kind in ("application/json", ""):
            try:
                js = wire.ForwardBackwardJSON.model_validate_json(body or b"{}")
            except ValidationError as err:
                text, param = _problems(err)
                raise UserFault(400, f"invalid forward_backward request: {text}", param=param) from None
            parsed = tinker_proto.StepRequest(
                js.model_id, js.seq_id, js.loss_fn, js.loss_fn_config or {}, js.forward_only, js.data
            )
        else:
            raise UserFault(
                415,
                f"Content-Type {kind!r}: send application/x-protobuf or application/json",
                code="unsupported_media_type",
            )
        # seq_id 0 is the proto default when a caller set none: it is the creation's, never a step's
        seq = parsed.seq_id or None
        try:
            _loss_fn(parsed.loss_fn)
            if parsed.loss_fn_config:
                raise UserFault(
                    400,
                    f"loss_fn_config {sorted(parsed.loss_fn_config)}: cross_entropy takes none",
                    param="loss_fn_config",
                )
        except UserFault as err:
            runtime.refuse(tenant, parsed.model_id, seq, "forward_backward", err)
            raise
        only = forward_only or parsed.forward_only
        examples = parsed.examples
        if not only:
            _client_batches(runtime, tenant, parsed.model_id)

        def run(learner: Learner) -> BaseModel:
            return learner.forward_backward(examples, only)

        request_id = runtime.submit(tenant, parsed.model_id, seq, "forward_backward", run)
        return json(wire.UntypedFuture(request_id=request_id, model_id=parsed.model_id))

    @app.post("/api/v1/forward_backward")
    async def forward_backward(request: Request) -> JSONResponse:
        return await step(request, forward_only=False)

    @app.post("/api/v1/forward")
    async def forward(request: Request) -> JSONResponse:
        return await step(request, forward_only=True)

    @app.post("/api/v1/optim_step")
    async def optim_step(request: Request) -> JSONResponse:
        tenant = tenants.tenant(request)
        req = await _json(request, wire.OptimStepRequest, max_body_bytes)
        if req.optimizer_params is not None:
            err = UserFault(
                400,
                "optimizer_params: this service steps with AdamW; send adam_params",
                param="optimizer_params",
            )
            runtime.refuse(tenant, req.model_id, req.seq_id, "optim_step", err)
            raise err
        adam = req.adam_params or req.optim_params or wire.AdamStep()
        slot = _client_batches(runtime, tenant, req.model_id)
        request_id = runtime.submit(
            tenant, req.model_id, req.seq_id, "optim_step", runtime.optim_step(slot, adam)
        )
        return json(wire.UntypedFuture(request_id=request_id, model_id=req.model_id))

    @app.post("/api/v1/save_weights")
    async def save_weights(request: Request) -> JSONResponse:
        tenant = tenants.tenant(request)
        req = await _json(request, wire.SaveWeightsRequest, max_body_bytes)
        slot = runtime.slot(tenant, req.model_id)
        name = _save_name(runtime, tenant, req, "save_weights", f"step-{req.seq_id or 0}")
        request_id = runtime.submit(
            tenant,
            req.model_id,
            req.seq_id,
            "save_weights",
            runtime.save(slot, name, "weights", req.overwrite, None),
        )
        return json(wire.UntypedFuture(request_id=request_id, model_id=req.model_id))

    @app.post("/api/v1/save_weights_for_sampler")
    async def save_for_sampler(request: Request) -> JSONResponse:
        tenant = tenants.tenant(request)
        req = await _json(request, wire.SaveWeightsRequest, max_body_bytes)
        slot = runtime.slot(tenant, req.model_id)
        name = _save_name(runtime, tenant, req, "save_weights_for_sampler", f"sampler-{req.seq_id or 0}")
        sid = None
        if req.sampling_session_seq_id is not None:
            sid = f"{slot.row.session_id}:sample:{req.sampling_session_seq_id}"
        request_id = runtime.submit(
            tenant,
            req.model_id,
            req.seq_id,
            "save_weights_for_sampler",
            runtime.save(slot, name, "sampler", True, sid),
        )
        return json(wire.UntypedFuture(request_id=request_id, model_id=req.model_id))

    # --- futures ---------------------------------------------------------------------------------

    @app.post("/api/v1/retrieve_future")
    async def retrieve_future(request: Request) -> Response:
        tenant = tenants.tenant(request)
        req = await _json(request, wire.RetrieveFutureRequest, max_body_bytes)
        found = await runtime.wait(tenant, req.request_id)
        if isinstance(found, wire.TryAgain):
            return json(found)
        if found.state == "failed":
            return json(
                wire.RequestFailed(
                    error=found.error or "failed", category=found.category or "unknown", code=found.code
                )
            )
        assert found.result is not None
        if tinker_proto.PROTOBUF in request.headers.get("accept", ""):
            # the tinker SDK reads these two results only as protobuf
            if found.kind == "forward_backward":
                step = wire.ForwardBackwardResult.model_validate_json(found.result)
                return Response(tinker_proto.encode_step_result(step), media_type=tinker_proto.PROTOBUF)
            if found.kind == "sample":
                sample = wire.SampleResult.model_validate_json(found.result)
                return Response(tinker_proto.encode_sample_result(sample), media_type=tinker_proto.PROTOBUF)
        return Response(found.result, media_type="application/json")

    # --- sampling --------------------------------------------------------------------------------

    @app.post("/api/v1/create_sampling_session")
    async def create_sampling_session(request: Request) -> JSONResponse:
        tenant = tenants.tenant(request)
        req = await _json(request, wire.CreateSamplingSessionRequest, max_body_bytes)
        if store.session(tenant, req.session_id) is None:
            raise UserFault(404, f"no session {req.session_id!r} for this API key", code="session_not_found")
        base, path = runtime.sampling_target(tenant, None, req.model_path, req.base_model)
        sid = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
        store.add_sampling_session(sid, tenant, req.session_id, base, path)
        return json(wire.CreateSamplingSessionResponse(sampling_session_id=sid))

    @app.get("/api/v1/samplers/{sampler_id}")
    async def sampler_info(sampler_id: str, request: Request) -> JSONResponse:
        tenant = tenants.tenant(request)
        base, path = runtime.sampling_target(tenant, sampler_id, None, None)
        return json(wire.SamplerInfo(sampler_id=sampler_id, base_model=base, model_path=path))

    @app.post("/api/v1/asample")
    async def asample(request: Request) -> JSONResponse:
        tenant = tenants.tenant(request)
        req = await _json(request, wire.SampleRequest, max_body_bytes)
        if req.num_samples > max_samples:
            raise UserFault(
                400,
                f"num_samples={req.num_samples}: at most {max_samples} per request "
                "(service.max_samples_per_request)",
                param="num_samples",
            )
        if req.prompt_logprobs or req.topk_prompt_logprobs:
            raise UserFault(400, "prompt_logprobs are not supported by this service", param="prompt_logprobs")
        prompt: list[int] = []
        for i, chunk in enumerate(req.prompt.chunks):
            try:
                prompt += wire.TextChunk.model_validate(chunk).tokens
            except ValidationError:
                raise UserFault(
                    400,
                    f"prompt.chunks[{i}]: only encoded_text chunks are accepted",
                    param=f"prompt.chunks[{i}]",
                ) from None
        if not prompt:
            raise UserFault(400, "prompt: no tokens", param="prompt")
        _, path = runtime.sampling_target(tenant, req.sampling_session_id, req.model_path, req.base_model)
        scope = req.sampling_session_id or f"direct:{path or 'base'}"
        seq = req.seq_id if req.sampling_session_id else None
        request_id, ids = runtime.sample(
            tenant, scope, seq, path, prompt, req.num_samples, req.sampling_params
        )
        return json(wire.UntypedFuture(request_id=request_id, sample_sequence_ids=ids))

    # --- TenSafe's extensions --------------------------------------------------------------------

    @app.post("/api/v1/tensafe/datasets")
    async def add_dataset(request: Request) -> JSONResponse:
        tenant = tenants.tenant(request)
        req = await _json(request, wire.CreateDatasetRequest, max_body_bytes)
        return json(runtime.add_dataset(tenant, req.name, req.records))

    @app.get("/api/v1/tensafe/datasets/{dataset_id}")
    async def dataset(dataset_id: str, request: Request) -> JSONResponse:
        return json(runtime.dataset_info(tenants.tenant(request), dataset_id))

    @app.post("/api/v1/tensafe/train_step")
    async def train_step(request: Request) -> JSONResponse:
        tenant = tenants.tenant(request)
        req = await _json(request, wire.TrainStepRequest, max_body_bytes)
        slot = runtime.slot(tenant, req.model_id)
        if slot.policy.sampling != "poisson":
            raise UserFault(
                400,
                f"model {req.model_id!r} was created without a dataset_id: its batches are the "
                "client's (forward_backward, then optim_step)",
                code="client_batch_model",
            )
        request_id = runtime.submit(
            tenant, req.model_id, req.seq_id, "train_step", runtime.train_step(slot, req.adam_params)
        )
        return json(wire.UntypedFuture(request_id=request_id, model_id=req.model_id))

    @app.post("/api/v1/tensafe/packages")
    async def package(request: Request) -> Response:
        tenant = tenants.tenant(request)
        req = await _json(request, wire.PackageRequest, max_body_bytes)
        return Response(await runtime.package(tenant, req.path), media_type="application/octet-stream")

    # The accountant's figures are computed off the event loop (PRV over a long history takes a while),
    # and never load a model: a parked or restarted model's privacy state is the store's.
    @app.get("/api/v1/tensafe/models/{model_id}/ledger")
    async def ledger(model_id: str, request: Request) -> Response:
        row, policy = runtime.privacy_of(tenants.tenant(request), model_id)
        made = await asyncio.to_thread(lambda: runtime.ledger(row, policy, runtime.accountant(row, policy)))
        return Response(made.model_dump_json(), media_type="application/json")

    @app.get("/api/v1/tensafe/models/{model_id}/dp")
    async def dp_metrics(model_id: str, request: Request) -> JSONResponse:
        row, policy = runtime.privacy_of(tenants.tenant(request), model_id)
        return json(await asyncio.to_thread(runtime.dp_metrics, row, policy))

    return app
