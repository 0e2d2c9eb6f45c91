"""NTT-friendly primes (q ≡ 1 mod 2n) and primitive 2n-th roots of unity, in exact Python integers."""

from __future__ import annotations

# Deterministic Miller–Rabin witnesses: correct for every n < 3.3 · 10^24.
_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in _WITNESSES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _WITNESSES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def ntt_primes(bits: int, n: int, count: int, exclude: tuple[int, ...] = ()) -> list[int]:
    """The `count` largest primes q < 2^bits with q ≡ 1 (mod 2n), skipping `exclude`, largest first."""
    step = 2 * n
    q = ((1 << bits) - 1) // step * step + 1
    found: list[int] = []
    while len(found) < count:
        if q < (1 << (bits - 1)):
            raise ValueError(f"fewer than {count} primes of {bits} bits are ≡ 1 mod {step}")
        if q not in exclude and is_prime(q):
            found.append(q)
        q -= step
    return found


def primitive_root_of_unity(order: int, q: int) -> int:
    """The smallest ψ with ψ^order ≡ 1 and ψ^(order/2) ≡ −1 (mod q); `order` is a power of two."""
    if (q - 1) % order:
        raise ValueError(f"{q} is not ≡ 1 mod {order}")
    for g in range(2, q):
        psi = pow(g, (q - 1) // order, q)
        if pow(psi, order // 2, q) == q - 1:
            return min(pow(psi, k, q) for k in range(1, order, 2))
    raise ValueError(f"no primitive {order}-th root of unity mod {q}")
