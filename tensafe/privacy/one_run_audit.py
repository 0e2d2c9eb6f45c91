"""An empirical lower bound on ε from one training run (Steinke, Nasr, Jagielski, "Privacy
Auditing with One (1) Training Run", NeurIPS 2023).

m canaries are each inserted with probability ½. After training, the auditor guesses "in" for
the k₊ highest membership scores and "out" for the k₋ lowest and abstains on the rest. If
training is (ε, δ)-DP for each record, the number of correct guesses V among r = k₊ + k₋ is at most
Binomial(r, e^ε / (1 + e^ε)) plus a δ term (their Theorem 3.1 and Appendix D), so a V that is
unlikely under that law refutes (ε, δ)-DP: the largest ε refuted at the chosen confidence is the
lower bound. A bound above the accountant's ε means the reported ε is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

_BISECTION_STEPS = 60


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of at least `v` correct guesses out of `r` (among `m` canaries) if training is
    (ε, δ)-DP: P[Binomial(r, q) ≥ v] + 2mδ·max_{1≤i≤v} P[v−i ≤ Binomial(r, q) < v] / i,
    with q = e^ε / (1 + e^ε), the accuracy of ε-DP randomized response."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need ε >= 0 and δ in [0, 1], got ε={epsilon}, δ={delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(1.0, tail)
    below = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v−1], P[B = v−2], …, P[B = 0]
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The largest ε (to about 1e-9) that `v` correct guesses out of `r` refute at `confidence`:
    p_value(ε) < 1 − confidence. 0 when not even ε = 0 is refuted."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    level = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < level:  # ends: P[Binomial(r, q) ≥ v] → 1 as ε grows
        lo, hi = hi, 2 * hi
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < level:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class AuditResult:
    canaries: int  # m
    inserted: int  # how many of them the coin put into training
    guesses: int  # r = k₊ + k₋ of the best guess count
    correct: int  # v
    epsilon_lower_bound: float
    confidence: float  # overall, after the Bonferroni correction over the guess counts tried
    guess_counts_tried: tuple[int, ...]


def guess_counts(m: int) -> tuple[int, ...]:
    """The guess counts r the audit tries, fixed before looking at scores: m/16 … m, even."""
    counts = sorted({max(2, (m // d) & ~1) for d in (16, 8, 4, 2, 1)})
    return tuple(c for c in counts if c <= m)


def audit(scores: Sequence[float], inserted: Sequence[bool], delta: float, confidence: float) -> AuditResult:
    """Guess membership from `scores` (higher: more likely trained on) and bound ε.

    For each r in `guess_counts(m)` the auditor guesses "in" for the r/2 highest scores and "out"
    for the r/2 lowest; the best bound is reported at `confidence` overall, each r being tested at
    1 − (1 − confidence)/len(counts) (Bonferroni), since r is chosen after seeing the scores.
    """
    scores_arr, truth = np.asarray(scores, dtype=float), np.asarray(inserted, dtype=bool)
    m = len(scores_arr)
    if m != len(truth) or m < 2:
        raise ValueError(
            f"need one membership flag per score and at least 2 canaries, got {m} and {len(truth)}"
        )
    order = np.argsort(-scores_arr, kind="stable")
    counts = guess_counts(m)
    each = 1 - (1 - confidence) / len(counts)
    best = (-1.0, 0, 0)
    for r in counts:
        top, bottom = order[: r // 2], order[m - r // 2 :]
        correct = int(truth[top].sum() + (~truth[bottom]).sum())
        bound = epsilon_lower_bound(m, r, correct, delta, each)
        if bound > best[0]:
            best = (bound, r, correct)
    return AuditResult(
        canaries=m,
        inserted=int(truth.sum()),
        guesses=best[1],
        correct=best[2],
        epsilon_lower_bound=best[0],
        confidence=confidence,
        guess_counts_tried=counts,
    )
