"""HE-LoRA in serving: the engine is the key holder; each HE adapter's evaluator computes the deltas.

For every forward pass, the rows of an HE adapter reach its adapted modules (see `multi_lora`), and
the adapter's deltas object (`he.packing`) computes s·X·A·B through the module's evaluator:
- `HEDeltas` (slots): packs the tokens column-wise into the CKKS slots (all of them share one batch,
  split only beyond N/2), encrypts, sends the batch to the evaluator, decrypts Δ: one round trip.
- `CoefficientDeltas` (coefficients): quantizes the tokens per row into coefficient blocks, sends
  them for stage 1 (·A), decrypts and re-encrypts U = X·A, sends it for stage 2 (·s·B), decrypts Δ:
  two round trips, each a few ct × pt products. Modules that read the same input (q, k and v; gate
  and up) go together: the first call's two round trips carry its siblings' products too.
- `AutoDeltas` (auto): per call, the packing that ran faster for the call's token count and the
  module's shape, measured on the first calls of each; it logs what it picked.

Where the evaluator runs is a transport with one interface (`EvaluatorTransport`):
- `InProcessEvaluators`: evaluators in the engine's own process. The same party then holds the key
  and the adapter, so this protects nothing; it exists for tests and benchmarks, and its name, its
  `protects_activations` and its repr say so.
- `tensafe.serving.he_client.HTTPEvaluators`: the evaluator as its own service
  (`tensafe task=he_evaluator`), reached over HTTP with the versioned ciphertext wire format.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np

from tensafe.he import wire
from tensafe.he.backends.base import CKKSBackend
from tensafe.he.circuit_private import CircuitPrivateEvaluator, CircuitPrivateKeyHolder
from tensafe.he.coefficient_lora import CoefficientEvaluator, CoefficientKeyHolder
from tensafe.he.counters import OpCounters
from tensafe.he.errors import HEError
from tensafe.he.lora import Evaluator, KeyHolder
from tensafe.serving.adapters import LoRAFactors

log = logging.getLogger(__name__)

PACKINGS = ("slots", "coefficients")
# Modules of one block that the architecture feeds the same input (Llama family): their products can
# share requests. The evaluator learns only that their inputs are equal, which the architecture tells it.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class ModuleInfo:
    """What a key holder learns about an evaluator's module: its shape and, per packing, what it
    needs to encode for it."""

    h_in: int
    r: int
    h_out: int
    input_bound: float | None = None  # slots: the largest safe |x|
    weight_scales: tuple[float, ...] | None = None  # coefficients: per stage, the quantized weights' scale


class EvaluatorTransport(Protocol):
    """How one HE adapter's evaluators are reached."""

    protects_activations: bool

    def open(self, public_context: bytes) -> dict[str, ModuleInfo]:
        """Start a session for the key holder's public context; the modules the evaluator serves."""

    def evaluate(self, module: str, data: bytes, stage: int | None = None) -> bytes:
        """A serialized ciphertext batch in, the serialized encrypted result out. `stage`: None for
        slot packing's single round, 1 or 2 for coefficient packing's two."""

    def evaluate_group(self, modules: list[str], data: list[bytes], stage: int) -> list[bytes]:
        """Coefficient stage `stage` for several modules in one round trip: `data` is one upload for
        all of them (modules that read the same input) or one per module; one result per module."""

    def close(self) -> None: ...


AnyEvaluator = Evaluator | CoefficientEvaluator | CircuitPrivateEvaluator
COEFFICIENT_EVALUATORS = (CoefficientEvaluator, CircuitPrivateEvaluator)
COEFFICIENT_CONTEXTS: dict[wire.Kind, type[CoefficientEvaluator] | type[CircuitPrivateEvaluator]] = {
    wire.Kind.COEFFICIENT_CONTEXT: CoefficientEvaluator, wire.Kind.PRIVATE_CONTEXT: CircuitPrivateEvaluator}


