"""Coefficient-encoded matrix products under RLWE (Cheetah's HomFC packing), over one NTT prime.

A block of a (tokens × inputs) integer matrix X goes into the coefficients of one polynomial and a
block of an (inputs × outputs) weight matrix W, its input index reversed, into another, so that
one negacyclic product holds every inner product of the block at known coefficients:

    x̂ = Σ_{i<t} Σ_{j<m} X[i, j] · x^(i·m·n + j)
    ŵ = Σ_{k<n} Σ_{j<m} W[j, k] · x^(k·m + m − 1 − j)
    (x̂ · ŵ)[i·m·n + k·m + m − 1] = Σ_j X[i, j] · W[j, k]        for t·m·n ≤ N

(the other coefficients hold other combinations; the negacyclic wrap-around lands below m − 1,
where no result is read). A ciphertext of x̂ multiplied by the plaintext ŵ is a ciphertext of
x̂·ŵ: products of ciphertexts by plaintexts and additions only, no rotations, no key switches, no
evaluation keys and no rescaling. Input blocks along the inner dimension add up under
encryption, so a (tokens × h_in) @ (h_in × h_out) product takes T·I·O products, T·I ciphertexts
up and T·O down, for T, I, O the block counts along tokens, inputs and outputs.

Encryption is symmetric and seeded: ct = (b, a) with b = m + e − a·s mod q and a uniform, drawn
from a 32-byte seed directly in NTT form (the NTT is a bijection of Z_q^N, so a uniform â is a
uniform a): the upload is b and the seed, and a is never transformed. Products stay in NTT form,
both halves, so a result costs one inverse NTT, at decryption: b̂ + â·ŝ.

The error of a result coefficient is Σ_blocks (e · ŵ), whose standard deviation is σ·‖ŵ‖₂ summed
in quadrature over the input blocks (`error_std`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np

from tensafe.he.counters import OpCounters
from tensafe.he.errors import HEError, InsecureParameters, ValueOutOfRange
from tensafe.he.params import HE_STANDARD_MAX_LOG_Q
from tensafe.kernels import compiled, modular
from tensafe.kernels.modular import MAX_MODULUS_BITS, Moduli
from tensafe.kernels.ntt import NTT
from tensafe.kernels.primes import is_prime, ntt_primes
from tensafe.kernels.sampling import GAUSSIAN_SIGMA, ChaChaStream, discrete_gaussian, ternary, uniform_mod

COEFFICIENT_BACKENDS = ("ckks_numpy",)  # the he= backends that also serve coefficient packing
_SUMMED = 1 << (64 - MAX_MODULUS_BITS)  # residues below 2^50 whose sum fits in 64 bits


@dataclass(frozen=True)
class CoefficientParameters:
    """Ring degree N and one prime q ≡ 1 mod 2N, within the HE Standard's 128-bit bound."""

    ring_degree: int
    modulus: int
    sigma: float = GAUSSIAN_SIGMA
    digest: str = field(init=False, repr=False)  # binds wire frames to this parameter set

    def __post_init__(self) -> None:
        n, q = self.ring_degree, self.modulus
        if n < 8 or n & (n - 1):
            raise HEError(f"he.params: ring degree {n} is not a power of two ≥ 8")
        if not is_prime(q) or (q - 1) % (2 * n) or q.bit_length() > MAX_MODULUS_BITS:
            raise HEError(f"he.params: modulus {q} is not a prime ≡ 1 mod 2N below 2^{MAX_MODULUS_BITS}")
        limit = HE_STANDARD_MAX_LOG_Q.get(n, 0)
        if math.log2(q) > limit:
            raise InsecureParameters(
                f"he.params: log2 q = {math.log2(q):.1f} bits at N = {n} is below 128-bit security "
                f"(the HE Standard allows at most {limit} bits); use a larger ring degree"
            )
        canonical = json.dumps({"packing": "coefficients", "n": n, "q": str(q), "sigma": self.sigma,
                                "secret": "ternary"}, sort_keys=True)
        object.__setattr__(self, "digest", hashlib.sha256(canonical.encode()).hexdigest())

    @property
    def name(self) -> str:
        return f"coefficients-n{self.ring_degree}-q{self.modulus.bit_length()}"

    @property
    def moduli(self) -> tuple[int, ...]:
        return (self.modulus,)

    @classmethod
    def for_ring(cls, ring_degree: int) -> CoefficientParameters:
        """The largest NTT prime the kernels and the HE Standard allow at `ring_degree`."""
        limit = HE_STANDARD_MAX_LOG_Q.get(ring_degree)
        if limit is None:
            raise HEError(f"he.params: no HE Standard bound for ring degree {ring_degree}")
        return cls(ring_degree, ntt_primes(min(limit, MAX_MODULUS_BITS), ring_degree, 1)[0])


