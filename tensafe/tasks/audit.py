"""task=audit: train twice on data with inserted canaries — once without DP, once with the
configured DP-SGD — and report each canary's exposure side by side (Carlini et al. 2019).
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from typing import Any

from tensafe.config.schema import DPSGD, NoPrivacy
from tensafe.data.datasets import ChatDataset, build_datasets, records_digest
from tensafe.errors import ConfigError
from tensafe.models.loader import load_tokenizer
from tensafe.privacy.canaries import (
    canary_record,
    candidate_records,
    exposure,
    insert_canaries,
    make_canaries,
    score_sequences,
)
from tensafe.tasks.context import RunContext
from tensafe.training.pipeline import train_adapter


def _item_pair(item: dict) -> tuple:
    return item["input_ids"], item["labels"]


def run(ctx: RunContext) -> dict[str, Any]:
    cfg, task = ctx.cfg, ctx.cfg.task
    if not isinstance(cfg.privacy, DPSGD):
        raise ConfigError(
            "privacy",
            cfg.privacy.mechanism,
            "task=audit compares a non-private run with a DP run; use privacy=dp_sgd (it is the DP side)",
        )
    space = 10**task.canary_digits
    if task.num_candidates + task.num_canaries > space:
        raise ConfigError(
            "task.num_candidates",
            task.num_candidates,
            f"canaries + candidates must fit the {space} secrets of task.canary_digits={task.canary_digits}",
        )
    rng = random.Random(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    base = build_datasets(cfg.data, tokenizer, cfg.model.max_seq_len, cfg.seed)
    canaries = make_canaries(task.num_canaries, task.canary_digits, rng)
    train_records = insert_canaries(base.train.records, canaries, task.canary_repeats, rng)
    train = ChatDataset(train_records, tokenizer, cfg.model.max_seq_len)
    data = dataclasses.replace(base, train=train, train_size=len(train), digest=records_digest(train.records))
    candidates = candidate_records(task.num_candidates, task.canary_digits, rng, exclude=canaries)
    canary_set = ChatDataset([canary_record(s) for s in canaries], tokenizer, cfg.model.max_seq_len)
    candidate_set = ChatDataset(candidates, tokenizer, cfg.model.max_seq_len)

    arms = {"non_private": cfg.model_copy(update={"privacy": NoPrivacy(mechanism="none")}), "dp": cfg}
    report: dict[str, Any] = {
        "canaries": len(canaries),
        "canary_repeats": task.canary_repeats,
        "candidates": len(candidates),
        "space_bits": math.log2(space),
        "sampled_exposure_ceiling": math.log2(len(candidates) + 1),
    }
    for arm, arm_cfg in arms.items():
        result = train_adapter(arm_cfg, ctx.raw.logger, ctx.output_dir / arm, ctx.config_digest, data=data)
        batch = cfg.hardware.micro_batch_size
        canary_scores = score_sequences(result.model, _item_pair, canary_set.items, batch)
        cand_scores = score_sequences(result.model, _item_pair, candidate_set.items, batch)
        exposures = [exposure(s, cand_scores, space) for s in canary_scores]
        report[arm] = {
            **{
                k: result.metrics()[k]
                for k in ("epsilon", "delta", "steps", "eval_loss_before", "eval_loss_after")
            },
            "exposure_sampled": [e.sampled for e in exposures],
            "exposure_extrapolated": [e.extrapolated for e in exposures],
            "exposure_sampled_mean": statistics.fmean(e.sampled for e in exposures),
            "exposure_extrapolated_mean": statistics.fmean(e.extrapolated for e in exposures),
        }
    ctx.write_metrics(report)
    print(format_report(report), flush=True)
    return report


def format_report(r: dict[str, Any]) -> str:
    eps = r["dp"]["epsilon"]
    rows = [
        f"canary exposure (bits; chance ≈ 1, sampled ceiling {r['sampled_exposure_ceiling']:.1f}, "
        f"space {r['space_bits']:.1f}); {r['canaries']} canaries × {r['canary_repeats']} copies, "
        f"{r['candidates']} candidates",
        f"{'':14}{'no DP':>12}{f'DP ε={eps:.2f}':>14}",
    ]
    for label, key, digits in (
        ("sampled mean", "exposure_sampled_mean", 2),
        ("extrap. mean", "exposure_extrapolated_mean", 2),
        ("eval loss", "eval_loss_after", 4),
    ):
        rows.append(f"{label:14}{r['non_private'][key]:12.{digits}f}{r['dp'][key]:14.{digits}f}")
    return "\n".join(rows)
