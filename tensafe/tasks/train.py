"""task=train: fine-tune a LoRA adapter (DP-SGD or plain) and report ε, δ and eval loss."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tensafe.security.context import SecurityContext
from tensafe.security.events import BUDGET_STOP, CHECKPOINT, TRAIN_END, TRAIN_START
from tensafe.security.evidence import training_statement
from tensafe.tasks.context import RunContext
from tensafe.training.metrics import TrainMetrics
from tensafe.training.pipeline import train_adapter


def format_summary(m: TrainMetrics) -> str:
    if m.epsilon is None:
        privacy = "privacy: none (no differential privacy guarantee)"
    else:
        privacy = (
            f"privacy: (ε = {m.epsilon:.3f}, δ = {m.delta:.2e})-DP  "
            f"[σ = {m.noise_multiplier:.3f}, C = {m.max_grad_norm}, q = {m.sample_rate:.4f}, "
            f"{m.steps} steps, {m.accountant} accountant]"
        )
    lines = [
        privacy,
        f"eval loss: {m.eval_loss_base:.4f} (base) -> {m.eval_loss_adapter:.4f} (adapter)   "
        f"perplexity {m.eval_perplexity_base:.2f} -> {m.eval_perplexity_adapter:.2f}",
        f"adapter: {m.adapter_dir}",
        f"privacy ledger: {m.privacy_ledger}",
    ]
    if m.stopped_by_budget:
        lines.insert(1, "stopped early: the next step would have exceeded privacy.max_epsilon")
    return "\n".join(lines)


@dataclass
class FitOutcome:
    """What training leaves for the rest of the task, wherever it ran."""

    metrics: TrainMetrics
    ledger_path: Path
    stopped_by_budget: bool


def fit_here(ctx: RunContext) -> FitOutcome:
    """Train in this process (launcher=local)."""
    result = train_adapter(ctx.cfg, ctx.raw.logger, ctx.output_dir, ctx.config_digest)
    return FitOutcome(result.metrics(), result.ledger_path, result.stopped_by_budget)


def run(ctx: RunContext, fit: Callable[[RunContext], FitOutcome] = fit_here) -> dict[str, Any]:
    """Train with `fit` (here, or as a Ray Train job: launchers/ray.py), then record, package and
    summarize in this process."""
    security = SecurityContext(ctx.cfg.security)
    if ctx.cfg.train.package:
        security.signer("sign the package")  # fail before training, not after
    security.record(TRAIN_START, {"output_dir": str(ctx.output_dir), "config_digest": ctx.config_digest,
                                    "model": ctx.cfg.model.name, "mechanism": ctx.cfg.privacy.mechanism})
    result = fit(ctx)
    metrics = result.metrics
    checkpoints = sorted((ctx.output_dir / "checkpoints").glob("step-*"))
    for folder in checkpoints:
        security.record(CHECKPOINT, {"path": str(folder)})
    if result.stopped_by_budget:
        security.record(BUDGET_STOP, {"epsilon": metrics.epsilon, "steps": metrics.steps})
    security.record(TRAIN_END, {"config_digest": ctx.config_digest, "adapter_dir": metrics.adapter_dir,
                                  "epsilon": metrics.epsilon, "delta": metrics.delta,
                                  "base_model_digest": metrics.base_model_digest})
    if ctx.cfg.train.package:
        ctx.write_metrics(metrics.model_dump())  # the package carries metrics.json's base-model digest
        manifest = security.package_run(ctx.output_dir, ctx.output_dir / "adapter.tssp")
        metrics.package, metrics.package_id = str(ctx.output_dir / "adapter.tssp"), manifest["package_id"]
    packages = [Path(metrics.package)] if metrics.package else []
    resolved = OmegaConf.to_container(ctx.raw, resolve=True)
    assert isinstance(resolved, dict)
    evidence = security.evidence(training_statement(
        ctx.output_dir, ctx.config_digest, resolved, metrics.model_dump(),
        json.loads(result.ledger_path.read_text()), packages, security.audit_head(),
    ), ctx.output_dir / "evidence.json")
    metrics.evidence = str(evidence) if evidence else None
    security.sign_head(ctx.output_dir / "audit_head.json")
    ctx.write_metrics(metrics.model_dump())
    print(format_summary(metrics), flush=True)
    for key, value in (("package", metrics.package), ("evidence", metrics.evidence)):
        if value:
            print(f"{key}: {value}", flush=True)
    return metrics.model_dump()
