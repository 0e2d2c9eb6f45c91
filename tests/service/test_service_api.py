"""The training service's protocol edges over raw HTTP: replay, tenancy, bad input, capacity and
restarts, against a live `tensafe task=service`."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tinker
from tinker.proto.request_conv import forward_backward_request_to_proto

from tests.cli import run_tensafe
from tests.service.live import KEYS, live_service

types = tinker.types
ACME, GLOBEX = ({"X-API-Key": KEYS[n]} for n in ("acme", "globex"))


def datum(seed: int, length: int = 12, vocab: int = 1000):
    tokens = np.random.default_rng(seed).integers(0, vocab, size=length + 1).tolist()
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
    )


def proto_step(model_id: str, seq_id: int, data: list, loss_fn: str = "cross_entropy") -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn),
        model_id=model_id,
        seq_id=seq_id,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


class Raw:
    """The protocol by hand: what a client that is not the SDK (or misbehaves) sends."""

    def __init__(self, url: str, headers: dict[str, str]):
        self.http = httpx.Client(base_url=f"{url}/api/v1", headers=headers, timeout=60)
        self.seqs: dict[str, int] = {}

    def seq(self, model_id: str) -> int:
        """The model's next seq_id (requests of a model run in seq_id order, without gaps)."""
        self.seqs[model_id] = self.seqs.get(model_id, 0) + 1
        return self.seqs[model_id]

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.http.post(path, **kwargs)

    def result(self, request_id: str) -> dict:
        while True:
            reply = self.post("/retrieve_future", json={"request_id": request_id})
            assert reply.status_code == 200, reply.text
            body = reply.json()
            if body.get("type") != "try_again":
                return body

    def session(self) -> str:
        return self.post("/create_session", json={"sdk_version": "0.38.0", "tags": []}).json()["session_id"]

    def model(self, session_id: str, seq: int = 0) -> str:
        reply = self.post(
            "/create_model",
            json={
                "session_id": session_id,
                "model_seq_id": seq,
                "base_model": "tiny_llama",
                "lora_config": {"rank": 2},
            },
        )
        assert reply.status_code == 200, reply.text
        result = self.result(reply.json()["request_id"])
        assert "model_id" in result, result
        return result["model_id"]

    def step(self, model_id: str, data: list, seq: int | None = None) -> httpx.Response:
        seq = self.seq(model_id) if seq is None else seq
        return self.post(
            "/forward_backward",
            content=proto_step(model_id, seq, data),
            headers={"content-type": "application/x-protobuf"},
        )

    def optim(self, model_id: str, seq: int | None = None) -> httpx.Response:
        seq = self.seq(model_id) if seq is None else seq
        return self.post(
            "/optim_step", json={"model_id": model_id, "seq_id": seq, "adam_params": {"learning_rate": 0.01}}
        )


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with live_service(tmp_path_factory.mktemp("service"), "service.max_datums_per_step=16") as svc:
        yield svc


@pytest.fixture(scope="module")
def acme(service):
    return Raw(service.url, ACME)


@pytest.fixture(scope="module")
def model(acme):
    return acme.model(acme.session())


def test_a_replayed_request_neither_trains_nor_spends_twice(acme, model):
    first = acme.step(model, [datum(1), datum(2)], seq=1).json()["request_id"]
    assert acme.step(model, [datum(1), datum(2)], seq=1).json()["request_id"] == first
    step = acme.optim(model, seq=2).json()["request_id"]
    acme.seqs[model] = 2
    metrics = acme.result(step)["metrics"]
    # The same optim_step again, as an SDK retry with a fresh idempotency key would send it.
    assert acme.optim(model, seq=2).json()["request_id"] == step
    assert acme.result(step)["metrics"] == metrics
    dp = acme.http.get(f"/tensafe/models/{model}/dp").json()
    assert dp["steps"] == 1 and dp["epsilon"] == pytest.approx(metrics["dp_epsilon:max"])
    # A seq_id used by another kind of request is refused, not merged.
    reply = acme.step(model, [datum(3)], seq=2)
    assert reply.status_code == 400 and "seq_id 2" in reply.json()["error"]["message"]


