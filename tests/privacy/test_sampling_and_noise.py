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
    for batch in PoissonBatchSampler(n, q, batches, rng, lambda: 0):
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
    assert any(len(b) == 0 for b in PoissonBatchSampler(50, 0.01, 400, SeededRandom(1), lambda: 0))


def test_shuffled_batches_cover_the_data_once_per_epoch():
    batches = list(ShuffledBatchSampler(100, 10, SeededRandom(0), lambda: 0))
    assert sorted(i for b in batches for i in b) == list(range(100))


@pytest.mark.parametrize("rng", [SeededRandom(0), SecureRandom()], ids=["seeded", "secure"])
def test_gaussian_noise_is_standard_normal_times_std(rng):
    draws = rng.for_step("noise", 0)
    sample = gaussian_like(draws, torch.zeros(200_000, dtype=torch.float64), std=3.0).numpy() / 3.0
    assert stats.kstest(sample, "norm").pvalue > 1e-4


def test_secure_uniforms_are_open_interval_and_unpredictable():
    a, b = SecureRandom(), SecureRandom()
    u = a.uniform(100_000)
    assert u.min() > 0 and u.max() < 1 and stats.kstest(u, "uniform").pvalue > 1e-4
    assert not np.array_equal(a.uniform(8), b.uniform(8))  # keyed from OS entropy per instance


def test_seeded_streams_are_keyed_by_use_and_step_and_reproducible():
    rng = SeededRandom(7)
    first = rng.for_step("noise", 3).normal(1000)
    assert np.array_equal(first, SeededRandom(7).for_step("noise", 3).normal(1000))  # a resume redraws it
    others = [rng.for_step("noise", 4).normal(1000), rng.for_step("batch", 3).normal(1000),
              SeededRandom(8).for_step("noise", 3).normal(1000)]
    assert all(abs(np.corrcoef(first, o)[0, 1]) < 0.15 for o in others)


def test_poisson_batches_follow_the_step_they_are_drawn_for():
    """A sampler started at step k draws exactly the batches an uninterrupted one draws at k, k+1, …"""
    rng, step = SeededRandom(5), {"at": 0}
    straight = list(PoissonBatchSampler(400, 0.05, 6, rng, lambda: step["at"]))
    step["at"] = 3
    resumed = list(PoissonBatchSampler(400, 0.05, 3, rng, lambda: step["at"]))
    assert resumed == straight[3:] and resumed != straight[:3]


def test_the_workers_shards_partition_the_single_process_poisson_batch():
    """Seeded: every worker draws the whole-dataset sample and keeps its residue class, so the
    workers' batches together are the single-process batch, each record in exactly one."""
    from tensafe.privacy.randomness import SeededRandom
    from tensafe.privacy.sampling import PoissonBatchSampler

    whole = list(PoissonBatchSampler(500, 0.1, 5, SeededRandom(4), lambda: 3))
    shards = [list(PoissonBatchSampler(500, 0.1, 5, SeededRandom(4), lambda: 3, (r, 3))) for r in range(3)]
    for step, batch in enumerate(whole):
        parts = [shard[step] for shard in shards]
        assert sorted(i for part in parts for i in part) == batch
        assert all(i % 3 == r for r, part in enumerate(parts) for i in part)
