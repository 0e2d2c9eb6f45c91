"""The HE-LoRA evaluator as its own service, live on loopback, driven by HTTPEvaluators + HEDeltas."""

from __future__ import annotations

import dataclasses
import signal
import time
import types

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tensafe.errors import ConfigError
from tensafe.he import wire
from tensafe.he.backends import build_backend
from tensafe.he.circuit_private import CircuitPrivateKeyHolder, CircuitPrivateParameters
from tensafe.he.ckks import SecretKey
from tensafe.he.coefficient import CoefficientParameters
from tensafe.he.coefficient_lora import CoefficientKeyHolder
from tensafe.he.errors import HEError, ParameterMismatch, SerializationError, ValueOutOfRange
from tensafe.he.lora import Evaluator, KeyHolder
from tensafe.he.params import preset
from tensafe.models.loader import load_model
from tensafe.models.lora import attach_lora
from tensafe.serving.adapters import read_adapter
from tensafe.serving.auth import hash_api_key
from tensafe.serving.he_client import HTTPEvaluators
from tensafe.serving.he_lora import CoefficientDeltas, HEDeltas, InProcessEvaluators
from tensafe.serving.he_service import create_evaluator_app
from tests.cli import start_tensafe
from tests.conftest import compose_cfg
from tests.serving.live import asgi_status, free_port, live_server

KEY = "sk-he-test"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_SESSIONS = 3
N4096 = preset("n4096")


def make_backend():
    return build_backend("ckks_numpy", N4096)


@pytest.fixture(scope="module")
def adapter_dir(tiny_cfg, tmp_path_factory):
    """A saved adapter of the tiny Llama whose B is not zero (a trained-looking adapter)."""
    model = attach_lora(load_model(tiny_cfg.model, seed=0).model, tiny_cfg.model.lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    folder = tmp_path_factory.mktemp("he") / "adapter"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(adapter_dir):
    return read_adapter("mine", adapter_dir)


@pytest.fixture(scope="module")
def service(adapter):
    app = create_evaluator_app(adapter, make_backend, [hash_api_key(KEY)], max_sessions=MAX_SESSIONS,
                               max_message_bytes=8 << 20)
    with live_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def holder():
    return KeyHolder(make_backend())


@pytest.fixture
def transport(service):
    remote = HTTPEvaluators(service[0], KEY)
    yield remote
    remote.close()


def _x(tokens: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (tokens, width))


def _reference(adapter, module: str, x: np.ndarray) -> np.ndarray:
    factors = adapter.modules[module]
    a, b = factors.evaluator_factors()
    return factors.scale * x @ a @ b


def test_deltas_through_the_service_match_float64_and_the_in_process_evaluators(service, adapter, holder,
                                                                               transport):
    remote = HEDeltas(holder, transport)
    local = HEDeltas(holder, InProcessEvaluators(adapter.modules, make_backend))
    assert transport.protects_activations and service[0] in repr(transport)
    for i, module in enumerate(sorted(adapter.modules)):
        x = _x(7, adapter.modules[module].shape[0], seed=i)
        got, expected = remote.delta(module, x), _reference(adapter, module, x)
        assert 0 < np.abs(got - expected).max() < 1e-4
        assert np.abs(got - local.delta(module, x)).max() < 1e-4
        assert transport.last_counters["levels_used"] == 2
        assert transport.last_counters["rotations"] == transport.last_counters["key_switches"] == 0
    assert remote.modules == local.modules


@pytest.mark.parametrize("rounds, private", [(2, False), (1, False), (2, True), (1, True)])
def test_coefficient_deltas_through_the_service_match_float64(service, adapter, transport, rounds, private):
    holder = (CircuitPrivateKeyHolder(CircuitPrivateParameters.for_ring(4096), rounds=rounds) if private
              else CoefficientKeyHolder(CoefficientParameters.for_ring(2048), rounds=rounds))
    deltas = CoefficientDeltas(holder, transport)
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    assert {q, v} <= set(deltas.modules)
    assert all(len(info.weight_scales or ()) == rounds for info in deltas.modules.values())
    x = _x(5, adapter.modules[q].shape[0], seed=3)
    for module in (q, v):  # v reads q's input: its products travel with q's, on one upload, if they can
        got, expected = deltas.delta(module, x), _reference(adapter, module, x)
        assert 0 < np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())
    # one upload serves both if the first stage has one width: the rank (two rounds), h_out (one)
    shared = rounds == 2 or adapter.modules[q].shape[2] == adapter.modules[v].shape[2]
    assert deltas.stats.grouped == shared and deltas.stats.encryptions == 2 - shared
    assert deltas.stats.calls_by_packing == {"slots": 0, "coefficients": 2}
    assert transport.last_counters["ct_plain_mults"] > 0
    assert transport.last_counters["rotations"] == transport.last_counters["key_switches"] == 0
    for module in sorted(set(adapter.modules) - {q, v}):  # no sibling: computed in the foreground
        x = _x(2, adapter.modules[module].shape[0], seed=4)
        assert np.abs(deltas.delta(module, x) - _reference(adapter, module, x)).max() < 1e-4


