"""The official `tinker` SDK, unmodified, against a live `tensafe task=service` on the tiny model."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
import tinker
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from tinker.types.optimizer import OptimizerConfigBase

from tests.service.live import KEYS, live_service

types = tinker.types

SIGMA, DELTA = 1.0, 1e-6  # the default policy (conf/service/default.yaml)


def pld_epsilon(steps: int, sigma: float = SIGMA, delta: float = DELTA) -> float:
    """ε of `steps` Gaussian mechanisms without subsampling (q = 1), by Google's PLD accountant."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_event.GaussianDpEvent(sigma), steps)
    return accountant.get_epsilon(delta)


def examples(seed: int, n: int = 8, length: int = 16) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, 1000, size=length + 1).tolist()
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
            )
        )
    return out


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with live_service(tmp_path_factory.mktemp("service")) as svc:
        yield svc


@pytest.fixture(scope="module")
def client(service):
    with tinker.ServiceClient(base_url=service.url, api_key=KEYS["acme"]) as sc:
        yield sc


def counting(n: int = 32, length: int = 16) -> list:
    """n distinct examples of one easy rule (each token is the previous one plus one): their clipped
    gradients point the same way, so the loss falls through the noise within a few steps."""
    out = []
    for start in range(n):
        tokens = [(start + i) % 200 + 10 for i in range(length + 1)]
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
            )
        )
    return out


def test_the_whole_training_flow_with_pipelined_calls(client):
    tc = client.create_lora_training_client(
        base_model="tiny_llama", rank=2, train_mlp=False, train_unembed=False
    ).result()
    data = counting()
    before = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
    # Six calls in flight before the first result is read: futures of a model complete in seq_id order.
    pending = []
    for _ in range(6):
        pending.append(
            (tc.forward_backward(data, "cross_entropy"), tc.optim_step(types.AdamParams(learning_rate=5e-2)))
        )
    epsilons = [step.result().metrics["dp_epsilon:max"] for _, step in pending]
    losses = [fb.result().metrics["loss:sum"] for fb, _ in pending]
    after = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
    assert all(b > a for a, b in zip(epsilons, epsilons[1:])), epsilons
    assert epsilons[-1] == pytest.approx(pld_epsilon(6), rel=0.02)
    assert after < before and losses[-1] < losses[0], (before, losses, after)
    outputs = pending[0][0].result().loss_fn_outputs
    assert len(outputs) == 32 and outputs[0]["logprobs"].to_numpy().shape == (16,)

    saved = tc.save_state("flow").result()
    assert saved.path.endswith("/weights/flow")
    sampler = tc.save_weights_and_get_sampling_client(name="flow-sampler").result()
    result = sampler.sample(
        prompt=types.ModelInput.from_ints([5, 6, 7]),
        num_samples=2,
        sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=1),
    ).result()
    assert len(result.sequences) == 2
    assert all(len(s.tokens) == 6 and all(0 <= t < 1024 for t in s.tokens) for s in result.sequences)
    assert all(len(s.logprobs) == 6 and max(s.logprobs) <= 0 for s in result.sequences)

    # The same weights through create_sampling_client, greedy: deterministic.
    path = tc.save_weights_for_sampler("flow-sampler-2").result().path
    again = client.create_sampling_client(model_path=path).result()
    greedy = types.SamplingParams(max_tokens=4, temperature=0.0)
    first = again.sample(types.ModelInput.from_ints([5, 6, 7]), 1, greedy).result().sequences[0].tokens
    second = again.sample(types.ModelInput.from_ints([5, 6, 7]), 1, greedy).result().sequences[0].tokens
    assert first == second


