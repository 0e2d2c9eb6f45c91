"""The one-run audit's statistics (Steinke, Nasr, Jagielski 2023) against exact binomial tails."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from tensafe.privacy.one_run_audit import audit, epsilon_lower_bound, guess_counts, p_value


def _exact_tail(r: int, v: int, q: float) -> float:
    """P[Binomial(r, q) ≥ v] in exact rational arithmetic."""
    qf = Fraction(q)
    return float(sum(math.comb(r, j) * qf**j * (1 - qf) ** (r - j) for j in range(v, r + 1)))


def _exact_pmf(r: int, j: int, q: float) -> Fraction:
    qf = Fraction(q)
    return math.comb(r, j) * qf**j * (1 - qf) ** (r - j)


@pytest.mark.parametrize(
    "r,v,eps", [(10, 10, 1.0), (40, 31, 0.7), (100, 62, 0.2), (64, 64, 3.0), (7, 0, 1.0)]
)
def test_p_value_without_delta_is_the_exact_binomial_tail(r, v, eps):
    q = 1 / (1 + math.exp(-eps))
    assert p_value(200, r, v, eps, 0.0) == pytest.approx(_exact_tail(r, v, q), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("r,v,eps,delta", [(20, 17, 0.8, 1e-5), (60, 45, 0.5, 1e-4), (30, 30, 2.0, 1e-3)])
def test_p_value_with_delta_adds_the_papers_term_computed_by_brute_force(r, v, eps, delta):
    m = 3 * r
    q = 1 / (1 + math.exp(-eps))
    alpha = max(sum(_exact_pmf(r, j, q) for j in range(v - i, v)) / i for i in range(1, v + 1))
    expected = min(1.0, _exact_tail(r, v, q) + 2 * m * delta * float(alpha))
    assert p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("r,v,delta", [(20, 20, 0.0), (64, 60, 0.0), (200, 150, 1e-5), (40, 33, 1e-6)])
def test_lower_bound_sits_where_the_exact_tail_crosses_the_level(r, v, delta):
    confidence = 0.95
    eps = epsilon_lower_bound(2 * r, r, v, delta, confidence)
    assert eps > 0
    below, above = p_value(2 * r, r, v, eps, delta), p_value(2 * r, r, v, eps + 1e-6, delta)
    assert below < 1 - confidence <= above
    if delta == 0:  # the crossing checked with exact arithmetic, not scipy
        assert (
            _exact_tail(r, v, 1 / (1 + math.exp(-eps)))
            < 0.05
            <= _exact_tail(r, v, 1 / (1 + math.exp(-eps - 1e-6)))
        )


def test_all_guesses_right_gives_the_closed_form_bound():
    # v = r: P = q^r < β  ⇔  ε < ln(β^(1/r) / (1 − β^(1/r))).
    r, beta = 20, 0.05
    root = beta ** (1 / r)
    assert epsilon_lower_bound(r, r, r, 0.0, 1 - beta) == pytest.approx(math.log(root / (1 - root)), abs=1e-8)


def test_guessing_at_chance_refutes_nothing():
    assert epsilon_lower_bound(100, 100, 50, 1e-5, 0.95) == 0.0


def test_audit_of_perfect_scores_beats_small_epsilon_and_of_random_scores_does_not():
    rng = random.Random(0)
    inserted = [rng.random() < 0.5 for _ in range(256)]
    perfect = audit([float(x) + rng.random() * 0.1 for x in inserted], inserted, delta=1e-5, confidence=0.95)
    assert perfect.correct == perfect.guesses >= 128 and perfect.epsilon_lower_bound > 3
    noise = audit([rng.random() for _ in inserted], inserted, delta=1e-5, confidence=0.95)
    assert noise.epsilon_lower_bound < 1
    assert perfect.guess_counts_tried == guess_counts(256) == (16, 32, 64, 128, 256)


def test_random_scores_keep_the_bound_at_zero_at_the_stated_rate():
    """Under the null (scores independent of membership: a 0-DP release), a 95% bound is positive in
    at most ~5% of trials."""
    rng = random.Random(1)
    positive = 0
    for _ in range(200):
        inserted = [rng.random() < 0.5 for _ in range(64)]
        positive += (
            audit([rng.random() for _ in inserted], inserted, delta=0.0, confidence=0.95).epsilon_lower_bound
            > 0
        )
    assert positive <= 20  # 5% of 200 is 10; binomial sd ≈ 3
