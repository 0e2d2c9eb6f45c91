"""One user never breaks another: failures stay with their sequence, every request ends, bad input is
a 400 in OpenAI's shape, and what one request may take is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import threading
import time
from collections import Counter

import httpx
import openai
import pytest
import torch

from tensafe.models.loader import load_model
from tensafe.serving import engine as engine_module
from tensafe.serving.adapters import read_adapter
from tensafe.serving.app import ServerLimits, create_app
from tensafe.serving.auth import hash_api_key
from tensafe.serving.base import SamplingParams, TokenEvent
from tensafe.serving.engine import EmbeddedEngine, _stop_prefix
from tensafe.serving.http import protocol
from tensafe.serving.multi_lora import MultiLoRA
from tests.serving.live import live_server
from tests.serving.made_adapters import trained_looking_adapter

KEY = "sk-robust"
ADMIN = "sk-robust-admin"
BASE = "tiny-llama"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = ServerLimits(max_prompt_tokens=64, max_tokens=32, max_body_bytes=4096, max_sequences_per_request=8,
                      max_sequences_per_key=24)


@pytest.fixture(scope="module")
def served(tiny_cfg, tmp_path_factory):
    folder = tmp_path_factory.mktemp("robust-adapters")
    trained_looking_adapter(tiny_cfg, folder / "default", seed=1)
    loaded = load_model(tiny_cfg.model, seed=0)
    lora = MultiLoRA(loaded.model)
    lora.add(read_adapter("default", folder / "default"))
    engine = EmbeddedEngine(loaded.model, loaded.tokenizer, lora, max_running=8, prefill_chunk=64)
    app = create_app(engine, BASE, [hash_api_key(KEY)], LIMITS, admin_key_hashes=[hash_api_key(ADMIN)])
    with live_server(app) as url:
        yield url, engine, loaded.tokenizer


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0)


class _StubEngine:
    """The Engine protocol without a model: subclasses define `generate` (contract tests of the API)."""

    tokenizer = staticmethod(lambda text: type("Encoded", (), {"input_ids": [1, 2, 3]})())
    adapters, ready, in_flight, supports = [], True, 0, frozenset()

    def start(self):
        pass

    def stop(self):
        pass

    def observe_he(self, observe):
        pass

    def observe_speculation(self, observe):
        pass


def _greedy(client, prompt: str, model: str = BASE, **kwargs) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                     **kwargs).choices[0].text


PROMPTS = [f"Patient {i} has" for i in range(6)]


def test_a_poisoned_request_in_a_batch_fails_alone_and_the_others_get_their_own_tokens(served, client,
                                                                                         monkeypatch):
    alone = {p: _greedy(client, p) for p in PROMPTS}
    real = engine_module._sample

    def poisoned(logits, params, generator, generated):
        if params.seed == 666:
            raise FloatingPointError("poisoned row")
        return real(logits, params, generator, generated)

    monkeypatch.setattr(engine_module, "_sample", poisoned)

    async def main():
        aclient = openai.AsyncOpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0)
        good = [aclient.completions.create(model=BASE, prompt=p, max_tokens=10, temperature=0)
                for p in PROMPTS]
        bad = aclient.completions.create(model=BASE, prompt="Patient 9 has", max_tokens=10, temperature=0.5,
                                         seed=666)
        return await asyncio.gather(*good[:3], bad, *good[3:], return_exceptions=True)

    results = asyncio.run(main())
    bad = results.pop(3)
    assert isinstance(bad, openai.InternalServerError) and "poisoned row" in str(bad)
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert not isinstance(result, Exception), result
        assert result.choices[0].text == alone[prompt] and "poisoned" not in result.choices[0].text


def test_tiny_temperatures_and_top_p_sample_without_failing(client):
    greedy = _greedy(client, PROMPTS[0])
    for extra in ({"temperature": 1e-40}, {"temperature": 1.0, "top_p": 1e-320}):
        kwargs = {"temperature": 0, **extra}
        out = client.completions.create(model=BASE, prompt=PROMPTS[0], max_tokens=10, seed=3, **kwargs)
        assert out.choices[0].text == greedy  # both limits are the greedy token


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_a_forward_failure_in_a_batch_fails_only_its_own_sequence(tiny_cfg, tmp_path, phase):
    """prefill: the adapter's every forward fails. decode: its third decode step fails *after* the
    forward wrote the batch's KV cache, so the others go on only if that write is rolled back."""
    trained_looking_adapter(tiny_cfg, tmp_path / "flaky", seed=2)
    loaded = load_model(tiny_cfg.model, seed=0)
    lora = MultiLoRA(loaded.model)
    lora.add(read_adapter("flaky", tmp_path / "flaky"))
    engine = EmbeddedEngine(loaded.model, loaded.tokenizer, lora, max_running=8, prefill_chunk=64)
    decodes = {"n": 0}
    real = engine._forward

    def forward(ids, cache, adapters, keep=1):
        if "flaky" not in adapters:
            return real(ids, cache, adapters, keep)
        if phase == "prefill":
            raise RuntimeError("the flaky adapter's evaluator is down")
        out = real(ids, cache, adapters, keep)
        decodes["n"] += ids.shape[1] == 1
        if ids.shape[1] == 1 and decodes["n"] >= 3:
            raise RuntimeError("the flaky adapter's evaluator is down")
        return out

    engine._forward = forward
    tok = loaded.tokenizer
    greedy = SamplingParams(max_tokens=6, temperature=0)

    async def one(prompt, adapter):
        text, finish, error = "", None, None
        async for ev in engine.generate(tok(prompt).input_ids, adapter, greedy):
            text, finish, error = text + ev.text, ev.finish_reason, ev.error
        return text, finish, error

    async def main(jobs):
        return await asyncio.gather(*(one(*job) for job in jobs))

    engine.start()
    try:
        solo = asyncio.run(main([(p, None) for p in PROMPTS[:3]]))
        mixed = asyncio.run(main([(PROMPTS[0], None), (PROMPTS[1], "flaky"), (PROMPTS[1], None),
                                  (PROMPTS[2], None)]))
    finally:
        engine.stop()
    assert mixed[1][1] == "error" and "evaluator is down" in mixed[1][2]
    assert [mixed[0], mixed[2], mixed[3]] == solo and all(r[2] is None for r in solo)
    assert phase == "prefill" or decodes["n"] >= 3


