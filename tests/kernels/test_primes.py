"""NTT-friendly primes and roots of unity, checked against trial division and exact Python integers."""

from __future__ import annotations

import random

import pytest
from tensafe.kernels.primes import is_prime, ntt_primes, primitive_root_of_unity


def _trial_division(n: int) -> bool:
    if n < 2:
        return False
    d = 2
    while d * d <= n:
        if n % d == 0:
            return False
        d += 1
    return True


def _probable_prime(n: int) -> bool:
    """An independent Miller–Rabin with 40 random bases (reference for primes too big to trial-divide)."""
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13):
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    rng = random.Random(n)
    for _ in range(40):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


# Known primes: Mersenne primes (2^127 − 1 lies beyond the deterministic witness range, but a prime
# passes every Miller–Rabin round), the largest primes below 2^32, 2^50 and 2^64, common NTT primes.
KNOWN_PRIMES = (
    2,
    3,
    41,
    43,
    2**31 - 1,
    2**32 - 5,
    998244353,
    1000000007,
    2**50 - 27,
    2**61 - 1,
    2**64 - 59,
    2**127 - 1,
)

CARMICHAEL = (561, 1105, 1729, 2465, 2821, 6601, 8911, 41041, 62745, 63973, 75361, 101101, 252601, 512461)
# Strong pseudoprimes to base 2 (they pass the a = 2 round of Miller–Rabin).
STRONG_PSEUDOPRIMES_BASE_2 = (2047, 3277, 4033, 4681, 8321, 15841, 29341, 42799, 49141, 52633, 65281)
# Composites that pass Miller–Rabin for all prime bases up to 7, 23 and 37 respectively; the last
# one is only caught by the witness 41.
FACTORED_PSEUDOPRIMES = {
    3215031751: (151, 751, 28351),
    3825123056546413051: (149491, 747451, 34233211),
    318665857834031151167461: (399165290221, 798330580441),
}
OTHER_COMPOSITES = (
    0,
    1,
    4,
    41 * 43,
    1000003**2,
    (2**31 - 1) * (2**61 - 1),
    (2**50 - 27) * (2**50 - 27),
    2**64 - 1,
    2**127 + 1,
)


def test_is_prime_matches_trial_division_below_5000():
    mismatches = [n for n in range(-3, 5000) if is_prime(n) != _trial_division(n)]
    assert mismatches == []


@pytest.mark.parametrize("p", KNOWN_PRIMES)
def test_is_prime_accepts_known_large_primes(p):
    assert is_prime(p)


@pytest.mark.parametrize("n", CARMICHAEL + STRONG_PSEUDOPRIMES_BASE_2)
def test_is_prime_rejects_carmichael_numbers_and_base_2_strong_pseudoprimes(n):
    assert not _trial_division(n)  # the table itself is right
    assert not is_prime(n)


@pytest.mark.parametrize("n", sorted(FACTORED_PSEUDOPRIMES))
def test_is_prime_rejects_strong_pseudoprimes_to_many_bases(n):
    factors = FACTORED_PSEUDOPRIMES[n]
    product = 1
    for f in factors:
        product *= f
    assert product == n
    assert not is_prime(n)


@pytest.mark.parametrize("n", OTHER_COMPOSITES)
def test_is_prime_rejects_composites_and_units(n):
    assert not is_prime(n)


def test_is_prime_agrees_with_independent_miller_rabin_on_random_odd_50_bit_numbers():
    rng = random.Random(1)
    numbers = [rng.randrange(1 << 49, 1 << 50) | 1 for _ in range(300)]
    assert [is_prime(n) for n in numbers] == [_probable_prime(n) for n in numbers]


@pytest.mark.parametrize(
    ("bits", "n", "count"),
    [(20, 8, 12), (20, 256, 2), (30, 1024, 5), (40, 1 << 15, 3), (50, 4096, 4), (50, 1 << 16, 2)],
)
def test_ntt_primes_are_the_largest_distinct_primes_one_mod_2n_in_range(bits, n, count):
    primes = ntt_primes(bits, n, count)
    assert len(primes) == count
    assert len(set(primes)) == count
    assert primes == sorted(primes, reverse=True)
    for q in primes:
        assert q % (2 * n) == 1
        assert 1 << (bits - 1) < q < 1 << bits
        assert _trial_division(q) if bits <= 30 else _probable_prime(q)
    # None skipped: every q ≡ 1 (mod 2n) between the smallest returned and 2^bits is either
    # returned or composite.
    skipped = [
        q
        for q in range(primes[-1], 1 << bits, 2 * n)
        if q not in primes and (_trial_division(q) if bits <= 30 else _probable_prime(q))
    ]
    assert skipped == []


def test_ntt_primes_skip_excluded_primes():
    full = ntt_primes(50, 4096, 6)
    assert ntt_primes(50, 4096, 3, exclude=tuple(full[:2])) == full[2:5]
    assert ntt_primes(50, 4096, 3, exclude=(full[1], full[3])) == [full[0], full[2], full[4]]
    # Excluding numbers that are not candidates changes nothing.
    assert ntt_primes(50, 4096, 3, exclude=(4, 2**50 + 1)) == full[:3]


def test_ntt_primes_refuses_when_too_few_primes_exist():
    # Candidates ≡ 1 mod 32 in [32, 64): only 33, which is composite.
    with pytest.raises(ValueError):
        ntt_primes(6, 16, 1)
    # There are exactly 2 such primes of 8 bits ≡ 1 mod 16 above 2^7: 193, 241 (and 129 = 3·43, 145, 161,
    # 177, 209, 225 composite); asking for 3 fails.
    assert ntt_primes(8, 8, 2) == [241, 193]
    with pytest.raises(ValueError):
        ntt_primes(8, 8, 3)


@pytest.mark.parametrize("n", [2, 4, 8, 64, 256, 4096])
@pytest.mark.parametrize("bits", [20, 30, 50])
def test_primitive_root_has_exact_order_2n(n, bits):
    for q in ntt_primes(bits, n, 2):
        psi = primitive_root_of_unity(2 * n, q)
        assert 1 < psi < q
        assert pow(psi, 2 * n, q) == 1
        assert pow(psi, n, q) == q - 1  # so the order is exactly 2n (a power of two)


def test_primitive_root_is_the_smallest_primitive_2n_th_root():
    q, order = 7681, 512  # 7681 = 15 · 512 + 1
    psi = primitive_root_of_unity(order, q)
    roots = [x for x in range(1, q) if pow(x, order, q) == 1 and pow(x, order // 2, q) == q - 1]
    assert len(roots) == order // 2
    assert psi == min(roots)


def test_primitive_root_refuses_modulus_not_one_mod_order():
    with pytest.raises(ValueError):
        primitive_root_of_unity(16, 99)  # 98 is not a multiple of 16
    with pytest.raises(ValueError):
        primitive_root_of_unity(64, 97)  # 96 = 3 · 32