def build_evaluators(
    modules: dict[str, LoRAFactors], make_backend: Callable[[], CKKSBackend], public_context: bytes,
    max_message_bytes: int | None = None,
) -> dict[str, AnyEvaluator]:
    """One evaluator per module, with only the public context: of the packing the context is for
    (a CKKS public context: slots, each with its own backend; a coefficient context: coefficients)."""
    limit = {} if max_message_bytes is None else {"max_message_bytes": max_message_bytes}
    coefficients = COEFFICIENT_CONTEXTS.get(wire.kind_of(public_context))
    out: dict[str, AnyEvaluator] = {}
    for name, f in modules.items():
        a, b = f.evaluator_factors()
        out[name] = (coefficients(public_context, a, b, f.scale, **limit) if coefficients is not None
                     else Evaluator(make_backend(), public_context, a, b, f.scale, **limit))
    return out


def module_info(evaluators: dict[str, AnyEvaluator]) -> dict[str, ModuleInfo]:
    return {name: ModuleInfo(*e.shape, weight_scales=e.weight_scales) if isinstance(e, COEFFICIENT_EVALUATORS)
            else ModuleInfo(*e.shape, input_bound=e.input_bound) for name, e in evaluators.items()}


def evaluate_on(evaluator: AnyEvaluator, data: bytes, stage: int | None) -> tuple[bytes, OpCounters]:
    """One round on `evaluator` and its counters; a stage that is not the session's packing's is refused."""
    if isinstance(evaluator, COEFFICIENT_EVALUATORS):
        if stage is None:
            stages = "stage 1" if evaluator.rounds == 1 else "stage 1 or 2"
            raise HEError(f"this session uses coefficient packing: send {stages} (…/stages/{{stage}})")
        return evaluator.evaluate_bytes(data, stage), evaluator.last_counters
    if stage is not None:
        raise HEError("this session uses slot packing, which has a single round: send it without a stage")
    return evaluator.evaluate_bytes(data), evaluator.last_counters


def evaluate_group_on(
    evaluators: dict[str, AnyEvaluator], modules: list[str], data: list[bytes], stage: int | None
) -> tuple[list[bytes], OpCounters]:
    """`modules`' evaluators on `data` (one frame for all, or one each; `stage` as for
    `evaluate_on`), and the counters summed over the modules."""
    if len(data) not in (1, len(modules)):
        raise HEError(f"{len(data)} uploads for {len(modules)} modules: send one for all, or one each")
    missing = sorted(set(modules) - set(evaluators))
    if missing:
        raise HEError(f"modules {missing} are not served; modules: {sorted(evaluators)}")
    out, total = [], OpCounters()
    for i, module in enumerate(modules):
        result, counters = evaluate_on(evaluators[module], data[i if len(data) > 1 else 0], stage)
        out.append(result)
        total += counters
    return out, total


class InProcessEvaluators:
    """TEST/BENCHMARK MODE, PROTECTS NOTHING: evaluators in the key holder's own process."""

    protects_activations = False

    def __init__(self, modules: dict[str, LoRAFactors], make_backend: Callable[[], CKKSBackend]):
        self._modules, self._make_backend = modules, make_backend
        self.evaluators: dict[str, AnyEvaluator] = {}

    def open(self, public_context: bytes) -> dict[str, ModuleInfo]:
        self.evaluators = build_evaluators(self._modules, self._make_backend, public_context)
        return module_info(self.evaluators)

    def evaluate(self, module: str, data: bytes, stage: int | None = None) -> bytes:
        return evaluate_on(self.evaluators[module], data, stage)[0]

    def evaluate_group(self, modules: list[str], data: list[bytes], stage: int) -> list[bytes]:
        return evaluate_group_on(self.evaluators, modules, data, stage)[0]

    def close(self) -> None:
        self.evaluators = {}

    def __repr__(self) -> str:
        return (
            f"InProcessEvaluators({len(self._modules)} modules; "
            "same party as the key holder: protects nothing)"
        )


