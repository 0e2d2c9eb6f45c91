"""TenSafe's SDK (tensafe.client) against a live `tensafe task=service`: the flow, server-side
sampling with task=train's accounting, typed errors, retries that never double-count, packages."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from tensafe import client as ts
from tensafe.privacy.ledger import PrivacyLedger
from tests.cli import run_tensafe
from tests.service.live import KEYS, live_service

SIGMA, DELTA = 1.0, 1e-6


def records(n: int, seed: int = 0, length: int = 12) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, 1000, size=length + 1).tolist()
        out.append({"tokens": tokens[:-1], "target_tokens": tokens[1:]})
    return out


def config(**kwargs) -> ts.TrainingConfig:
    return ts.TrainingConfig(model_ref="tiny_llama", lora_config=ts.LoRAConfig(rank=2, alpha=4), **kwargs)


@pytest.fixture(scope="module")
def keystore(tmp_path_factory):
    """A signing key the service packages with, trusted by the same keystore (for verify)."""
    root = tmp_path_factory.mktemp("keys")
    done = run_tensafe("keys", "--keystore", str(root), "generate", "signing", "--name", "svc", "--trust")
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture(scope="module")
def service(tmp_path_factory, keystore):
    extra = (f"security.keystore={keystore}", "security.signing_key=svc")
    with live_service(tmp_path_factory.mktemp("service"), *extra) as svc:
        yield svc


@pytest.fixture()
def sdk(service):
    with ts.ServiceClient(service.url, KEYS["acme"]) as sc:
        yield sc


def test_client_batches_train_save_sample_and_continue(sdk):
    tc = sdk.create_training_client(config())
    batch = records(4)
    for _ in range(3):
        fb = tc.forward_backward(batch)
        step = tc.optim_step(ts.AdamParams(learning_rate=1e-2))
    assert fb.result(timeout=120).metrics["loss:sum"] > 0
    assert step.result(timeout=120).metrics["dp_steps:max"] == 3
    dp = tc.get_dp_metrics()
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_event.GaussianDpEvent(SIGMA), 3)
    assert dp.sampling == "client_batches" and dp.sample_rate == 1 and dp.steps == 3
    assert dp.epsilon == pytest.approx(accountant.get_epsilon(DELTA), rel=0.02)
    assert dp.budget_remaining == pytest.approx(50.0 - dp.epsilon)

    path = tc.save_state("sdk")
    sampler = sdk.create_sampling_client(model_path=tc.save_weights_for_sampler("sdk-sampler"))
    seqs = sampler.sample([1, 2, 3], 2, ts.SamplingParams(max_tokens=5, seed=3)).result(timeout=120).sequences
    assert [len(s.tokens) for s in seqs] == [5, 5]
    again = sdk.create_training_client_from_state(path)
    again.forward_backward(records(2, seed=9))
    assert again.optim_step().result(timeout=120).metrics["dp_steps:max"] == 4
    ledger = PrivacyLedger.model_validate(again.privacy_ledger())
    assert ledger.sampling == "client_batches" and ledger.steps == 4 and ledger.epsilon > dp.epsilon


def test_server_side_sampling_is_task_trains_dp_sgd(sdk, tmp_path):
    # task=train's own run and ledger for (σ, q, steps), at the service's δ
    run = tmp_path / "train"
    done = run_tensafe(
        "model=tiny_llama",
        "privacy.noise_multiplier=1.0",
        "privacy.delta=1e-6",
        "privacy.accountant=prv",
        "train.max_steps=5",
        "train.batch_size=8",
        "train.eval_max_examples=4",
        f"hydra.run.dir={run}",
    )
    assert done.returncode == 0, done.stderr
    reference = PrivacyLedger.load(run)
    n = reference.dataset_size
    assert n is not None

    dataset = sdk.upload_dataset("private-set", records(n, seed=1))
    assert dataset.size == n and dataset.digest.startswith("hmac-sha256:")
    tc = sdk.create_training_client(config(dataset_id=dataset.dataset_id, batch_size=8))
    for _ in range(5):
        step = tc.train_step(ts.AdamParams(learning_rate=1e-2))
    metrics = step.result(timeout=300).metrics
    dp = tc.get_dp_metrics()
    assert dp.sampling == "poisson" and dp.sample_rate == pytest.approx(reference.sample_rate)
    assert dp.steps == reference.steps == 5 and dp.delta == reference.delta
    assert metrics["dp_epsilon:max"] == pytest.approx(reference.epsilon, rel=1e-9)
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(dp_event.PoissonSampledDpEvent(8 / n, dp_event.GaussianDpEvent(SIGMA)), 5)
    assert dp.epsilon == pytest.approx(pld.get_epsilon(DELTA), rel=0.02)
    # Amplification is the point: the same five steps on client batches cost far more.
    assert dp.epsilon < 0.5 * json.loads(json.dumps(_q1_epsilon(5)))
    ledger = PrivacyLedger.model_validate(tc.privacy_ledger())
    assert (
        ledger.sampling == "poisson" and ledger.dataset_digest == dataset.digest and ledger.dataset_size == n
    )
    # Its steps are the server's: a client batch on it is refused.
    with pytest.raises(ts.InvalidBatchError, match="server-side sampling"):
        tc.forward_backward(records(1))


def _q1_epsilon(steps: int) -> float:
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_event.GaussianDpEvent(SIGMA), steps)
    return accountant.get_epsilon(DELTA)


def test_a_target_epsilon_calibrates_sigma_and_becomes_the_budget(sdk):
    dataset = sdk.upload_dataset("calibrated", records(64, seed=2))
    tc = sdk.create_training_client(
        config(
            dataset_id=dataset.dataset_id,
            batch_size=8,
            dp_config=ts.DPConfig(target_epsilon=2.0, planned_steps=3),
        )
    )
    dp = tc.get_dp_metrics()
    assert dp.noise_multiplier >= SIGMA and dp.max_epsilon == 2.0
    for _ in range(3):
        tc.train_step().result(timeout=300)
    assert tc.get_dp_metrics().epsilon <= 2.0
    with pytest.raises(ts.BudgetExhaustedError, match="privacy budget exhausted"):
        tc.train_step().result(timeout=300)
    assert tc.get_dp_metrics().steps == 3  # the refused step changed nothing


def test_typed_errors(service, sdk):
    with pytest.raises(ts.AuthenticationError), ts.ServiceClient(service.url, "tml-wrong") as bad:
        bad.create_training_client(config())
    with pytest.raises(ts.PermissionDeniedError, match="noise_multiplier 0.5 < 1.0"):
        sdk.create_training_client(config(dp_config=ts.DPConfig(noise_multiplier=0.5)))
    tc = sdk.create_training_client(config())
    with pytest.raises(ts.InvalidBatchError, match="outside the model's vocabulary"):
        tc.forward_backward([{"tokens": [1, 4000], "target_tokens": [2, 3]}]).result(timeout=120)
    with pytest.raises(ts.NotFoundError):
        ts.TrainingClient(sdk, "no-such:train:0").get_dp_metrics()
    with pytest.raises(ts.NotFoundError):
        sdk.create_training_client_from_state("tinker://someone-else:train:0/weights/x")


class DropsFirstReply(httpx.BaseTransport):
    """Sends every request, but loses the reply to the first optim_step, as a dropped connection would."""

    def __init__(self):
        self.real, self.dropped = httpx.HTTPTransport(), False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        reply = self.real.handle_request(request)
        if request.url.path.endswith("/optim_step") and not self.dropped:
            self.dropped = True
            reply.read()
            raise httpx.ReadError("connection reset after the request was sent")
        return reply


def test_a_retry_after_a_lost_reply_does_not_take_the_step_twice(service):
    flaky = DropsFirstReply()
    with ts.ServiceClient(service.url, KEYS["acme"], transport=flaky) as sc:
        tc = sc.create_training_client(config())
        tc.forward_backward(records(3, seed=5))
        metrics = tc.optim_step().result(timeout=120).metrics
        assert flaky.dropped and metrics["dp_steps:max"] == 1
        assert tc.get_dp_metrics().steps == 1


def test_export_package_is_a_signed_tssp_with_the_ledger(sdk, keystore, tmp_path):
    tc = sdk.create_training_client(config())
    tc.forward_backward(records(2, seed=6))
    tc.optim_step().result(timeout=120)
    out = tc.export_package(tc.save_state("to-package"), str(tmp_path / "adapter.tssp"))
    verified = run_tensafe("package", "--keystore", str(keystore), "verify", out)
    assert verified.returncode == 0, verified.stderr
    inspected = run_tensafe("package", "inspect", out)
    manifest = json.loads(inspected.stdout)["manifest"]
    assert manifest["privacy_ledger"]["sampling"] == "client_batches"
    assert manifest["privacy_ledger"]["steps"] == 1
