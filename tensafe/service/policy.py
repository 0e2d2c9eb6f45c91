"""The DP policy a training model runs under: the tenant's (service config), tightened by whatever
the client asked for. A request can make it stricter, never weaker; the parts that make DP-SGD what
it is (per-example clipping, noise on every step, the accountant) have no switch at all.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from tensafe.config.schema import ServicePolicy
from tensafe.errors import ConfigError
from tensafe.privacy.accounting import calibrate_noise_multiplier, default_delta
from tensafe.service.errors import UserFault
from tensafe.service.wire import DPRequest

CLIENT_BATCH_RATE = 1.0  # the sample rate every client-batch step is accounted at


class Policy(BaseModel):
    """The effective policy of one training lineage (stored with it, so a restart keeps it).

    client_batches: the client sends every batch; each step is accounted at q = 1 and the step's
    gradient is the noisy sum. poisson: the server draws each batch from the registered dataset at
    q = batch_size / dataset_size, and the gradient is the noisy sum over batch_size, as task=train.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    max_epsilon: float | None
    accountant: str
    sampling: Literal["client_batches", "poisson"] = "client_batches"
    sample_rate: float = CLIENT_BATCH_RATE
    dataset_id: str | None = None
    dataset_size: int | None = None
    batch_size: int | None = None

    @property
    def normaliser(self) -> float:
        """What the noisy sum of clipped gradients is divided by (DPGradient's expected batch size)."""
        return float(self.batch_size) if self.sampling == "poisson" and self.batch_size else 1.0


def dp_request(optimizer_config: dict[str, Any] | None, dp: DPRequest | None) -> DPRequest | None:
    """The DP fields of a create_model request: tensafe.client's `dp`, or extra fields of Tinker's
    `optimizer_config` (whose `type` must be adamw). An unknown field is refused by name, so a
    client that tries to switch something off learns it cannot."""
    if dp is not None:
        return dp
    if not optimizer_config:
        return None
    extras = {k: v for k, v in optimizer_config.items() if k != "type"}
    if optimizer_config.get("type", "adamw") != "adamw":
        raise UserFault(
            400,
            f"optimizer_config.type={optimizer_config.get('type')!r}: this service trains with AdamW only",
            param="optimizer_config.type",
        )
    if not extras:
        return None
    try:
        return DPRequest.model_validate(extras)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise UserFault(
            400,
            f"optimizer_config: {problems}. The DP fields a client may set are "
            f"{sorted(DPRequest.model_fields)}, and only to something stricter than the "
            "tenant's policy",
            param="optimizer_config",
        ) from None


def effective_policy(tenant: ServicePolicy, asked: DPRequest | None) -> Policy:
    """`tenant`'s policy with the client's stricter choices; a weaker one is a 400 naming it."""
    chosen = tenant.model_dump()
    if asked is not None:
        weaker = []
        if asked.noise_multiplier is not None:
            if asked.noise_multiplier < tenant.noise_multiplier:
                weaker.append(f"noise_multiplier {asked.noise_multiplier} < {tenant.noise_multiplier}")
            chosen["noise_multiplier"] = asked.noise_multiplier
        if asked.delta is not None:
            if asked.delta > tenant.delta:
                weaker.append(f"delta {asked.delta} > {tenant.delta}")
            chosen["delta"] = asked.delta
        if asked.max_epsilon is not None:
            if tenant.max_epsilon is not None and asked.max_epsilon > tenant.max_epsilon:
                weaker.append(f"max_epsilon {asked.max_epsilon} > {tenant.max_epsilon}")
            chosen["max_epsilon"] = asked.max_epsilon
        if asked.target_epsilon is not None or asked.planned_steps is not None:
            raise UserFault(
                400,
                "target_epsilon and planned_steps calibrate σ for server-side sampling only "
                "(a model created with dataset_id); with client batches set noise_multiplier",
                param="dp.target_epsilon",
            )
        if asked.max_grad_norm is not None:
            # C does not change ε (the noise scales with it); a larger C still means larger
            # per-example influence on the weights, so it is held to the policy's too.
            if asked.max_grad_norm > tenant.max_grad_norm:
                weaker.append(f"max_grad_norm {asked.max_grad_norm} > {tenant.max_grad_norm}")
            chosen["max_grad_norm"] = asked.max_grad_norm
        if weaker:
            raise UserFault(
                403,
                "the tenant's DP policy allows only stricter settings: " + "; ".join(weaker),
                code="weaker_than_policy",
                param="optimizer_config",
            )
    return Policy(**chosen)


def sampled_policy(
    tenant: ServicePolicy, asked: DPRequest | None, dataset_id: str, dataset_size: int, batch_size: int
) -> Policy:
    """The policy of a model trained by server-side Poisson sampling: q = B/N, δ no larger than the
    tenant's nor than 1/(10N), σ the largest of the tenant's, the client's and (with a target ε) the
    one calibrated to reach it after planned_steps; the target also becomes the budget."""
    if batch_size > dataset_size:
        raise UserFault(
            400,
            f"batch_size={batch_size} is larger than the dataset's {dataset_size} records",
            param="batch_size",
        )
    asked = asked or DPRequest()
    if (asked.target_epsilon is None) != (asked.planned_steps is None):
        raise UserFault(
            400,
            "give target_epsilon and planned_steps together (σ is calibrated to reach the "
            "target after that many steps)",
            param="dp.target_epsilon",
        )
    base = effective_policy(tenant, asked.model_copy(update={"target_epsilon": None, "planned_steps": None}))
    q = batch_size / dataset_size
    delta = min(base.delta, default_delta(dataset_size))
    sigma, budget = base.noise_multiplier, base.max_epsilon
    if asked.target_epsilon is not None and asked.planned_steps is not None:
        if budget is not None and asked.target_epsilon > budget:
            raise UserFault(
                403,
                f"target_epsilon {asked.target_epsilon} > the policy's max_epsilon {budget}",
                code="weaker_than_policy",
                param="dp.target_epsilon",
            )
        try:
            calibrated = calibrate_noise_multiplier(
                asked.target_epsilon, delta, q, asked.planned_steps, base.accountant
            )
        except ConfigError as err:
            raise UserFault(400, f"dp.target_epsilon: {err.allowed}", param="dp.target_epsilon") from None
        sigma, budget = max(sigma, calibrated), asked.target_epsilon
    return base.model_copy(
        update={
            "noise_multiplier": sigma,
            "delta": delta,
            "max_epsilon": budget,
            "sampling": "poisson",
            "sample_rate": q,
            "dataset_id": dataset_id,
            "dataset_size": dataset_size,
            "batch_size": batch_size,
        }
    )
