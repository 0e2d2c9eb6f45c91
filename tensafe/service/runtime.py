"""The training service's engine room: models in memory, each one's requests run in seq_id order on
one compute thread, futures stored as they finish, long polls woken when they do, capacity waited
for, and the privacy history of every lineage kept in the store after every step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tensafe.config.schema import ModelConfig, ServiceConfig, ServicePolicy
from tensafe.data.digest import DatasetKey
from tensafe.errors import ConfigError
from tensafe.privacy.accounting import PrivacyAccountant
from tensafe.privacy.ledger import PrivacyLedger
from tensafe.security import events
from tensafe.service import wire
from tensafe.service.errors import UserFault, not_found
from tensafe.service.learner import Learner
from tensafe.service.policy import Policy
from tensafe.service.sampler import Sampler
from tensafe.service.store import Checkpoint, Future, ModelRow, Store
from tensafe.service.vault import Vault, VaultError

log = logging.getLogger(__name__)
JSON = "application/json"
RESTARTED = "the service restarted before this request finished; submit it again"
Record = Callable[[str, str, dict], None]  # (tenant, event, data) -> the tenant's audit chain
Package = Callable[[str, Path, Path], dict]  # (tenant, run folder, out .tssp) -> manifest


@dataclass
class _Op:
    request_id: str
    kind: str
    run: Callable[[Learner], BaseModel]


@dataclass
class Slot:
    """One training model in memory: its learner (once loaded) and its queue of requests by seq_id."""

    row: ModelRow
    policy: Policy
    next_seq: int
    learner: Learner | None = None
    failed: str | None = None
    pending: dict[int, _Op] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    busy: bool = False  # a request of it is running on the compute thread
    last_used: float = field(default_factory=time.monotonic)

    def idle(self) -> bool:
        """Loaded, nothing queued or running, and no step half-accumulated: it can be parked."""
        learner = self.learner
        return learner is not None and not self.pending and not self.busy and not learner.accumulating


def _raise(err: BaseException) -> BaseModel:
    raise err


def model_id_of(session_id: str, model_seq_id: int) -> str:
    """The id the tinker SDK derives itself (create_training_client_from_state relies on it)."""
    return f"{session_id}:train:{model_seq_id}"


class Runtime:
    def __init__(
        self,
        cfg: ServiceConfig,
        model_cfg: ModelConfig,
        store: Store,
        vault: Vault,
        policies: dict[str, ServicePolicy],
        record: Record,
        package: Package,
        config_digest: str,
    ):
        self.cfg, self.model_cfg, self.store, self.vault = cfg, model_cfg, store, vault
        self.policies, self.record, self.config_digest = policies, record, config_digest
        self._package = package
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensafe-compute")
        self.slots: dict[str, Slot] = {}
        self._waiters: dict[str, asyncio.Event] = {}
        self._queue_state: dict[str, tuple[str, str]] = {}  # request_id -> (queue_state, reason)
        self._capacity = asyncio.Condition()
        self._model_bytes: int | None = None  # measured on the first load
        self._samplers: OrderedDict[tuple[str, str], Sampler] = OrderedDict()
        self._datasets: OrderedDict[tuple[str, str], list[wire.Example]] = OrderedDict()  # decrypted, LRU
        self.base_names = {model_cfg.name, model_cfg.hf_id}

    def close(self) -> None:
        for slot in self.slots.values():
            if slot.task:
                slot.task.cancel()
        self.compute.shutdown(wait=True, cancel_futures=True)

    # --- futures ---------------------------------------------------------------------------------

    def _future(self, tenant: str, scope: str, seq_id: int | None, kind: str) -> tuple[str, bool]:
        request_id = str(uuid.uuid4())
        try:
            stored = self.store.add_future(request_id, tenant, scope, seq_id, kind)
        except ValueError as err:
            raise UserFault(400, str(err), code="seq_id_reused", param="seq_id") from None
        return stored, stored == request_id

    def _wake(self, request_id: str) -> None:
        self._queue_state.pop(request_id, None)
        event = self._waiters.pop(request_id, None)
        if event is not None:
            event.set()

    def _done(self, request_id: str, result: BaseModel) -> None:
        self.store.finish(request_id, JSON, result.model_dump_json(exclude_none=True).encode())
        self._wake(request_id)

    def _failed(self, request_id: str, err: BaseException) -> None:
        if isinstance(err, asyncio.CancelledError):  # the session finished, or the service is stopping
            self.store.fail(
                request_id,
                "the service stopped this request (its session finished, or the "
                "service shut down) before it finished",
                "server",
                "request_cancelled",
            )
        elif isinstance(err, UserFault):
            self.store.fail(request_id, err.message, "user", err.code)
        elif isinstance(err, VaultError):
            self.store.fail(request_id, str(err), "server")
        else:
            log.error("request %s failed: %s", request_id, type(err).__name__, exc_info=err)
            self.store.fail(
                request_id, f"internal error ({type(err).__name__}); the request did not complete", "server"
            )
        self._wake(request_id)

    async def wait(self, tenant: str, request_id: str) -> Future | wire.TryAgain:
        """The finished future, or try_again after holding the poll for service.poll_hold_s."""
        row = self.store.future(tenant, request_id)
        if row is None:
            raise not_found("future", request_id)
        if row.state in ("queued", "running"):
            event = self._waiters.setdefault(request_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), self.cfg.poll_hold_s)
            except asyncio.TimeoutError:
                pass
            row = self.store.future(tenant, request_id)
            assert row is not None
        if row.state in ("queued", "running"):
            state, reason = self._queue_state.get(request_id, ("active", None))
            return wire.TryAgain(request_id=request_id, queue_state=state, queue_state_reason=reason)  # type: ignore[arg-type]
        return row

    async def _in_compute(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn)

    # --- models ----------------------------------------------------------------------------------

    def check_base(self, name: str, param: str = "base_model") -> None:
        if name not in self.base_names:
            raise UserFault(
                400,
                f"{param}={name!r}: this service trains {sorted(self.base_names)}",
                code="unknown_base_model",
                param=param,
            )

    def _in_memory(self, besides: str = "") -> int:
        return sum(1 for s in self.slots.values() if s.failed is None and s.row.model_id != besides)

    def _has_room(self, model_id: str) -> bool:
        """Room for `model_id` (already in self.slots) beside the models in memory."""
        others = self._in_memory(besides=model_id)
        if others >= self.cfg.max_models:
            return False
        return (others + 1) * (self._model_bytes or 0) <= self.cfg.memory_budget_mb * 2**20

    def _measure(self, learner: Learner) -> None:
        params = sum(p.numel() * p.element_size() for p in learner.model.parameters())
        trainable = sum(p.numel() * 4 for p in learner.params)
        # weights + (grad, summed clip, two Adam moments) + a micro-batch of per-example gradients
        self._model_bytes = params + trainable * (4 + self.cfg.micro_batch_size)

    async def _park_one(self, keep: str) -> bool:
        """Make room by parking the least recently used idle model (not `keep`): its weights and
        optimizer state go to the vault, and its next request restores it. Nothing is lost."""
        idle = [s for s in self.slots.values() if s.row.model_id != keep and s.failed is None and s.idle()]
        if not idle:
            return False
        slot = min(idle, key=lambda s: s.last_used)
        tenant, model_id = slot.row.tenant, slot.row.model_id
        path = f"tensafe-parked://{model_id}"
        self.slots.pop(model_id)
        if slot.task:
            slot.task.cancel()
        learner = slot.learner
        assert learner is not None
        self.store.set_model_state(model_id, "suspended", restore_from=path)
        # The compute thread runs in submission order: a restore queued after this runs after it.
        await self._in_compute(lambda: self.vault.put(tenant, path, learner.state_bytes()))
        log.info("parked model %s to make room", model_id)
        return True

    async def _wait_for_room(self, request_id: str, model_id: str) -> None:
        deadline = time.monotonic() + self.cfg.capacity_wait_s
        async with self._capacity:
            while not self._has_room(model_id):
                if await self._park_one(keep=model_id):
                    continue
                self._queue_state[request_id] = (
                    "paused_capacity",
                    f"{self._in_memory(model_id)} models in memory (service.max_models="
                    f"{self.cfg.max_models}, memory_budget_mb={self.cfg.memory_budget_mb:g})",
                )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UserFault(
                        400,
                        f"the service is at capacity ({self._in_memory(model_id)} training models in "
                        f"memory, service.max_models={self.cfg.max_models}); finish a session or "
                        "try again later",
                        code="at_capacity",
                    )
                try:
                    await asyncio.wait_for(self._capacity.wait(), left)
                except asyncio.TimeoutError:
                    pass
            self._queue_state.pop(request_id, None)

    async def _release(self, model_ids: list[str]) -> None:
        for model_id in model_ids:
            slot = self.slots.pop(model_id, None)
            if slot and slot.task:
                slot.task.cancel()
        async with self._capacity:
            self._capacity.notify_all()

    def _start(
        self,
        slot: Slot,
        request_id: str,
        load: Callable[[], Learner],
        result: Callable[[], BaseModel],
        restore: bool = False,
    ) -> None:
        """Load the slot's learner on the compute thread (after waiting for room), then drain its queue.
        If it cannot be loaded, its queued requests fail with the reason; a new model is finished,
        while a model being restored stays suspended, so its next request tries again."""
        self.slots[slot.row.model_id] = slot

        async def run() -> None:
            try:
                await self._wait_for_room(request_id, slot.row.model_id)
                self.store.set_running(request_id)
                slot.learner = await self._in_compute(load)
                if self._model_bytes is None:
                    self._measure(slot.learner)
                self._done(request_id, result())
            except BaseException as err:
                self._failed(request_id, err)
                for op in slot.pending.values():
                    self._failed(op.request_id, err)
                slot.pending.clear()
                if restore:
                    self.slots.pop(slot.row.model_id, None)
                    self.store.set_model_state(slot.row.model_id, "suspended")
                else:
                    slot.failed = (
                        str(err)
                        if isinstance(err, UserFault)
                        else f"model creation failed ({type(err).__name__})"
                    )
                    self.store.set_model_state(slot.row.model_id, "finished")
                async with self._capacity:
                    self._capacity.notify_all()
                if isinstance(err, asyncio.CancelledError):
                    raise
                return
            await self._drain(slot)

        slot.task = asyncio.get_running_loop().create_task(run())

    def _learner(self, policy: Policy, spec: wire.LoraSpec) -> Learner:
        return Learner(
            self.model_cfg,
            spec,
            policy,
            spec.alpha or self.cfg.lora_alpha,
            self.cfg.micro_batch_size,
            self.cfg.max_datums_per_step,
        )

    async def create_model(
        self,
        tenant: str,
        session_id: str,
        model_seq_id: int,
        spec: wire.LoraSpec,
        base_model: str,
        policy: Policy,
    ) -> tuple[str, str]:
        """Returns (request_id, model_id). A retried creation answers with the first one's future."""
        self._session(tenant, session_id)
        self.check_base(base_model)
        model_id = model_id_of(session_id, model_seq_id)
        request_id, new = self._future(tenant, model_id, 0, "create_model")
        if not new:
            return request_id, model_id
        lineage = str(uuid.uuid4())
        self.store.add_lineage(lineage, tenant, policy.model_dump())
        row = ModelRow(
            model_id,
            tenant,
            session_id,
            lineage,
            {"lora": spec.model_dump(), "base_model": base_model},
            "active",
            None,
        )
        self.store.add_model(row)
        self.record(
            tenant,
            events.SERVICE_MODEL,
            {
                "model_id": model_id,
                "lineage": lineage,
                "rank": spec.rank,
                "base_model": base_model,
                "policy": policy.model_dump(),
            },
        )
        self._start(
            Slot(row, policy, next_seq=1),
            request_id,
            lambda: self._learner(policy, spec),
            lambda: wire.CreateModelResult(model_id=model_id),
        )
        return request_id, model_id

    async def load_model(
        self, tenant: str, session_id: str, model_seq_id: int, path: str, optimizer: bool
    ) -> tuple[str, str]:
        """A new model from a checkpoint (create_training_client_from_state). It continues the
        checkpoint's lineage: its accountant is the lineage's whole history, every step taken since
        the save included, never the history as it was when the checkpoint was written."""
        self._session(tenant, session_id)
        ckpt = self._checkpoint(tenant, path, "weights")
        model_id = model_id_of(session_id, model_seq_id)
        request_id, new = self._future(tenant, model_id, 0, "load_weights")
        if not new:
            return request_id, model_id
        policy_dict, _ = self._lineage(tenant, ckpt.lineage_id)
        policy = Policy(**policy_dict)
        spec = wire.LoraSpec(**ckpt.spec["lora"])
        row = ModelRow(model_id, tenant, session_id, ckpt.lineage_id, ckpt.spec, "active", path)
        self.store.add_model(row)
        self.record(
            tenant,
            events.SERVICE_MODEL,
            {"model_id": model_id, "lineage": ckpt.lineage_id, "from": path, "optimizer": optimizer},
        )
        self._start(
            Slot(row, policy, next_seq=1),
            request_id,
            lambda: self._restored(tenant, policy, spec, path, optimizer),
            lambda: wire.LoadWeightsResult(path=path, model_id=model_id),
        )
        return request_id, model_id

    def _restored(
        self, tenant: str, policy: Policy, spec: wire.LoraSpec, path: str, optimizer: bool
    ) -> Learner:
        learner = self._learner(policy, spec)
        learner.load_state(self.vault.get(tenant, path), optimizer)
        return learner

    def _session(self, tenant: str, session_id: str) -> None:
        session = self.store.session(tenant, session_id)
        if session is None:
            raise not_found("session", session_id)
        if session["finished"]:
            raise UserFault(
                400,
                f"session {session_id!r} has finished; create a new ServiceClient",
                code="session_finished",
            )

    def _lineage(self, tenant: str, lineage_id: str) -> tuple[dict[str, Any], list[list]]:
        found = self.store.lineage(tenant, lineage_id)
        assert found is not None, lineage_id  # written with the model, in the same tenant
        return found

    def _checkpoint(self, tenant: str, path: str, kind: str) -> Checkpoint:
        ckpt = self.store.checkpoint(tenant, path)
        if ckpt is None or ckpt.kind != kind:
            what = "checkpoint" if kind == "weights" else "sampler weights"
            raise not_found(what, path)
        return ckpt

    def slot(self, tenant: str, model_id: str) -> Slot:
        """The model's slot; a model suspended by a restart resumes from its last saved state."""
        slot = self.slots.get(model_id)
        if slot is not None and slot.row.tenant == tenant:
            if slot.failed:
                raise UserFault(
                    400, f"model {model_id!r} could not be created: {slot.failed}", code="model_failed"
                )
            return slot
        row = self.store.model(tenant, model_id)
        if row is None:
            raise not_found("model", model_id)
        if row.state == "finished":
            raise UserFault(
                400,
                f"model {model_id!r} belongs to a finished session (or failed to load); "
                "continue from a saved state with create_training_client_from_state",
                code="model_finished",
            )
        if row.restore_from is None:
            raise UserFault(
                400,
                f"model {model_id!r} lost its weights when the service restarted and was never "
                "saved; create a new training client",
                code="model_lost",
            )
        policy_dict, _ = self._lineage(tenant, row.lineage_id)
        policy = Policy(**policy_dict)
        spec = wire.LoraSpec(**row.spec["lora"])
        request_id, _ = self._future(tenant, f"{model_id}:restore", None, "restore")
        last = self.store.last_seq(model_id)
        slot = Slot(row, policy, next_seq=(last or 0) + 1)
        self.store.set_model_state(model_id, "active")
        path = row.restore_from
        self._start(
            slot,
            request_id,
            lambda: self._restored(tenant, policy, spec, path, True),
            lambda: wire.LoadWeightsResult(path=path, model_id=model_id),
            restore=True,
        )
        return slot

    # --- a model's ordered requests --------------------------------------------------------------

    def submit(
        self, tenant: str, model_id: str, seq_id: int | None, kind: str, run: Callable[[Learner], BaseModel]
    ) -> str:
        """Queue `run` for the model at `seq_id` (None: after everything queued). A (model, seq_id)
        seen before answers with the stored future and runs nothing."""
        slot = self.slot(tenant, model_id)
        if seq_id is None:
            seq_id = max([slot.next_seq - 1, *slot.pending, self.store.last_seq(model_id) or 0]) + 1
        request_id, new = self._future(tenant, model_id, seq_id, kind)
        if not new:
            return request_id
        if seq_id < slot.next_seq:
            self._failed(
                request_id,
                UserFault(
                    400,
                    f"seq_id {seq_id} of model {model_id!r} is behind requests "
                    f"already run (next is {slot.next_seq})",
                    param="seq_id",
                ),
            )
            return request_id
        slot.pending[seq_id] = _Op(request_id, kind, run)
        slot.last_used = time.monotonic()
        slot.wake.set()
        return request_id

    def refuse(self, tenant: str, model_id: str, seq_id: int | None, kind: str, err: UserFault) -> None:
        """A request refused up front still uses its seq_id (as a failed future), so the model's
        later requests do not wait for it."""
        if seq_id is None:
            return
        try:
            self.submit(tenant, model_id, seq_id, kind, lambda learner: _raise(err))
        except UserFault:
            return  # an unknown model, or the seq_id is taken: nothing waits on it

    async def _drain(self, slot: Slot) -> None:
        while True:
            op = slot.pending.pop(slot.next_seq, None)
            if op is None:
                slot.wake.clear()
                timeout = self.cfg.seq_gap_timeout_s if slot.pending else None
                try:
                    await asyncio.wait_for(slot.wake.wait(), timeout)
                except asyncio.TimeoutError:  # a seq_id that never came (its request failed upstream)
                    slot.next_seq = min(slot.pending)
                continue
            slot.next_seq += 1
            self.store.set_running(op.request_id)
            learner = slot.learner
            assert learner is not None
            slot.busy = True
            try:
                result = await self._in_compute(partial(op.run, learner))
                self._done(op.request_id, result)
            except asyncio.CancelledError:
                raise
            except BaseException as err:
                self._failed(op.request_id, err)
            finally:
                slot.busy, slot.last_used = False, time.monotonic()

    # --- what the requests run (on the compute thread) -------------------------------------------

    def privacy_of(self, tenant: str, model_id: str) -> tuple[ModelRow, Policy]:
        """A model's row and its lineage's policy, whether or not the model is in memory."""
        slot = self.slots.get(model_id)
        if slot is not None and slot.row.tenant == tenant:
            return slot.row, slot.policy
        row = self.store.model(tenant, model_id)
        if row is None:
            raise not_found("model", model_id)
        return row, Policy(**self._lineage(tenant, row.lineage_id)[0])

    def accountant(self, row: ModelRow, policy: Policy) -> PrivacyAccountant:
        """The lineage's accountant as the store holds it now (every model of the lineage adds to it)."""
        _, history = self._lineage(row.tenant, row.lineage_id)
        accountant = PrivacyAccountant(policy.accountant)
        accountant.load_state_dict({"accountant": policy.accountant, "history": history})
        return accountant

    def _dp_step(
        self,
        slot: Slot,
        learner: Learner,
        take: Callable[[Learner, PrivacyAccountant], dict],
        record: dict[str, Any],
    ) -> dict[str, float]:
        """Run one DP step against the lineage's accountant, store the history it leaves, audit it."""
        accountant = self.accountant(slot.row, slot.policy)
        tenant, model_id = slot.row.tenant, slot.row.model_id
        try:
            metrics = take(learner, accountant)
        except UserFault as err:
            if err.code == "privacy_budget_exhausted":
                self.record(
                    tenant, events.SERVICE_BUDGET_REFUSED, {"model_id": model_id, "steps": accountant.steps}
                )
            raise
        self.store.set_history(tenant, slot.row.lineage_id, [list(h) for h in accountant.history])
        self.record(
            tenant,
            events.SERVICE_STEP,
            {"model_id": model_id, "steps": accountant.steps, "epsilon": metrics["dp_epsilon:max"], **record},
        )
        return metrics

    def optim_step(self, slot: Slot, adam: wire.AdamStep) -> Callable[[Learner], BaseModel]:
        """A step over the client's examples since the last one."""

        def run(learner: Learner) -> BaseModel:
            metrics = self._dp_step(slot, learner, lambda lr, acc: lr.optim_step(adam, acc), {})
            return wire.OptimStepResult(metrics=metrics)

        return run

    def ledger(self, row: ModelRow, p: Policy, accountant: PrivacyAccountant) -> PrivacyLedger:
        if p.sampling == "poisson":
            found = self.store.dataset(row.tenant, p.dataset_id or "")
            assert found is not None
            digest = found[2]
        else:
            digest = f"client_batches:{row.lineage_id}"
        return PrivacyLedger(
            mechanism="dp_sgd",
            sampling=p.sampling,
            noise_multiplier=p.noise_multiplier,
            max_grad_norm=p.max_grad_norm,
            sample_rate=p.sample_rate,
            expected_batch_size=p.batch_size or 1,
            steps=accountant.steps,
            delta=p.delta,
            epsilon=accountant.epsilon(p.delta),
            accountant=p.accountant,  # type: ignore[arg-type]
            accountant_state=accountant.state_dict(),
            dataset_digest=digest,
            dataset_size=p.dataset_size,
            config_digest=self.config_digest,
            grad_sample_mode="hooks",
            secure_mode=True,
        )

    def dp_metrics(self, row: ModelRow, p: Policy) -> wire.DPMetrics:
        accountant = self.accountant(row, p)
        eps = accountant.epsilon(p.delta)
        return wire.DPMetrics(
            model_id=row.model_id,
            sampling=p.sampling,
            epsilon=eps,
            delta=p.delta,
            noise_multiplier=p.noise_multiplier,
            max_grad_norm=p.max_grad_norm,
            sample_rate=p.sample_rate,
            steps=accountant.steps,
            max_epsilon=p.max_epsilon,
            budget_remaining=None if p.max_epsilon is None else max(p.max_epsilon - eps, 0.0),
            accountant=p.accountant,
        )

    def save(
        self, slot: Slot, name: str, kind: str, overwrite: bool, sampling_session: str | None
    ) -> Callable[[Learner], BaseModel]:
        tenant, model_id = slot.row.tenant, slot.row.model_id
        folder = "weights" if kind == "weights" else "sampler_weights"
        path = f"tinker://{model_id}/{folder}/{name}"

        def run(learner: Learner) -> BaseModel:
            if not overwrite and self.store.checkpoint(tenant, path) is not None:
                raise UserFault(
                    400,
                    f"{path} exists; choose another name or pass overwrite=True",
                    code="checkpoint_exists",
                    param="path",
                )
            accountant = self.accountant(slot.row, slot.policy)
            file = self.vault.put(tenant, path, learner.state_bytes(with_optimizer=kind == "weights"))
            self.store.add_checkpoint(
                Checkpoint(
                    path,
                    tenant,
                    model_id,
                    slot.row.lineage_id,
                    "weights" if kind == "weights" else "sampler",
                    file,
                    slot.row.spec,
                    accountant.steps,
                )
            )
            ledger = self.ledger(slot.row, slot.policy, accountant)
            self.record(
                tenant,
                events.SERVICE_SAVE,
                {"model_id": model_id, "path": path, "steps": ledger.steps, "epsilon": ledger.epsilon},
            )
            if kind == "weights":
                self.store.set_restore_point(model_id, path)
                return wire.SaveWeightsResult(path=path)
            if sampling_session is not None:
                self.store.add_sampling_session(
                    sampling_session, tenant, slot.row.session_id, slot.row.spec["base_model"], path
                )
            return wire.SaveForSamplerResult(path=path, sampling_session_id=sampling_session)

        return run

    def train_step(self, slot: Slot, adam: wire.AdamStep) -> Callable[[Learner], BaseModel]:
        """A server-sampled DP-SGD step on the model's dataset (TenSafe's extension)."""
        tenant, dataset_id = slot.row.tenant, slot.policy.dataset_id
        assert dataset_id is not None

        def run(learner: Learner) -> BaseModel:
            records = self.dataset_records(tenant, dataset_id)
            metrics = self._dp_step(
                slot, learner, lambda lr, acc: lr.sampled_step(records, adam, acc), {"dataset": dataset_id}
            )
            return wire.TrainStepResult(metrics=metrics)

        return run

    # --- packages (TenSafe's extension) ----------------------------------------------------------

    async def package(self, tenant: str, path: str) -> bytes:
        """A saved state as a .tssp built by the security layer's packaging (signed with the
        service's key, encrypted for its configured recipients), carrying the lineage's ledger as
        it stands now, every step taken since the save included."""
        ckpt = self.store.checkpoint(tenant, path)
        if ckpt is None or ckpt.kind not in ("weights", "sampler"):
            raise not_found("checkpoint", path)
        row, policy = self.privacy_of(tenant, ckpt.model_id)

        def build() -> bytes:
            from omegaconf import OmegaConf

            from tensafe.models.loader import model_digest

            spec = wire.LoraSpec(**ckpt.spec["lora"])
            sampler = Sampler(
                self.model_cfg, spec, spec.alpha or self.cfg.lora_alpha, self.vault.get(tenant, path)
            )
            with tempfile.TemporaryDirectory() as folder:
                run = Path(folder)
                sampler.model.save_pretrained(run / "adapter")
                self.ledger(row, policy, self.accountant(row, policy)).save(run)
                (run / "resolved_config.yaml").write_text(
                    OmegaConf.to_yaml({"model": self.model_cfg.model_dump()})
                )
                (run / "metrics.json").write_text(
                    json.dumps({"base_model_digest": model_digest(self.model_cfg), "checkpoint": path})
                )
                try:
                    self._package(tenant, run, run / "adapter.tssp")
                except ConfigError as err:
                    raise UserFault(
                        400,
                        f"this service cannot build packages: {err} (the service's operator sets it)",
                        code="packaging_unavailable",
                    ) from None
                return (run / "adapter.tssp").read_bytes()

        return await self._in_compute(build)

    # --- datasets (TenSafe's extension) ----------------------------------------------------------

    def add_dataset(self, tenant: str, name: str, records: list[wire.Example]) -> wire.DatasetInfo:
        """Stores the records encrypted at rest with a key of their own for the keyed digest."""
        for i, record in enumerate(records):
            if len(record.tokens) != len(record.target_tokens) or (
                record.weights is not None and len(record.weights) != len(record.tokens)
            ):
                raise UserFault(
                    400,
                    f"records[{i}]: target_tokens and weights need one value per token",
                    param=f"records[{i}]",
                )
        dataset_id = str(uuid.uuid4())
        key = DatasetKey.generate()
        rows = [r.model_dump() for r in records]
        blob = json.dumps({"key": key.key.hex(), "records": rows}).encode()
        self.vault.put(tenant, f"dataset:{dataset_id}", blob)
        digest = key.digest(rows)
        self.store.add_dataset(dataset_id, tenant, name, len(records), digest)
        self.record(
            tenant,
            events.SERVICE_DATASET,
            {"dataset_id": dataset_id, "records": len(records), "digest": digest},
        )
        return wire.DatasetInfo(dataset_id=dataset_id, name=name, size=len(records), digest=digest)

    def dataset_info(self, tenant: str, dataset_id: str) -> wire.DatasetInfo:
        found = self.store.dataset(tenant, dataset_id)
        if found is None:
            raise not_found("dataset", dataset_id)
        return wire.DatasetInfo(dataset_id=dataset_id, name=found[0], size=found[1], digest=found[2])

    def dataset_records(self, tenant: str, dataset_id: str) -> list[wire.Example]:
        cached = self._datasets.get((tenant, dataset_id))
        if cached is None:
            stored = json.loads(self.vault.get(tenant, f"dataset:{dataset_id}"))
            cached = [wire.Example(**r) for r in stored["records"]]
            self._datasets[(tenant, dataset_id)] = cached
            while len(self._datasets) > self.cfg.max_models:  # at most one per model in memory
                self._datasets.popitem(last=False)
        self._datasets.move_to_end((tenant, dataset_id))
        return cached

    # --- sessions --------------------------------------------------------------------------------

    async def finish_session(self, tenant: str, session_id: str) -> None:
        if self.store.session(tenant, session_id) is None:
            raise not_found("session", session_id)
        await self._release(self.store.finish_session(tenant, session_id))

    # --- sampling --------------------------------------------------------------------------------

    def sampling_target(
        self, tenant: str, sid: str | None, model_path: str | None, base_model: str | None
    ) -> tuple[str, str | None]:
        if sid is not None:
            found = self.store.sampling_session(tenant, sid)
            if found is None:
                raise not_found("sampling session", sid)
            return found
        if model_path is not None:
            ckpt = self._sampler_checkpoint(tenant, model_path)
            return ckpt.spec["base_model"], model_path
        if base_model is None:
            raise UserFault(400, "give sampling_session_id, model_path or base_model", param="model_path")
        self.check_base(base_model)
        return base_model, None

    def _sampler_checkpoint(self, tenant: str, path: str) -> Checkpoint:
        ckpt = self.store.checkpoint(tenant, path)
        if ckpt is None:
            raise not_found("sampler weights", path)
        return ckpt

    def _sampler(self, tenant: str, model_path: str | None) -> Sampler:
        key = (tenant, model_path or "")
        sampler = self._samplers.get(key)
        if sampler is None:
            if model_path is None:
                sampler = Sampler(self.model_cfg, None, self.cfg.lora_alpha, None)
            else:
                ckpt = self._sampler_checkpoint(tenant, model_path)
                spec = wire.LoraSpec(**ckpt.spec["lora"])
                sampler = Sampler(
                    self.model_cfg,
                    spec,
                    spec.alpha or self.cfg.lora_alpha,
                    self.vault.get(tenant, model_path),
                )
            self._samplers[key] = sampler
            while len(self._samplers) > self.cfg.max_samplers:
                self._samplers.popitem(last=False)
        self._samplers.move_to_end(key)
        return sampler

    def sample(
        self,
        tenant: str,
        scope: str,
        seq_id: int | None,
        model_path: str | None,
        prompt: list[int],
        n: int,
        params: wire.SamplingParams,
    ) -> tuple[str, list[str]]:
        request_id, new = self._future(tenant, scope, seq_id, "sample")
        ids = [f"{request_id}:{i}" for i in range(n)]
        if not new:
            return request_id, ids

        async def run() -> None:
            try:
                self.store.set_running(request_id)
                limit = self.cfg.max_sample_tokens
                result = await self._in_compute(
                    lambda: self._sampler(tenant, model_path).sample(prompt, n, params, limit)
                )
                self._done(request_id, result)
            except BaseException as err:
                self._failed(request_id, err)

        asyncio.get_running_loop().create_task(run())
        return request_id, ids