STAGES = ("encrypt", "evaluator", "decrypt")  # key holder, the evaluator's round trips, key holder


@dataclass
class HEStats:
    """What the HE path has done: module calls, tokens, and seconds in all and per stage. `seconds`
    is the time the forward pass waited; `stage_seconds` the time per stage (coefficient packing
    counts a group's shared round trips at its first module's call)."""

    calls: int = 0
    encryptions: int = 0  # calls that encrypted afresh (the others reused the same input's ciphertexts)
    tokens: int = 0
    tokens_scaled_down: int = 0  # slots: tokens past the evaluator's worst-case bound, scaled into it
    grouped: int = 0  # coefficients: calls answered by a sibling's round trips (same input, one request)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    calls_by_packing: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PACKINGS, 0))


@dataclass
class _Work:
    """One module call's result and what it cost."""

    delta: np.ndarray
    spent: dict[str, float]
    encrypted: bool
    scaled_down: int = 0
    grouped: bool = False


class _Deltas(abc.ABC):
    """What every packing's deltas share: the session, the module check, the stats and `observe`."""

    packing: ClassVar[str]

    def __init__(self, holder, transport: EvaluatorTransport, modules: list[str] | None,
                 stats: HEStats | None):
        self.holder, self.transport = holder, transport
        self.stats = stats if stats is not None else HEStats()
        self.observe: Callable[[str, float], None] | None = None  # (stage or "total", seconds): metrics
        served = transport.open(holder.public_context())
        wanted = sorted(served) if modules is None else list(modules)
        missing = sorted(set(wanted) - set(served))
        if missing:
            raise HEError(f"the evaluator does not serve modules {missing}; it serves {sorted(served)}")
        self.modules = {name: served[name] for name in wanted}

    def delta(self, module: str, x: np.ndarray) -> np.ndarray:
        """Δ for tokens x (t × h_in) through the key holder and the module's evaluator."""
        start = time.perf_counter()
        work = self._work(module, np.asarray(x, dtype=np.float64))
        waited = time.perf_counter() - start
        self.stats.calls += 1
        self.stats.calls_by_packing[self.packing] += 1
        self.stats.encryptions += work.encrypted
        self.stats.tokens += x.shape[0]
        self.stats.tokens_scaled_down += work.scaled_down
        self.stats.grouped += work.grouped
        self.stats.seconds += waited
        for stage, seconds in work.spent.items():
            self.stats.stage_seconds[stage] += seconds
        if self.observe is not None:
            self.observe("total", waited)
            for stage, seconds in work.spent.items():
                self.observe(stage, seconds)
        return work.delta

    @abc.abstractmethod
    def _work(self, module: str, x: np.ndarray) -> _Work:
        """One module call's delta and what it cost."""

    def close(self) -> None:
        self.transport.close()


class HEDeltas(_Deltas):
    """Slot packing: `delta(module, x)` = s·x·A·B in one round trip. Fresh ciphertexts for every new
    x; a module that reads the very same x as the last one reuses them."""

    packing = "slots"

    def __init__(self, holder: KeyHolder, transport: EvaluatorTransport, modules: list[str] | None = None,
                 stats: HEStats | None = None):
        super().__init__(holder, transport, modules, stats)
        # the last activations sent and their ciphertexts: modules that read the same input (q, k and v
        # of one layer) share one encryption; the evaluator learns only that they are equal, which the
        # architecture already tells it
        self._sent: tuple[np.ndarray, list[bytes]] | None = None
        # One bound for every module, so the modules that read the same input still share its encryption.
        bounds = [info.input_bound for info in self.modules.values()]
        if any(bound is None for bound in bounds):
            raise HEError("the evaluator's session is not for slot packing (no input bounds)")
        self._bound = min(bound for bound in bounds if bound is not None)

    def _work(self, module: str, x: np.ndarray) -> _Work:
        info, slots = self.modules[module], self.holder.params.slots
        assert info.input_bound is not None  # checked when the session opened
        ticks, parts = [time.perf_counter()], []
        spent = dict.fromkeys(STAGES, 0.0)
        factors = token_scales(x, self._bound)
        scaled = x * factors[:, None]
        sent = self._sent
        reuse = sent is not None and sent[0].shape == x.shape and np.array_equal(sent[0], x)
        if sent is None or not reuse:
            sent = self._sent = (x.copy(), [])
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
        return _Work(np.concatenate(parts) / factors[:, None], spent, not reuse, int((factors < 1).sum()))


