"""Secure aggregation: the masked sum is the exact integer sum, anything missing, forged or tampered
with is refused, masks are never reused, and the quantization keeps its sensitivity bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tensafe.errors import ConfigError
from tensafe.privacy.distributed import GaussianAllReduce, Quantizer, SecureAggregation, batch_tail
from tensafe.privacy.randomness import SeededRandom
from tensafe.privacy.secure_aggregation import (
    CHUNK,
    SKETCH_WIDTH,
    AggregationError,
    Party,
    PartyKeys,
    SketchKey,
    default_degree,
    neighbour_graph,
)
from tests.privacy.collectives import run_parties

BITS = 32  # the default: masks are 32-bit words (48 covers the 64-bit words)


def _session(n: int, degree: int | None = None, run_id: str = "run", bits: int = BITS) -> list[Party]:
    keys = [PartyKeys() for _ in range(n)]
    cards = [k.card(rank) for rank, k in enumerate(keys)]
    return [Party(run_id, keys[rank], cards, rank, bits, degree) for rank in range(n)]


def _masked(parties: list[Party], step: int, values: list[np.ndarray]) -> list[np.ndarray]:
    return [p.mask(step, 0, v) for p, v in zip(parties, values)]


def _sum(masked: list[np.ndarray]) -> np.ndarray:
    return np.sum([m.astype(np.int64) for m in masked], axis=0)


def _finish(parties, step, masked, total):
    challenges = [p.challenge(step, 1) for p in parties]  # each drawn once its sum is there
    sketches = [p.sketch(step, [m], challenges) for p, m in zip(parties, masked)]
    return [p.unmask(step, challenges, [total.copy()], sketches)[0] for p in parties]  # centred in place


@pytest.mark.parametrize(
    "n, degree, size, bits",
    [(2, None, 1000, 32), (3, None, 2048, 48), (7, 2, 1, 32), (12, 4, 5000, 32), (5, None, 3000, 60)],
)
def test_the_masked_sum_is_the_exact_integer_sum(n, degree, size, bits):
    rng = np.random.default_rng(n)
    parties = _session(n, degree, bits=bits)
    assert parties[0].word == (np.uint32 if bits <= 32 else np.uint64)
    low = 2 ** (bits - 1 - n.bit_length())  # |sum| < 2^(bits-1)
    values = [rng.integers(-low, low, size=size, dtype=np.int64) for _ in range(n)]
    masked = _masked(parties, 0, values)
    assert all(not np.array_equal(m, v) for m, v in zip(masked, values))
    for result in _finish(parties, 0, masked, _sum(masked)):
        np.testing.assert_array_equal(result, np.sum(values, axis=0))


def test_a_masked_vector_alone_is_uniform_noise():
    parties = _session(3)
    masked = _masked(parties, 0, [np.zeros(20_000, dtype=np.int64)] * 3)
    top_bits = masked[0] >> (BITS - 4)  # 16 equally likely values if the mask is uniform mod 2^k
    counts = np.bincount(top_bits, minlength=16)
    assert counts.min() > 1000 and counts.max() < 1500


@pytest.mark.parametrize("error", [1, 1 << BITS, -(1 << 40)])
def test_a_tampered_share_is_detected(error):
    parties = _session(4)
    masked = _masked(parties, 0, [np.arange(100, dtype=np.int64) * (r + 1) for r in range(4)])
    tampered = _sum(masked)
    tampered[17] += error  # a share changed on its way into the sum
    with pytest.raises(AggregationError, match="tampered|out of range"):
        _finish(parties, 0, masked, tampered)


def test_a_missing_forged_replayed_or_foreign_message_is_refused():
    parties = _session(3)
    masked = _masked(parties, 5, [np.ones(10, dtype=np.int64)] * 3)
    total = _sum(masked)
    challenges = [p.challenge(5, 1) for p in parties]
    with pytest.raises(AggregationError, match="2 challenges for 3 parties"):
        parties[0].sketch(5, [masked[0]], challenges[:2])
    with pytest.raises(AggregationError, match="two challenges from rank 1"):
        parties[0].sketch(5, [masked[0]], [challenges[0], challenges[1], challenges[1]])
    forged = bytearray(challenges[1])
    forged[60] ^= 1
    with pytest.raises(AggregationError, match="not signed"):
        parties[0].sketch(5, [masked[0]], [challenges[0], bytes(forged), challenges[2]])
    with pytest.raises(AggregationError, match="another session or step"):
        parties[0].sketch(5, [masked[0]], [challenges[0], parties[1].challenge(6, 1), challenges[2]])
    with pytest.raises(AggregationError, match="another session"):
        parties[0].sketch(5, [masked[0]], [challenges[0], _session(3)[1].challenge(5, 1), challenges[2]])
    sketches = [p.sketch(5, [m], challenges) for p, m in zip(parties, masked)]
    with pytest.raises(AggregationError, match="2 sketches for 3 parties"):
        parties[1].unmask(5, challenges, [total], sketches[:2])
    assert np.array_equal(parties[1].unmask(5, challenges, [total.copy()], sketches)[0], np.full(10, 3))
    replayed = parties[0].challenge(7, 1)  # an earlier challenge of its own, replayed in transit
    parties[0].challenge(7, 1)
    others = [parties[1].challenge(7, 1), parties[2].challenge(7, 1)]
    with pytest.raises(AggregationError, match="not the one it made"):
        parties[0].sketch(7, [masked[0]], [replayed, *others])


def test_a_mask_is_never_reused():
    parties = _session(2)
    value = np.zeros(64, dtype=np.int64)
    first = parties[0].mask(3, 0, value)
    with pytest.raises(AggregationError, match="never reused"):
        parties[0].mask(3, 0, value)
    assert not np.array_equal(first, parties[0].mask(3, 1, value))  # another chunk, another key
    assert not np.array_equal(first, parties[0].mask(4, 0, value))
    restarted = _session(2)  # a new attempt: fresh keys, a new session
    assert restarted[0].session_id != parties[0].session_id
    assert not np.array_equal(first, restarted[0].mask(3, 0, value))


def test_the_neighbour_graph_is_symmetric_connected_and_of_logarithmic_degree():
    for n in (2, 5, 16, 100, 2000):
        degree = default_degree(n)
        graph = neighbour_graph(n, degree, b"session" * 4)
        assert all(len(peers) == degree and i not in peers for i, peers in enumerate(graph))
        assert all(i in graph[j] for i, peers in enumerate(graph) for j in peers)
        seen, frontier = {0}, [0]
        while frontier:
            frontier = [j for i in frontier for j in graph[i] if j not in seen and not seen.add(j)]  # type: ignore[func-returns-value]
        assert len(seen) == n
    assert default_degree(2000) == 22
    assert neighbour_graph(50, 6, b"a" * 32) != neighbour_graph(50, 6, b"b" * 32)


def test_quantization_keeps_the_sensitivity_bound():
    rng = np.random.default_rng(0)
    d, clip = 500, 1.0
    quantizer = Quantizer.for_clip(clip, d, rounding_overhead=0.05)
    bound = quantizer.sensitivity
    assert bound.l2 == pytest.approx(quantizer.scale * clip * 1.05)
    for _ in range(200):
        x = rng.normal(size=d)
        step = rng.normal(size=d)
        x_next = x + step / np.linalg.norm(step) * clip  # a neighbour at distance exactly C
        dither = rng.random(d)
        diff = quantizer.quantize(x, dither) - quantizer.quantize(x_next, dither)
        assert np.linalg.norm(diff) <= bound.l2 and np.abs(diff).sum() <= bound.l1
    with pytest.raises(ConfigError, match="modulus_bits"):
        quantizer.check_headroom(10**9, 0.01, workers=2, noise_std=1e3, modulus_bits=32)
    quantizer.check_headroom(10**9, 1e-7, workers=2, noise_std=1e3, modulus_bits=32)  # batches ~100


def test_the_batch_tail_bound_holds():
    from scipy.stats import binom

    for n, q in ((1000, 0.05), (50_000, 0.005), (10**6, 1e-4), (20, 0.9)):
        tail = batch_tail(n, q)
        assert n * q < tail <= n
        # beyond the bound the binomial's mass is below 2^-64 (scipy's log survival function)
        assert tail == n or binom.logsf(tail, n, q) < -64 * math.log(2)


@pytest.mark.parametrize(
    "n, d, threads, bits", [(3, 300, 1, BITS), (2, CHUNK + 300, 2, BITS), (3, 300, 1, 48)]
)
def test_secure_aggregation_over_a_collective_returns_the_noisy_sum_to_everyone(n, d, threads, bits):
    vectors = [torch.full((d,), float(r + 1)) for r in range(n)]
    quantizer = Quantizer.for_clip(1.0, d, 0.01)

    def body(collective):
        aggregation = SecureAggregation(
            collective, "run", quantizer, 4.0, bits, SeededRandom(1), seed=1, threads=threads
        )
        return aggregation.noisy_sum([vectors[collective.rank]], step=0)[0], dict(aggregation.timings)

    results = run_parties(n, body)
    first = results[0][0]
    assert all(torch.equal(first, r[0]) for r in results)
    # Σ = n(n+1)/2 per coordinate; noise: Sk(4n) in quantization units, rounding below n units.
    error = (first.double() - n * (n + 1) / 2) * quantizer.scale
    assert error.abs().max() < n + 8 * math.sqrt(4 * n) + 1
    assert abs(error.var().item() - 4 * n) < 0.35 * 4 * n
    assert set(results[0][1]) == {"quantize", "noise_wait", "mask", "sum", "unmask"}


def test_a_tampered_share_on_the_collective_stops_the_step():
    quantizer = Quantizer.for_clip(1.0, 50, 0.01)

    def tamper(collectives):
        collectives[1].tamper = lambda v: v + np.int64(1)

    def body(collective):
        aggregation = SecureAggregation(collective, "run", quantizer, 4.0, BITS, SeededRandom(0), 0)
        with pytest.raises(AggregationError):
            aggregation.noisy_sum([torch.ones(50)], step=0)
        return True

    assert all(run_parties(2, body, setup=tamper))


def test_rank0_noise_reproduces_the_single_process_noise_and_split_noise_has_its_variance():
    d, sigma_c = 20_000, 2.0

    def body(placement):
        def run(collective):
            aggregate = GaussianAllReduce(collective, sigma_c, SeededRandom(3), placement)
            return aggregate.noisy_sum([torch.zeros(d, dtype=torch.float64)], step=7)[0]

        return run

    rank0 = run_parties(2, body("rank0"))
    single = SeededRandom(3).for_step("noise", 7).normal(d) * sigma_c
    np.testing.assert_allclose(rank0[0].numpy(), single)
    split = run_parties(4, body("workers"))
    assert torch.equal(split[0], split[3])
    assert split[0].var().item() == pytest.approx(sigma_c**2, rel=0.05)


@pytest.mark.parametrize("bits, dtype", [(32, np.uint32), (36, np.int64), (62, np.int64)])
def test_the_sketch_is_the_exact_bilinear_form(bits, dtype):
    rng = np.random.default_rng(bits)
    size = 3 * SKETCH_WIDTH + 17  # zero-padded to 4 rows
    values = rng.integers(0, 2**bits, size=size, dtype=np.uint64).astype(dtype)
    key = SketchKey.derive(b"s" * 32, 1, 0, b"t" * 32, size)
    matrix = [[0] * SKETCH_WIDTH for _ in range(4)]
    for i, value in enumerate(values.tolist()):
        matrix[i // SKETCH_WIDTH][i % SKETCH_WIDTH] = int(value)
    expected = [
        sum(
            int(key.u[r, i]) * sum(matrix[i][j] * int(key.v[j, r]) for j in range(SKETCH_WIDTH))
            for i in range(4)
        )
        for r in range(key.u.shape[0])
    ]
    assert key.sketch(values, bits) == expected
