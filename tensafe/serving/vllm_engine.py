"""The vLLM engine (`serving=vllm`): the embedded engine's `Engine` protocol on vLLM, on a CUDA GPU.

The API layer is the same for both engines: it tokenizes with `engine.tokenizer` and streams
`TokenEvent`s from `engine.generate`. This engine submits the prompt token ids to vLLM's async
engine as a `TokensPrompt`, streams `RequestOutputKind.DELTA` outputs, and serves each plaintext
LoRA adapter as a `LoRARequest` (multi-LoRA batching is vLLM's). HE-LoRA adapters stay on the
embedded engine, which holds the CKKS key.

vLLM is imported lazily, by `VLLMEngine` only: the mapping functions below are pure and this
module imports on any machine. Written against vLLM's V1 engine API (vLLM >= 0.10, where
`vllm.AsyncLLMEngine` is `vllm.v1.engine.async_llm.AsyncLLM`):
`AsyncLLMEngine.from_engine_args(AsyncEngineArgs(...))`,
`generate(prompt, sampling_params, request_id, lora_request=...)` (an async generator of
`RequestOutput`), `add_lora(LoRARequest)`, `remove_lora(lora_int_id)`, `abort(request_id)`,
`errored` and `shutdown()`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

from tensafe.config.schema import HardwareConfig, ModelConfig, ServingConfig, VLLMOptions
from tensafe.errors import ConfigError
from tensafe.security.context import SecurityContext
from tensafe.security.package import is_package
from tensafe.serving.adapters import (
    Adapter,
    remove_materialized,
    remove_stale_materialized,
)
from tensafe.serving.base import AdapterError, SamplingParams, TokenEvent, TokenLogprob
from tensafe.serving.session import ServingSession
from tensafe.serving.structured import Grammars

log = logging.getLogger(__name__)

GPU_TARGETS = "hardware=h100_80gb, hardware=a100_80gb or hardware=h200"
_DTYPES = {"bf16-mixed": "bfloat16", "bf16-true": "bfloat16", "16-mixed": "float16", "32-true": "float32"}
_FINISH = {"stop": "stop", "length": "length"}


# --- pure mapping: config → vLLM arguments ---------------------------------------------------------


def vllm_options(serving_cfg: ServingConfig) -> VLLMOptions:
    """The `serving.vllm` block, or its defaults where the config has none."""
    return serving_cfg.vllm if serving_cfg.vllm is not None else VLLMOptions()


def engine_args(model_cfg: ModelConfig, serving_cfg: ServingConfig, hardware_cfg: HardwareConfig,
                seed: int = 0, tokenizer: str | None = None) -> dict[str, Any]:
    """Keyword arguments for vLLM's `AsyncEngineArgs`. `tokenizer` defaults to the model's own."""
    if hardware_cfg.accelerator != "cuda":
        raise ConfigError(
            "serving", "vllm", f"the vLLM engine needs a CUDA GPU ({GPU_TARGETS}), and "
            f"hardware={hardware_cfg.name} is {hardware_cfg.accelerator}; use serving=embedded on CPU"
        )
    dtype = _DTYPES.get(hardware_cfg.precision)
    if dtype is None:
        raise ConfigError("hardware.precision", hardware_cfg.precision,
                          f"vLLM serves in one dtype; choose one of {sorted(_DTYPES)}")
    options = vllm_options(serving_cfg)
    model = options.model_path
    if model is None:
        if model_cfg.source == "random_init":
            raise ConfigError(
                "serving.vllm.model_path", None, f"model={model_cfg.name} is built at random (model.source="
                "random_init) and has no weights for vLLM to load; set a saved HF model folder"
            )
        model = model_cfg.hf_id
    if serving_cfg.speculative_tokens and serving_cfg.speculative_drafter != "ngram":
        raise ConfigError("serving.speculative_drafter", serving_cfg.speculative_drafter,
                          "serving=vllm drafts by n-gram prompt lookup here; set serving.speculative_drafter="
                          "ngram, or serve with serving=embedded")
    speculation = {} if not serving_cfg.speculative_tokens else {"speculative_config": {
        "method": "ngram", "num_speculative_tokens": serving_cfg.speculative_tokens,
        "prompt_lookup_max": serving_cfg.speculative_ngram,
        "prompt_lookup_min": serving_cfg.speculative_ngram_min}}
    return {
        "model": model,
        "tokenizer": tokenizer or model,
        "dtype": dtype,
        "seed": seed,
        "max_model_len": options.max_model_len or model_cfg.max_seq_len,
        "max_num_seqs": serving_cfg.max_running,
        "tensor_parallel_size": options.tensor_parallel_size,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "enforce_eager": options.enforce_eager,
        "enable_lora": True,
        "max_loras": options.max_loras,
        "max_lora_rank": options.max_lora_rank,
        "max_cpu_loras": options.max_cpu_loras,
        **speculation,
    }


def lora_request_args(name: str, path: str | os.PathLike, int_id: int) -> dict[str, Any]:
    """Keyword arguments for vLLM's `LoRARequest` (ids are positive and never reused)."""
    if int_id < 1:
        raise ValueError(f"vLLM LoRA ids start at 1, got {int_id}")
    return {"lora_name": name, "lora_int_id": int_id, "lora_path": os.path.abspath(os.path.expanduser(path))}