def test_two_tenants_train_at_once(service, client):
    other = tinker.ServiceClient(base_url=service.url, api_key=KEYS["globex"])
    results: dict[str, list[float]] = {}

    def train(name: str, sc) -> None:
        tc = sc.create_lora_training_client(base_model="tiny_llama", rank=2).result()
        eps = []
        for step in range(3):
            tc.forward_backward(examples(10 + step), "cross_entropy")
            eps.append(tc.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["dp_epsilon:max"])
        results[name] = eps

    threads = [
        threading.Thread(target=train, args=(n, sc)) for n, sc in (("acme", client), ("globex", other))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    other.close("success").result()
    # Each model's ε is its own three steps', whatever ran beside it.
    assert results["acme"] == pytest.approx(results["globex"]) and len(results["acme"]) == 3
    assert results["acme"][-1] == pytest.approx(pld_epsilon(3), rel=0.02)


def test_a_duplicate_example_in_one_step_is_refused(client):
    tc = client.create_lora_training_client(base_model="tiny_llama", rank=2).result()
    data = examples(3, n=2)
    with pytest.raises(tinker.RequestFailedError, match="already in the current step"):
        tc.forward_backward([data[0], data[1], data[0]], "cross_entropy").result()
    tc.forward_backward(data, "cross_entropy").result()
    with pytest.raises(tinker.RequestFailedError, match="already in the current step"):
        tc.forward_backward([data[1]], "cross_entropy").result()
    tc.optim_step(types.AdamParams()).result()
    tc.forward_backward(data, "cross_entropy").result()  # a new step: the same examples are allowed again


def test_the_client_cannot_weaken_the_policy(client):
    weaker = OptimizerConfigBase(type="adamw", noise_multiplier=0.1)
    with pytest.raises(tinker.PermissionDeniedError, match="noise_multiplier 0.1 < 1.0"):
        client.create_lora_training_client(base_model="tiny_llama", rank=2, optimizer=weaker).result()
    off = OptimizerConfigBase(type="adamw", dp=False)
    with pytest.raises(tinker.BadRequestError, match="DP fields a client may set"):
        client.create_lora_training_client(base_model="tiny_llama", rank=2, optimizer=off).result()
    stricter = OptimizerConfigBase(type="adamw", noise_multiplier=2.0)
    tc = client.create_lora_training_client(base_model="tiny_llama", rank=2, optimizer=stricter).result()
    tc.forward_backward(examples(4), "cross_entropy")
    # A huge global clip norm does not replace per-example clipping: ε is σ=2's.
    eps = tc.optim_step(types.AdamParams(grad_clip_norm=1e9)).result().metrics["dp_epsilon:max"]
    assert eps == pytest.approx(pld_epsilon(1, sigma=2.0), rel=0.02)


def test_unsupported_loss_functions_and_tokens_fail_fast(client):
    tc = client.create_lora_training_client(base_model="tiny_llama", rank=2).result()
    with pytest.raises(tinker.BadRequestError, match="loss_fn='importance_sampling' is not supported"):
        tc.forward_backward(examples(5), "importance_sampling").result()
    bad = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 5000]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
    )
    with pytest.raises(tinker.RequestFailedError, match="token id 5000 is outside the model's vocabulary"):
        tc.forward_backward([bad], "cross_entropy").result()
    tc.forward_backward(examples(5), "cross_entropy").result()  # the model is still usable


def test_unsupported_sdk_versions_are_refused_by_name(service):
    reply = httpx.post(
        f"{service.url}/api/v1/create_session",
        headers={"X-API-Key": KEYS["acme"]},
        json={"sdk_version": "0.30.1", "tags": [], "type": "create_session"},
    )
    assert reply.status_code == 426
    assert "supported versions: 0.38.*" in reply.json()["error"]["message"]


def test_a_spent_budget_refuses_the_next_step_without_retrying(service, client):
    budget = OptimizerConfigBase(type="adamw", max_epsilon=6.0)  # one step reaches ε ≈ 4.9, two ≈ 7.3
    tc = client.create_lora_training_client(base_model="tiny_llama", rank=2, optimizer=budget).result()
    tc.forward_backward(examples(20), "cross_entropy")
    first = tc.optim_step(types.AdamParams()).result().metrics["dp_epsilon:max"]
    assert first < 6.0
    tc.forward_backward(examples(21), "cross_entropy")
    with pytest.raises(tinker.RequestFailedError, match="privacy budget exhausted"):
        tc.optim_step(types.AdamParams()).result()
    # nothing was spent by the refusal: the model's ε is still the first step's
    assert httpx.get(f"{service.url}/api/v1/tensafe/models/{tc.model_id}/dp",
                     headers={"X-API-Key": KEYS["acme"]}).json()["epsilon"] == pytest.approx(first)