def test_seeds_outside_the_generator_range_are_400s(client):
    for seed, n in [(2**64, 1), (-(2**63) - 1, 1), (2**63 - 1, 2)]:
        with pytest.raises(openai.BadRequestError, match="seed"):
            client.completions.create(model=BASE, prompt="x", max_tokens=2, seed=seed, n=n)
    assert client.completions.create(model=BASE, prompt="x", max_tokens=2, seed=-(2**63)).choices


def test_an_engine_that_never_answers_ends_each_request_at_its_deadline():
    class Hangs(_StubEngine):
        cancelled = []

        async def generate(self, prompt, adapter, params):
            try:
                await asyncio.sleep(3600)
                yield TokenEvent("never", 1, "stop")
            finally:
                self.cancelled.append(True)

    engine = Hangs()
    app = create_app(engine, BASE, [hash_api_key(KEY)], ServerLimits(request_timeout_s=1.0))
    with live_server(app) as url:
        start = time.monotonic()
        r = httpx.post(url + "/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 2},
                       headers=AUTH, timeout=30)
        assert r.status_code == 504 and "request_timeout_s" in r.json()["error"]["message"]
        streamed = httpx.post(url + "/v1/completions", headers=AUTH, timeout=30,
                              json={"model": BASE, "prompt": "x", "max_tokens": 2, "stream": True})
        assert "request_timeout_s" in streamed.text and streamed.text.rstrip().endswith("data: [DONE]")
        assert time.monotonic() - start < 10
        time.sleep(0.2)
        assert len(engine.cancelled) == 2  # the sequences were dropped, not left running


def test_an_abandoned_non_streaming_request_stops_generating():
    class Slow(_StubEngine):
        ended = threading.Event()

        async def generate(self, prompt, adapter, params):
            try:
                while True:
                    await asyncio.sleep(0.05)
                    yield TokenEvent("a", 1)
            finally:
                self.ended.set()

    engine = Slow()
    app = create_app(engine, BASE, [hash_api_key(KEY)], ServerLimits())
    with live_server(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"model": BASE, "prompt": "x"}, headers=AUTH,
                       timeout=0.5)
        assert engine.ended.wait(10), "the engine kept generating for a client that left"


