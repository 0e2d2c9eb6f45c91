"""task=evaluate: eval loss and perplexity of the base model vs an adapter on held-out data."""

from __future__ import annotations

from functools import partial
from typing import Any

from tensafe.config.schema import EvaluateTask
from tensafe.data.collate import collate
from tensafe.data.datasets import build_datasets
from tensafe.models.loader import load_model
from tensafe.models.lora import load_adapter
from tensafe.tasks.context import RunContext
from tensafe.training.hardware import apply_hardware
from tensafe.training.loss import evaluate_loss


def run(ctx: RunContext) -> dict[str, Any]:
    cfg, task = ctx.cfg, ctx.task_config(EvaluateTask)
    device = apply_hardware(cfg.hardware, dp=False)
    loaded = load_model(cfg.model, seed=cfg.seed)
    data = build_datasets(cfg.data, loaded.tokenizer, cfg.model.max_seq_len, cfg.seed)
    evaluate = partial(
        evaluate_loss,
        dataset=data.eval,
        collate=partial(collate, pad_token_id=loaded.tokenizer.pad_token_id),
        batch_size=cfg.hardware.micro_batch_size,
        max_examples=cfg.train.eval_max_examples,
        device=device,
    )
    base = evaluate(loaded.model.to(device))
    adapted = evaluate(load_adapter(loaded.model, task.adapter).to(device))
    metrics = {
        "adapter": task.adapter,
        "eval_examples": base["examples"],
        "eval_tokens": base["tokens"],
        "eval_loss_base": base["loss"],
        "eval_loss_adapter": adapted["loss"],
        "eval_perplexity_base": base["perplexity"],
        "eval_perplexity_adapter": adapted["perplexity"],
        "base_model_digest": loaded.digest,
    }
    ctx.write_metrics(metrics)
    print(
        f"{'':10}{'eval loss':>12}{'perplexity':>12}\n"
        f"{'base':10}{base['loss']:12.4f}{base['perplexity']:12.2f}\n"
        f"{'adapter':10}{adapted['loss']:12.4f}{adapted['perplexity']:12.2f}\n"
        f"({base['examples']} held-out examples, {base['tokens']} answer tokens)",
        flush=True,
    )
    return metrics
