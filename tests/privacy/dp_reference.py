"""The brute-force DP-SGD reference (loop over examples, clip each, sum) and the framework's
path through Opacus, side by side, for the gradient-equality tests."""

from __future__ import annotations

import torch

from tensafe.data.collate import collate
from tensafe.privacy.dp_sgd import DPGradient, per_sample_gradient_module
from tensafe.privacy.randomness import SeededRandom
from tensafe.training.loss import per_example_loss


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def brute_force(model, examples, clip_norm: float, pad_id: int):
    """(Σ_i clip(∇ loss_i) / n, per-example norms), one example at a time, no padding."""
    params = trainable(model)
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for ex in examples:
        batch = collate([ex], pad_token_id=pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        grads = torch.autograd.grad(per_example_loss(logits, batch["labels"]).sum(), params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, clip_norm / (float(norm) + 1e-6))
        for t, g in zip(total, grads):
            t.add_(g * factor)
    return [t / len(examples) for t in total], torch.stack(norms)


def framework(model, examples, clip_norm: float, pad_id: int, mode: str, micro_batch: int):
    """(the DP gradient with σ = 0 through Opacus per-sample gradients, per-example norms)."""
    params = trainable(model)
    wrapped = per_sample_gradient_module(model, mode)
    dp = DPGradient(
        params,
        noise_multiplier=0.0,
        max_grad_norm=clip_norm,
        expected_batch_size=len(examples),
        rng=SeededRandom(0),
    )
    dp.begin()
    norms = []
    for start in range(0, len(examples), micro_batch):
        batch = collate(examples[start : start + micro_batch], pad_token_id=pad_id)
        logits = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_example_loss(logits, batch["labels"]).sum().backward()
        norms.append(dp.clip_and_accumulate())
    dp.finalize(step=0)
    grads = [p.grad.clone() for p in params]
    wrapped._close()
    return grads, torch.cat(norms)


def assert_dp_gradient_matches(
    model, examples, pad_id: int, mode: str, micro_batch: int, rtol: float, atol: float
):
    """Clip at the median norm (some examples clipped, some not) and compare both paths."""
    _, norms = brute_force(model, examples, clip_norm=1e9, pad_id=pad_id)
    clip = float(norms.median())
    assert (norms > clip).sum() >= 1 and (norms < clip).sum() >= 1
    expected, _ = brute_force(model, examples, clip_norm=clip, pad_id=pad_id)
    got, got_norms = framework(model, examples, clip, pad_id, mode, micro_batch)
    torch.testing.assert_close(got_norms, norms, rtol=1e-4, atol=1e-6)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol)