def sampling_args(params: SamplingParams, output_kind: Any, structured: Any = None) -> dict[str, Any]:
    """Keyword arguments for vLLM's `SamplingParams`; `output_kind` is `RequestOutputKind.DELTA` and
    `structured` vLLM's `StructuredOutputsParams` class (passed in, so this mapping imports nothing
    from vLLM). vLLM's log-probabilities are the raw model's, as the embedded engine's."""
    schema = None
    if params.json_schema is not None:
        if structured is None:
            raise ValueError("a json_schema needs vLLM's StructuredOutputsParams")
        schema = structured(json=json.loads(params.json_schema))
    return {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": params.seed,
        "stop": list(params.stop),
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "logit_bias": dict(params.logit_bias) or None,
        "logprobs": params.logprobs,
        "structured_outputs": schema,
        "skip_special_tokens": True,  # as the embedded engine decodes
        "output_kind": output_kind,
    }


def token_logprobs(token_ids, logprobs, top: int | None) -> tuple[TokenLogprob, ...]:
    """TokenLogprobs of a vLLM output's new tokens: `logprobs` holds, per token, a dict token id →
    `Logprob` (with `.logprob` and `.rank`) of the sampled token and the `top` most likely ones."""
    if top is None or not logprobs:
        return ()
    out = []
    for token, entries in zip(token_ids, logprobs, strict=True):
        best = sorted((e.rank, t, e.logprob) for t, e in entries.items() if (e.rank or top + 1) <= top)
        out.append(TokenLogprob(int(token), float(entries[token].logprob),
                                tuple((int(t), float(v)) for _, t, v in best[:top])))
    return tuple(out)


def plaintext_adapters(adapters: Mapping[str, Any]) -> dict[str, str]:
    """name → folder for `serving.adapters`, whose entries are a folder, or a mapping (or config
    object) with `path` and an optional `he: {enabled: ...}`. HE-LoRA entries are refused."""
    folders = {}
    for name, entry in adapters.items():
        if isinstance(entry, (str, os.PathLike)):
            folders[name] = os.fspath(entry)
            continue
        path, he = _get(entry, "path"), _get(entry, "he")
        if _get(he, "enabled"):
            raise ConfigError(
                f"serving.adapters.{name}.he.enabled", True, "HE-LoRA adapters are served by the embedded "
                "engine (serving=embedded); vLLM serves plaintext adapters only"
            )
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ConfigError(f"serving.adapters.{name}", entry,
                              "an adapter is a folder, or a mapping with `path` (and optional `he`)")
        folders[name] = os.fspath(path)
    return folders


def _get(entry: Any, key: str) -> Any:
    if entry is None:
        return None
    if isinstance(entry, Mapping):
        return entry.get(key)
    return getattr(entry, key, None)


def check_rank(adapter: Adapter, max_lora_rank: int, key: str) -> None:
    """The adapter's rank fits `serving.vllm.max_lora_rank`."""
    if adapter.rank > max_lora_rank:
        raise ConfigError(
            key, adapter.path, f"LoRA rank {adapter.rank} is over serving.vllm.max_lora_rank="
            f"{max_lora_rank}; raise serving.vllm.max_lora_rank (vLLM takes 1, 8, 16, 32, 64, 128, "
            "256, 320 or 512)"
        )


class Configured(NamedTuple):
    """A configured adapter: what the session opened, and the folder vLLM loads it from."""

    adapter: Adapter
    folder: str


