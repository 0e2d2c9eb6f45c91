"""The DP policy a training model runs under: the tenant's (service config), tightened by whatever
the client asked for. A request can make it stricter, never weaker; the parts that make DP-SGD what
it is (per-example clipping, noise on every step, the accountant) have no switch at all.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tensafe.config.schema import ServicePolicy
from tensafe.service.errors import UserFault
from tensafe.service.wire import DPRequest


class Policy(BaseModel):
    """The effective policy of one training lineage (stored with it, so a restart keeps it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    max_epsilon: float | None
    accountant: str


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
        raise UserFault(400, f"optimizer_config.type={optimizer_config.get('type')!r}: this service trains "
                        "with AdamW only", param="optimizer_config.type")
    if not extras:
        return None
    try:
        return DPRequest.model_validate(extras)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise UserFault(400, f"optimizer_config: {problems}. The DP fields a client may set are "
                        f"{sorted(DPRequest.model_fields)}, and only to something stricter than the "
                        "tenant's policy", param="optimizer_config") from None


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
        if asked.max_grad_norm is not None:
            # C does not change ε (the noise scales with it); a larger C still means larger
            # per-example influence on the weights, so it is held to the policy's too.
            if asked.max_grad_norm > tenant.max_grad_norm:
                weaker.append(f"max_grad_norm {asked.max_grad_norm} > {tenant.max_grad_norm}")
            chosen["max_grad_norm"] = asked.max_grad_norm
        if weaker:
            raise UserFault(403, "the tenant's DP policy allows only stricter settings: " + "; ".join(weaker),
                            code="weaker_than_policy", param="optimizer_config")
    return Policy(**chosen)
