"""The DP-SGD gradient (docs/privacy.md): clip each example's gradient to C, sum, add N(0, σ²C²),
divide by the expected batch size. Per-example gradients come from Opacus.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from tensafe.privacy.randomness import SecureRandom, SeededRandom, gaussian_like

GRAD_SAMPLE_MODES = ("hooks", "functorch")


def per_sample_gradient_module(model: torch.nn.Module, mode: str):
    """Wrap `model` so each trainable parameter gets `.grad_sample` [batch, *shape] on backward."""
    from opacus import GradSampleModule

    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {mode!r}")
    return GradSampleModule(
        model, batch_first=True, loss_reduction="sum", force_functorch=(mode == "functorch")
    )


def _accumulation_dtype(p: torch.Tensor) -> torch.dtype:
    """Clipping and noise run in float32 or wider, whatever the training precision."""
    return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32


def _no_autocast(device: torch.device):
    # Lightning runs training_step under autocast for *-mixed precision, where einsum would
    # drop to bf16/fp16 and a clipped contribution could leave the ball of radius C.
    return torch.autocast(device_type=device.type, enabled=False)


class NoiseAggregator(Protocol):
    """Turns the clipped sums of a logical batch into their noisy sum (over all workers of a
    distributed job; tensafe.privacy.distributed)."""

    noise: str  # the noise distribution: "gaussian" or "skellam"
    attempt: str  # the distributed attempt it belongs to ("" in one process)

    def noisy_sum(self, summed: Sequence[torch.Tensor], step: int) -> list[torch.Tensor]: ...


class LocalGaussian:
    """One process: Σ clipped + N(0, std²), with the noise stream of optimizer step `step`."""

    noise = "gaussian"
    attempt = ""

    def __init__(self, std: float, rng: SeededRandom | SecureRandom):
        self.std, self.rng = std, rng

    def noisy_sum(self, summed: Sequence[torch.Tensor], step: int) -> list[torch.Tensor]:
        if self.std <= 0:
            return list(summed)
        draws = self.rng.for_step("noise", step)
        return [total + gaussian_like(draws, total, self.std) for total in summed]


class DPGradient:
    """Builds the noisy gradient of one logical batch from its micro-batches.

    Norms, clip factors, the clipped sum and the noise are computed in float32 (or float64) with
    autocast off, so every clipped contribution has norm ≤ C up to float32 rounding even when the
    per-example gradients come out of a bf16 or fp16 forward.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        rng: SeededRandom | SecureRandom,
        aggregator: NoiseAggregator | None = None,
    ):
        self.params = list(params)
        self.noise_multiplier, self.max_grad_norm = noise_multiplier, max_grad_norm
        self.expected_batch_size, self.rng = expected_batch_size, rng
        self.aggregator = aggregator or LocalGaussian(noise_multiplier * max_grad_norm, rng)
        self.summed: list[torch.Tensor] = []
        self.num_examples = 0

    def begin(self) -> None:
        self.summed = [torch.zeros_like(p, dtype=_accumulation_dtype(p)) for p in self.params]
        self.num_examples = 0

    def clip_and_accumulate(self) -> torch.Tensor:
        """Consume the parameters' `.grad_sample`, add the clipped per-example sum; return the norms."""
        grad_samples = [getattr(p, "grad_sample", None) for p in self.params]  # set by Opacus
        if any(not isinstance(g, torch.Tensor) for g in grad_samples):
            # Opacus keeps a list when two backward passes ran without a clip in between: the
            # examples of both would be mixed into one clip. Refuse instead of guessing.
            raise RuntimeError(
                "per-sample gradients of more than one backward pass are pending; "
                "call clip_and_accumulate() after every backward"
            )
        tensors = [g for g in grad_samples if isinstance(g, torch.Tensor)]  # every one, checked above
        with _no_autocast(self.params[0].device):
            samples = [g.to(t.dtype) for g, t in zip(tensors, self.summed, strict=True)]
            batch = samples[0].shape[0]
            per_param = torch.stack([g.reshape(batch, -1).norm(2, dim=1) for g in samples], dim=1)
            norms = per_param.norm(2, dim=1)
            clip = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            for total, g in zip(self.summed, samples):
                total.add_(torch.einsum("i,i...->...", clip.to(g.dtype), g))
        for p in self.params:
            p.grad_sample = None  # type: ignore[attr-defined]  # Opacus' per-example gradients
            p.grad = None
        self.num_examples += batch
        return norms

    def finalize(self, step: int) -> None:
        """Set each parameter's `.grad` to (Σ clipped + N(0, σ²C²)) / expected batch size, with
        the noise of optimizer step `step` (summed over the workers by the aggregator)."""
        with _no_autocast(self.params[0].device):
            noisy_sums = self.aggregator.noisy_sum(self.summed, step)
            for p, noisy in zip(self.params, noisy_sums, strict=True):
                p.grad = (noisy / self.expected_batch_size).to(p.dtype)
        self.summed = []