class CoefficientDeltas(_Deltas):
    """Coefficient packing: `delta(module, x)` = s·x·A·B in two round trips (stage 1, the key holder
    re-encrypts U = x·A, stage 2), or in one with W = s·A·B when the key holder's context asks for
    one round. Modules of a `SHARED_INPUT` group go together: the first one's stage 1 sends one
    upload for all of them and its stage 2 their U's in one request, and the others' deltas wait
    for their calls (with the very same x; another x is computed afresh). One upload serves modules
    whose first stage has the same width: the same rank in two rounds, the same h_out in one."""

    packing = "coefficients"

    def __init__(self, holder: CoefficientKeyHolder | CircuitPrivateKeyHolder, transport: EvaluatorTransport,
                 modules: list[str] | None = None, stats: HEStats | None = None, group: bool = True):
        super().__init__(holder, transport, modules, stats)
        if any(info.weight_scales is None or len(info.weight_scales) != holder.rounds
               for info in self.modules.values()):
            raise HEError(f"the evaluator's session is not for {holder.rounds}-round coefficient packing "
                          "(no weight scale per stage)")
        self._siblings = siblings(list(self.modules)) if group else {}
        self._ready: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # a sibling's delta, and its x

    def _width(self, module: str) -> int:
        """The outputs of the module's first stage, which its upload is blocked for."""
        info = self.modules[module]
        return info.r if self.holder.rounds == 2 else info.h_out

    def _work(self, module: str, x: np.ndarray) -> _Work:
        ready = self._ready.pop(module, None)
        if ready is not None and ready[0].shape == x.shape and np.array_equal(ready[0], x):
            return _Work(ready[1], dict.fromkeys(STAGES, 0.0), False, grouped=True)
        width = self._width(module)
        group = [module, *(s for s in self._siblings.get(module, ()) if self._width(s) == width)]
        deltas, spent = self._round_trips(group, x)
        for sibling, delta in zip(group[1:], deltas[1:], strict=True):
            self._ready[sibling] = (x, delta)
        return _Work(deltas[0], spent, True)

    def _round_trips(self, group: list[str], x: np.ndarray) -> tuple[list[np.ndarray], dict[str, float]]:
        """The session's stages for the modules of `group`, which read the same x and whose first
        stage has the same width: stage 1 on one upload for all of them, stage 2 (two rounds) on
        one upload per module, U = x·A."""
        holder, infos = self.holder, [self.modules[m] for m in group]
        widths = [[(i.h_in, i.r), (i.r, i.h_out)] if holder.rounds == 2 else [(i.h_in, i.h_out)]
                  for i in infos]  # (inputs, outputs) of each stage, per module
        spent = dict.fromkeys(STAGES, 0.0)
        values: list[np.ndarray] = []
        for stage in range(holder.rounds):
            start = time.perf_counter()
            if stage == 0:
                upload, xq = holder.upload(x, widths[0][0][1])
                uploads, quantized = [bytes(upload)], [xq] * len(group)
            else:
                made = [holder.upload(v, w[stage][1]) for v, w in zip(values, widths, strict=True)]
                uploads, quantized = [bytes(u) for u, _ in made], [q for _, q in made]
            sent = time.perf_counter()
            replies = self._stage(group, uploads, stage + 1)
            back = time.perf_counter()
            values = [holder.download(reply, q, info.weight_scales[stage], *w[stage])  # type: ignore[index]
                      for reply, q, info, w in zip(replies, quantized, infos, widths, strict=True)]
            spent["encrypt"] += sent - start
            spent["evaluator"] += back - sent
            spent["decrypt"] += time.perf_counter() - back
        return values, spent

    def _stage(self, group: list[str], data: list[bytes], stage: int) -> list[bytes]:
        if len(group) == 1:
            return [self.transport.evaluate(group[0], data[0], stage)]
        return self.transport.evaluate_group(group, data, stage)