# --- the engine -------------------------------------------------------------------------------------


def _import_vllm() -> SimpleNamespace:
    """The vLLM names this engine uses, or a ConfigError saying how to install vLLM."""
    try:
        import vllm
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    except ImportError as err:
        raise ConfigError(
            "serving", "vllm", f"vLLM is not installed ({err}); pip install 'tensafe[vllm]' on a CUDA "
            "machine, or use serving=embedded"
        ) from None
    return SimpleNamespace(
        AsyncEngineArgs=vllm.AsyncEngineArgs, AsyncLLMEngine=vllm.AsyncLLMEngine,
        SamplingParams=vllm.SamplingParams, TokensPrompt=vllm.TokensPrompt, LoRARequest=LoRARequest,
        DELTA=RequestOutputKind.DELTA, StructuredOutputsParams=StructuredOutputsParams,
    )


@dataclass
class _Lora:
    request: Any  # vllm LoRARequest
    active: int = 0
    retiring: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self):
        self.idle.set()


class VLLMEngine:
    """Serves a model and its plaintext LoRA adapters through vLLM's async engine.

    Log-probabilities come from vLLM's outputs (`token_logprobs`) and structured outputs are
    vLLM's (`StructuredOutputsParams`), with the same schema checks up front as the embedded
    engine (`grammars`, llguidance).

    `start()` builds the engine (inside the server's event loop, which vLLM's output handler
    joins) and loads the configured adapters; `stop()`, called off the loop, waits for every
    in-flight request, then shuts vLLM down.
    """

    supports: frozenset[str] = frozenset({"logprobs", "json_schema"})

    def __init__(self, args: dict[str, Any], tokenizer, adapters: Mapping[str, Configured],
                 max_lora_rank: int, session: ServingSession | None = None):
        """`adapters`: the configured ones, opened by `session` (what this server trusts and records;
        default: unsigned folders allowed, nothing recorded), each with the folder vLLM loads."""
        self._v = _import_vllm()
        self.session = session if session is not None else ServingSession(security=None)
        self.tokenizer = tokenizer
        self.grammars = Grammars(tokenizer)
        self._args = dict(args)
        self._max_lora_rank = max_lora_rank
        self._ids = itertools.count(1)
        self._configured = dict(adapters)
        self._loras: dict[str, _Lora] = {name: self._new_lora(name, c.folder) for name, c in adapters.items()}
        self._loading: set[str] = set()
        self._engine: Any = None  # vLLM's AsyncLLMEngine once started
        self._preload: asyncio.Future | None = None
        self._active = 0
        self._idle = threading.Condition()
        self._stopping = False
        self.error: str | None = None

    def _new_lora(self, name: str, path: str) -> _Lora:
        return _Lora(self._v.LoRARequest(**lora_request_args(name, path, next(self._ids))))

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._engine is not None:
            raise RuntimeError("the vLLM engine is already started")
        self._engine = self._v.AsyncLLMEngine.from_engine_args(self._v.AsyncEngineArgs(**self._args))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop yet: the first request loads the adapters
            return
        self._preload = loop.create_task(self._load_configured())

    @property
    def ready(self) -> bool:
        preloaded = self._preload is None or self._preload.done()
        return (self._engine is not None and not self._stopping and self.error is None and preloaded
                and not self._engine.errored)

    @property
    def in_flight(self) -> int:
        return self._active

    @property
    def adapters(self) -> list[str]:
        return [name for name, lora in self._loras.items() if not lora.retiring]

    def stop(self) -> None:
        """Finish every in-flight request, then shut vLLM down. Call it off the event loop (the
        requests finish on it), e.g. `await asyncio.to_thread(engine.stop)`."""
        with self._idle:
            if self._active and _on_event_loop():
                raise RuntimeError("VLLMEngine.stop() waits for requests that run on this event loop; "
                                   "call it from another thread (asyncio.to_thread)")
            self._stopping = True
            self._idle.wait_for(lambda: self._active == 0)
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
        for lora in self._loras.values():
            remove_materialized(lora.request.lora_path)

    async def _load_configured(self) -> None:
        for name, lora in list(self._loras.items()):
            configured = self._configured[name]
            try:
                await self._add_lora(name, lora)
            except AdapterError as err:
                log.error("%s", err)
                self.error = str(err)
                del self._loras[name]
                self.session.refused(name, configured.adapter.path, err)
                continue
            self.session.loaded(configured.adapter)

    async def _ensure_preloaded(self) -> None:
        if self._preload is None:
            self._preload = asyncio.ensure_future(self._load_configured())
        await asyncio.shield(self._preload)

    # --- requests ----------------------------------------------------------------------------
    async def generate(self, prompt: list[int], adapter: str | None, params: SamplingParams
                       ) -> AsyncIterator[TokenEvent]:
        """Events for one sequence, from vLLM's DELTA outputs."""
        if self._engine is None or self._stopping:
            yield TokenEvent("", 0, "error", error="the vLLM engine is not running (stopped or not started)")
            return
        await self._ensure_preloaded()
        lora = None
        if adapter is not None:
            lora = self._loras.get(adapter)
            if lora is None or lora.retiring:
                yield TokenEvent("", 0, "error", error=f"adapter {adapter!r} is not loaded")
                return
        if not self._admit(lora):
            yield TokenEvent("", 0, "error", error="the vLLM engine is stopping")
            return
        request_id = f"tensafe-{uuid.uuid4().hex}"
        stream = self._engine.generate(
            self._v.TokensPrompt(prompt_token_ids=list(prompt)),
            self._v.SamplingParams(**sampling_args(params, self._v.DELTA, self._v.StructuredOutputsParams)),
            request_id,
            lora_request=None if lora is None else lora.request,
        )
        tokens, finished = 0, False
        try:
            try:
                async for out in stream:
                    completion = out.outputs[0] if out.outputs else None
                    text = completion.text if completion is not None else ""
                    tokens += len(completion.token_ids) if completion is not None else 0
                    logprobs = () if completion is None else token_logprobs(
                        completion.token_ids, completion.logprobs, params.logprobs)
                    if not out.finished:
                        if text or logprobs:
                            yield TokenEvent(text, tokens, logprobs=logprobs)
                        continue
                    finished = True
                    reason = completion.finish_reason if completion is not None else None
                    if reason in _FINISH:
                        yield TokenEvent(text, tokens, _FINISH[reason], logprobs=logprobs)
                    else:
                        yield TokenEvent(text, tokens, "error",
                                         error=f"vLLM ended the request with finish_reason={reason!r}")
                    return
            except Exception as err:  # noqa: BLE001  (reported to the client as an error event)
                finished = True
                log.exception("vLLM request %s failed", request_id)
                yield TokenEvent("", tokens, "error", error=_describe(err))
                return
            finished = True
            yield TokenEvent("", tokens, "error", error="vLLM ended the stream before the request finished")
        finally:
            try:
                if not finished:  # cancelled or closed by the client: free vLLM's slot now
                    await stream.aclose()
                    await self._engine.abort(request_id)
            finally:
                self._end(lora)

    def _admit(self, lora: _Lora | None) -> bool:
        """Count a request in, unless `stop()` has begun (it then waits for those counted)."""
        with self._idle:
            if self._stopping or self._engine is None:
                return False
            self._active += 1
        if lora is not None:
            lora.active += 1
            lora.idle.clear()
        return True

    def _end(self, lora: _Lora | None) -> None:
        if lora is not None:
            lora.active -= 1
            if lora.active == 0:
                lora.idle.set()
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    def observe_he(self, observe) -> None:
        """HE-LoRA adapters are the embedded engine's; this engine has no HE stages to time."""

    def observe_speculation(self, observe) -> None:
        """vLLM verifies its own drafts (`speculative_config`) and reports them in its own metrics."""

    # --- adapters ----------------------------------------------------------------------------
    async def load_adapter(self, name: str, path: str) -> None:
        """Validate the folder, then load it into vLLM as `name`; AdapterError if it cannot."""
        if self._engine is None or self._stopping:
            raise AdapterError("the vLLM engine is not running")
        if name in self._loras or name in self._loading:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first or pick "
                               "another name")
        self._loading.add(name)
        folder = None
        try:
            try:
                # vLLM loads from disk: a verified package's members go to a private folder
                adapter, folder = await asyncio.to_thread(self.session.open_on_disk, name, path, "path")
                if adapter.rank > self._max_lora_rank:
                    raise AdapterError(f"adapter {name!r} has LoRA rank {adapter.rank}, over this server's "
                                       f"serving.vllm.max_lora_rank={self._max_lora_rank}")
                await self._ensure_preloaded()
                lora = self._new_lora(name, folder)
                await self._add_lora(name, lora)
            except Exception as err:  # noqa: BLE001  (its reason goes to the admin API's caller)
                if folder is not None:  # opened (the session records its own refusals), then failed
                    self.session.refused(name, path, err)
                    remove_materialized(folder)
                if isinstance(err, AdapterError):
                    raise
                raise AdapterError(str(err)) from None
            self._loras[name] = lora
            self.session.loaded(adapter)
        finally:
            self._loading.discard(name)

    async def _add_lora(self, name: str, lora: _Lora) -> None:
        try:
            added = await self._engine.add_lora(lora.request)
        except Exception as err:  # noqa: BLE001  (vLLM's reason goes into the message)
            raise AdapterError(f"vLLM could not load adapter {name!r} from {lora.request.lora_path}: "
                               f"{type(err).__name__}: {err}") from None
        if added is False:
            raise AdapterError(f"vLLM did not load adapter {name!r} from {lora.request.lora_path}")

    async def unload_adapter(self, name: str) -> None:
        """Stop routing new requests to `name`, wait for its in-flight ones, then drop it from vLLM."""
        lora = self._loras.get(name)
        if lora is None or lora.retiring:
            raise AdapterError(f"adapter {name!r} is not loaded")
        if self._engine is None:
            raise AdapterError("the vLLM engine is not running")
        lora.retiring = True
        await lora.idle.wait()
        try:
            await self._engine.remove_lora(lora.request.lora_int_id)
        except Exception as err:  # noqa: BLE001
            raise AdapterError(f"vLLM could not unload adapter {name!r}: {type(err).__name__}: "
                               f"{err}") from None
        finally:
            del self._loras[name]  # never routed to again, whatever vLLM answered
            remove_materialized(lora.request.lora_path)  # a package's decrypted copy goes with it
            self.session.unloaded(name)