def test_bad_text_and_empty_prompts_are_400s_in_openai_shape(served):
    url = served[0] + "/v1/completions"
    cases = [
        {"model": BASE, "prompt": ""},
        {"model": BASE, "prompt": []},
        {"model": BASE, "prompt": ["ok", ""]},
    ]
    for body in cases:
        r = httpx.post(url, json=body, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt"), r.text
    surrogate = b'{"model": "%s", "prompt": "\\ud800"}' % BASE.encode()
    r = httpx.post(url, content=surrogate, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and re.search("surrogate|unicode", r.json()["error"]["message"])
    assert r.json()["error"]["param"] == "prompt"
    chat = {"model": BASE, "messages": [{"role": "user", "content": "\ud800"}]}
    r = httpx.post(served[0] + "/v1/chat/completions", content=json.dumps(chat), headers={
        **AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"{not json", headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert r.json()["error"]["param"] is None


def test_types_are_strict_and_unknown_or_unsupported_parameters_are_named(served, client):
    url = served[0] + "/v1/completions"
    strict = [("max_tokens", True), ("stream", "yes"), ("n", 1.0), ("temperature", "0"), ("user", 5)]
    for field, value in strict:
        r = httpx.post(url, json={"model": BASE, "prompt": "x", field: value}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    r = httpx.post(served[0] + "/v1/chat/completions", headers=AUTH,
                   json={"model": BASE, "messages": [{"role": "user", "content": 5}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content", r.text
    r = httpx.post(url, json={"model": BASE, "prompt": "x", "frobnicate": 1}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"
    for name, value in [("best_of", 3), ("suffix", "end")]:
        with pytest.raises(openai.BadRequestError, match=name):
            client.completions.create(model=BASE, prompt="x", max_tokens=2, extra_body={name: value})
    for name, value in [("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
                        ("response_format", {"type": "json_schema"})]:
        with pytest.raises(openai.BadRequestError, match=name):
            client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}],
                                           max_tokens=2, extra_body={name: value})
    # neutral values and fields that change no answer are accepted
    ok = client.completions.create(model=BASE, prompt="x", max_tokens=2, best_of=1, suffix="", user="someone")
    assert ok.choices
    parts = client.chat.completions.create(model=BASE, max_tokens=3, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}])
    plain = client.chat.completions.create(model=BASE, max_tokens=3, temperature=0, messages=[
        {"role": "user", "content": "Hello there"}])
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_the_admin_api_refuses_an_he_field_rather_than_serving_in_plaintext(served):
    r = httpx.post(served[0] + "/v1/admin/adapters", headers={"Authorization": f"Bearer {ADMIN}"},
                   json={"name": "x", "path": "/nowhere", "he": {"enabled": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "he"


def test_admin_load_errors_name_what_is_wrong_with_the_adapter(served, tiny_cfg, tmp_path):
    good = tmp_path / "good"
    trained_looking_adapter(tiny_cfg, good, seed=4)
    config = json.loads((good / "adapter_config.json").read_text())
    cases = {"no_rank": ({k: v for k, v in config.items() if k != "r"}, "r is None"),
             "rank_zero": ({**config, "r": 0}, "r=0"),
             "alpha_text": ({**config, "lora_alpha": "sixteen"}, "lora_alpha is 'sixteen'")}
    for name, (edited, reason) in cases.items():
        folder = tmp_path / name
        shutil.copytree(good, folder)
        (folder / "adapter_config.json").write_text(json.dumps(edited))
        r = httpx.post(served[0] + "/v1/admin/adapters", headers={"Authorization": f"Bearer {ADMIN}"},
                       json={"name": name, "path": str(folder)})
        assert r.status_code == 400 and reason in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "path"


def test_one_request_and_one_key_are_bounded(served):
    url = served[0] + "/v1/completions"
    r = httpx.post(url, json={"model": BASE, "prompt": ["a"] * 200, "n": 16}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_sequences"

    async def main():
        async with httpx.AsyncClient(timeout=60) as c:
            jobs = [c.post(url, headers=AUTH, json={"model": BASE, "prompt": ["a", "b"], "n": 4,
                                                   "max_tokens": 32, "temperature": 1.0}) for _ in range(6)]
            return await asyncio.gather(*jobs)

    statuses = sorted(r.status_code for r in asyncio.run(main()))
    assert 429 in statuses and 200 in statuses  # 6 × 8 sequences at once exceed the key's 24


def test_a_chunked_body_over_the_limit_is_a_413_and_health_answers_meanwhile(served):
    url = served[0]

    def chunks():
        for _ in range(20):
            yield b" " * 1024
            time.sleep(0.05)

    answers = []

    def probe():
        for _ in range(5):
            answers.append(httpx.get(url + "/health", timeout=5).status_code)
            time.sleep(0.1)

    prober = threading.Thread(target=probe)
    prober.start()
    r = httpx.post(url + "/v1/completions", content=chunks(),
                   headers={**AUTH, "content-type": "application/json"})
    prober.join()
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert answers == [200] * 5


def _closed_by_server(sock: socket.socket) -> bytes | None:
    """What the server sent before closing `sock`, or None while it is still open."""
    sock.setblocking(False)
    try:
        data = sock.recv(4096)
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return b""
    return data if data == b"" or data.startswith(b"HTTP/1.1 408") else None


def test_slow_clients_are_timed_out_and_long_requests_are_not():
    class Slow(_StubEngine):
        async def generate(self, prompt, adapter, params):
            for i in range(5):
                await asyncio.sleep(0.5)
                yield TokenEvent("a", i + 1, "length" if i == 4 else None)

    app = create_app(Slow(), BASE, [hash_api_key(KEY)], ServerLimits(body_timeout_s=1.0))
    with live_server(app, http=protocol(1.0), timeout_keep_alive=1) as url:
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
        dribbling = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
        slow_body = socket.create_connection(("127.0.0.1", port))
        slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY.encode()
                          + b"\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        # a 2.5 s streamed request: its headers came at once, so the header deadline leaves it alone
        long = {}
        thread = threading.Thread(target=lambda: long.update(r=httpx.post(
            url + "/v1/completions", headers=AUTH, timeout=30,
            json={"model": BASE, "prompt": "x", "max_tokens": 5, "stream": True})))
        thread.start()
        request = b"GET /health HTTP/1.1\r\nhost: x\r\n"
        closed: dict[int, bytes] = {}
        start = time.monotonic()
        for step in range(30):  # a header byte every 0.1 s: headers that never finish in time
            for sock in dribbling:
                with contextlib.suppress(OSError):
                    sock.sendall(request[step % len(request): step % len(request) + 1])
            for sock in idle + dribbling + [slow_body]:
                if id(sock) not in closed and (data := _closed_by_server(sock)) is not None:
                    closed[id(sock)] = data
            assert httpx.get(url + "/health", timeout=5).status_code == 200
            time.sleep(0.1)
        elapsed = time.monotonic() - start
        thread.join(30)
        assert len(closed) == 41, f"{41 - len(closed)} slow connections still open after {elapsed:.1f} s"
        late = closed[id(slow_body)]
        assert late.startswith(b"HTTP/1.1 408") and b"body_timeout_s" in late
        assert long["r"].status_code == 200 and long["r"].text.count('"text":"a"') == 5
        for sock in idle + dribbling + [slow_body]:
            sock.close()


def _token_boundary_stop(tokenizer, text_ids: list[int]) -> str | None:
    """A stop string that spans two tokens of the greedy output (2 characters of each)."""
    for k in range(1, len(text_ids) - 1):
        left = tokenizer.decode(text_ids[:k], skip_special_tokens=True)
        right = tokenizer.decode(text_ids[: k + 1], skip_special_tokens=True)[len(left):]
        if len(left) >= 2 and len(right) >= 2 and left[-2:].strip() and right[:2].strip():
            return left[-2:] + right[:2]
    return None


def test_a_stop_string_spanning_tokens_never_leaks_streamed_or_not(served, client):
    url, _, tokenizer = served
    full = client.completions.create(model=BASE, prompt=PROMPTS[1], max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = _token_boundary_stop(tokenizer, tokenizer(text, add_special_tokens=False).input_ids)
    if stop is None or text.find(stop) < 0:
        pytest.skip("the greedy text has no stop string across a token boundary")
    expected = text[: text.find(stop)]
    cut = client.completions.create(model=BASE, prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=stop)
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=BASE, prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected
    empty = client.completions.create(model=BASE, prompt=PROMPTS[1], max_tokens=6, temperature=0, stop="")
    assert empty.choices[0].text == _greedy(client, PROMPTS[1])[: len(empty.choices[0].text)]
    assert empty.choices[0].finish_reason == "length"


def test_stop_prefix_holds_back_exactly_what_could_begin_a_stop_string():
    assert _stop_prefix("abc", ("cde",)) == 1
    assert _stop_prefix("abcd", ("cdx", "bcdy")) == 3
    assert _stop_prefix("abc", ("xyz",)) == 0
    assert _stop_prefix("", ("abc",)) == 0
    assert _stop_prefix("aaa", ("aaaa",)) == 3


def _reference_greedy(model, tokenizer, prompt: str, steps: int, params: SamplingParams) -> str:
    """Greedy decoding by hand from the model's full-context logits, with the penalties and biases
    applied as OpenAI defines them (over the tokens generated so far)."""
    ids = tokenizer(prompt).input_ids
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids + generated])).logits[0, -1].double().tolist()
            for t, count in Counter(generated).items():
                logits[t] -= params.frequency_penalty * count + params.presence_penalty
            for t, bias in params.logit_bias:
                logits[t] += bias
            token = max(range(len(logits)), key=logits.__getitem__)
            if token == tokenizer.eos_token_id:
                break
            generated.append(token)
    # the engine sends whole characters only
    return tokenizer.decode(generated, skip_special_tokens=True).rstrip("\ufffd")


def test_penalties_and_logit_bias_equal_a_reference_from_the_logits(served, client, tiny_cfg):
    _, engine, tokenizer = served
    model = load_model(tiny_cfg.model, seed=0).model.eval()
    prompt = PROMPTS[2]
    plain = client.completions.create(model=BASE, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    changed = 0
    for kwargs in [{"frequency_penalty": 1.5}, {"presence_penalty": -2.0}, {"frequency_penalty": -2.0,
                   "presence_penalty": 0.5}]:
        expected = _reference_greedy(model, tokenizer, prompt, 24, SamplingParams(24, 0, **kwargs))
        got = client.completions.create(model=BASE, prompt=prompt, max_tokens=24, temperature=0, **kwargs)
        assert got.choices[0].text == expected
        changed += expected != plain
    assert changed  # the penalties change this output: the comparison above is not vacuous
    token = tokenizer(" Code", add_special_tokens=False).input_ids[0]
    forced = client.completions.create(model=BASE, prompt=prompt, max_tokens=4, temperature=0,
                                       logit_bias={str(token): 100})
    assert forced.choices[0].text == tokenizer.decode([token] * 4)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=BASE, prompt=prompt, max_tokens=2, logit_bias={"99999999": 1})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=BASE, prompt=prompt, max_tokens=2, logit_bias={"5": 101})
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model=BASE, prompt=prompt, max_tokens=2, presence_penalty=2.5)


def test_a_model_card_is_served_by_id(served, client):
    assert client.models.retrieve(BASE).parent is None
    assert client.models.retrieve("default").parent == BASE
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_logprobs_equal_the_models_log_softmax_streamed_or_not(served, client, tiny_cfg):
    _, _, tokenizer = served
    model = load_model(tiny_cfg.model, seed=0).model.eval()
    prompt = PROMPTS[3]
    out = client.completions.create(model=BASE, prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    ids, generated = tokenizer(prompt).input_ids, []
    assert "".join(lp.tokens).startswith(out.choices[0].text) and len(lp.tokens) == len(lp.token_logprobs)
    with torch.no_grad():  # greedy decoding by hand: each step's log-softmax of the full-context logits
        for k, value in enumerate(lp.token_logprobs):
            logits = model(input_ids=torch.tensor([ids + generated])).logits[0, -1].double()
            reference = torch.log_softmax(logits, dim=-1)
            best = torch.topk(reference, 3)
            assert value == pytest.approx(float(best.values[0]), abs=1e-4)
            top = sorted(lp.top_logprobs[k].values())
            assert top == pytest.approx(sorted(best.values.tolist()), abs=1e-4)
            generated.append(int(best.indices[0]))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    stream = client.completions.create(model=BASE, prompt=prompt, max_tokens=8, temperature=0, logprobs=3,
                                       stream=True)
    streamed = [v for c in stream if c.choices and c.choices[0].logprobs
                for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-9)

    hi = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=BASE, messages=hi, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy
    assert "".join(t.token for t in content).startswith(chat.choices[0].message.content)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       top_logprobs=2)


def test_echo_puts_the_prompt_first_and_refuses_prompt_logprobs(client):
    plain = _greedy(client, PROMPTS[4])
    echoed = client.completions.create(model=BASE, prompt=PROMPTS[4], max_tokens=10, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPTS[4] + plain
    stream = client.completions.create(model=BASE, prompt=PROMPTS[4], max_tokens=10, temperature=0, echo=True,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == PROMPTS[4] + plain
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model=BASE, prompt="x", max_tokens=2, echo=True, logprobs=1)


def test_an_engine_without_logprobs_refuses_them_by_name():
    app = create_app(_StubEngine(), BASE, [hash_api_key(KEY)], ServerLimits())
    with live_server(app) as url:
        body = {"model": BASE, "prompt": "x", "logprobs": 1}
        r = httpx.post(url + "/v1/completions", headers=AUTH, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def _samples(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", headers=AUTH).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_requests_and_errors_are_counted_by_model_and_status(served, client):
    url = served[0]
    before = _samples(url)
    client.completions.create(model=BASE, prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt="x", max_tokens=1000)
    httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    after = _samples(url)

    def grew(name):
        return after.get(name, 0) - before.get(name, 0)

    assert grew(f'tensafe_requests_total{{model="{BASE}",status="200"}}') == 1
    assert grew(f'tensafe_requests_total{{model="{BASE}",status="400"}}') == 1
    assert grew('tensafe_requests_total{model="",status="401"}') == 1
    assert grew(f'tensafe_request_errors_total{{model="{BASE}",type="invalid_request_error"}}') == 1


def test_an_unloaded_adapters_series_are_dropped():
    from tensafe.observability.metrics import ServingMetrics

    metrics = ServingMetrics(lambda: 0)
    for model in ("gone", "kept"):
        metrics.latency.labels(model).observe(0.1)
        metrics.tokens.labels(model, "prompt").inc(3)
        metrics.requests.labels(model, "200").inc()
        metrics.he_lora_latency.labels(model, "total").observe(0.2)
    metrics.forget("gone")
    text = metrics.render().decode()
    assert 'model="gone"' not in text and 'model="kept"' in text


def test_tokens_of_a_stream_the_client_abandons_are_counted():
    class Endless(_StubEngine):
        async def generate(self, prompt, adapter, params):
            k = 0
            while True:
                k += 1
                await asyncio.sleep(0.01)
                yield TokenEvent("a", k)

    app = create_app(Endless(), BASE, [hash_api_key(KEY)], ServerLimits())
    with live_server(app) as url:
        with httpx.stream("POST", url + "/v1/completions", headers=AUTH, timeout=30,
                          json={"model": BASE, "prompt": "x", "stream": True}) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data:")
                if seen >= 20:
                    break
        deadline = time.monotonic() + 10
        name = f'tensafe_inference_tokens_total{{kind="completion",model="{BASE}"}}'
        while _samples(url).get(name, 0) < 20:
            assert time.monotonic() < deadline, "the abandoned stream's tokens were never counted"
            time.sleep(0.2)


def test_prompts_may_be_token_ids(served, client):
    _, _, tokenizer = served
    ids = tokenizer(PROMPTS[5]).input_ids
    as_text = _greedy(client, PROMPTS[5])
    assert _greedy(client, ids) == as_text
    both = client.completions.create(model=BASE, prompt=[ids, ids], max_tokens=10, temperature=0)
    assert [c.text for c in both.choices] == [as_text, as_text]
    echoed = client.completions.create(model=BASE, prompt=ids, max_tokens=10, temperature=0, echo=True)
    assert echoed.choices[0].text == tokenizer.decode(ids) + as_text
    url = served[0] + "/v1/completions"
    for bad in ([len(tokenizer)], [-1], [[]], [1, "a"]):
        r = httpx.post(url, json={"model": BASE, "prompt": bad}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt"), (bad, r.text)