def siblings(modules: list[str]) -> dict[str, list[str]]:
    """For every module, the other modules of its `SHARED_INPUT` group in the same block."""
    served, out = set(modules), {}
    for name in modules:
        prefix, _, leaf = name.rpartition(".")
        for group in SHARED_INPUT:
            if leaf in group:
                out[name] = [f"{prefix}.{other}" if prefix else other for other in group
                             if other != leaf and (f"{prefix}.{other}" if prefix else other) in served]
    return {name: others for name, others in out.items() if others}


class AutoDeltas:
    """he.packing=auto: per call, slot or coefficient packing, whichever ran faster here for the call's
    module shape and token count (rounded up to a power of two). Like an FFT planner it measures
    rather than models: the first `TRIALS` calls of a (shape, tokens) bucket run both packings (in
    alternating order, so neither always pays for a cold start) and return the faster one's delta;
    later calls run the packing with the lower best time. Each plan is logged with both times and
    counted in `stats.calls_by_packing` (a trial call counts in both)."""

    TRIALS = 2

    def __init__(self, slots: HEDeltas, coefficients: CoefficientDeltas):
        if sorted(slots.modules) != sorted(coefficients.modules):
            raise HEError("auto packing needs both packings' sessions for the same modules")
        self.paths: dict[str, _Deltas] = {"slots": slots, "coefficients": coefficients}
        self.stats = HEStats()
        slots.stats = coefficients.stats = self.stats
        self.modules = coefficients.modules
        self.plans: dict[tuple[int, int, int, int], str] = {}  # (h_in, r, h_out, tokens bucket) → packing
        self._trials: dict[tuple[int, int, int, int], dict[str, list[float]]] = {}

    @property
    def holder(self) -> KeyHolder:
        """The slot key holder, whose parameter set the session's evidence records."""
        return self.paths["slots"].holder

    @property
    def observe(self) -> Callable[[str, float], None] | None:
        return self.paths["slots"].observe

    @observe.setter
    def observe(self, fn: Callable[[str, float], None] | None) -> None:
        for path in self.paths.values():
            path.observe = fn

    def delta(self, module: str, x: np.ndarray) -> np.ndarray:
        info = self.modules[module]
        key = (info.h_in, info.r, info.h_out, 1 << max(0, (x.shape[0] - 1).bit_length()))
        planned = self.plans.get(key)
        if planned is not None:
            return self.paths[planned].delta(module, x)
        trials = self._trials.setdefault(key, {packing: [] for packing in self.paths})
        order = list(self.paths) if len(trials["slots"]) % 2 == 0 else list(self.paths)[::-1]
        results = {}
        for packing in order:
            start = time.perf_counter()
            results[packing] = self.paths[packing].delta(module, x)
            trials[packing].append(time.perf_counter() - start)
        best = {packing: min(times) for packing, times in trials.items()}
        if len(trials["slots"]) >= self.TRIALS:
            self.plans[key] = min(best, key=best.__getitem__)
            del self._trials[key]
            log.info("he.packing=auto: %s for up to %d tokens of a %d × %d × %d module (best of %d: slots "
                     "%.4f s, coefficients %.4f s)", self.plans[key], key[3], *key[:3], self.TRIALS,
                     best["slots"], best["coefficients"])
        return results[min(trials, key=lambda packing: trials[packing][-1])]

    def close(self) -> None:
        for path in self.paths.values():
            path.close()


Deltas = HEDeltas | CoefficientDeltas | AutoDeltas


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
