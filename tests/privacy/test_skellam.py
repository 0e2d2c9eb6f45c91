"""The Skellam mechanism: its accountant bounds the exactly computed divergences, agrees with the
Gaussian's where it should, and the workers' shares add up to the configured noise."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from scipy.special import logsumexp
from scipy.stats import chisquare, skellam

from tensafe.errors import ConfigError
from tensafe.privacy.distributed import share_variance
from tensafe.privacy.skellam import (
    ORDERS,
    Sensitivity,
    SkellamAccountant,
    calibrate_noise_multiplier,
    skellam_noise,
    skellam_rdp,
    subsampled_rdp,
)


def _log_pmfs(mu: float, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """log P(k) of Sk(μ) and of Sk(μ) + shift over a support holding all but ~e^-70 of the mass."""
    reach = int(20 * math.sqrt(mu)) + abs(shift) + 20
    k = np.arange(-reach, reach + 1)
    return skellam.logpmf(k, mu / 2, mu / 2), skellam.logpmf(k - shift, mu / 2, mu / 2)


def _renyi(log_p: np.ndarray, log_q: np.ndarray, alpha: int) -> float:
    """D_α(P ‖ Q) by summation."""
    return float(logsumexp(alpha * log_p + (1 - alpha) * log_q)) / (alpha - 1)


def _epsilon_from_rdp(rdp: list[float], orders: tuple[int, ...], delta: float) -> float:
    """Written out here, independently of the accountant (Balle et al. 2020, Theorem 21)."""
    return min(
        r + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1) for r, a in zip(rdp, orders)
    )


@pytest.mark.parametrize("sigma, shift", [(0.8, 10), (1.5, 40), (1.0, 3)])
def test_the_rdp_bound_holds_against_the_exact_divergence(sigma, shift):
    mu = (sigma * shift) ** 2
    log_p, log_q = _log_pmfs(mu, shift)
    for alpha in (2, 5, 16, 32):
        exact = max(_renyi(log_q, log_p, alpha), _renyi(log_p, log_q, alpha))
        assert exact <= skellam_rdp(alpha, Sensitivity(shift, shift), mu) * (1 + 1e-9)


@pytest.mark.parametrize("q", [0.01, 0.1, 0.5])
def test_the_subsampling_bound_holds_in_both_directions(q):
    sigma, shift = 1.0, 20
    mu = (sigma * shift) ** 2
    log_p, log_q = _log_pmfs(mu, shift)
    log_mix = np.logaddexp(math.log1p(-q) + log_p, math.log(q) + log_q)
    sensitivity = Sensitivity(shift, shift)
    for alpha in (2, 4, 8, 24):
        exact = max(_renyi(log_mix, log_p, alpha), _renyi(log_p, log_mix, alpha))
        bound = subsampled_rdp(alpha, q, lambda a: skellam_rdp(a, sensitivity, mu))
        assert exact <= bound * (1 + 1e-9)


def test_epsilon_is_a_sound_and_close_bound_of_the_exactly_computed_one():
    """The accountant's ε of 200 subsampled steps against ε from exactly summed divergences."""
    sigma, shift, q, steps, delta = 1.2, 30, 0.05, 200, 1e-5
    mu = (sigma * shift) ** 2
    log_p, log_q = _log_pmfs(mu, shift)
    log_mix = np.logaddexp(math.log1p(-q) + log_p, math.log(q) + log_q)
    exact = [steps * max(_renyi(log_mix, log_p, a), _renyi(log_p, log_mix, a)) for a in ORDERS]
    accountant = SkellamAccountant(Sensitivity(shift, shift))
    accountant.step(sigma, q, steps)
    ours, reference = accountant.epsilon(delta), _epsilon_from_rdp(exact, ORDERS, delta)
    assert reference <= ours <= 1.35 * reference, (ours, reference)


def test_at_a_fine_quantization_it_is_the_gaussian_rdp_up_to_the_subsampling_bound():
    """Δ₂ ≈ 3000 quantization units: the discreteness term vanishes; what remains above Google's
    Gaussian RDP is the general subsampling bound's price."""
    sigma, q, steps, delta = 1.0, 0.02, 300, 1e-5
    accountant = SkellamAccountant(Sensitivity(3000.0, 3000.0 * 1000))
    accountant.step(sigma, q, steps)
    gaussian = RdpAccountant()
    gaussian.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    )
    ours, google = accountant.epsilon(delta), gaussian.get_epsilon(delta)
    assert google <= ours <= 1.3 * google, (ours, google)  # 1.22 here: the factor 3 of Theorem 6
    assert skellam_rdp(8, Sensitivity(3000.0, 3e6), 3000.0**2) == pytest.approx(8 / 2, rel=1e-5)


def test_the_sum_of_the_shares_is_skellam_with_the_configured_variance():
    mu, workers, size = 60.0, 4, 200_000
    total = sum(skellam_noise(size, mu / workers, secure=True) for _ in range(workers))
    assert total.var() == pytest.approx(mu, rel=0.02)
    edges = np.arange(-25, 26)
    observed = np.array(
        [(total <= edges[0]).sum(), *[(total == k).sum() for k in edges[1:-1]], (total >= edges[-1]).sum()]
    )
    dist = skellam(mu / 2, mu / 2)
    expected = np.array([dist.cdf(edges[0]), *dist.pmf(edges[1:-1]), dist.sf(edges[-1] - 1)]) * size
    assert chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-4


def test_one_share_alone_protects_far_less_than_the_aggregate():
    sensitivity, q, steps, delta = Sensitivity(1000.0, 1e6), 0.02, 100, 1e-5
    sigma, workers = 1.0, 8
    mu_share = share_variance(sigma, sensitivity, workers, tolerated=0)
    aggregate, alone = SkellamAccountant(sensitivity), SkellamAccountant(sensitivity)
    aggregate.step(sigma, q, steps)
    alone.step(math.sqrt(mu_share) / sensitivity.l2, q, steps)  # one share: σ/√8
    assert alone.epsilon(delta) > 10 * aggregate.epsilon(delta)


def test_tolerated_colluders_raise_every_share():
    sensitivity = Sensitivity(100.0, 1e4)
    assert share_variance(1.0, sensitivity, 4, tolerated=1) * 3 == pytest.approx(100.0**2)
    with pytest.raises(ConfigError, match="tolerated_colluders"):
        share_variance(1.0, sensitivity, 4, tolerated=4)


def test_calibration_meets_the_target():
    sensitivity = Sensitivity(2000.0, 2000.0 * 50)
    sigma = calibrate_noise_multiplier(3.0, 1e-5, 0.02, 200, sensitivity)
    accountant = SkellamAccountant(sensitivity)
    accountant.step(sigma, 0.02, 200)
    assert 2.95 <= accountant.epsilon(1e-5) <= 3.0


def test_state_round_trips_and_refuses_another_geometry():
    accountant = SkellamAccountant(Sensitivity(50.0, 500.0))
    accountant.step(1.0, 0.1, 5)
    again = SkellamAccountant(Sensitivity(50.0, 500.0))
    again.load_state_dict(accountant.state_dict())
    assert again.epsilon(1e-5) == accountant.epsilon(1e-5)
    with pytest.raises(Exception, match="sensitivity"):
        SkellamAccountant(Sensitivity(60.0, 500.0)).load_state_dict(accountant.state_dict())
