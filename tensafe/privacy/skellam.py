"""The Skellam mechanism of distributed DP-SGD under secure aggregation: integer noise that workers
add in shares, and its accountant.

Sk(μ) is Poisson(μ/2) − Poisson(μ/2), integer-valued with variance μ. Independent Skellams add:
Sk(μ₁) + Sk(μ₂) = Sk(μ₁ + μ₂). So n workers that each add Sk(μ / (n − t)) give the sum at least
Sk(μ) even when t of them subtract their own share afterwards (Agarwal, Kairouz, Liu, "The
Skellam Mechanism for Differentially Private Federated Learning", NeurIPS 2021).

Its Rényi DP for integer orders α > 1, an integer-valued query of ℓ₂ sensitivity Δ₂ and ℓ₁
sensitivity Δ₁ and per-coordinate variance μ (ibid., Corollary 3.6):

    ε(α) ≤ α·Δ₂²/(2μ) + min( ((2α − 1)·Δ₂² + 6·Δ₁) / (4μ²),  3·Δ₁/(2μ) ).

The first term is the Gaussian's RDP at noise multiplier σ = √μ/Δ₂; the second is what the
discreteness costs, negligible when μ is large. Poisson subsampling at rate q is accounted by the
general upper bound of Zhu & Wang ("Poisson Subsampled Rényi Differential Privacy", ICML 2019,
Theorem 6), and (ε, δ) by the same RDP conversion the Gaussian RDP accountant uses.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import gammaln, logsumexp

from tensafe.privacy.accounting import (
    AccountingError,
    Step,
    StepHistory,
    _appended,
    _check_delta_range,
    _check_step,
    smallest_sigma,
)

NAME = "skellam_rdp"
# Integer orders only: the Skellam bound and the subsampling bound are stated for them.
ORDERS: tuple[int, ...] = (*range(2, 65), 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass(frozen=True)
class Sensitivity:
    """ℓ₂ and ℓ₁ sensitivity of the quantized (integer) clipped sum, in quantization units."""

    l2: float
    l1: float

    def __post_init__(self) -> None:
        if not (self.l2 >= 1 and self.l1 >= 1 and math.isfinite(self.l2) and math.isfinite(self.l1)):
            raise ValueError(f"integer-domain sensitivities are >= 1 and finite, got {self}")


def skellam_rdp(alpha: int, sensitivity: Sensitivity, variance: float) -> float:
    """RDP of order α of adding Sk(variance) to each coordinate (Corollary 3.6 above)."""
    l2sq, l1, mu = sensitivity.l2**2, sensitivity.l1, variance
    return alpha * l2sq / (2 * mu) + min(((2 * alpha - 1) * l2sq + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))


def subsampled_rdp(alpha: int, q: float, rdp_of: Any) -> float:
    """Zhu & Wang's Theorem 6: RDP of order α of a mechanism with RDP curve `rdp_of` (a function of
    integer orders) run on a Poisson sample at rate q. Never above the mechanism's own RDP."""
    full = float(rdp_of(alpha))
    if q == 1:
        return full
    log_q, log_1q = math.log(q), math.log1p(-q)

    def log_comb(n: int, k: int) -> float:
        return float(gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1))

    terms = [
        (alpha - 1) * log_1q + math.log(alpha * q - q + 1),
        log_comb(alpha, 2) + 2 * log_q + (alpha - 2) * log_1q + float(rdp_of(2)),
    ]
    terms += [
        math.log(3)
        + log_comb(alpha, ell)
        + ell * log_q
        + (alpha - ell) * log_1q
        + (ell - 1) * float(rdp_of(ell))
        for ell in range(3, alpha + 1)
    ]
    return min(float(logsumexp(terms)) / (alpha - 1), full)


def rdp_to_epsilon(rdp: Sequence[float], orders: Sequence[int], delta: float) -> float:
    """(ε, δ) from an RDP curve: the conversion of Opacus' RDP accountant (Balle et al. 2020)."""
    import warnings

    from opacus.accountants.analysis.rdp import get_privacy_spent

    with warnings.catch_warnings():
        # Only integer orders >= 2 are valid here; an optimum at 2 is still a valid bound.
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        eps, _ = get_privacy_spent(orders=[float(a) for a in orders], rdp=list(rdp), delta=delta)
    return float(eps)


