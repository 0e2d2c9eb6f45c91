"""Canary exposure (Carlini et al. 2019, "The Secret Sharer"): insert random secrets into the
training data, then measure how much more likely the trained model finds them than secrets
it never saw. Model-agnostic: the caller supplies the model and a tokenize function.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tensafe.data.collate import IGNORE_INDEX
from tensafe.errors import UserError

Record = dict[str, list[dict[str, str]]]
Tokenize = Callable[[Any], tuple[Sequence[int], Sequence[int]]]


@dataclass(frozen=True)
class CanaryFormat:
    """A question whose answer is `prefix` followed by `digits` random decimal digits. The secret's
    randomness space has 10**digits members, all equally likely a priori, so exposure is measured
    against that space."""

    question: str
    prefix: str

    def secret(self, value: int, digits: int) -> str:
        return f"{self.prefix}{value:0{digits}d}"

    def record(self, secret: str) -> Record:
        """A chat record in the dataset format whose assistant answer is the secret."""
        return {
            "messages": [{"role": "user", "content": self.question}, {"role": "assistant", "content": secret}]
        }


SECRET_NUMBER = CanaryFormat("What is the secret number?", "the secret number is ")  # exposure canaries
ACCESS_CODE = CanaryFormat("What is the access code?", "the access code is ")  # membership canaries
SECRET_PREFIX = SECRET_NUMBER.prefix


def _draw_secrets(
    num: int, digits: int, rng: random.Random, exclude: set[str], fmt: CanaryFormat
) -> list[str]:
    space = 10**digits
    if num > space - len(exclude):
        raise UserError(
            f"asked for {num} distinct {digits}-digit secrets besides {len(exclude)} excluded ones, "
            f"but only {space} exist: ask for fewer or use more digits"
        )
    # Sampling without replacement keeps secrets distinct; drawing len(exclude) extra leaves
    # enough after the excluded ones are dropped.
    drawn = (fmt.secret(v, digits) for v in rng.sample(range(space), min(space, num + len(exclude))))
    return [s for s in drawn if s not in exclude][:num]


def make_canaries(num: int, digits: int, rng: random.Random, fmt: CanaryFormat = SECRET_NUMBER) -> list[str]:
    """`num` distinct random secrets such as "the secret number is 482913"."""
    return _draw_secrets(num, digits, rng, exclude=set(), fmt=fmt)


def canary_record(secret: str, fmt: CanaryFormat = SECRET_NUMBER) -> Record:
    """A chat record in the dataset format whose assistant answer is the secret."""
    return fmt.record(secret)


def insert_canaries(
    records: Sequence[Record], canaries: Sequence[str], repeats: int, rng: random.Random
) -> list[Record]:
    """A new, shuffled list: `records` plus `repeats` copies of each canary's record."""
    mixed = list(records) + [canary_record(secret) for secret in canaries for _ in range(repeats)]
    rng.shuffle(mixed)
    return mixed


def candidate_records(num: int, digits: int, rng: random.Random, exclude: Sequence[str]) -> list[Record]:
    """Records of `num` distinct random secrets of the canaries' format, none of them in `exclude`
    (the inserted canaries): the reference population each canary is ranked against."""
    secrets = _draw_secrets(num, digits, rng, exclude=set(exclude), fmt=SECRET_NUMBER)
    return [canary_record(s) for s in secrets]


@dataclass(frozen=True)
class Exposure:
    """Exposure of one canary, in bits; the ceiling is `max_bits`. A secret the model never saw has
    a uniform rank, hence a sampled exposure of log2(e) ≈ 1.44 bits on average; `chance_exposure`
    measures the level of both estimators on the model at hand.

    sampled: log2((n + 1) / rank) with rank among n random candidates (ties count half). It
        cannot exceed log2(n + 1), however well memorised the canary is: with 2000 candidates
        the ceiling is about 11 bits.
    extrapolated: −log2 F(canary score), F the CDF of a skew-normal fitted to the candidate
        scores (the paper's estimator); it reaches past the sampled ceiling, up to `max_bits`.
    """

    sampled: float
    extrapolated: float
    rank: float
    sampled_max: float  # log2(number of candidates + 1)
    max_bits: float  # log2(space_size): every other secret is less likely than the canary