def test_a_coefficient_session_refuses_slot_batches_and_unknown_stages(service, adapter, holder):
    url, _ = service
    coefficients = CoefficientKeyHolder(CoefficientParameters.for_ring(2048))
    opened = httpx.post(url + "/v1/he/sessions", content=bytes(coefficients.public_context()),
                        headers=AUTH).json()
    module = sorted(adapter.modules)[0]
    offer = opened["modules"][module]
    assert offer["input_bound"] is None and len(offer["weight_scales"]) == 2
    base = f"{url}/v1/he/sessions/{opened['session']}/modules/{module}"
    slot_batch = bytes(holder.to_bytes(holder.encrypt(_x(2, adapter.modules[module].shape[0]), 1.0)))
    refused = httpx.post(base, content=slot_batch, headers=AUTH)
    assert refused.status_code == 400 and "stage 1 or 2" in refused.json()["error"]["message"]
    assert httpx.post(base + "/stages/3", content=b"", headers=AUTH).status_code == 404
    upload, _ = coefficients.upload(_x(2, adapter.modules[module].shape[0]), adapter.modules[module].shape[1])
    assert httpx.post(base + "/stages/1", content=bytes(slot_batch), headers=AUTH).status_code == 400
    assert httpx.post(base + "/stages/1", content=bytes(upload), headers=AUTH).status_code == 200
    group = f"{url}/v1/he/sessions/{opened['session']}/stages/1"
    two = sorted(adapter.modules)[:2]
    assert httpx.post(group, params={"modules": ",".join(two)}, content=bytes(upload) * 3,
                      headers=AUTH).status_code == 400  # 3 uploads for 2 modules
    unknown = httpx.post(group, params={"modules": "nope"}, content=bytes(upload), headers=AUTH)
    assert unknown.status_code == 404
    assert httpx.post(group, content=bytes(upload), headers=AUTH).status_code == 400  # no modules named
    assert httpx.post(group, params={"modules": module}, content=bytes(upload)[:-5],
                      headers=AUTH).status_code == 400  # truncated
    httpx.delete(f"{url}/v1/he/sessions/{opened['session']}", headers=AUTH)


def test_an_evaluator_whose_backend_has_no_coefficient_packing_says_so(adapter):
    from tensafe.he.backends.kernels import KernelCKKSBackend

    slots_only = type("SlotsOnly", (KernelCKKSBackend,), {"name": "slots_only"})
    app = create_evaluator_app(adapter, lambda: slots_only(N4096), [hash_api_key(KEY)])
    client = TestClient(app)
    assert client.get("/v1/he/info", headers=AUTH).json()["packings"] == ["slots"]
    context = bytes(CoefficientKeyHolder(CoefficientParameters.for_ring(2048)).public_context())
    refused = client.post("/v1/he/sessions", content=context, headers=AUTH)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "packing_not_served"
    assert "he.packing=slots" in refused.json()["error"]["message"]


def test_info_and_session_describe_the_served_modules(service, adapter, holder):
    url, _ = service
    info = httpx.get(url + "/v1/he/info", headers=AUTH).json()
    assert (info["adapter"], info["backend"], info["wire_version"]) == ("mine", "ckks_numpy", wire.VERSION)
    assert info["packings"] == ["slots", "coefficients"]
    assert info["params"] == {"name": "n4096", "digest": N4096.digest}
    shapes = {name: dict(zip(("h_in", "r", "h_out"), f.shape)) for name, f in adapter.modules.items()}
    assert info["modules"] == shapes and len(shapes) == 4
    context = bytes(holder.public_context())
    opened = httpx.post(url + "/v1/he/sessions", content=context, headers=AUTH).json()
    assert len(opened["session"]) >= 32
    for name, m in opened["modules"].items():
        assert {k: m[k] for k in ("h_in", "r", "h_out")} == shapes[name] and m["input_bound"] > 1
    assert httpx.delete(f"{url}/v1/he/sessions/{opened['session']}", headers=AUTH).status_code == 200