def test_another_tenants_ids_read_as_unknown(service, acme, model):
    globex = Raw(service.url, GLOBEX)
    future = acme.step(model, [datum(10)]).json()["request_id"]
    assert acme.result(future)["metrics"]["loss:sum"] > 0
    checks = [
        globex.post("/retrieve_future", json={"request_id": future}),
        globex.step(model, [datum(11)], seq=99),
        globex.post("/get_info", json={"model_id": model}),
        globex.post("/save_weights", json={"model_id": model, "path": "x", "seq_id": 99}),
        globex.http.get(f"/tensafe/models/{model}/dp"),
        globex.post(
            "/create_model",
            json={
                "session_id": model.split(":")[0],
                "model_seq_id": 5,
                "base_model": "tiny_llama",
                "lora_config": {"rank": 2},
            },
        ),
    ]
    for reply in checks:
        assert reply.status_code == 404, reply.text
        assert "for this API key" in reply.json()["error"]["message"]
    saved = acme.result(
        acme.post(
            "/save_weights", json={"model_id": model, "path": "mine", "seq_id": acme.seq(model)}
        ).json()["request_id"]
    )
    session = globex.session()
    stolen = globex.post(
        "/load_weights",
        json={"session_id": session, "model_seq_id": 0, "path": saved["path"], "optimizer": True},
    )
    assert stolen.status_code == 404
    assert (
        globex.post(
            "/create_sampling_session",
            json={"session_id": session, "sampling_session_seq_id": 0, "model_path": saved["path"]},
        ).status_code
        == 404
    )


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "tml-not-a-key"}, {"authorization": "Bearer nope"}])
def test_requests_without_a_valid_key_are_refused(service, headers):
    reply = httpx.post(
        f"{service.url}/api/v1/create_session", headers=headers, json={"sdk_version": "0.38.0"}
    )
    assert reply.status_code == 401 and "API key" in reply.json()["error"]["message"]


def test_bad_input_is_a_4xx_naming_the_fix(acme, model):
    proto = {"content-type": "application/x-protobuf"}
    cases = [
        (
            acme.post("/forward_backward", content=b"\xff\xfe not protobuf", headers=proto),
            400,
            "not a protobuf",
        ),
        (
            acme.post("/optim_step", content=b"{not json", headers={"content-type": "application/json"}),
            400,
            "invalid OptimStepRequest",
        ),
        (
            acme.post("/forward_backward", content=b"x", headers={"content-type": "text/plain"}),
            415,
            "application/x-protobuf or application/json",
        ),
        (acme.step(model, [datum(1000 + i) for i in range(17)]), 0, "max_datums_per_step=16"),
        (acme.step(model, [datum(1, vocab=5000)]), 0, "outside the model's vocabulary"),
        (acme.step(model, [datum(1, length=200)]), 0, "over the model's 80"),
        (
            acme.post(
                "/forward_backward",
                content=proto_step(model, acme.seq(model), [datum(1)], "ppo"),
                headers=proto,
            ),
            400,
            "loss_fn='ppo' is not supported",
        ),
        (acme.step("nobody:train:0", [datum(1)]), 404, "no model 'nobody:train:0'"),
        (acme.post("/retrieve_future", json={"request_id": "no-such-future"}), 404, "no future"),
        (
            acme.post(
                "/create_model",
                json={
                    "session_id": "no-such-session",
                    "model_seq_id": 0,
                    "base_model": "tiny_llama",
                    "lora_config": {"rank": 2},
                },
            ),
            404,
            "no session",
        ),
        (
            acme.post(
                "/create_model",
                json={
                    "session_id": model.split(":")[0],
                    "model_seq_id": 9,
                    "base_model": "Qwen/Qwen3-8B",
                    "lora_config": {"rank": 2},
                },
            ),
            400,
            "this service trains",
        ),
        (
            acme.post(
                "/optim_step", json={"model_id": model, "seq_id": 99, "adam_params": {"learning_rate": -1}}
            ),
            400,
            "learning_rate",
        ),
        (
            acme.post(
                "/save_weights", json={"model_id": model, "seq_id": acme.seq(model), "path": "../../etc"}
            ),
            400,
            "a checkpoint name is",
        ),
        (
            acme.post(
                "/asample",
                json={
                    "base_model": "tiny_llama",
                    "num_samples": 1,
                    "sampling_params": {},
                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": [99999]}]},
                },
            ),
            0,
            "outside the model's vocabulary",
        ),
    ]
    for reply, status, words in cases:
        assert reply.status_code < 500, reply.text
        if status:
            assert reply.status_code == status, reply.text
            assert words in reply.json()["error"]["message"], reply.text
        else:  # accepted, then the future fails as the client's fault
            assert reply.status_code == 200, reply.text
            failed = acme.result(reply.json()["request_id"])
            assert failed["category"] == "user" and words in failed["error"], failed
    # The model took none of it and still trains; the refused seq_ids did not block the queue.
    assert acme.result(acme.step(model, [datum(7)]).json()["request_id"])["metrics"]["loss:sum"] > 0


