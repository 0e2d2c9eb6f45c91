"""task=train: fine-tune a LoRA adapter (DP-SGD or plain) and report ε, δ and eval loss."""

from __future__ import annotations

from typing import Any

from tensafe.tasks.context import RunContext
from tensafe.training.pipeline import train_adapter


def format_summary(m: dict[str, Any]) -> str:
    if m["epsilon"] is None:
        privacy = "privacy: none (no differential privacy guarantee)"
    else:
        privacy = (
            f"privacy: (ε = {m['epsilon']:.3f}, δ = {m['delta']:.2e})-DP  "
            f"[σ = {m['noise_multiplier']:.3f}, C = {m['max_grad_norm']}, q = {m['sample_rate']:.4f}, "
            f"{m['steps']} steps, {m['accountant']} accountant]"
        )
    lines = [
        privacy,
        f"eval loss: {m['eval_loss_before']:.4f} (base) -> {m['eval_loss_after']:.4f} (adapter)   "
        f"perplexity {m['eval_perplexity_before']:.2f} -> {m['eval_perplexity_after']:.2f}",
        f"adapter: {m['adapter_dir']}",
        f"privacy ledger: {m['privacy_ledger']}",
    ]
    if m.get("stopped_by_budget"):
        lines.insert(1, "stopped early: the next step would have exceeded privacy.max_epsilon")
    return "\n".join(lines)


def run(ctx: RunContext) -> dict[str, Any]:
    result = train_adapter(ctx.cfg, ctx.raw.logger, ctx.output_dir, ctx.config_digest)
    metrics = result.metrics()
    ctx.write_metrics(metrics)
    print(format_summary(metrics), flush=True)
    return metrics
