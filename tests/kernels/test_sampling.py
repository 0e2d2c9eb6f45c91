"""ChaCha20-driven samplers: determinism, ranges and (seeded, loose) distribution checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tensafe.kernels.primes import ntt_primes
from tensafe.kernels.sampling import (
    GAUSSIAN_SIGMA,
    SEED_BYTES,
    ChaChaStream,
    discrete_gaussian,
    ternary,
    uniform_mod,
    uniform_rns,
)

SEED = bytes(range(SEED_BYTES))
OTHER_SEED = bytes(range(1, SEED_BYTES + 1))
CHI2_15_DOF_LIMIT = 50.0  # P(χ²₁₅ > 50) ≈ 1e-5: a loose bound, deterministic under a fixed seed


def _stream(label: int = 0, seed: bytes = SEED) -> ChaChaStream:
    return ChaChaStream(seed, label)


def test_chacha_stream_is_rfc_8439_chacha20():
    # RFC 8439 §2.3.2: key 00..1f, nonce 00:00:00:09:00:00:00:4a:00:00:00:00, block counter 1. The
    # label is the 12-byte nonce, little-endian; streams start at block counter 0.
    expected = bytes.fromhex(
        "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
        "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
    )
    label = int.from_bytes(bytes([0, 0, 0, 9, 0, 0, 0, 0x4A, 0, 0, 0, 0]), "little")
    assert ChaChaStream(bytes(range(32)), label).bytes(128)[64:] == expected


def test_same_seed_and_label_give_the_same_stream():
    for label in (0, 1, 7, 2**40):
        a, b = _stream(label), _stream(label)
        assert a.bytes(1000) == b.bytes(1000)
        assert np.array_equal(a.words(100), b.words(100))


def test_stream_is_continuous_across_reads():
    a, b = _stream(3), _stream(3)
    assert a.bytes(7) + a.bytes(57) + a.bytes(200) == b.bytes(264)
    words = _stream(3).words(5)
    assert words.dtype == np.uint64 and words.shape == (5,)
    assert words.tobytes() == _stream(3).bytes(40)


def test_different_labels_and_seeds_give_different_streams():
    streams = [_stream(label).bytes(64) for label in range(5)]
    streams += [_stream(0, OTHER_SEED).bytes(64), _stream(1, OTHER_SEED).bytes(64)]
    assert len(set(streams)) == len(streams)


def test_streams_of_different_labels_do_not_overlap():
    long_stream = _stream(0).bytes(64 * 8)
    for label in (1, 2, 5):
        head = _stream(label).bytes(64)
        assert head not in long_stream, f"label {label} repeats label 0 from byte {long_stream.find(head)}"


def test_unseeded_streams_differ():
    assert ChaChaStream().bytes(32) != ChaChaStream().bytes(32)


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_seed_of_wrong_length_is_refused(length):
    with pytest.raises(ValueError):
        ChaChaStream(bytes(length))


def _uniform_bins(values: np.ndarray, q: int, bins: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Observed counts of ⌊bins·v/q⌋ and the expected counts for a uniform v in [0, q)."""
    index = [bins * int(v) // q for v in values.tolist()]
    observed = np.bincount(index, minlength=bins)
    # Bin b holds the integers v with b·q ≤ bins·v < (b+1)·q: ⌈(b+1)q/bins⌉ − ⌈bq/bins⌉ of them.
    ceil = [-(-b * q // bins) for b in range(bins + 1)]
    sizes = np.array([ceil[b + 1] - ceil[b] for b in range(bins)])
    return observed, sizes * (values.size / q)


@pytest.mark.parametrize(
    "q", [17, 97, 65537, 2**31 - 1, 2**40 + 1, 3 * 2**38 + 1, 2**49 + 1, ntt_primes(50, 4096, 1)[0]]
)
def test_uniform_mod_is_in_range_and_roughly_uniform(q):
    count = 40_000
    values = uniform_mod(_stream(11), q, count)
    assert values.dtype == np.uint64 and values.shape == (count,)
    assert int(values.max()) < q
    assert np.array_equal(values, uniform_mod(_stream(11), q, count))  # deterministic for a seed
    observed, expected = _uniform_bins(values, q)
    assert expected.sum() == pytest.approx(count)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_15_DOF_LIMIT


def test_uniform_mod_reaches_every_residue_of_a_small_modulus():
    values = uniform_mod(_stream(12), 5, 1000)
    assert sorted(set(values.tolist())) == [0, 1, 2, 3, 4]


def test_uniform_mod_rejects_instead_of_reducing():
    # For q ≈ 0.75 · 2^40 the masked 40-bit draws cover [0, 4q/3): reducing them mod q instead of
    # rejecting would put half of the mass, not a third, below q/3.
    q = 3 * 2**38 + 1
    values = uniform_mod(_stream(13), q, 30_000)
    low = int((values < np.uint64(q // 3)).sum())
    assert abs(low / values.size - 1 / 3) < 0.015


def test_uniform_rns_shape_and_rows_below_their_moduli():
    moduli = (ntt_primes(50, 64, 1)[0], 65537, 97)
    a = uniform_rns(_stream(14), moduli, (3, 64))
    assert a.shape == (3, len(moduli), 64) and a.dtype == np.uint64
    for i, q in enumerate(moduli):
        assert int(a[:, i, :].max()) < q
    assert np.array_equal(a, uniform_rns(_stream(14), moduli, (3, 64)))
    assert uniform_rns(_stream(14), moduli, (2, 5, 8)).shape == (2, 5, len(moduli), 8)
    assert uniform_rns(_stream(14), moduli, (16,)).shape == (len(moduli), 16)


def test_ternary_is_uniform_on_minus_one_zero_one():
    # 3M draws: the standard error of each frequency is 2.7e-4, and the tolerance 1.2e-3 still catches
    # the 2.6e-3 bias of taking a byte mod 3 without rejecting 255.
    count = 3_000_000
    values = ternary(_stream(15), count)
    assert values.dtype == np.int64 and values.shape == (count,)
    assert set(np.unique(values).tolist()) == {-1, 0, 1}
    for v in (-1, 0, 1):
        assert abs(float((values == v).mean()) - 1 / 3) < 0.0012
    assert np.array_equal(values[:1000], ternary(_stream(15), 1000))
    assert ternary(_stream(15), 1).shape == (1,)


def test_discrete_gaussian_has_mean_zero_and_std_sigma_within_its_tail_cut():
    count = 200_000
    values = discrete_gaussian(_stream(16), count)
    assert values.dtype == np.int64 and values.shape == (count,)
    assert int(np.abs(values).max()) <= math.ceil(10 * GAUSSIAN_SIGMA) == 32
    assert abs(float(values.mean())) < 0.05  # the standard error of the mean is ≈ 0.007
    assert float(values.std()) == pytest.approx(GAUSSIAN_SIGMA, rel=0.02)
    assert np.array_equal(values, discrete_gaussian(_stream(16), count))


def test_discrete_gaussian_frequencies_follow_the_gaussian_weights():
    count, sigma = 200_000, GAUSSIAN_SIGMA
    values = discrete_gaussian(_stream(17), count)
    support = np.arange(-8, 9)
    weights = np.exp(-(support.astype(np.float64) ** 2) / (2 * sigma * sigma))
    total = np.exp(-(np.arange(-40, 41) ** 2) / (2 * sigma * sigma)).sum()
    expected = weights / total * count
    observed = np.array([(values == v).sum() for v in support])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 60.0  # 17 cells; P(χ²₁₇ > 60) ≈ 1e-6


def test_discrete_gaussian_with_another_sigma_respects_its_bound():
    values = discrete_gaussian(_stream(18), 50_000, sigma=1.0)
    assert int(np.abs(values).max()) <= 10
    assert float(values.std()) == pytest.approx(1.0, rel=0.03)