def test_the_telemetry_endpoint_accepts_and_discards(acme):
    reply = acme.post("/telemetry", json={"events": [{"request_headers": {"X-API-Key": KEYS["acme"]}}]})
    assert reply.json() == {"status": "accepted"}


def test_a_model_beyond_capacity_waits_then_fails_clearly(tmp_path):
    extra = ("service.max_models=1", "service.capacity_wait_s=4", "service.poll_hold_s=1")
    with live_service(tmp_path, *extra) as svc:
        raw = Raw(svc.url, ACME)
        session = raw.session()
        first = raw.model(session, 0)
        busy = raw.step(first, [datum(1)])  # half a step: the first model cannot be parked
        assert raw.result(busy.json()["request_id"])["metrics"]
        reply = raw.post(
            "/create_model",
            json={
                "session_id": session,
                "model_seq_id": 1,
                "base_model": "tiny_llama",
                "lora_config": {"rank": 2},
            },
        )
        poll = raw.post("/retrieve_future", json={"request_id": reply.json()["request_id"]}).json()
        assert poll["type"] == "try_again" and poll["queue_state"] == "paused_capacity"
        failed = raw.result(reply.json()["request_id"])
        assert failed["category"] == "user" and "service.max_models=1" in failed["error"]
        # Once the first model's step is taken it can be parked: the next model gets its room.
        assert raw.result(raw.optim(first).json()["request_id"])["metrics"]
        third = raw.model(session, 2)
        assert raw.result(raw.step(third, [datum(2)]).json()["request_id"])["metrics"]
        assert raw.result(raw.optim(third).json()["request_id"])[
            "metrics"
        ]  # a whole step: third can be parked
        # The parked model comes back with its step count when it is used again.
        assert raw.result(raw.step(first, [datum(3)]).json()["request_id"])["metrics"]
        assert raw.http.get(f"/tensafe/models/{first}/dp").json()["steps"] == 1


def test_restart_keeps_results_ledgers_and_checkpoints(tmp_path):
    with live_service(tmp_path) as svc:
        with tinker.ServiceClient(base_url=svc.url, api_key=KEYS["acme"]) as sc:
            tc = sc.create_lora_training_client(base_model="tiny_llama", rank=2).result()
            for step in range(2):
                tc.forward_backward([datum(step), datum(step + 100)], "cross_entropy")
                eps_before = tc.optim_step(types.AdamParams()).result().metrics["dp_epsilon:max"]
            path = tc.save_state("before-restart").result().path
            # One more step after the save: the lineage's history keeps it, though the checkpoint does not.
            tc.forward_backward([datum(7)], "cross_entropy")
            eps_after_save = tc.optim_step(types.AdamParams()).result().metrics["dp_epsilon:max"]
            raw = Raw(svc.url, ACME)
            # The SDK used seq_ids 1-7 (three steps and a save); 9 waits for a seq 8 that never comes.
            done = raw.step(tc.model_id, [datum(8)], seq=8).json()["request_id"]
            kept = raw.result(done)
            pending = raw.step(tc.model_id, [datum(9)], seq=10).json()["request_id"]
        assert eps_after_save > eps_before
    with live_service(tmp_path) as svc:
        raw = Raw(svc.url, ACME)
        assert raw.result(done) == kept  # a finished future survives the restart
        lost = raw.result(pending)
        assert lost["category"] == "server" and "restarted" in lost["error"]
        with tinker.ServiceClient(base_url=svc.url, api_key=KEYS["acme"]) as sc:
            tc = sc.create_training_client_from_state(path).result()
            tc.forward_backward([datum(11)], "cross_entropy")
            metrics = tc.optim_step(types.AdamParams()).result().metrics
        assert metrics["dp_steps:max"] == 4  # 3 before the restart, never the checkpoint's 2
        assert metrics["dp_epsilon:max"] > eps_after_save
        # what the SDK's telemetry would carry on a fatal error, and a request that fails
        raw.post("/telemetry", json={"event_data": {"request_headers": {"X-API-Key": KEYS["acme"]}}})
        assert (
            raw.post(
                "/forward_backward", content=b"junk", headers={"content-type": "application/x-protobuf"}
            ).status_code
            == 400
        )
    assert KEYS["acme"] not in svc.log and KEYS["acme"][4:] not in svc.log  # nothing logs keys


