"""TenSafe's SDK for the training service: the Tinker protocol plus TenSafe's extensions (DP metrics,
privacy ledgers, datasets with server-side Poisson sampling), over the same pydantic wire models
as the server (tensafe.service.wire).

Every request of a model carries a seq_id the SDK chose, so a retry after a timeout or a dropped
connection is answered from the server's stored result: a step is never taken, nor ε spent, twice.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field

from tensafe import __version__
from tensafe.client import errors
from tensafe.service import wire

T = TypeVar("T", bound=BaseModel)
SDK_VERSION = f"tensafe-{__version__}"
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

AdamParams = wire.AdamStep
Example = wire.Example
SamplingParams = wire.SamplingParams


class LoRAConfig(wire.LoraSpec):
    """The adapter to train (the service's own LoraSpec; a misspelt field is an error here)."""

    model_config = ConfigDict(extra="forbid")


# What to ask of the tenant's DP policy (the wire model itself): the service accepts only something
# at least as strict.
DPConfig = wire.DPRequest


class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_ref: str
    lora_config: LoRAConfig
    dp_config: DPConfig = Field(default_factory=DPConfig)
    batch_size: int | None = None  # with dataset_id: the expected Poisson batch size B (q = B/N)
    dataset_id: str | None = None  # train on a registered dataset, batches drawn by the server


class Retry(BaseModel):
    """Backoff for transient failures (connection errors, 408/409/429/5xx): attempts and delays."""

    attempts: int = 8
    first_delay_s: float = 0.2
    max_delay_s: float = 10.0


class _Transport:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout_s: float,
        retry: Retry,
        transport: httpx.BaseTransport | None,
    ):
        self.http = httpx.Client(
            base_url=base_url.rstrip("/") + "/api/v1",
            timeout=timeout_s,
            transport=transport,
            headers={"X-API-Key": api_key, "User-Agent": f"tensafe-client/{__version__}"},
        )
        self.retry = retry

    def call(self, method: str, path: str, body: BaseModel | dict | None = None) -> dict[str, Any]:
        payload = body.model_dump(exclude_none=True) if isinstance(body, BaseModel) else body
        delay = self.retry.first_delay_s
        for attempt in itertools.count(1):
            try:
                reply = self.http.request(method, path, json=payload)
            except httpx.TransportError as err:
                if attempt >= self.retry.attempts:
                    raise errors.ServerBusyError(f"the service is unreachable: {err}") from None
            else:
                if reply.status_code < 400:
                    return reply.json()
                try:
                    detail = reply.json()["error"]
                    message, code = detail["message"], detail.get("code")
                except (ValueError, KeyError, TypeError):
                    message, code = reply.text[:500] or reply.reason_phrase, None
                if reply.status_code not in _RETRY_STATUS:
                    raise errors.for_status(reply.status_code, message, code)
                if attempt >= self.retry.attempts:
                    raise errors.ServerBusyError(
                        f"{message} (HTTP {reply.status_code}, after {attempt} tries)",
                        code,
                        reply.status_code,
                    )
            time.sleep(delay * (0.5 + random.random()))  # jittered exponential backoff
            delay = min(delay * 2, self.retry.max_delay_s)
        raise AssertionError("unreachable")


class APIFuture(Generic[T]):
    """A request the service is running: `.result(timeout)` waits for it (long polls)."""

    def __init__(self, transport: _Transport, request_id: str, model: type[T]):
        self.request_id, self._transport, self._model = request_id, transport, model
        self._value: T | None = None

    def result(self, timeout: float | None = None) -> T:
        if self._value is not None:
            return self._value
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            body = self._transport.call("POST", "/retrieve_future", {"request_id": self.request_id})
            if body.get("type") != "try_again":
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"request {self.request_id} did not finish within {timeout} s "
                    f"(queue state: {body.get('queue_state')})"
                )
        if "error" in body and "category" in body:
            failed = wire.RequestFailed.model_validate(body)
            raise errors.for_failure(failed.error, failed.category, failed.code)
        self._value = self._model.model_validate(body)
        return self._value

    async def result_async(self, timeout: float | None = None) -> T:
        return await asyncio.to_thread(self.result, timeout)


