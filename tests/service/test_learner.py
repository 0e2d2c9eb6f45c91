"""The service's Learner in process: its DP gradient against a brute-force per-example reference,
clipping that no client setting replaces, and the policy arithmetic."""

from __future__ import annotations

import pytest
import torch

from tensafe.config.schema import ServicePolicy
from tensafe.privacy.accounting import PrivacyAccountant
from tensafe.service import wire
from tensafe.service.errors import UserFault
from tensafe.service.learner import Learner
from tensafe.service.policy import dp_request, effective_policy, sampled_policy

TENANT = ServicePolicy(
    noise_multiplier=1.0, max_grad_norm=0.05, delta=1e-6, max_epsilon=50.0, accountant="rdp"
)


def _examples(n: int, length: int = 10) -> list[wire.Example]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, 1000, (length + 1,), generator=g).tolist()
        out.append(
            wire.Example(
                tokens=tokens[:-1], target_tokens=tokens[1:], weights=torch.rand(length, generator=g).tolist()
            )
        )
    return out


@pytest.fixture()
def learner(tiny_cfg):
    policy = effective_policy(TENANT, None)
    return Learner(
        tiny_cfg.model,
        wire.LoraSpec(rank=2, seed=0),
        policy,
        alpha=4.0,
        micro_batch_size=3,
        max_datums_per_step=64,
    )


def _reference_sum(learner: Learner, examples: list[wire.Example], clip: float) -> list[torch.Tensor]:
    """Σ_i clip(∇ loss_i, C), one example at a time with plain autograd."""
    total = [torch.zeros_like(p) for p in learner.params]
    for ex in examples:
        ids = torch.tensor([ex.tokens])
        logits = learner.model(input_ids=ids).logits
        logp = torch.log_softmax(logits.float(), -1).gather(
            -1, torch.tensor([ex.target_tokens]).unsqueeze(-1)
        )
        loss = -(logp.squeeze(-1) * torch.tensor([ex.weights])).sum()
        grads = torch.autograd.grad(loss, learner.params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads):
            t.add_(g * factor)
    for p in learner.params:
        p.grad_sample = None  # the Opacus hooks saw these passes too
    return total


def test_the_step_gradient_is_the_clipped_per_example_sum(learner):
    examples = _examples(7)
    learner.forward_backward(examples, forward_only=False)  # micro-batches of 3, 3, 1
    summed = [t.clone() for t in learner.gradient.summed]
    reference = _reference_sum(learner, examples, TENANT.max_grad_norm)
    for got, want in zip(summed, reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # every example's contribution was clipped: the sum is within n·C
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in summed))
    assert float(norm) <= 7 * TENANT.max_grad_norm * (1 + 1e-5)


def test_a_global_clip_norm_does_not_replace_per_example_clipping(learner):
    examples = _examples(4)
    learner.forward_backward(examples, forward_only=False)
    summed = [t.clone() for t in learner.gradient.summed]
    assert (
        float(torch.sqrt(sum((t.double() ** 2).sum() for t in summed))) <= 4 * TENANT.max_grad_norm * 1.00001
    )
    accountant = PrivacyAccountant("rdp")
    metrics = learner.optim_step(wire.AdamStep(grad_clip_norm=1e9), accountant)
    assert metrics["dp_steps:max"] == 1 and accountant.history == [(1.0, 1.0, 1)]


def test_forward_only_changes_nothing(learner):
    before = [p.detach().clone() for p in learner.params]
    out = learner.forward_backward(_examples(2), forward_only=True)
    assert len(out.loss_fn_outputs) == 2 and not learner.accumulating
    assert all(torch.equal(a, b) for a, b in zip(before, learner.params))


def test_policies_only_tighten():
    strict = effective_policy(
        TENANT, wire.DPRequest(noise_multiplier=2.0, delta=1e-8, max_epsilon=3.0, max_grad_norm=0.01)
    )
    assert (strict.noise_multiplier, strict.delta, strict.max_epsilon, strict.max_grad_norm) == (
        2.0,
        1e-8,
        3.0,
        0.01,
    )
    for weaker in (
        dict(noise_multiplier=0.5),
        dict(delta=1e-3),
        dict(max_epsilon=100.0),
        dict(max_grad_norm=1.0),
    ):
        with pytest.raises(UserFault) as refused:
            effective_policy(TENANT, wire.DPRequest(**weaker))
        assert refused.value.status == 403 and next(iter(weaker)) in refused.value.message
    with pytest.raises(UserFault, match="DP fields a client may set"):
        dp_request({"type": "adamw", "secure_mode": False}, None)
    with pytest.raises(UserFault, match="AdamW only"):
        dp_request({"type": "dimuon"}, None)


def test_server_side_sampling_policy_is_poisson_at_b_over_n():
    policy = sampled_policy(TENANT, None, "d", dataset_size=1000, batch_size=10)
    assert policy.sampling == "poisson" and policy.sample_rate == 0.01 and policy.normaliser == 10
    assert policy.delta == min(TENANT.delta, 1 / 10_000)
    calibrated = sampled_policy(TENANT, wire.DPRequest(target_epsilon=1.0, planned_steps=200), "d", 1000, 10)
    assert calibrated.noise_multiplier >= TENANT.noise_multiplier and calibrated.max_epsilon == 1.0
    accountant = PrivacyAccountant("rdp")
    accountant.step(calibrated.noise_multiplier, calibrated.sample_rate, 200)
    assert accountant.epsilon(calibrated.delta) <= 1.0
    with pytest.raises(UserFault, match="larger than the dataset"):
        sampled_policy(TENANT, None, "d", dataset_size=5, batch_size=10)
