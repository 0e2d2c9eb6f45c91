"""A distributed job resumed behind its executed steps calibrates σ for the steps its model still
needs, so the whole job, re-executed steps included, lands on the target ε rather than past it."""

from __future__ import annotations

import pytest

from tensafe.config.schema import DPSGD
from tensafe.privacy.accounting import PrivacyAccountant
from tensafe.privacy.distributed import WorkerGroup
from tensafe.privacy.mechanisms import build_mechanism
from tests.privacy.collectives import ThreadCollective, ThreadGroup

TARGET, DELTA, N, BATCH, PLANNED = 3.0, 1e-5, 10_000, 100, 60


def _mechanism(history, steps_in_model):
    cfg = DPSGD(
        mechanism="dp_sgd",
        target_epsilon=TARGET,
        delta=DELTA,
        max_grad_norm=1.0,
        accountant="rdp",
        grad_sample_mode="hooks",
        secure_mode=False,
    )
    group = WorkerGroup(ThreadCollective(ThreadGroup(1), 0), "run", 10, None)
    return build_mechanism(
        cfg,
        dataset_size=N,
        batch_size=BATCH,
        planned_steps=PLANNED,
        seed=0,
        dataset_digest="d",
        resumed_history=history,
        group=group,
        steps_in_model=steps_in_model,
    )


def test_a_resumed_distributed_job_reaches_the_target_with_its_re_executed_steps():
    first = _mechanism([], 0)
    executed = [(first.noise_multiplier, BATCH / N, 40)]  # 40 steps ran; the checkpoint holds 20
    resumed = _mechanism(executed, steps_in_model=20)
    assert resumed.noise_multiplier > first.noise_multiplier  # 40 steps left to pay for, not 20
    whole = PrivacyAccountant("rdp")
    whole.step(first.noise_multiplier, BATCH / N, 40)
    whole.step(resumed.noise_multiplier, BATCH / N, PLANNED - 20)  # what the model still needs
    assert whole.epsilon(DELTA) == pytest.approx(TARGET, rel=0.02)
    assert whole.epsilon(DELTA) <= TARGET * 1.001
