"""HE-LoRA in serving: the engine is the key holder; each HE adapter's evaluator computes the deltas.

For every forward pass, the rows of an HE adapter reach its adapted modules (see `multi_lora`), and
`HEDeltas.delta` packs those tokens column-wise into the slots (all of them share one batch, split
only beyond N/2), encrypts, sends the batch to the module's evaluator, and decrypts s·X·A·B.

Where the evaluator runs is a transport with one interface (`EvaluatorTransport`):
- `InProcessEvaluators`: evaluators in the engine's own process. The same party then holds the key
  and the adapter, so this protects nothing; it exists for tests and benchmarks, and its name, its
  `protects_activations` and its repr say so.
- `tensafe.serving.he_client.HTTPEvaluators`: the evaluator as its own service
  (`tensafe task=he_evaluator`), reached over HTTP with the versioned ciphertext wire format.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from tensafe.he.backends.base import CKKSBackend
from tensafe.he.errors import HEError
from tensafe.he.lora import Evaluator, KeyHolder
from tensafe.serving.adapters import LoRAFactors


@dataclass(frozen=True)
class ModuleInfo:
    """What a key holder learns about an evaluator's module: its shape and the largest safe |x|."""

    h_in: int
    r: int
    h_out: int
    input_bound: float


class EvaluatorTransport(Protocol):
    """How one HE adapter's evaluators are reached."""

    protects_activations: bool

    def open(self, public_context: bytes) -> dict[str, ModuleInfo]:
        """Start a session for the key holder's public context; the modules the evaluator serves."""

    def evaluate(self, module: str, data: bytes) -> bytes:
        """A serialized ciphertext batch in, the serialized encrypted delta out."""

    def close(self) -> None: ...


def build_evaluators(
    modules: dict[str, LoRAFactors], make_backend: Callable[[], CKKSBackend], public_context: bytes,
    max_message_bytes: int | None = None,
) -> dict[str, Evaluator]:
    """One evaluator per module, each with its own backend and only the public context."""
    limit = {} if max_message_bytes is None else {"max_message_bytes": max_message_bytes}
    out = {}
    for name, f in modules.items():
        a, b = f.evaluator_factors()
        out[name] = Evaluator(make_backend(), public_context, a, b, f.scale, **limit)
    return out


def module_info(evaluators: dict[str, Evaluator]) -> dict[str, ModuleInfo]:
    return {name: ModuleInfo(*e.shape, e.input_bound) for name, e in evaluators.items()}


class InProcessEvaluators:
    """TEST/BENCHMARK MODE, PROTECTS NOTHING: evaluators in the key holder's own process."""

    protects_activations = False

    def __init__(self, modules: dict[str, LoRAFactors], make_backend: Callable[[], CKKSBackend]):
        self._modules, self._make_backend = modules, make_backend
        self.evaluators: dict[str, Evaluator] = {}

    def open(self, public_context: bytes) -> dict[str, ModuleInfo]:
        self.evaluators = build_evaluators(self._modules, self._make_backend, public_context)
        return module_info(self.evaluators)

    def evaluate(self, module: str, data: bytes) -> bytes:
        return self.evaluators[module].evaluate_bytes(data)

    def close(self) -> None:
        self.evaluators = {}

    def __repr__(self) -> str:
        return (
            f"InProcessEvaluators({len(self._modules)} modules; "
            "same party as the key holder: protects nothing)"
        )


STAGES = ("encrypt", "evaluator", "decrypt")  # key holder, the evaluator's round trip, key holder


@dataclass
class HEStats:
    """What the HE path has done: module calls, tokens, and seconds in all and per stage."""

    calls: int = 0
    encryptions: int = 0  # calls that encrypted afresh (the others reused the same input's ciphertexts)
    tokens: int = 0
    tokens_scaled_down: int = 0  # tokens past the evaluator's worst-case bound, scaled into it
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))


