"""Build the embedded engine from the config: the model, its adapters, and HE-LoRA where enabled."""

from __future__ import annotations

import fnmatch
import logging
import os

from tensafe.config.schema import IN_PROCESS_EVALUATOR, HEAdapterOptions
from tensafe.errors import ConfigError
from tensafe.serving.adapters import Adapter
from tensafe.serving.engine import EmbeddedEngine
from tensafe.serving.he_lora import (
    PACKINGS,
    AutoDeltas,
    CoefficientDeltas,
    Deltas,
    EvaluatorTransport,
    HEDeltas,
    InProcessEvaluators,
)
from tensafe.serving.multi_lora import MultiLoRA
from tensafe.serving.session import ServingSession
from tensafe.serving.speculative import Speculation

log = logging.getLogger(__name__)


def build_embedded(cfg) -> EmbeddedEngine:
    from tensafe.models.loader import load_model
    from tensafe.security.context import SecurityContext
    from tensafe.security.evidence import he_parameters

    serving = cfg.serving
    loaded = load_model(cfg.model, seed=cfg.seed)
    session = ServingSession(SecurityContext(cfg.security), serving.allow_unsigned, loaded.digest)
    lora = MultiLoRA(loaded.model)
    holders = None
    for name, spec in serving.adapters.items():
        adapter = session.open(name, spec.path, f"serving.adapters.{name}")
        he = None
        if spec.he is not None and spec.he.enabled:
            if holders is None:
                holders = key_holders(cfg.he, name)
            he = he_deltas(adapter, spec.he, cfg.he, holders)
        lora.add(adapter, he)
        session.loaded(adapter, he_parameters(cfg.he.backend, he.holder.params) if he is not None else None)
    speculation = None
    if serving.speculative_tokens:
        speculation = Speculation(serving.speculative_tokens, serving.speculative_ngram,
                                  serving.speculative_ngram_min, serving.speculative_drafter)
    return EmbeddedEngine(loaded.model, loaded.tokenizer, lora, serving.max_running, serving.prefill_chunk,
                          session, speculation)


def key_holders(he_cfg, adapter: str) -> dict[str, object]:
    """The engine's key holders, one per packing `he.packing` uses (auto: both)."""
    from tensafe.he.backends import backend_from_config
    from tensafe.he.circuit_private import CircuitPrivateKeyHolder, CircuitPrivateParameters
    from tensafe.he.coefficient import CoefficientParameters
    from tensafe.he.coefficient_lora import CoefficientKeyHolder
    from tensafe.he.lora import KeyHolder

    if he_cfg.backend == "off":
        raise ConfigError(f"serving.adapters.{adapter}.he.enabled", True,
                          "HE-LoRA needs an HE backend: add he=ckks_numpy (or he=openfhe, he=ckks_cupy)")
    holders: dict[str, object] = {}
    if he_cfg.packing in ("slots", "auto"):
        backend = backend_from_config(he_cfg)
        assert backend is not None  # he.backend is not off
        holders["slots"] = KeyHolder(backend, he_cfg.max_message_bytes)
    if he_cfg.packing in ("coefficients", "auto"):
        ring = he_cfg.coefficient_ring_degree
        options = {"max_message_bytes": he_cfg.max_message_bytes, "rounds": he_cfg.coefficient_rounds}
        holders["coefficients"] = (
            CircuitPrivateKeyHolder(CircuitPrivateParameters.for_ring(ring), **options)
            if he_cfg.circuit_private
            else CoefficientKeyHolder(CoefficientParameters.for_ring(ring), **options))
    return holders


def he_modules(adapter: Adapter, patterns: list[str] | None) -> list[str]:
    """The adapter's modules that run under HE: all of them, or those matching `patterns`."""
    if patterns is None:
        return sorted(adapter.modules)
    chosen = sorted(m for m in adapter.modules if any(fnmatch.fnmatchcase(m, p) for p in patterns))
    if not chosen:
        raise ConfigError(f"serving.adapters.{adapter.name}.he.modules", patterns,
                          f"matches none of the adapter's modules, e.g. {sorted(adapter.modules)[:3]}")
    return chosen


def he_deltas(adapter: Adapter, options: HEAdapterOptions, he_cfg, holders: dict) -> Deltas:
    """The key holder's view of `adapter` under HE, with its evaluator reached as `options` say: one
    session per packing in `holders` (auto: both, chosen per call)."""
    modules = he_modules(adapter, options.modules)
    if options.evaluator == IN_PROCESS_EVALUATOR:
        log.warning("adapter %s: HE evaluator IN THIS PROCESS (%s): the same party holds the key and the "
                    "adapter, so HE-LoRA protects nothing here; for tests and benchmarks only",
                    adapter.name, IN_PROCESS_EVALUATOR)
    paths = {
        packing: _deltas(packing, holders[packing], _transport(adapter, options, he_cfg, modules), modules)
        for packing in PACKINGS if packing in holders
    }
    if len(paths) == 2:
        return AutoDeltas(paths["slots"], paths["coefficients"])  # type: ignore[arg-type]
    (path,) = paths.values()
    return path


def _deltas(packing: str, holder, transport: EvaluatorTransport, modules: list[str]) -> Deltas:
    if packing == "slots":
        return HEDeltas(holder, transport, modules)
    return CoefficientDeltas(holder, transport, modules)


def _transport(adapter: Adapter, options: HEAdapterOptions, he_cfg, modules: list[str]) -> EvaluatorTransport:
    from tensafe.he.backends import backend_from_config

    if options.evaluator == IN_PROCESS_EVALUATOR:
        def backend():
            made = backend_from_config(he_cfg)
            assert made is not None  # he.backend is not off: the key holder was built from it
            return made

        return InProcessEvaluators({m: adapter.modules[m] for m in modules}, backend)
    from tensafe.serving.he_client import HTTPEvaluators

    key = os.environ.get(options.api_key_env)
    if not key:
        raise ConfigError(f"serving.adapters.{adapter.name}.he.api_key_env", options.api_key_env,
                          "set this environment variable to the evaluator service's API key")
    return HTTPEvaluators(options.evaluator, key)