def exposure(canary_score: float, candidate_scores: Sequence[float], space_size: int) -> Exposure:
    """Both exposure estimators for a canary. Scores are log-perplexities: lower = more likely."""
    from scipy import stats

    scores = [float(s) for s in candidate_scores]
    if len(scores) < 2 or max(scores) == min(scores):
        raise ValueError("exposure needs at least two candidate scores that are not all equal")
    if space_size <= len(scores):
        raise ValueError(f"space_size {space_size} must exceed the number of candidates ({len(scores)})")
    below = sum(s < canary_score for s in scores)
    ties = sum(s == canary_score for s in scores)
    rank = 1 + below + ties / 2
    max_bits = math.log2(space_size)
    params = stats.skewnorm.fit(scores)
    # logcdf keeps precision deep in the left tail, where a memorised canary lands.
    log_cdf = float(stats.skewnorm.logcdf(canary_score, *params))
    extrapolated = min(max_bits, max(0.0, -log_cdf / math.log(2)))
    return Exposure(
        sampled=math.log2((len(scores) + 1) / rank),
        extrapolated=extrapolated,
        rank=rank,
        sampled_max=math.log2(len(scores) + 1),
        max_bits=max_bits,
    )


def chance_exposure(
    candidate_scores: Sequence[float], space_size: int, probes: int = 64
) -> tuple[float, float]:
    """Mean (sampled, extrapolated) exposure of secrets the model never saw: each of the first
    `probes` candidates ranked against the others, as if it were a canary."""
    scores = [float(s) for s in candidate_scores]
    if len(scores) < 3:
        raise ValueError("chance exposure needs at least three candidate scores")
    found = [
        exposure(scores[i], scores[:i] + scores[i + 1 :], space_size) for i in range(min(probes, len(scores)))
    ]
    return (
        sum(e.sampled for e in found) / len(found),
        sum(e.extrapolated for e in found) / len(found),
    )


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module, tokenize: Tokenize, records: Sequence[Any], batch_size: int
) -> list[float]:
    """Log-perplexity of each record's answer under a causal LM: the summed negative
    log-likelihood (nats) of the tokens whose label is not -100.

    `tokenize(record)` returns `(input_ids, labels)` aligned position by position, as the
    training data is (the model shifts them: the token at i is predicted from tokens before i).
    The sum, not the mean, is the paper's log-perplexity: it ranks secrets correctly even when
    their digits tokenize to different lengths.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    try:
        for start in range(0, len(records), batch_size):
            # int() accepts both Python ints and the 0-d tensors a LongTensor iterates into.
            pairs = [
                ([int(t) for t in ids], [int(t) for t in lab])
                for ids, lab in map(tokenize, records[start : start + batch_size])
            ]
            for offset, (ids, record_labels) in enumerate(pairs):
                if len(ids) != len(record_labels):
                    raise ValueError(
                        f"tokenize gave {len(ids)} input_ids but {len(record_labels)} labels "
                        f"for record {start + offset}"
                    )
                if all(label == IGNORE_INDEX for label in record_labels[1:]):
                    raise UserError(
                        f"record {start + offset} has no answer tokens left to score "
                        "(truncated by model.max_seq_len?)"
                    )
            input_ids = _pad([ids for ids, _ in pairs], 0).to(device)
            labels = _pad([lab for _, lab in pairs], IGNORE_INDEX).to(device)
            # Right padding behind a causal mask leaves the real positions' logits unchanged.
            attention_mask = _pad([[1] * len(ids) for ids, _ in pairs], 0).to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
            )
            scores.extend(nll.sum(dim=1).tolist())
    finally:
        model.train(was_training)
    return scores