class TrainingClient:
    """One training model. Its calls are numbered (seq_id) and run on the service in that order."""

    def __init__(self, service: ServiceClient, model_id: str):
        self.service, self.model_id = service, model_id
        self._transport = service._transport
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def _next(self) -> int:
        with self._lock:
            return next(self._seq)

    def _submit(self, path: str, body: dict[str, Any], model: type[T]) -> APIFuture[T]:
        reply = wire.UntypedFuture.model_validate(self._transport.call("POST", path, body))
        return APIFuture(self._transport, reply.request_id, model)

    def forward_backward(
        self, batch: Sequence[wire.Example | dict], loss_fn: str = "cross_entropy"
    ) -> APIFuture[wire.ForwardBackwardResult]:
        """Per-example loss and gradients, clipped and summed into the current DP step."""
        data = [wire.Example.model_validate(e) if isinstance(e, dict) else e for e in batch]
        body = wire.ForwardBackwardJSON(
            model_id=self.model_id, seq_id=self._next(), loss_fn=loss_fn, data=data
        )
        return self._submit(
            "/forward_backward", body.model_dump(exclude_none=True), wire.ForwardBackwardResult
        )

    def forward(self, batch: Sequence[wire.Example | dict]) -> APIFuture[wire.ForwardBackwardResult]:
        data = [wire.Example.model_validate(e) if isinstance(e, dict) else e for e in batch]
        body = wire.ForwardBackwardJSON(
            model_id=self.model_id, seq_id=self._next(), loss_fn="cross_entropy", forward_only=True, data=data
        )
        return self._submit("/forward", body.model_dump(exclude_none=True), wire.ForwardBackwardResult)

    def optim_step(self, adam: wire.AdamStep | None = None) -> APIFuture[wire.OptimStepResult]:
        """One DP-SGD step: noise on the sum of the clipped gradients since the last step, then AdamW."""
        body = {
            "model_id": self.model_id,
            "seq_id": self._next(),
            "adam_params": (adam or wire.AdamStep()).model_dump(),
        }
        return self._submit("/optim_step", body, wire.OptimStepResult)

    def train_step(self, adam: wire.AdamStep | None = None) -> APIFuture[wire.TrainStepResult]:
        """A step on the model's registered dataset: the service draws the Poisson batch itself."""
        body = {
            "model_id": self.model_id,
            "seq_id": self._next(),
            "adam_params": (adam or wire.AdamStep()).model_dump(),
        }
        return self._submit("/tensafe/train_step", body, wire.TrainStepResult)

    def save_state(self, name: str) -> str:
        """Save weights and optimizer state (encrypted at rest on the service); returns its tinker:// path."""
        body = {"model_id": self.model_id, "seq_id": self._next(), "path": name}
        return self._submit("/save_weights", body, wire.SaveWeightsResult).result().path

    def save_weights_for_sampler(self, name: str) -> str:
        body = {"model_id": self.model_id, "seq_id": self._next(), "path": name}
        return self._submit("/save_weights_for_sampler", body, wire.SaveForSamplerResult).result().path

    def export_package(self, path: str, out: str) -> str:
        """The saved state `path` as a signed (and, if the service has recipients, encrypted) .tssp
        package built by the service's packaging, written to `out`."""
        reply = self._transport.http.post("/tensafe/packages", json={"path": path})
        if reply.status_code >= 400:
            detail = reply.json().get("error", {})
            raise errors.for_status(reply.status_code, detail.get("message", reply.text), detail.get("code"))
        with open(out, "wb") as handle:
            handle.write(reply.content)
        return out

    def get_dp_metrics(self) -> wire.DPMetrics:
        """ε spent, δ, σ, C, q, steps and the budget left, as the service's accountant reports them."""
        return wire.DPMetrics.model_validate(
            self._transport.call("GET", f"/tensafe/models/{self.model_id}/dp")
        )

    def privacy_ledger(self) -> dict[str, Any]:
        return self._transport.call("GET", f"/tensafe/models/{self.model_id}/ledger")

    # async twins: the same calls off the event loop
    async def forward_backward_async(
        self, batch: Sequence[wire.Example | dict], loss_fn: str = "cross_entropy"
    ) -> APIFuture[wire.ForwardBackwardResult]:
        return await asyncio.to_thread(self.forward_backward, batch, loss_fn)

    async def optim_step_async(self, adam: wire.AdamStep | None = None) -> APIFuture[wire.OptimStepResult]:
        return await asyncio.to_thread(self.optim_step, adam)

    async def train_step_async(self, adam: wire.AdamStep | None = None) -> APIFuture[wire.TrainStepResult]:
        return await asyncio.to_thread(self.train_step, adam)

    async def save_state_async(self, name: str) -> str:
        return await asyncio.to_thread(self.save_state, name)

    async def get_dp_metrics_async(self) -> wire.DPMetrics:
        return await asyncio.to_thread(self.get_dp_metrics)


