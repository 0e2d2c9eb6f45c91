"""Group privacy of DP-SGD: the ε that holds for k records added or removed together (a canary
inserted k times, a person with k records), by exact composition rather than the k·ε rule.

With Poisson sampling each of the k copies joins a step independently with probability q, so the
step's sensitivity is j·C with j ~ Binomial(k, q): a mixture-of-Gaussians mechanism, which
dominates the vector case (Choquette-Choo, Ganesh, Steinke, Thakurta 2023, Corollary 4.7).
Google's `dp_accounting` builds its privacy loss distribution (pessimistic, so an upper bound)
and composes the run's history.
"""

from __future__ import annotations

from collections.abc import Sequence

from scipy.stats import binom

from tensafe.privacy.accounting import Step

# The loss grid of the PLD: coarse enough to stay fast at ε ≈ 100, and an upper bound at any width.
_DISCRETIZATION = 1e-2


def group_epsilon(history: Sequence[Step], group_size: int, delta: float) -> float:
    """ε at `delta` for adding or removing `group_size` records at once, after `history`."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not history:
        return 0.0
    total = None
    sensitivities = list(range(group_size + 1))
    for sigma, q, steps in history:
        step = pld.from_mixture_gaussian_mechanism(
            standard_deviation=sigma,
            sensitivities=sensitivities,
            sampling_probs=binom.pmf(sensitivities, group_size, q).tolist(),
            value_discretization_interval=_DISCRETIZATION,
        )
        composed = step.self_compose(steps)
        total = composed if total is None else total.compose(composed)
    assert total is not None  # the history is not empty
    return float(total.get_epsilon_for_delta(delta))