def _describe(err: BaseException) -> str:
    """The error and its cause (vLLM wraps request failures in an EngineGenerateError without text)."""
    text = f"{type(err).__name__}: {err}".rstrip(": ")
    cause = err.__cause__
    return f"{text} ({type(cause).__name__}: {cause})" if cause is not None else text


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def build(cfg) -> VLLMEngine:
    """The vLLM engine for a validated config (`task=serve serving=vllm`); ConfigError (exit 2) for
    a CPU target, HE-LoRA adapters, adapter ranks over `serving.vllm.max_lora_rank`, no visible GPU
    or no vLLM. The model loads in `start()`."""
    serving = cfg.serving
    engine_args(cfg.model, serving, cfg.hardware, seed=cfg.seed)  # refuses CPU targets first
    sources = plaintext_adapters(serving.adapters)
    remove_stale_materialized()
    base_digest, model_path = None, vllm_options(serving).model_path
    if any(is_package(path) for path in sources.values()):
        if model_path is not None:
            raise ConfigError("serving.vllm.model_path", model_path,
                              "packages are bound to the digest of model.hf_id, which a local model_path "
                              "does not have: serve them with model_path null, or serve adapter folders")
        from tensafe.models.loader import model_digest

        base_digest = model_digest(cfg.model, cfg.seed)
    session = ServingSession(SecurityContext(cfg.security), serving.allow_unsigned, base_digest)
    max_rank = vllm_options(serving).max_lora_rank
    adapters = {}
    for name, path in sources.items():
        key = f"serving.adapters.{name}"
        # vLLM loads from disk: a verified package's members go to a private folder
        adapter, folder = session.open_on_disk(name, path, key)
        try:
            check_rank(adapter, max_rank, key)
        except ConfigError as err:
            session.refused(name, path, err)
            remove_materialized(folder)
            raise
        adapters[name] = Configured(adapter, folder)
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("hardware", cfg.hardware.name, "needs a CUDA GPU and none is visible here "
                          "(torch.cuda.is_available() is False); use hardware=cpu serving=embedded")
    _import_vllm()
    from tensafe.models.loader import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    # vLLM detokenizes with the tokenizer the API layer encodes with (hf id or local folder).
    args = engine_args(cfg.model, serving, cfg.hardware, seed=cfg.seed,
                       tokenizer=getattr(tokenizer, "name_or_path", None) or None)
    return VLLMEngine(args, tokenizer, adapters, max_rank, session)
