"""Poisson sampling and the noise sources behave as the accountant assumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from tensafe.privacy.randomness import SecureRandom, SeededRandom, gaussian_like
from tensafe.privacy.sampling import PoissonBatchSampler, ShuffledBatchSampler


@pytest.mark.parametrize("rng", [SeededRandom(0), SecureRandom()], ids=["seeded", "secure"])
def test_poisson_batches_include_each_example_independently_at_rate_q(rng):
    n, q, batches = 500, 0.04, 2000
    counts = np.zeros(n)
    sizes = []
    for batch in PoissonBatchSampler(n, q, batches, rng):
        assert len(set(batch)) == len(batch)
        counts[batch] += 1
        sizes.append(len(batch))
    # Batch sizes are Binomial(n, q): variable, mean qn, variance qn(1-q); empty batches happen.
    # Tolerances are 5 standard errors: sd(mean) = sqrt(qn(1-q)/batches) ≈ 0.098, sd(var) ≈ 0.61
    # (the unseeded CSPRNG run draws afresh every time, so a 2σ tolerance failed about 1 run in 25).
    assert abs(np.mean(sizes) - q * n) < 0.5
    assert abs(np.var(sizes) - q * n * (1 - q)) < 3.1
    # Every example's inclusion count is Binomial(batches, q).
    assert stats.chisquare(counts).pvalue > 1e-4
    assert any(len(b) == 0 for b in PoissonBatchSampler(50, 0.01, 400, SeededRandom(1)))


def test_shuffled_batches_cover_the_data_once_per_epoch():
    batches = list(ShuffledBatchSampler(100, 10, SeededRandom(0)))
    assert sorted(i for b in batches for i in b) == list(range(100))


@pytest.mark.parametrize("rng", [SeededRandom(0), SecureRandom()], ids=["seeded", "secure"])
def test_gaussian_noise_is_standard_normal_times_std(rng):
    sample = gaussian_like(rng, torch.zeros(200_000, dtype=torch.float64), std=3.0).numpy() / 3.0
    assert stats.kstest(sample, "norm").pvalue > 1e-4


def test_secure_uniforms_are_open_interval_and_unpredictable():
    a, b = SecureRandom(), SecureRandom()
    u = a.uniform(100_000)
    assert u.min() > 0 and u.max() < 1 and stats.kstest(u, "uniform").pvalue > 1e-4
    assert not np.array_equal(a.uniform(8), b.uniform(8))  # keyed from OS entropy per instance