@dataclass(frozen=True)
class Blocks:
    """The block of one packed product: `tokens` × `inputs` of X against `inputs` × `outputs` of W."""

    tokens: int
    inputs: int
    outputs: int

    def counts(self, tokens: int, h_in: int, h_out: int) -> tuple[int, int, int]:
        """(T, I, O): blocks along tokens, inputs and outputs."""
        return -(-tokens // self.tokens), -(-h_in // self.inputs), -(-h_out // self.outputs)


@functools.lru_cache(maxsize=4096)
def choose_blocks(ring_degree: int, tokens: int, h_in: int, h_out: int) -> Blocks:
    """The block shape t·m·n ≤ N of least cost, over powers of two, in modular multiplications per
    coefficient: each of the T·I uploads takes two NTTs (one per party), each of the T·O results one
    (at decryption), an NTT about log2(N)/2 per coefficient, and the T·I·O products two (both halves)."""
    butterflies = math.log2(ring_degree) / 2
    best: tuple[float, Blocks] | None = None
    t = 1
    while t <= min(ring_degree, _pow2_at_least(tokens)):
        m = 1
        while t * m <= ring_degree and m <= _pow2_at_least(h_in):
            n = min(ring_degree // (t * m), _pow2_at_least(h_out))
            blocks = Blocks(min(t, tokens), min(m, h_in), min(n, h_out))
            big_t, big_i, big_o = blocks.counts(tokens, h_in, h_out)
            cost = butterflies * (2 * big_t * big_i + big_t * big_o) + 2 * big_t * big_i * big_o
            if best is None or cost < best[0]:
                best = (cost, blocks)
            m *= 2
        t *= 2
    assert best is not None
    return best[1]


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def encode_inputs(x: np.ndarray, blocks: Blocks, ring_degree: int) -> np.ndarray:
    """(T, I, N) int64: the coefficient polynomials of the blocks of the integer matrix x."""
    tokens, h_in = x.shape
    t, m, n = blocks.tokens, blocks.inputs, blocks.outputs
    big_t, big_i, _ = blocks.counts(tokens, h_in, n)
    padded = np.zeros((big_t * t, big_i * m), dtype=np.int64)
    padded[:tokens, :h_in] = x
    out = np.zeros((big_t, big_i, ring_degree), dtype=np.int64)
    # X[tb·t + i, ib·m + j] at coefficient i·m·n + j of block (tb, ib)
    view = padded.reshape(big_t, t, big_i, m).transpose(0, 2, 1, 3)
    out[:, :, : t * m * n].reshape(big_t, big_i, t, m * n)[..., :m] = view
    return out


def encode_weights(w: np.ndarray, blocks: Blocks, ring_degree: int) -> np.ndarray:
    """(I, O, N) int64: the reversed coefficient polynomials of the blocks of the integer matrix w."""
    h_in, h_out = w.shape
    m, n = blocks.inputs, blocks.outputs
    big_i, big_o = -(-h_in // m), -(-h_out // n)
    padded = np.zeros((big_i * m, big_o * n), dtype=np.int64)
    padded[:h_in, :h_out] = w
    out = np.zeros((big_i, big_o, ring_degree), dtype=np.int64)
    # W[ib·m + j, ob·n + k] at coefficient k·m + m − 1 − j of block (ib, ob)
    view = padded.reshape(big_i, m, big_o, n).transpose(0, 2, 3, 1)[..., ::-1]
    out[:, :, : m * n] = view.reshape(big_i, big_o, m * n)
    return out


def decode_outputs(y: np.ndarray, blocks: Blocks, tokens: int, h_out: int) -> np.ndarray:
    """(tokens × h_out) from the (T, O, N) result polynomials: coefficient i·m·n + k·m + m − 1."""
    t, m, n = blocks.tokens, blocks.inputs, blocks.outputs
    big_t, big_o = y.shape[0], y.shape[1]
    picked = y[:, :, : t * m * n].reshape(big_t, big_o, t, n, m)[..., m - 1]
    return picked.transpose(0, 2, 1, 3).reshape(big_t * t, big_o * n)[:tokens, :h_out]


@dataclass(frozen=True)
class SecretKey:
    """A ternary secret and its NTT; held by the key holder only."""

    coefficients: np.ndarray  # int64 (N,)
    ntt: np.ndarray  # uint64 (1, N)

    def __repr__(self) -> str:
        return "SecretKey(<hidden>)"


@dataclass(frozen=True)
class Ciphertexts:
    """A batch of ciphertexts (b, â) of shape (..., N) each: â always in NTT form, b in coefficient
    form when fresh (`ntt` False) and in NTT form once multiplied (`ntt` True)."""

    b: np.ndarray  # uint64 (..., N)
    a: np.ndarray  # uint64 (..., N), NTT form
    ntt: bool = False


class CoefficientContext:
    """Keys, seeded symmetric encryption, decryption and ct × pt products for one parameter set."""

    def __init__(self, params: CoefficientParameters, compiled: bool | None = None):
        """`compiled`: the numba NTT and product kernels (default: where numba imports), or NumPy."""
        self.params = params
        self.moduli = Moduli.build((params.modulus,))
        self.ntt = NTT(params.ring_degree, self.moduli, compiled)

    def _forward(self, polys: np.ndarray) -> np.ndarray:
        return self.ntt.forward(polys[..., None, :])[..., 0, :]

    def _inverse(self, polys: np.ndarray) -> np.ndarray:
        return self.ntt.inverse(polys[..., None, :])[..., 0, :]

    def _residues(self, values: np.ndarray) -> np.ndarray:
        return (np.asarray(values, dtype=np.int64) % np.int64(self.params.modulus)).astype(np.uint64)

    def generate_secret_key(self) -> SecretKey:
        s = ternary(ChaChaStream(), self.params.ring_degree)
        return SecretKey(s, self._forward(self._residues(s))[None, :])

    def expand(self, seed: bytes, shape: tuple[int, ...]) -> np.ndarray:
        """The uniform a-halves of seeded ciphertexts of `shape` (..., N), in NTT form."""
        return uniform_mod(ChaChaStream(seed), self.params.modulus, math.prod(shape)).reshape(shape)

    def encrypt(self, sk: SecretKey, messages: np.ndarray, seed: bytes) -> Ciphertexts:
        """(b, a): b = m + e − a·s mod q, with a expanded from `seed` (send b and the seed)."""
        q = self.moduli
        a = self.expand(seed, messages.shape)
        a_s = self._inverse(modular.mul(a, sk.ntt[0], q))
        e = discrete_gaussian(ChaChaStream(), messages.size, self.params.sigma).reshape(messages.shape)
        return Ciphertexts(modular.sub(self._residues(messages + e), a_s, q), a)

    def decrypt(self, sk: SecretKey, ct: Ciphertexts) -> np.ndarray:
        """b + a·s mod q, centred in (−q/2, q/2], int64."""
        q = self.moduli
        a_s = modular.mul(ct.a, sk.ntt[0], q)
        if ct.ntt:
            return modular.center(self._inverse(modular.add(ct.b, a_s, q)), q)
        return modular.center(modular.add(ct.b, self._inverse(a_s), q), q)

    def plain_weights(self, w: np.ndarray) -> np.ndarray:
        """Encoded weight polynomials (I, O, N) in NTT form, made once per weight matrix."""
        return self._forward(self._residues(w))

    def multiply(
        self, ct: Ciphertexts, weights_ntt: np.ndarray, counters: OpCounters | None = None
    ) -> Ciphertexts:
        """out[tb, ob] = Σ_ib ct[tb, ib] · ŵ[ib, ob]: (T, I, N) fresh ciphertexts by (I, O, N)
        plaintexts (NTT form) into (T, O, N) ciphertexts in NTT form, with products and additions only."""
        q, (inputs, outputs) = self.moduli, weights_ntt.shape[:2]
        if ct.b.shape[1] != inputs:
            raise HEError(f"{ct.b.shape[1]} input blocks for weights of {inputs}")
        if ct.ntt:
            raise HEError("a product's result cannot be multiplied again; send fresh ciphertexts")
        halves = []
        for half in (self._forward(ct.b), ct.a):
            if self.ntt.compiled:
                halves.append(compiled.product_sum(np.ascontiguousarray(half), weights_ntt, q.values[0],
                                                   float(q.q_inverse[0, 0])))
                continue
            spectrum = half[:, :, None, :]  # (T, I, 1, N)
            acc = np.empty((half.shape[0], outputs, half.shape[-1]), dtype=np.uint64)
            for ob in range(outputs):  # up to _SUMMED products < q < 2^50 add up in uint64 at once
                total = np.zeros_like(acc[:, ob])
                for start in range(0, inputs, _SUMMED):
                    products = modular.mul(
                        spectrum[:, start : start + _SUMMED, 0],
                        weights_ntt[None, start : start + _SUMMED, ob],
                        q,
                    )
                    total = modular.add(total, products.sum(axis=1, dtype=np.uint64) % q.q, q)
                acc[:, ob] = total
            halves.append(acc)
        if counters is not None:
            big_t = ct.b.shape[0]
            counters.ct_plain_mults += big_t * inputs * outputs
            counters.additions += big_t * (inputs - 1) * outputs
        return Ciphertexts(halves[0], halves[1], ntt=True)


def error_std(w: np.ndarray, blocks: Blocks, sigma: float = GAUSSIAN_SIGMA) -> float:
    """The standard deviation bound of a result coefficient's error: the error of every input
    block's ciphertext times its weight polynomial, σ·‖ŵ_(ib,ob)‖₂, added in quadrature over ib
    and maximised over ob (the error coefficients are independent)."""
    h_in, h_out = w.shape
    m, n = blocks.inputs, blocks.outputs
    big_i, big_o = -(-h_in // m), -(-h_out // n)
    padded = np.zeros((big_i * m, big_o * n))
    padded[:h_in, :h_out] = w
    energy = (padded.reshape(big_i, m, big_o, n) ** 2).sum(axis=(0, 1, 3))  # per output block
    return sigma * math.sqrt(float(energy.max()))


def check_capacity(
    params: CoefficientParameters, input_bound: float, w: np.ndarray, blocks: Blocks | None = None
) -> None:
    """Refuse a product whose result coefficients could wrap modulo q: for |x| ≤ `input_bound`,
    every result is at most input_bound·max_k Σ_j |w[j, k]| plus the error at 10σ (`blocks` None:
    for any block shape, whose error σ·‖w‖_F bounds)."""
    if blocks is None:
        noise = params.sigma * math.sqrt(float((np.asarray(w, dtype=np.float64) ** 2).sum()))
    else:
        noise = error_std(w, blocks, params.sigma)
    worst = input_bound * float(np.abs(w).sum(axis=0).max()) + 10 * noise
    if worst >= params.modulus / 2:
        raise ValueOutOfRange(
            f"results up to 2^{math.log2(worst):.1f} do not fit q/2 = 2^{math.log2(params.modulus) - 1:.1f} "
            f"at N = {params.ring_degree}: quantize the inputs or the weights to fewer bits"
        )