def test_every_v1_route_needs_the_key_and_health_does_not(service, holder):
    url, _ = service
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    for headers in ({}, {"authorization": "Bearer sk-wrong"}):
        r = httpx.get(url + "/v1/he/info", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.post(url + "/v1/he/sessions", content=bytes(holder.public_context())).status_code == 401
    with pytest.raises(HEError, match="API key") as err:
        HTTPEvaluators(url, "sk-wrong").open(holder.public_context())
    assert err.value.status == 401


def test_unknown_session_module_or_route_is_404(service, holder, transport):
    url, _ = service
    transport.open(holder.public_context())
    with pytest.raises(HEError, match="not served") as err:
        transport.evaluate("model.nope", b"x")
    assert err.value.status == 404
    r = httpx.post(url + "/v1/he/sessions/bogus/modules/m", content=b"x", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    assert httpx.delete(url + "/v1/he/sessions/bogus", headers=AUTH).status_code == 404
    r = httpx.get(url + "/v1/he/nowhere", headers=AUTH)
    assert r.status_code == 404 and "error" in r.json()


def test_another_parameter_set_is_refused_with_parameter_mismatch(service, adapter, holder, transport):
    other = KeyHolder(build_backend("ckks_numpy", preset("n8192")))
    with pytest.raises(ParameterMismatch, match="same he.params") as err:
        transport.open(other.public_context())
    assert err.value.status == 400
    module = sorted(adapter.modules)[0]
    transport.open(holder.public_context())
    batch = other.to_bytes(other.encrypt(_x(3, adapter.modules[module].shape[0]), input_bound=1.0))
    with pytest.raises(ParameterMismatch, match="n4096"):
        transport.evaluate(module, batch)


def test_corrupt_bytes_and_secret_key_frames_are_refused_with_400(service, adapter, holder, transport):
    module = sorted(adapter.modules)[0]
    transport.open(holder.public_context())
    x = _x(3, adapter.modules[module].shape[0])
    data = bytearray(holder.to_bytes(holder.encrypt(x, input_bound=1.0)))
    data[len(data) // 2] ^= 1
    with pytest.raises(SerializationError, match="checksum") as err:
        transport.evaluate(module, bytes(data))
    assert err.value.status == 400 and err.value.wire_code == "serialization_error"  # a stable name
    with pytest.raises(SerializationError, match="truncated"):
        transport.evaluate(module, b"")
    secret_frame = bytes(wire.pack(wire.Kind.SECRET_KEY, wire.BackendId.KERNELS, N4096, b"\x00" * 64))
    with pytest.raises(SerializationError, match="secret_key; refused"):
        transport.evaluate(module, secret_frame)
    with pytest.raises(SerializationError, match="secret_key; refused"):
        HTTPEvaluators(service[0], KEY).open(secret_frame)
    context = bytearray(holder.public_context())
    context[-1] ^= 1
    r = httpx.post(service[0] + "/v1/he/sessions", content=bytes(context), headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "serialization_error"


def test_the_service_holds_no_secret_key(service, holder, transport):
    transport.open(holder.public_context())
    seen, stack, evaluators = set(), [service[1].state.sessions], 0
    skip = (np.ndarray, str, bytes, int, float, type(None), type, types.ModuleType)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        assert not isinstance(obj, SecretKey)
        evaluators += isinstance(obj, Evaluator)
        if dataclasses.is_dataclass(obj):
            stack.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
        stack.extend(vars(obj).values() if hasattr(obj, "__dict__") else [])
        if isinstance(obj, dict):
            stack.extend(obj.values())
    assert evaluators >= 4


def test_sessions_are_bounded_and_an_evicted_client_reopens(service, adapter, holder):
    url, app = service
    module = sorted(adapter.modules)[0]
    clients = [HTTPEvaluators(url, KEY) for _ in range(MAX_SESSIONS + 1)]
    try:
        for client in clients:
            client.open(holder.public_context())
        first = clients[0]._session
        assert len(app.state.sessions) == MAX_SESSIONS and first not in app.state.sessions
        r = httpx.post(f"{url}/v1/he/sessions/{first}/modules/{module}", content=b"x", headers=AUTH)
        assert r.status_code == 404
        x = _x(2, adapter.modules[module].shape[0])
        # the evicted client reopens a session with its context and retries
        delta = clients[0].evaluate(module, holder.to_bytes(holder.encrypt(x, input_bound=1.0)))
        got = holder.decrypt(holder.from_bytes(delta), 2)
        assert np.abs(got - _reference(adapter, module, x)).max() < 1e-4 and clients[0]._session != first
    finally:
        for client in clients:
            client.close()


def test_bodies_over_the_limit_are_413(adapter, holder):
    app = create_evaluator_app(adapter, make_backend, [hash_api_key(KEY)], max_message_bytes=4096)
    with TestClient(app) as client:
        r = client.post("/v1/he/sessions", content=bytes(holder.public_context()), headers=AUTH)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        chunked = client.post("/v1/he/sessions", content=iter([b"x" * 3000] * 2), headers=AUTH)
        assert chunked.status_code == 413


def test_a_connection_failure_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(HEError, match=f"cannot reach the HE evaluator at {url}"):
        HTTPEvaluators(url, KEY).open(b"context")


def _tensafe(*args, cwd):
    return start_tensafe(*args, cwd=cwd, env={"HYDRA_FULL_ERROR": ""})


def test_task_he_evaluator_serves_deltas_and_stops_on_sigterm(adapter_dir, adapter, holder, tmp_path):
    port = free_port()
    proc = _tensafe("task=he_evaluator", "he=ckks_numpy", "he.params=n4096", "model=tiny_llama",
                    f"task.adapter={adapter_dir}", f"task.port={port}",
                    f"task.api_key_sha256=[{hash_api_key(KEY)}]", cwd=tmp_path)
    try:
        line = proc.stdout.readline()
        assert line.startswith("HE evaluator for adapter adapter (") and f":{port}/v1/he" in line, (
            line + proc.stderr.read() if proc.poll() is not None else line
        )
        deadline = time.time() + 120  # a loaded machine starts the interpreter slowly
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and proc.poll() is None, "the evaluator never became healthy"
            time.sleep(0.1)
        deltas = HEDeltas(holder, HTTPEvaluators(line.split(" on ")[-1].strip(), KEY))
        module = sorted(adapter.modules)[-1]
        x = _x(4, adapter.modules[module].shape[0])
        assert np.abs(deltas.delta(module, x) - _reference(adapter, module, x)).max() < 1e-4
        deltas.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_config_errors_exit_2_with_one_line(tmp_path):
    key = f"task.api_key_sha256=[{'0' * 64}]"
    cases = {  # run side by side: each is an interpreter start
        "task.adapter": ["he=ckks_numpy"],
        "task=he_evaluator needs an HE backend": ["he=off", "task.adapter=/x", key],
    }
    procs = {needle: _tensafe("task=he_evaluator", *args, cwd=tmp_path) for needle, args in cases.items()}
    for needle, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], err
        assert "Traceback" not in out + err
    with pytest.raises(ConfigError) as bad:
        compose_cfg("task=he_evaluator", "task.adapter=/x", "task.api_key_sha256=[abc]")
    assert bad.value.key == "task.api_key_sha256.0"  # the first digest of the list


def test_a_content_length_that_is_not_a_number_is_a_400(service):
    headers = [(b"authorization", b"Bearer " + KEY.encode()), (b"content-length", b"abc")]
    assert asgi_status(service[1], "/v1/he/sessions", headers) == 400


def test_the_evaluator_lists_no_routes_to_anonymous_clients(service):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(service[0] + path).status_code == 404, path


def test_tokens_past_the_worst_case_bound_are_scaled_per_token_and_come_back_exact(service, adapter, holder):
    """Real activations have outlier channels far past the ℓ1 worst-case bound; the key holder scales
    each token by a power of two before encrypting and undoes it after decrypting."""
    from tensafe.serving.he_lora import token_scales

    deltas = HEDeltas(holder, HTTPEvaluators(service[0], KEY))
    try:
        module = sorted(adapter.modules)[0]
        width = adapter.modules[module].shape[0]
        x = _x(6, width, seed=3)
        x[2, 5], x[4, 0] = 40 * deltas.modules[module].input_bound, 1e-3  # an outlier channel, a tiny token
        x[5] *= 1e-4
        got = deltas.delta(module, x)
        want = _reference(adapter, module, x)
        factors = token_scales(x, min(m.input_bound for m in deltas.modules.values()))
        assert factors[2] < 1 < factors[5]  # scaled down, and up
        rel = np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)
        assert rel.max() < 1e-3, rel
    finally:
        deltas.close()
    with pytest.raises(ValueOutOfRange):  # the key holder's own API still refuses unscaled input
        holder.encrypt(x, input_bound=deltas.modules[module].input_bound)
