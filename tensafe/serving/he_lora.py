"""HE-LoRA inside a model: the LoRA deltas of adapted layers go through the HE key holder.

The base projections run in plaintext. For each adapted module, PEFT's plaintext delta is switched
off and a forward hook adds the HE one instead: the key holder (this process: it owns the
activations and the secret key) packs the module's input tokens column-wise into the slots, the
evaluator computes s·X·A·B on ciphertexts, and the key holder decrypts and adds. All tokens of one
forward pass share the slots (split into several batches only beyond N/2).

Where the evaluator runs is a transport: `InProcessEvaluators` keeps it in this process, which is
the same party as the key holder and therefore protects nothing; it exists for tests and
benchmarks and says so in its name and repr.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from tensafe.he.backends.base import CKKSBackend
from tensafe.he.errors import HEError
from tensafe.he.lora import Evaluator, KeyHolder


class EvaluatorTransport(Protocol):
    """How serialized ciphertext batches reach a module's evaluator and come back."""

    def evaluate(self, module: str, data: bytes) -> bytes: ...


class InProcessEvaluators:
    """TEST/BENCHMARK MODE, PROTECTS NOTHING: evaluators in the key holder's own process."""

    protects_activations = False

    def __init__(self, evaluators: dict[str, Evaluator]):
        self.evaluators = evaluators

    def evaluate(self, module: str, data: bytes) -> bytes:
        return self.evaluators[module].evaluate_bytes(data)

    def __repr__(self) -> str:
        return (
            f"InProcessEvaluators({len(self.evaluators)} modules; "
            "same party as the key holder: protects nothing)"
        )


@dataclass
class HEStats:
    """What the HE path has done: module calls, tokens and seconds (encrypt + evaluate + decrypt)."""

    calls: int = 0
    tokens: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class LoRAFactors:
    """One adapted module's plaintext factors, as the evaluator holds them."""

    a: np.ndarray  # h_in × r
    b: np.ndarray  # r × h_out
    scale: float


def lora_factors(model: torch.nn.Module, modules: list[str] | None = None) -> dict[str, LoRAFactors]:
    """A, B and s of every PEFT LoRA module of the active adapter (or of the named `modules`)."""
    from peft.tuners.lora.layer import Linear as LoRALinear

    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear) or (modules is not None and name not in modules):
            continue
        (adapter,) = module.active_adapters
        a = module.lora_A[adapter].weight.detach().double().cpu().numpy().T
        b = module.lora_B[adapter].weight.detach().double().cpu().numpy().T
        found[name] = LoRAFactors(a, b, float(module.scaling[adapter]))
    missing = sorted(set(modules or []) - set(found))
    if missing or not found:
        raise HEError(f"no LoRA module named {missing} in this model" if missing else "the model has no LoRA")
    return found


class HELoRAHook:
    """Routes the LoRA deltas of `factors`' modules of a PEFT model through HE; `remove()` undoes it."""

    def __init__(
        self, model: torch.nn.Module, holder: KeyHolder, transport: EvaluatorTransport,
        factors: dict[str, LoRAFactors], input_bounds: dict[str, float] | None = None,
    ):
        self.holder, self.transport, self.stats = holder, transport, HEStats()
        self._input_bounds = input_bounds or {}
        self._handles, self._modules = [], []
        named = dict(model.named_modules())
        for name in factors:
            module = named[name]
            module.enable_adapters(False)  # PEFT now returns the base projection alone
            self._modules.append(module)
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable:
        def add_delta(module, args, output):
            x = args[0]
            delta = self.delta(name, x.detach().reshape(-1, x.shape[-1]).double().cpu().numpy())
            return output + torch.from_numpy(delta).to(output.dtype).reshape(output.shape).to(output.device)

        return add_delta

    def delta(self, name: str, x: np.ndarray) -> np.ndarray:
        """Δ for tokens x (t × h_in) through the key holder and the module's evaluator."""
        start = time.perf_counter()
        slots = self.holder.params.slots
        parts = []
        for first in range(0, x.shape[0], slots):
            chunk = x[first : first + slots]
            batch = self.holder.encrypt(chunk, self._input_bounds.get(name))
            reply = self.transport.evaluate(name, self.holder.to_bytes(batch))
            parts.append(self.holder.decrypt(self.holder.from_bytes(reply), chunk.shape[0]))
        self.stats.calls += 1
        self.stats.tokens += x.shape[0]
        self.stats.seconds += time.perf_counter() - start
        return np.concatenate(parts)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._modules:
            module.enable_adapters(True)
        self._handles, self._modules = [], []


def enable_in_process(
    model: torch.nn.Module, make_backend: Callable[[], CKKSBackend], modules: list[str] | None = None,
) -> HELoRAHook:
    """HE-LoRA with key holder and evaluators in this process (TEST/BENCHMARK MODE: protects nothing).

    Each evaluator gets its own backend instance and only the key holder's public context.
    """
    factors = lora_factors(model, modules)
    holder = KeyHolder(make_backend())
    context = holder.public_context()
    evaluators = {
        name: Evaluator(make_backend(), context, f.a, f.b, f.scale) for name, f in factors.items()
    }
    bounds = {name: e.input_bound for name, e in evaluators.items()}
    return HELoRAHook(model, holder, InProcessEvaluators(evaluators), factors, bounds)