class SkellamAccountant(StepHistory):
    """RDP composition of Poisson-subsampled Skellam steps for one quantization geometry.

    The history holds (σ, q, steps) like the Gaussian accountant's, with σ relative to the integer
    ℓ₂ sensitivity: each step's aggregate noise is Sk(μ) per coordinate with μ = (σ·Δ₂)².
    """

    name = NAME

    def __init__(self, sensitivity: Sensitivity):
        super().__init__()
        self.sensitivity = sensitivity

    def variance(self, noise_multiplier: float) -> float:
        return (noise_multiplier * self.sensitivity.l2) ** 2

    def rdp(self, history: Sequence[Step]) -> list[float]:
        curve = [0.0] * len(ORDERS)
        for sigma, q, n in history:
            mu = self.variance(sigma)
            cache: dict[int, float] = {}

            def rdp_of(alpha: int, mu: float = mu, cache: dict[int, float] = cache) -> float:
                if alpha not in cache:
                    cache[alpha] = skellam_rdp(alpha, self.sensitivity, mu)
                return cache[alpha]

            for i, alpha in enumerate(ORDERS):
                curve[i] += n * subsampled_rdp(alpha, q, rdp_of)
        return curve

    def epsilon(self, delta: float) -> float:
        _check_delta_range(delta)
        if not self._history:
            return 0.0
        return rdp_to_epsilon(self.rdp(self._history), ORDERS, delta)

    def epsilon_if(
        self, noise_multiplier: float, sample_rate: float, extra_steps: int, delta: float
    ) -> float:
        _check_step(noise_multiplier, sample_rate, extra_steps)
        future = _appended(self._history, noise_multiplier, sample_rate, extra_steps)
        return rdp_to_epsilon(self.rdp(future), ORDERS, delta) if future else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.name,
            "history": [list(entry) for entry in self._history],
            "l2_sensitivity": self.sensitivity.l2,
            "l1_sensitivity": self.sensitivity.l1,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            sensitivity = Sensitivity(float(state["l2_sensitivity"]), float(state["l1_sensitivity"]))
            entries = [(float(s), float(q), n) for s, q, n in state["history"]]
        except (KeyError, TypeError, ValueError) as err:
            raise AccountingError(
                f"a {NAME} accountant state holds 'history' triples and the l2/l1 sensitivities; "
                f"got {state!r} ({err})"
            ) from None
        if sensitivity != self.sensitivity:
            raise AccountingError(
                f"accountant state was written for sensitivity {sensitivity}, this run quantizes with "
                f"{self.sensitivity}"
            )
        self._load_history(entries)


def skellam_noise(shape: int, variance: float, secure: bool, seed: Sequence[int] = ()) -> np.ndarray:
    """Sk(variance) per coordinate as int64. Secure: Poissons from ChaCha20 (randomgen) keyed from
    os.urandom, fresh at every call; otherwise from PCG64 seeded by the integers `seed` (research runs)."""
    if not (variance > 0 and math.isfinite(variance)):
        raise ValueError(f"Skellam variance must be a finite number > 0, got {variance}")
    if secure:
        import randomgen

        key = int.from_bytes(os.urandom(32), "little")
        generator = np.random.Generator(randomgen.ChaCha(key=key, counter=0, rounds=20))
    else:
        generator = np.random.default_rng(list(seed))
    half = variance / 2
    return generator.poisson(half, shape).astype(np.int64) - generator.poisson(half, shape).astype(np.int64)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    sensitivity: Sensitivity,
    history: Sequence[Step] = (),
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest σ (relative to Δ₂) at which the Skellam accountant reports ε ≤ target after
    `history` and `steps` more steps at `sample_rate` (see accounting.calibrate_noise_multiplier)."""
    from tensafe.errors import ConfigError

    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError("privacy.target_epsilon", target_epsilon, "must be a finite number > 0")
    _check_delta_range(delta)
    if steps < 1:
        raise ConfigError("steps", steps, "calibration needs at least one training step")
    prefix = SkellamAccountant(sensitivity)
    for sigma, q, n in history:
        prefix.step(sigma, q, n)
    if history and (spent := prefix.epsilon(delta)) >= target_epsilon:
        raise ConfigError(
            "privacy.target_epsilon",
            target_epsilon,
            f"already spent: the executed steps reach ε={spent:.4g}; raise the target or stop here",
        )
    tolerance = min(epsilon_tolerance, 0.01 * target_epsilon)
    return smallest_sigma(
        lambda sigma: prefix.epsilon_if(sigma, sample_rate, steps, delta),
        target_epsilon,
        tolerance,
        1.0,
        sample_rate,
        steps,
        delta,
    )
