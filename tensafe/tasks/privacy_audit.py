"""task=privacy_audit: train twice on data with inserted canaries, once without DP and once with
the configured DP-SGD, and report side by side what each model gives away:

- exposure (Carlini et al. 2019) of secrets inserted `exposure.repeats` times, beside the chance
  level measured on secrets the model never saw, and the group ε such repeated secrets really have;
- an empirical lower bound on ε from this one run (Steinke, Nasr, Jagielski 2023) from
  `one_run.canaries` secrets each inserted with probability ½, beside the accountant's ε. A bound
  above the reported ε means the reported ε does not hold.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from typing import Any

from tensafe.config.schema import DPSGD, NoPrivacy, PrivacyAuditTask
from tensafe.data.datasets import ChatDataset, build_datasets
from tensafe.errors import ConfigError
from tensafe.models.loader import load_tokenizer
from tensafe.privacy.accounting import default_delta
from tensafe.privacy.canaries import (
    ACCESS_CODE,
    canary_record,
    candidate_records,
    chance_exposure,
    exposure,
    insert_canaries,
    make_canaries,
    score_sequences,
)
from tensafe.privacy.group import group_epsilon
from tensafe.privacy.mechanisms import DPSGDMechanism
from tensafe.privacy.one_run_audit import audit
from tensafe.tasks.context import RunContext
from tensafe.training.pipeline import train_adapter


def _item_pair(item: dict) -> tuple:
    return item["input_ids"], item["labels"]


def run(ctx: RunContext) -> dict[str, Any]:
    cfg, task = ctx.cfg, ctx.task_config(PrivacyAuditTask)
    if not isinstance(cfg.privacy, DPSGD):
        raise ConfigError(
            "privacy",
            cfg.privacy.mechanism,
            "task=privacy_audit compares a non-private run with a DP run; use privacy=dp_sgd (the DP side)",
        )
    ex, one = task.exposure, task.one_run
    rng = random.Random(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    base = build_datasets(cfg.data, tokenizer, cfg.model.max_seq_len, cfg.seed)
    secrets = make_canaries(ex.canaries, ex.digits, rng)
    members = make_canaries(one.canaries, one.digits, rng, fmt=ACCESS_CODE)
    inserted = [rng.random() < 0.5 for _ in members]
    chosen = [ACCESS_CODE.record(s) for s, keep in zip(members, inserted) if keep]
    train_records = insert_canaries([*base.train.records, *chosen], secrets, ex.repeats, rng)
    train = ChatDataset(train_records, tokenizer, cfg.model.max_seq_len)
    if train.dropped:
        raise ConfigError("model.max_seq_len", cfg.model.max_seq_len, "cuts canaries away; raise it")
    data = dataclasses.replace(base, train=train, train_size=len(train))
    # Both arms are audited at the DP arm's δ (the same N).
    delta = cfg.privacy.delta if cfg.privacy.delta is not None else default_delta(len(train))
    space = 10**ex.digits
    sets = {
        "secrets": ChatDataset([canary_record(s) for s in secrets], tokenizer, cfg.model.max_seq_len),
        "candidates": ChatDataset(
            candidate_records(ex.candidates, ex.digits, rng, exclude=secrets),
            tokenizer,
            cfg.model.max_seq_len,
        ),
        "members": ChatDataset([ACCESS_CODE.record(s) for s in members], tokenizer, cfg.model.max_seq_len),
    }
    batch = cfg.hardware.micro_batch_size

    def scores(model, names=tuple(sets)) -> dict[str, list[float]]:
        return {name: score_sequences(model, _item_pair, sets[name].items, batch) for name in names}

    report: dict[str, Any] = {
        "exposure": {
            "canaries": len(secrets),
            "repeats": ex.repeats,
            "candidates": ex.candidates,
            "space_bits": math.log2(space),
            "sampled_ceiling": math.log2(ex.candidates + 1),
        },
        "one_run": {
            "canaries": len(members),
            "inserted": sum(inserted),
            "confidence": one.confidence,
            "delta": delta,
        },
    }
    arms = {"non_private": cfg.model_copy(update={"privacy": NoPrivacy(mechanism="none")}), "dp": cfg}
    reference: list[float] | None = None
    for arm, arm_cfg in arms.items():
        result = train_adapter(arm_cfg, ctx.raw.logger, ctx.output_dir / arm, ctx.config_digest, data=data)
        if reference is None:  # the base model is the same for both arms
            with result.model.disable_adapter():
                reference = scores(result.model, ("members",))["members"]
        got = scores(result.model)
        metrics = result.metrics().model_dump()
        report[arm] = {
            k: metrics[k] for k in ("epsilon", "delta", "steps", "eval_loss_base", "eval_loss_adapter")
        }
        report[arm].update(_exposure(got["secrets"], got["candidates"], space))
        # Membership score: how much more likely training made the canary than the base model found it.
        membership = [before - after for before, after in zip(reference, got["members"])]
        found = audit(membership, inserted, delta=delta, confidence=one.confidence)
        claimed = metrics["epsilon"]
        report[arm]["one_run"] = {
            "epsilon_lower_bound": found.epsilon_lower_bound,
            "guesses": found.guesses,
            "correct": found.correct,
            "guess_counts_tried": list(found.guess_counts_tried),
            "consistent_with_reported_epsilon": claimed is None or found.epsilon_lower_bound <= claimed,
        }
        mechanism = result.mechanism  # a claimed ε comes from DP-SGD's accountant
        report[arm]["group_epsilon"] = (
            group_epsilon(mechanism.accountant.history, ex.repeats, delta)
            if claimed is not None and isinstance(mechanism, DPSGDMechanism)
            else None
        )
    ctx.write_metrics(report)
    print(format_report(report), flush=True)
    return report


def _exposure(secret_scores: list[float], candidate_scores: list[float], space: int) -> dict[str, Any]:
    found = [exposure(s, candidate_scores, space) for s in secret_scores]
    chance_sampled, chance_extrapolated = chance_exposure(candidate_scores, space)
    return {
        "exposure_sampled": [e.sampled for e in found],
        "exposure_extrapolated": [e.extrapolated for e in found],
        "exposure_sampled_mean": statistics.fmean(e.sampled for e in found),
        "exposure_extrapolated_mean": statistics.fmean(e.extrapolated for e in found),
        "chance_sampled": chance_sampled,
        "chance_extrapolated": chance_extrapolated,
    }


def _eps(value: float | None) -> str:
    return "∞ (no DP)" if value is None else f"{value:.2f}"


def format_report(r: dict[str, Any]) -> str:
    ex, one, np_, dp = r["exposure"], r["one_run"], r["non_private"], r["dp"]
    row = "{:34}{:>14}{:>14}".format
    lines = [
        row("", "no DP", "DP"),
        row("ε per record (accountant)", _eps(np_["epsilon"]), _eps(dp["epsilon"])),
        f"exposure: {ex['canaries']} secrets × {ex['repeats']} copies, {ex['candidates']} candidates "
        f"(bits; sampled ceiling {ex['sampled_ceiling']:.1f}, space {ex['space_bits']:.1f})",
        row(
            f"  ε per secret ({ex['repeats']} copies, group)",
            _eps(np_["group_epsilon"]),
            _eps(dp["group_epsilon"]),
        ),
    ]
    for label, key in (
        ("  sampled mean", "exposure_sampled_mean"),
        ("  sampled, never-seen secrets", "chance_sampled"),
        ("  extrapolated mean", "exposure_extrapolated_mean"),
        ("  extrapolated, never-seen secrets", "chance_extrapolated"),
    ):
        lines.append(row(label, f"{np_[key]:.2f}", f"{dp[key]:.2f}"))
    lines += [
        f"one-run audit: {one['canaries']} canaries, {one['inserted']} inserted (each with probability 1/2), "
        f"{one['confidence']:.0%} confidence",
        row(
            "  ε lower bound",
            f"{np_['one_run']['epsilon_lower_bound']:.2f}",
            f"{dp['one_run']['epsilon_lower_bound']:.2f}",
        ),
        row(
            "  correct / guesses",
            f"{np_['one_run']['correct']}/{np_['one_run']['guesses']}",
            f"{dp['one_run']['correct']}/{dp['one_run']['guesses']}",
        ),
        row("eval loss", f"{np_['eval_loss_adapter']:.4f}", f"{dp['eval_loss_adapter']:.4f}"),
    ]
    bound = dp["one_run"]["epsilon_lower_bound"]
    if dp["one_run"]["consistent_with_reported_epsilon"]:
        lines.append(
            f"verdict: the DP run's ε = {dp['epsilon']:.2f} is consistent with the audit "
            f"(lower bound {bound:.2f})"
        )
    else:
        lines.append(
            f"verdict: PRIVACY VIOLATION: the audit shows ε ≥ {bound:.2f} at "
            f"{one['confidence']:.0%} confidence, above the reported ε = {dp['epsilon']:.2f}"
        )
    return "\n".join(lines)
