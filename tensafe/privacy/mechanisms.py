"""Training-time privacy mechanisms, chosen by `privacy.mechanism`: what sampler feeds the
trainer, how the batch gradient is formed, and what the privacy ledger records.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal, Protocol

import torch

from tensafe.config.schema import DPSGD, NoPrivacy
from tensafe.errors import ConfigError
from tensafe.privacy.accounting import (
    PrivacyAccountant,
    Step,
    calibrate_noise_multiplier,
    check_delta,
    default_delta,
)
from tensafe.privacy.distributed import (
    GaussianAllReduce,
    Quantizer,
    SecureAggregation,
    WorkerGroup,
    describe,
    share_variance,
)
from tensafe.privacy.dp_sgd import DPGradient, NoiseAggregator, per_sample_gradient_module
from tensafe.privacy.ledger import PrivacyLedger
from tensafe.privacy.randomness import SeededRandom, make_random
from tensafe.privacy.sampling import PoissonBatchSampler, ShuffledBatchSampler
from tensafe.privacy.skellam import SkellamAccountant
from tensafe.privacy.skellam import calibrate_noise_multiplier as calibrate_skellam

log = logging.getLogger(__name__)


class Mechanism(Protocol):
    """What training asks of a privacy mechanism: the batches, how a batch's gradient is formed
    (`wrap`, `attach`, the batch hooks, `loss_scale`), the budget, and what the ledger records."""

    name: str
    differentially_private: bool
    dataset_digest: str
    loss_scale: float

    def batch_sampler(self, num_batches: int) -> Iterable[list[int]]: ...

    def steps_per_epoch(self) -> int: ...

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module training calls forward on (per-sample gradients where DP needs them)."""

    def attach(self, params: list[torch.nn.Parameter]) -> None: ...

    def begin_batch(self) -> None: ...

    def after_backward(self) -> None:
        """After each micro-batch's backward pass (DP-SGD clips per example here)."""

    def end_batch(self) -> None:
        """Before the optimizer step (DP-SGD adds the noise here)."""

    def step_taken(self) -> None: ...

    def budget_allows_step(self) -> bool: ...

    def epsilon(self) -> float | None: ...

    def summary(self) -> dict[str, Any]: ...

    def ledger(self, config_digest: str) -> PrivacyLedger: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NonPrivate:
    """Plain fine-tuning: shuffled fixed-size batches, mean gradient, no guarantee (ε = ∞)."""

    name: Literal["none"] = "none"
    differentially_private = False

    def __init__(
        self,
        cfg: NoPrivacy,
        *,
        dataset_size: int,
        batch_size: int,
        planned_steps: int,
        seed: int,
        dataset_digest: str,
        resumed_history: Sequence[Step] = (),
        group: WorkerGroup | None = None,
        steps_in_model: int = 0,
    ):
        if resumed_history or steps_in_model:
            raise ValueError("a run without DP has no accountant history to resume")
        if group is not None:
            raise ConfigError(
                "privacy", "none",
                "a distributed job trains with DP-SGD (its aggregation is DP's); use privacy=dp_sgd",
            )
        self.dataset_size, self.batch_size, self.dataset_digest = dataset_size, batch_size, dataset_digest
        self.rng = SeededRandom(seed)
        self.steps = 0
        self.loss_scale = 1.0 / batch_size

    def batch_sampler(self, num_batches: int) -> ShuffledBatchSampler:
        return ShuffledBatchSampler(self.dataset_size, self.batch_size, self.rng, lambda: self.steps)

    def steps_per_epoch(self) -> int:
        return max(1, self.dataset_size // self.batch_size)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def attach(self, params: list[torch.nn.Parameter]) -> None:
        pass

    def begin_batch(self) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def end_batch(self) -> None:
        pass

    def step_taken(self) -> None:
        self.steps += 1

    def budget_allows_step(self) -> bool:
        return True

    def epsilon(self) -> float | None:
        return None

    def summary(self) -> dict[str, Any]:
        return {"mechanism": self.name, "epsilon": None, "delta": None, "steps": self.steps}

    def ledger(self, config_digest: str) -> PrivacyLedger:
        # Every DP-only field stays null: there is no guarantee to record.
        return PrivacyLedger(
            mechanism=self.name,
            sample_rate=self.batch_size / self.dataset_size,
            expected_batch_size=self.batch_size,
            steps=self.steps,
            dataset_digest=self.dataset_digest,
            dataset_size=self.dataset_size,
            config_digest=config_digest,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


class DPSGDMechanism:
    """DP-SGD with Poisson sampling at q = batch_size / N and an accountant that never forgets.

    With a `group` (a distributed job) each worker samples its shard and the aggregator sums the
    workers' clipped sums with the noise (tensafe.privacy.distributed); under secure aggregation
    the noise is Skellam and the accountant the Skellam one.
    """

    name: Literal["dp_sgd"] = "dp_sgd"
    differentially_private = True

    def __init__(
        self,
        cfg: DPSGD,
        *,
        dataset_size: int,
        batch_size: int,
        planned_steps: int,
        seed: int,
        dataset_digest: str,
        resumed_history: Sequence[Step] = (),
        group: WorkerGroup | None = None,
        steps_in_model: int = 0,
    ):
        if batch_size > dataset_size:
            raise ConfigError(
                "train.batch_size", batch_size, f"must be ≤ the {dataset_size} training records"
            )
        if cfg.secure_aggregation and group is None:
            raise ConfigError(
                "privacy.secure_aggregation", True,
                "sums the clipped gradients of several workers: use launcher=ray (or set it to false)",
            )
        self.cfg, self.dataset_size, self.dataset_digest = cfg, dataset_size, dataset_digest
        self.group, self.seed = group, seed
        self.sample_rate = batch_size / dataset_size
        self.expected_batch_size = batch_size
        self.delta = cfg.delta if cfg.delta is not None else default_delta(dataset_size)
        check_delta(self.delta, dataset_size)
        self.quantizer: Quantizer | None = None
        self.accountant: PrivacyAccountant | SkellamAccountant
        if cfg.secure_aggregation:
            assert group is not None  # refused above
            self.quantizer = Quantizer.for_clip(
                cfg.max_grad_norm, group.dimension, cfg.distributed.rounding_overhead
            )
            self.accountant = SkellamAccountant(self.quantizer.sensitivity)
        else:
            self.accountant = PrivacyAccountant(cfg.accountant)
        for sigma, q, n in resumed_history:
            self.accountant.step(sigma, q, n)
        # Optimizer steps in the model: the accountant's steps in one process; a distributed job
        # starts from 0 or from the checkpoint it resumed (load_state_dict), whatever was executed.
        self.model_steps = self.accountant.steps if group is None else 0
        # The steps still to run: the model's, not the executed ones (a distributed job re-executes
        # the steps after its checkpoint, and all of them count against the target).
        remaining = planned_steps - (self.accountant.steps if group is None else steps_in_model)
        if cfg.noise_multiplier is not None:
            self.noise_multiplier = cfg.noise_multiplier
        elif remaining <= 0:  # resumed at or past the end: nothing left to calibrate
            self.noise_multiplier = resumed_history[-1][0]
        else:
            # On resume the steps already taken count against the target: only the rest is calibrated.
            assert cfg.target_epsilon is not None  # the schema requires a target without a σ
            if self.quantizer is not None:
                self.noise_multiplier = calibrate_skellam(
                    cfg.target_epsilon, self.delta, self.sample_rate, remaining,
                    self.quantizer.sensitivity, history=self.accountant.history,
                )
            else:
                self.noise_multiplier = calibrate_noise_multiplier(
                    cfg.target_epsilon,
                    self.delta,
                    self.sample_rate,
                    remaining,
                    cfg.accountant,
                    history=self.accountant.history,
                )
        if self.quantizer is not None and group is not None:
            n, t = group.collective.world_size, cfg.distributed.tolerated_colluders
            self.share_variance = share_variance(self.noise_multiplier, self.quantizer.sensitivity, n, t)
            self.quantizer.check_headroom(
                dataset_size, self.sample_rate, n, math.sqrt(self.share_variance * n),
                cfg.distributed.modulus_bits,
            )
        self.rng = make_random(cfg.secure_mode, seed)
        if not cfg.secure_mode:
            log.warning(
                "privacy.secure_mode=false: noise and Poisson sampling come from a PRNG seeded by "
                "seed=%d, so anyone who knows the seed can remove the noise. A research mode: do not "
                "release what this run trains.", seed
            )
        self.loss_scale = 1.0  # per-example gradients of the summed loss
        self.gradient: DPGradient | None = None
        self._epsilon_at: tuple[int, float] = (-1, 0.0)

    @property
    def accountant_name(self) -> Literal["rdp", "prv", "skellam_rdp"]:
        return "skellam_rdp" if isinstance(self.accountant, SkellamAccountant) else self.cfg.accountant

    def batch_sampler(self, num_batches: int) -> PoissonBatchSampler:
        shard = (self.group.collective.rank, self.group.collective.world_size) if self.group else (0, 1)
        return PoissonBatchSampler(
            self.dataset_size, self.sample_rate, num_batches, self.rng, lambda: self.accountant.steps, shard
        )

    def steps_per_epoch(self) -> int:
        return max(1, round(1 / self.sample_rate))

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return per_sample_gradient_module(model, self.cfg.grad_sample_mode)

    def attach(self, params: list[torch.nn.Parameter]) -> None:
        self.gradient = DPGradient(
            params, self.noise_multiplier, self.cfg.max_grad_norm, self.expected_batch_size, self.rng,
            self._aggregator(),
        )

    def _aggregator(self) -> NoiseAggregator | None:
        if self.group is None:
            return None  # DPGradient's own: the noise added here
        std = self.noise_multiplier * self.cfg.max_grad_norm
        spread = self.cfg.distributed
        if self.quantizer is None:
            return GaussianAllReduce(self.group.collective, std, self.rng, spread.noise_placement)
        return SecureAggregation(
            self.group.collective, self.group.run_id, self.quantizer, self.share_variance,
            spread.modulus_bits, self.rng, self.seed, spread.neighbours,
            spread.threads or len(os.sched_getaffinity(0)),
        )

    def _attached(self) -> DPGradient:
        if self.gradient is None:
            raise RuntimeError("DP-SGD: attach() the trainable parameters before the first batch")
        return self.gradient

    def begin_batch(self) -> None:
        self._attached().begin()

    def after_backward(self) -> None:
        self._attached().clip_and_accumulate()

    def end_batch(self) -> None:
        gradient = self._attached()
        if self.group is not None and self.group.journal is not None:
            # Journaled before this worker's share exists: the aggregate cannot form without it.
            self.group.journal.append(
                gradient.aggregator.attempt, self.model_steps, self.noise_multiplier, self.sample_rate
            )
        gradient.finalize(step=self.accountant.steps)

    def step_taken(self) -> None:
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        self.model_steps += 1

    @property
    def steps(self) -> int:
        return self.accountant.steps

    def budget_allows_step(self) -> bool:
        if self.cfg.max_epsilon is None:
            return True
        return (
            self.accountant.epsilon_if(self.noise_multiplier, self.sample_rate, 1, self.delta)
            <= self.cfg.max_epsilon
        )

    def epsilon(self) -> float:
        # Progress lines, the summary and the ledger all ask after the same step: compute once.
        if self._epsilon_at[0] != self.steps:
            self._epsilon_at = (self.steps, self.accountant.epsilon(self.delta))
        return self._epsilon_at[1]

    def summary(self) -> dict[str, Any]:
        return {
            "mechanism": self.name,
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.cfg.max_grad_norm,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "accountant": self.accountant_name,
        }

    def ledger(self, config_digest: str) -> PrivacyLedger:
        return PrivacyLedger(
            mechanism=self.name,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.cfg.max_grad_norm,
            sample_rate=self.sample_rate,
            expected_batch_size=self.expected_batch_size,
            steps=self.steps,
            delta=self.delta,
            epsilon=self.epsilon(),
            accountant=self.accountant_name,
            accountant_state=self.accountant.state_dict(),
            dataset_digest=self.dataset_digest,
            dataset_size=self.dataset_size,
            config_digest=config_digest,
            grad_sample_mode=self.cfg.grad_sample_mode,
            secure_mode=self.cfg.secure_mode,
            steps_in_model=self.model_steps,
            distributed=self._distributed_record(),
        )

    def aggregation_timings(self) -> dict[str, list[float]]:
        """Seconds per step of each secure-aggregation phase (empty without secure aggregation)."""
        aggregator = self.gradient.aggregator if self.gradient else None
        return dict(aggregator.timings) if isinstance(aggregator, SecureAggregation) else {}

    def _distributed_record(self) -> dict[str, Any] | None:
        if self.group is None:
            return None
        record: dict[str, Any] = {"workers": self.group.collective.world_size, "run_id": self.group.run_id}
        if self.group.journal is not None:
            record |= self.group.journal.summary()
        if self.gradient is not None:
            record |= describe(self.gradient.aggregator)
        if self.quantizer is not None:
            sensitivity = self.quantizer.sensitivity
            record |= {
                "l2_sensitivity": sensitivity.l2,
                "l1_sensitivity": sensitivity.l1,
                "tolerated_colluders": self.cfg.distributed.tolerated_colluders,
            }
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "model_steps": self.model_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A distributed job's accountant comes from its journal (every executed step), never from
        # the checkpoint, which may be many executed steps behind.
        if self.group is None:
            self.accountant.load_state_dict(state["accountant"])
        self.model_steps = int(state.get("model_steps", self.accountant.steps))
        self._epsilon_at = (-1, 0.0)


MECHANISMS = {"none": NonPrivate, "dp_sgd": DPSGDMechanism}


def build_mechanism(cfg: NoPrivacy | DPSGD, **kwargs: Any) -> Mechanism:
    return MECHANISMS[cfg.mechanism](cfg, **kwargs)


def planned_steps(max_steps: int | None, epochs: float | None, batch_size: int, dataset_size: int) -> int:
    """Optimizer steps for the run: `max_steps`, or epochs · N / batch_size."""
    if max_steps is not None:
        return max_steps
    assert epochs is not None  # the schema requires one of the two
    return max(1, math.ceil(epochs * dataset_size / batch_size))