def test_service_events_go_to_each_tenants_own_audit_chain(service, acme, model):
    from tensafe.security.audit import AuditChain

    acme.result(acme.step(model, [datum(500)]).json()["request_id"])
    acme.result(acme.optim(model).json()["request_id"])
    body = {"model_id": model, "path": "audited", "seq_id": acme.seq(model)}
    acme.result(acme.post("/save_weights", json=body).json()["request_id"])
    chain = AuditChain(service.state_dir / "audit.sqlite3")
    mine = chain.records("acme")
    events = {r.event for r in mine}
    assert {"service_session", "service_model", "service_step", "service_save"} <= events
    assert any(r.data.get("model_id") == model for r in mine)
    theirs = chain.records("globex")
    assert not any(r.data.get("model_id") == model for r in theirs)
    assert chain.verify().ok


def test_the_official_client_is_refused_when_its_version_is_not_configured(tmp_path):
    with live_service(tmp_path, "service.sdk_versions=[0.37.*]") as svc:
        with tinker.ServiceClient(base_url=svc.url, api_key=KEYS["acme"]) as sc:
            with pytest.raises(tinker.APIStatusError, match="supported versions: 0.37") as refused:
                sc.create_lora_training_client(base_model="tiny_llama", rank=2).result()
        assert refused.value.status_code == 426


def test_no_request_field_weakens_the_policy(acme):
    session = acme.session()
    # Fields that sound like switches are ignored where the protocol has no such field...
    junk = {
        "session_id": session,
        "model_seq_id": 40,
        "base_model": "tiny_llama",
        "lora_config": {"rank": 2},
        "noise_multiplier": 0.0,
        "privacy": "none",
        "secure_mode": False,
        "dp_enabled": False,
        "user_metadata": {"noise_multiplier": "0", "max_epsilon": "1e9"},
    }
    reply = acme.post("/create_model", json=junk)
    assert reply.status_code == 200, reply.text
    model = acme.result(reply.json()["request_id"])["model_id"]
    dp = acme.http.get(f"/tensafe/models/{model}/dp").json()
    assert (dp["noise_multiplier"], dp["max_grad_norm"], dp["delta"], dp["max_epsilon"]) == (
        1.0,
        1.0,
        1e-6,
        50.0,
    )
    # ...and refused where they would reach the policy.
    for i, fields in enumerate(
        [
            {"noise_multiplier": 0.5},
            {"max_grad_norm": 10.0},
            {"delta": 0.01},
            {"max_epsilon": 1000.0},
            {"noise_multiplier": 0},
            {"clip": False},
        ]
    ):
        for where in ({"optimizer_config": {"type": "adamw", **fields}}, {"dp": fields}):
            body = {
                "session_id": session,
                "model_seq_id": 50 + i,
                "base_model": "tiny_llama",
                "lora_config": {"rank": 2},
                **where,
            }
            refused = acme.post("/create_model", json=body)
            assert refused.status_code in (400, 403), (fields, refused.text)
    # An optim_step cannot carry its own DP settings either.
    acme.result(acme.step(model, [datum(600)]).json()["request_id"])
    body = {
        "model_id": model,
        "seq_id": acme.seq(model),
        "adam_params": {"learning_rate": 0.01, "noise_multiplier": 0.0},
    }
    refused = acme.post("/optim_step", json=body)
    assert refused.status_code == 400 and "noise_multiplier" in refused.text


def test_a_service_without_tenants_is_a_one_line_config_error(tmp_path):
    done = run_tensafe("task=service", "model=tiny_llama", f"service.state_dir={tmp_path}",
                       f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 2, done.stderr
    assert "service.tenants" in done.stderr and "tensafe keys api-key" in done.stderr
    assert "Traceback" not in done.stderr
