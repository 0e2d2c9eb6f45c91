"""Many LoRA adapters in one batch: the base projection once for all rows, each row's delta per adapter.

`MultiLoRA` wraps every adapted linear layer of the base model in a `MultiLoRALinear`. Before a
forward pass the engine routes the batch (`route`): which rows belong to which adapter. Each
wrapped layer then computes base(x) for the whole batch and adds, for every adapter group,
scale·x·Aᵀ·Bᵀ on that group's rows, in plaintext, or for the modules of an HE adapter through
the adapter's HE deltas (the engine is the key holder; all of the group's tokens share one encryption).
Rows of the base model get no delta. Adapters are added and removed between forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tensafe.serving.adapters import Adapter, LoRAFactors, check_fits
from tensafe.serving.he_lora import Deltas


@dataclass
class _Group:
    adapter: Adapter
    he: Deltas | None
    rows: torch.Tensor | None  # None: every row of the batch


class MultiLoRALinear(torch.nn.Module):
    """A base linear layer plus per-row LoRA deltas for the adapters routed through it."""

    def __init__(self, name: str, base: torch.nn.Linear, router: MultiLoRA):
        super().__init__()
        self.name, self.base, self._router = name, base, router
        self.factors: dict[str, LoRAFactors] = {}  # adapter name → this module's factors (model dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for group in self._router.groups:
            factors = self.factors.get(group.adapter.name)
            if factors is None:
                continue
            rows = x if group.rows is None else x.index_select(0, group.rows)
            if group.he is not None and self.name in group.he.modules:
                flat = rows.reshape(-1, rows.shape[-1]).detach().double().cpu().numpy()
                delta = torch.from_numpy(group.he.delta(self.name, flat)).to(out.dtype).to(out.device)
                delta = delta.reshape(*rows.shape[:-1], -1)
            else:
                delta = (rows @ factors.lora_a.T) @ factors.lora_b.T * factors.scale
            out = out + delta if group.rows is None else out.index_add(0, group.rows, delta)
        return out


class MultiLoRA:
    """The adapters a model serves, installed as wrapped layers, and the current batch's routing."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.adapters: dict[str, Adapter] = {}
        self.he: dict[str, Deltas] = {}
        self.groups: list[_Group] = []
        self._layers: dict[str, MultiLoRALinear] = {}
        self._param = next(model.parameters())

    def add(self, adapter: Adapter, he: Deltas | None = None) -> None:
        """Serve `adapter` (checked against the model); `he` routes its HE modules through the evaluator."""
        if adapter.name in self.adapters:
            raise ValueError(f"an adapter named {adapter.name!r} is already loaded")
        check_fits(adapter, self.model, f"serving.adapters.{adapter.name}")
        for module, factors in adapter.modules.items():
            layer = self._layers.get(module) or self._wrap(module)
            layer.factors[adapter.name] = LoRAFactors(
                factors.lora_a.to(self._param.dtype).to(self._param.device),
                factors.lora_b.to(self._param.dtype).to(self._param.device), factors.scale,
            )
        self.adapters[adapter.name] = adapter
        if he is not None:
            self.he[adapter.name] = he

    def remove(self, name: str) -> None:
        adapter = self.adapters.pop(name)
        for module in adapter.modules:
            self._layers[module].factors.pop(name, None)
        he = self.he.pop(name, None)
        if he is not None:
            he.close()

    def route(self, row_adapters: list[str | None]) -> None:
        """Route the next forward pass: row i runs under adapter row_adapters[i] (None: base model)."""
        names = {name for name in row_adapters if name is not None}
        self.groups = []
        for name in sorted(names):
            rows = None if len(names) == 1 and None not in row_adapters else torch.tensor(
                [i for i, a in enumerate(row_adapters) if a == name], device=self._param.device
            )
            self.groups.append(_Group(self.adapters[name], self.he.get(name), rows))

    def _wrap(self, module: str) -> MultiLoRALinear:
        parent_name, _, child = module.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layer = MultiLoRALinear(module, getattr(parent, child), self)
        setattr(parent, child, layer)
        self._layers[module] = layer
        return layer
