"""The OpenAI-compatible server, live on loopback, driven by the official openai client."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import torch

from tensafe.models.loader import load_model
from tensafe.models.lora import attach_lora
from tensafe.serving.adapters import read_adapter
from tensafe.serving.app import ServerLimits, create_app
from tensafe.serving.auth import hash_api_key
from tensafe.serving.engine import EmbeddedEngine
from tensafe.serving.multi_lora import MultiLoRA
from tests.cli import start_tensafe
from tests.serving.live import asgi_status, free_port, live_server
from tests.serving.made_adapters import trained_looking_adapter

KEY = "sk-test-key"
ADMIN = "sk-admin-key"
BASE = "tiny-llama"


@pytest.fixture(scope="module")
def server(tiny_cfg, tmp_path_factory):
    """The server with adapter "default" (non-zero B), and the PEFT model of that adapter as reference."""
    folder = tmp_path_factory.mktemp("adapters")
    reference = trained_looking_adapter(tiny_cfg, folder / "default", seed=1)
    loaded = load_model(tiny_cfg.model, seed=0)
    lora = MultiLoRA(loaded.model)
    lora.add(read_adapter("default", folder / "default"))
    engine = EmbeddedEngine(loaded.model, loaded.tokenizer, lora, max_running=8, prefill_chunk=8)
    app = create_app(engine, BASE, [hash_api_key(KEY)], ServerLimits(max_prompt_tokens=64, max_tokens=32,
                                                                       max_body_bytes=4096),
                     admin_key_hashes=[hash_api_key(ADMIN)])
    with live_server(app) as url:
        yield url, reference, loaded.tokenizer, folder


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def test_models_lists_the_base_and_each_adapter_with_its_parent(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {BASE, "default"}
    assert cards["default"].parent == BASE and cards[BASE].parent is None


def test_greedy_completion_equals_transformers_generate(client, server):
    _, model, tokenizer, _ = server
    out = client.completions.create(model="default", prompt="Patient 4 has", max_tokens=8, temperature=0)
    ids = tokenizer("Patient 4 has", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    expected = tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert out.choices[0].text == expected
    assert out.usage.prompt_tokens == ids.shape[1] and out.usage.completion_tokens <= 8


def test_the_model_field_selects_base_or_adapter(client):
    base = client.completions.create(model=BASE, prompt="Patient 4 has", max_tokens=8, temperature=0)
    adapted = client.completions.create(model="default", prompt="Patient 4 has", max_tokens=8, temperature=0)
    assert base.choices[0].text != adapted.choices[0].text


def test_chat_streaming_ends_with_usage_and_matches_the_non_streamed_text(client):
    messages = [{"role": "user", "content": "What is the code of patient 3?"}]
    whole = client.chat.completions.create(model="default", messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model="default", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in {"stop", "length"}


def test_raw_sse_ends_with_done(server):
    url = server[0] + "/v1/completions"
    body = {"model": BASE, "prompt": "hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_seeded_sampling_is_reproducible_and_n_gives_n_choices(client):
    kwargs = dict(model="default", prompt="Patient", max_tokens=6, temperature=1.0, top_p=0.9, seed=7, n=3)
    a, b = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model=BASE, prompt="Patient 4 has", max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[3:5] if len(text) >= 5 else None
    if stop is None or not stop.strip():
        pytest.skip("greedy text too short to pick a stop string")
    cut = client.completions.create(
        model=BASE, prompt="Patient 4 has", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_async_client_and_concurrent_requests(server):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)
        jobs = [aclient.completions.create(model=m, prompt=f"Patient {i}", max_tokens=5, temperature=0)
                for i, m in enumerate([BASE, "default"] * 3)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    assert len(results) == 6 and all(r.choices[0].finish_reason in {"stop", "length"} for r in results)


def test_missing_or_wrong_api_key_is_401_in_openai_shape(server):
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.get(server[0] + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_limits_and_bad_input_are_4xx_with_a_message(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=BASE, prompt="x", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|over this server's limit"):
        client.completions.create(model=BASE, prompt="word " * 200, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=BASE, prompt="x", max_tokens=2, temperature=5)
    r = httpx.post(server[0] + "/v1/completions", content=b"x" * 5000,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()


def test_health_and_readiness(server):
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}
    assert httpx.get(server[0] + "/ready").json()["status"] == "ready"


def test_task_serve_runs_from_the_entrypoint_and_shuts_down_gracefully(tmp_path):
    """`tensafe task=serve` serves a trained adapter folder; SIGTERM lets a streaming request finish."""
    import signal
    import socket

    from tests.conftest import compose_cfg

    cfg = compose_cfg("model=tiny_llama")
    loaded = load_model(cfg.model, seed=0)
    attach_lora(loaded.model, cfg.model.lora).save_pretrained(tmp_path / "adapter")
    port, metrics_port = free_port(), free_port()
    proc = start_tensafe("task=serve", "model=tiny_llama", f"serving.port={port}",
                         f"serving.metrics_port={metrics_port}",
                         f"serving.api_key_sha256=[{hash_api_key(KEY)}]",
                         f"+serving.adapters.mine={tmp_path / 'adapter'}",
                         "serving.timeout_keep_alive_s=1", cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server never became ready"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert {m.id for m in client.models.list().data} == {"tiny_llama", "mine"}
        # serving.timeout_keep_alive_s: an idle client's connection is closed (uvicorn's default is 5 s)
        idle = socket.create_connection(("127.0.0.1", port))
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        idle.settimeout(30)
        answer = b""
        while b'"ok"' not in answer:
            answer += idle.recv(4096)
        started = time.monotonic()
        assert idle.recv(4096) == b"" and time.monotonic() - started < 4
        idle.close()
        # serving.metrics_port: the metrics on their own port, for a local scraper, without a key
        assert "tensafe_request_queue_depth" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        stream = client.completions.create(model="mine", prompt="Patient", max_tokens=24, temperature=0,
                                           stream=True)
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert first.choices and rest[-1].choices[0].finish_reason in {"stop", "length"}
        # uvicorn finishes in-flight requests; the task then ends normally (and writes its evidence)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_metrics_count_requests_tokens_and_first_token_time_per_model(client, server):
    client.completions.create(model="default", prompt="Patient 9", max_tokens=3, temperature=0)
    text = httpx.get(server[0] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['tensafe_inference_latency_seconds_count{model="default"}'] >= 1
    assert samples['tensafe_time_to_first_token_seconds_count{model="default"}'] >= 1
    assert samples['tensafe_inference_tokens_total{kind="completion",model="default"}'] >= 3
    assert samples['tensafe_inference_tokens_total{kind="prompt",model="default"}'] >= 2
    assert "tensafe_request_queue_depth" in samples


def test_admin_api_loads_and_unloads_adapters_while_serving(client, server, tiny_cfg):
    url, _, tokenizer, folder = server
    reference = trained_looking_adapter(tiny_cfg, folder / "late", seed=5, target_modules=["gate_proj"])
    admin = {"Authorization": f"Bearer {ADMIN}"}

    def load(name: str, sub: str, headers=admin):
        return httpx.post(url + "/v1/admin/adapters", json={"name": name, "path": str(folder / sub)},
                          headers=headers)

    assert load("late", "late", {"Authorization": f"Bearer {KEY}"}).status_code == 401  # not an admin key
    r = load("late", "nope")
    assert r.status_code == 400 and "not an adapter folder" in r.json()["error"]["message"]
    assert load(BASE, "late").status_code == 400
    r = load("late", "late")
    assert r.status_code == 201 and r.json()["parent"] == BASE
    r = load("late", "late")
    assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]
    assert "late" in {m.id for m in client.models.list().data}

    out = client.completions.create(model="late", prompt="Patient 4 has", max_tokens=8, temperature=0)
    ids = tokenizer("Patient 4 has", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = reference.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.choices[0].text == tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)

    assert httpx.delete(url + "/v1/admin/adapters/late", headers=admin).json()["deleted"] is True
    assert "late" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="x", max_tokens=2)
    assert httpx.delete(url + "/v1/admin/adapters/late", headers=admin).status_code == 404


def test_a_content_length_that_is_not_a_number_is_a_400(tiny_cfg):
    loaded = load_model(tiny_cfg.model, seed=0)
    lora = MultiLoRA(loaded.model)
    engine = EmbeddedEngine(loaded.model, loaded.tokenizer, lora, max_running=2, prefill_chunk=8)
    app = create_app(engine, BASE, [hash_api_key(KEY)], ServerLimits(max_prompt_tokens=64, max_tokens=32))
    headers = [(b"authorization", b"Bearer " + KEY.encode()), (b"content-type", b"application/json")]
    assert asgi_status(app, "/v1/completions", [*headers, (b"content-length", b"abc")]) == 400


def test_anonymous_clients_see_health_and_readiness_but_no_metrics_counts_or_routes(server):
    url, auth = server[0], {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/ready").json() == {"status": "ready"}  # no in-flight count for strangers
    assert "in_flight" in httpx.get(url + "/ready", headers=auth).json()
    assert httpx.get(url + "/metrics").status_code == 401  # adapter names are in the labels
    assert httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(url + path).status_code == 404, path


def test_metrics_and_docs_exposure_follow_the_config(tiny_cfg):
    from tensafe.serving.app import Exposure

    loaded = load_model(tiny_cfg.model, seed=0)
    lora = MultiLoRA(loaded.model)
    engine = EmbeddedEngine(loaded.model, loaded.tokenizer, lora, max_running=2, prefill_chunk=8)
    for exposure, metrics_status in ((Exposure(metrics="public", docs=True), 200),
                                     (Exposure(metrics="off"), 404)):
        app = create_app(engine, BASE, [hash_api_key(KEY)], admin_key_hashes=[hash_api_key(ADMIN)],
                         exposure=exposure)
        with live_server(app) as url:
            assert httpx.get(url + "/metrics").status_code == metrics_status
            if exposure.docs:
                paths = httpx.get(url + "/openapi.json").json()["paths"]
                assert "/v1/completions" in paths and not [p for p in paths if "admin" in p]


def test_one_key_is_not_both_a_user_and_an_admin_key_unless_configured():
    from tensafe.errors import ConfigError
    from tensafe.serving.auth import check_separate

    with pytest.raises(ConfigError, match="admin_keys_may_serve"):
        check_separate([hash_api_key(KEY)], [hash_api_key(KEY), hash_api_key(ADMIN)], shared_allowed=False)
    check_separate([hash_api_key(KEY)], [hash_api_key(KEY)], shared_allowed=True)
    check_separate([hash_api_key(KEY)], [hash_api_key(ADMIN)], shared_allowed=False)
