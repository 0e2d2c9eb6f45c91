"""Causal-LM losses on answer tokens (labels −100 elsewhere): per example for training, pooled for eval."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tensafe.data.collate import IGNORE_INDEX as IGNORE


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL [batch, T] and the mask of scored positions.

    The labels are shifted, not the logits: slicing [batch, T, vocab] logits would copy them.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view_as(targets)
    return nll, targets != IGNORE


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over each example's answer tokens: one loss per example (the unit DP protects)."""
    nll, mask = token_nll(logits, labels)
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    dataset,
    collate,
    batch_size: int,
    max_examples: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Token-weighted mean NLL and perplexity over the first `max_examples` of `dataset`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = min(len(dataset), max_examples)
    for start in range(0, n, batch_size):
        batch = collate([dataset[i] for i in range(start, min(n, start + batch_size))])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, mask = token_nll(logits, batch["labels"])
        total += float((nll * mask).sum())
        count += int(mask.sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "examples": n, "tokens": count}