class SamplingClient:
    def __init__(self, service: ServiceClient, sampling_session_id: str):
        self._transport, self.sampling_session_id = service._transport, sampling_session_id
        self._seq = itertools.count(0)
        self._lock = threading.Lock()

    def sample(
        self, prompt: Sequence[int], num_samples: int = 1, params: wire.SamplingParams | None = None
    ) -> APIFuture[wire.SampleResult]:
        with self._lock:
            seq = next(self._seq)
        body = {
            "sampling_session_id": self.sampling_session_id,
            "seq_id": seq,
            "num_samples": num_samples,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": list(prompt)}]},
            "sampling_params": (params or wire.SamplingParams()).model_dump(exclude_none=True),
        }
        reply = wire.UntypedFuture.model_validate(self._transport.call("POST", "/asample", body))
        return APIFuture(self._transport, reply.request_id, wire.SampleResult)

    async def sample_async(
        self, prompt: Sequence[int], num_samples: int = 1, params: wire.SamplingParams | None = None
    ) -> APIFuture[wire.SampleResult]:
        return await asyncio.to_thread(self.sample, prompt, num_samples, params)


class ServiceClient:
    """`ServiceClient(base_url, api_key)`: a session on the training service, opened on first use."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout_s: float = 60.0,
        retry: Retry | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        """`transport`: an httpx transport to send through (a proxy, a test's flaky network)."""
        self._transport = _Transport(base_url, api_key, timeout_s, retry or Retry(), transport)
        self._session: str | None = None
        self._models = itertools.count(0)
        self._samplers = itertools.count(0)
        self._lock = threading.Lock()

    @property
    def session_id(self) -> str:
        with self._lock:
            if self._session is None:
                reply = self._transport.call(
                    "POST", "/create_session", {"sdk_version": SDK_VERSION, "tags": []}
                )
                self._session = wire.CreateSessionResponse.model_validate(reply).session_id
            return self._session

    def _counter(self, counter: itertools.count) -> int:
        with self._lock:
            return next(counter)

    def create_training_client(self, config: TrainingConfig) -> TrainingClient:
        body = {
            "session_id": self.session_id,
            "model_seq_id": self._counter(self._models),
            "base_model": config.model_ref,
            "dataset_id": config.dataset_id,
            "batch_size": config.batch_size,
            "lora_config": config.lora_config.model_dump(exclude_none=True),
            "dp": config.dp_config.model_dump(exclude_none=True),
        }
        reply = wire.UntypedFuture.model_validate(self._transport.call("POST", "/create_model", body))
        created = APIFuture(self._transport, reply.request_id, wire.CreateModelResult).result()
        return TrainingClient(self, created.model_id)

    def create_training_client_from_state(self, path: str, with_optimizer: bool = True) -> TrainingClient:
        """A new model continuing a saved state's lineage: its ε history is the lineage's whole history."""
        body = {
            "session_id": self.session_id,
            "model_seq_id": self._counter(self._models),
            "path": path,
            "optimizer": with_optimizer,
        }
        reply = wire.UntypedFuture.model_validate(self._transport.call("POST", "/load_weights", body))
        loaded = APIFuture(self._transport, reply.request_id, wire.LoadWeightsResult).result()
        return TrainingClient(self, loaded.model_id)

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> SamplingClient:
        body = {
            "session_id": self.session_id,
            "sampling_session_seq_id": self._counter(self._samplers),
            "model_path": model_path,
            "base_model": base_model,
        }
        reply = self._transport.call(
            "POST", "/create_sampling_session", {k: v for k, v in body.items() if v is not None}
        )
        return SamplingClient(
            self, wire.CreateSamplingSessionResponse.model_validate(reply).sampling_session_id
        )

    def upload_dataset(self, name: str, records: Sequence[wire.Example | dict]) -> wire.DatasetInfo:
        """Register training records with the service (stored encrypted at rest) for server-side sampling."""
        body = wire.CreateDatasetRequest(
            name=name, records=[wire.Example.model_validate(r) if isinstance(r, dict) else r for r in records]
        )
        return wire.DatasetInfo.model_validate(self._transport.call("POST", "/tensafe/datasets", body))

    def close(self) -> None:
        """Finish the session (its models leave the service's memory) and close the connection."""
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            self._transport.call("POST", f"/sessions/{session}/finish", {})
        self._transport.http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def create_training_client_async(self, config: TrainingConfig) -> TrainingClient:
        return await asyncio.to_thread(self.create_training_client, config)

    async def create_training_client_from_state_async(
        self, path: str, with_optimizer: bool = True
    ) -> TrainingClient:
        return await asyncio.to_thread(self.create_training_client_from_state, path, with_optimizer)

    async def upload_dataset_async(
        self, name: str, records: Sequence[wire.Example | dict]
    ) -> wire.DatasetInfo:
        return await asyncio.to_thread(self.upload_dataset, name, records)