class HEDeltas:
    """One HE adapter as the key holder sees it: `delta(module, x)` = s·x·A·B through the evaluator."""

    def __init__(self, holder: KeyHolder, transport: EvaluatorTransport, modules: list[str] | None = None):
        self.holder, self.transport, self.stats = holder, transport, HEStats()
        self.observe: Callable[[str, float], None] | None = None  # (stage or "total", seconds): metrics
        # the last activations sent and their ciphertexts: modules that read the same input (q, k and v
        # of one layer) share one encryption; the evaluator learns only that they are equal, which the
        # architecture already tells it
        self._sent: tuple[np.ndarray, list[bytes]] | None = None
        served = transport.open(holder.public_context())
        wanted = sorted(served) if modules is None else list(modules)
        missing = sorted(set(wanted) - set(served))
        if missing:
            raise HEError(f"the evaluator does not serve modules {missing}; it serves {sorted(served)}")
        self.modules = {name: served[name] for name in wanted}
        # One bound for every module, so the modules that read the same input still share its encryption.
        self._bound = min(info.input_bound for info in self.modules.values())

    def delta(self, module: str, x: np.ndarray) -> np.ndarray:
        """Δ for tokens x (t × h_in) through the key holder and the module's evaluator. Fresh
        ciphertexts for every new x; a module that reads the very same x as the last one reuses them."""
        info, slots = self.modules[module], self.holder.params.slots
        ticks, parts = [time.perf_counter()], []
        spent = dict.fromkeys(STAGES, 0.0)
        factors = token_scales(x, self._bound)
        scaled = x * factors[:, None]
        sent = self._sent
        reuse = sent is not None and sent[0].shape == x.shape and np.array_equal(sent[0], x)
        if sent is None or not reuse:
            sent = self._sent = (x.copy(), [])
            self.stats.encryptions += 1
        for index, first in enumerate(range(0, x.shape[0], slots)):
            chunk = scaled[first : first + slots]
            if not reuse:
                sent[1].append(self.holder.to_bytes(self.holder.encrypt(chunk, info.input_bound)))
            data = sent[1][index]
            ticks.append(time.perf_counter())
            reply = self.transport.evaluate(module, data)
            ticks.append(time.perf_counter())
            parts.append(self.holder.decrypt(self.holder.from_bytes(reply), chunk.shape[0], info.h_out))
            ticks.append(time.perf_counter())
            for stage, (begin, end) in zip(STAGES, zip(ticks[-4:-1], ticks[-3:], strict=True), strict=True):
                spent[stage] += end - begin
        self.stats.calls += 1
        self.stats.tokens += x.shape[0]
        self.stats.tokens_scaled_down += int((factors < 1).sum())
        self.stats.seconds += ticks[-1] - ticks[0]
        for stage, seconds in spent.items():
            self.stats.stage_seconds[stage] += seconds
        if self.observe is not None:
            self.observe("total", ticks[-1] - ticks[0])
            for stage, seconds in spent.items():
                self.observe(stage, seconds)
        return np.concatenate(parts) / factors[:, None]

    def close(self) -> None:
        self.transport.close()


def token_scales(x: np.ndarray, bound: float) -> np.ndarray:
    """Per token (row of `x`), the power of two f that brings its largest |value| to at most `bound`.

    Δ is linear in x, so the key holder encrypts f·x and divides the decrypted delta by f: exact in
    floating point (powers of two), never seen by the evaluator, and every token fits the
    evaluator's worst-case input bound, outlier channels included. The price is precision: the
    HE noise is divided by f too, so a token scaled down by f carries 1/f times the error (and a
    small one scaled up, less)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise HEError(f"activations must be a finite (tokens × hidden) matrix, got shape {x.shape}")
    peak = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0])
    with np.errstate(divide="ignore"):
        exponents = np.where(peak > 0, np.floor(np.log2(bound / np.where(peak > 0, peak, 1.0))), 0.0)
    factors = np.exp2(np.clip(exponents, -64, 64))
    return np.where(factors * peak > bound, factors / 2, factors)  # log2's last-bit rounding
