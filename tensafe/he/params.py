"""CKKS parameter sets: ring degree, modulus chain, scale; checked against the HE Standard.

HE-LoRA needs no key switching, so there is no special prime P: the whole modulus budget is the
chain Q = q0 · q1 ⋯ q_depth. q0 (the base) holds the final result, Δ · 2^value_bits; each q_i
(i ≥ 1) is one rescale, and weights are encoded at scale q_i so that the scale stays Δ = 2^scale_bits.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field

from tensafe.he.errors import HEError, InsecureParameters, SlotOverflow
from tensafe.kernels.modular import MAX_MODULUS_BITS
from tensafe.kernels.primes import is_prime, ntt_primes
from tensafe.kernels.sampling import GAUSSIAN_SIGMA

# Homomorphic Encryption Standard (2018), table 1: max log2(Q·P) for 128-bit classical security,
# ternary (and uniform) secrets, error σ ≈ 3.19.
HE_STANDARD_MAX_LOG_Q = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881, 65536: 1747}
HE_LORA_DEPTH = 2  # stage 1 (x·A) and stage 2 (·s·B), one rescale each
NOISE_TAIL_SIGMAS = 6.0  # the noise floor counted in `precision_bits` is 6 standard deviations


@dataclass(frozen=True)
class CKKSParameters:
    """A concrete parameter set. Construct with `build_parameters`, `preset` or `select_parameters`."""

    name: str
    ring_degree: int
    moduli: tuple[int, ...]  # q0 (base) first; rescale drops the last
    scale_bits: int
    value_bits: int  # every encrypted value (input, intermediate, output) must satisfy |v| < 2^value_bits
    allow_insecure: bool = False
    sigma: float = GAUSSIAN_SIGMA
    digest: str = field(init=False, repr=False)

    def __post_init__(self):
        n = self.ring_degree
        if n < 8 or n & (n - 1):
            raise HEError(f"he.params: ring degree {n} is not a power of two ≥ 8")
        for q in self.moduli:
            if not is_prime(q) or (q - 1) % (2 * n) or q.bit_length() > MAX_MODULUS_BITS:
                raise HEError(f"he.params: modulus {q} is not a prime ≡ 1 mod 2N below 2^{MAX_MODULUS_BITS}")
        if len(set(self.moduli)) != len(self.moduli):
            raise HEError("he.params: the modulus chain repeats a prime")
        if self.moduli[0] <= 2 ** (self.scale_bits + self.value_bits + 1):
            raise HEError(
                f"he.params: the base modulus ({self.moduli[0].bit_length()} bits) must exceed "
                f"2 · Δ · 2^value_bits = 2^{self.scale_bits + self.value_bits + 1}"
            )
        limit = HE_STANDARD_MAX_LOG_Q.get(n, 0)
        if self.log_q > limit and not self.allow_insecure:
            raise InsecureParameters(
                f"he.params {self.name!r}: log2 Q = {self.log_q:.1f} bits at N = {n} is below 128-bit "
                f"security (HE Standard allows at most {limit} bits); use a larger ring degree or a "
                f"shorter chain (allow_insecure: true exists for tests only)"
            )
        canonical = json.dumps(
            {"n": n, "moduli": [str(q) for q in self.moduli], "scale_bits": self.scale_bits,
             "value_bits": self.value_bits, "sigma": self.sigma, "secret": "ternary"},
            sort_keys=True,
        )
        object.__setattr__(self, "digest", hashlib.sha256(canonical.encode()).hexdigest())
        if self.insecure:
            print(
                f"WARNING: HE parameter set {self.name!r} is INSECURE (log2 Q = {self.log_q:.0f} > "
                f"{limit} at N = {n}); allow_insecure is for tests only",
                file=sys.stderr,
            )

    @property
    def slots(self) -> int:
        return self.ring_degree // 2

    @property
    def depth(self) -> int:
        return len(self.moduli) - 1

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def log_q(self) -> float:
        return sum(math.log2(q) for q in self.moduli)

    @property
    def insecure(self) -> bool:
        return self.log_q > HE_STANDARD_MAX_LOG_Q.get(self.ring_degree, 0)

    def describe(self) -> str:
        bits = "+".join(str(q.bit_length()) for q in self.moduli)
        flag = " INSECURE" if self.insecure else ""
        return (
            f"{self.name}: N={self.ring_degree} ({self.slots} slots), log2 Q={self.log_q:.0f} ({bits}), "
            f"Δ=2^{self.scale_bits}, |values|<2^{self.value_bits}, depth {self.depth}{flag}"
        )


def build_parameters(
    name: str, ring_degree: int, scale_bits: int, value_bits: int, weight_bits: int | None = None,
    depth: int = HE_LORA_DEPTH, allow_insecure: bool = False,
) -> CKKSParameters:
    """A chain of one base prime above 2·Δ·2^value_bits and `depth` rescale primes.

    Rescale primes have `weight_bits` bits (default scale_bits, the textbook chain). Weights are
    encoded at scale q_i and divided by q_i again, so Δ never changes and the rescale noise is set by
    Δ alone: q_i only needs the bits the *weights* need, which keeps Q and the GEMM limbs small.
    """
    weight_bits = weight_bits or scale_bits
    base_bits = scale_bits + value_bits + 2  # primes of `bits` bits lie in (2^(bits−1), 2^bits)
    if max(base_bits, weight_bits) > MAX_MODULUS_BITS:
        raise HEError(
            f"he.params: scale_bits + value_bits + 2 = {base_bits} exceeds the kernels' "
            f"{MAX_MODULUS_BITS}-bit modulus limit; lower he.precision_bits or he.value_bits"
        )
    rescale = ntt_primes(weight_bits, ring_degree, depth)
    base = ntt_primes(base_bits, ring_degree, 1, exclude=tuple(rescale))
    return CKKSParameters(name, ring_degree, (*base, *rescale), scale_bits, value_bits, allow_insecure)


def noise_bits(ring_degree: int) -> float:
    """log2 of the per-slot noise floor after a rescale (6σ), the dominant term at scale Δ.

    Rescale rounding adds τ0 + τ1·s (τ uniform in [−½, ½], s ternary): per coefficient variance
    (1 + 2N/3)/12, per slot (real part) N/2 times that.
    """
    n = ring_degree
    return math.log2(NOISE_TAIL_SIGMAS * math.sqrt(n / 2 * (1 + 2 * n / 3) / 12))


def scale_bits_for(ring_degree: int, precision_bits: int) -> int:
    return math.ceil(precision_bits + noise_bits(ring_degree))


def weight_bits_for(precision_bits: int) -> int:
    """Rescale-prime bits: weight rounding error |x|·sqrt(h/12)·2^-(bits+1) stays below 2^-precision
    for unit inputs up to h = 4096."""
    return precision_bits + 5


def select_parameters(
    tokens: int, precision_bits: int = 18, value_bits: int = 8, depth: int = HE_LORA_DEPTH,
) -> CKKSParameters:
    """The smallest secure ring whose slots hold `tokens` and whose Q holds `depth` rescales at
    `precision_bits` bits below 1 (absolute, for unit-scale values) with |values| < 2^value_bits."""
    if tokens < 1:
        raise HEError(f"he: token count must be ≥ 1, got {tokens}")
    too_wide = []  # rings whose base prime would pass the kernels' modulus cap
    for log_n in range(12, 17):
        n = 1 << log_n
        if n // 2 < tokens:
            continue
        s, w = scale_bits_for(n, precision_bits), weight_bits_for(precision_bits)
        base = s + value_bits + 2
        if max(base, w) > MAX_MODULUS_BITS:
            too_wide.append((n, base))
            continue
        if base + depth * w > HE_STANDARD_MAX_LOG_Q[n]:
            continue
        return build_parameters(f"auto-n{n}-p{precision_bits}", n, s, value_bits, w, depth)
    if too_wide:
        n, base = too_wide[0]
        raise HEError(
            f"he: {precision_bits} bits of precision with value_bits={value_bits} need a {base}-bit base "
            f"prime at N={n}, past the kernels' {MAX_MODULUS_BITS}-bit modulus limit (not a security "
            "limit); lower he.precision_bits or he.value_bits"
        )
    raise HEError(
        f"he: no secure ring up to N=65536 holds {tokens} tokens at {precision_bits} bits of precision "
        f"with value_bits={value_bits}; lower he.precision_bits or split the batch"
    )



def _named(name: str, n: int, precision_bits: int = 18, value_bits: int = 8) -> CKKSParameters:
    return build_parameters(
        name, n, scale_bits_for(n, precision_bits), value_bits, weight_bits_for(precision_bits)
    )


# Named sets: N = 2^12 and 2^13 for decode batches, 2^14+ for prefill (18 bits of precision, |v| < 256).
PRESETS = {
    "n4096": lambda: _named("n4096", 4096),
    "n8192": lambda: _named("n8192", 8192),
    "n16384": lambda: _named("n16384", 16384),
    "n32768": lambda: _named("n32768", 32768),
    # The textbook chain (rescale primes of Δ's size), as OpenFHE builds it: for like-for-like benchmarks.
    "n8192_uniform": lambda: build_parameters("n8192_uniform", 8192, scale_bits_for(8192, 18), 8),
    # Insecure: a toy ring for fast unit tests; refused unless allow_insecure is set.
    "insecure_n256": lambda: build_parameters("insecure_n256", 256, 30, 8, 24, allow_insecure=True),
}


def preset(name: str, allow_insecure: bool = False) -> CKKSParameters:
    if name not in PRESETS:
        raise HEError(f"he.params={name!r}: not a parameter set; choose auto or one of {sorted(PRESETS)}")
    if name.startswith("insecure") and not allow_insecure:
        raise InsecureParameters(
            f"he.params={name!r} is below 128-bit security; it needs he.allow_insecure=true (tests only)"
        )
    return PRESETS[name]()


def resolve_parameters(
    params: str, max_tokens: int, precision_bits: int, value_bits: int, allow_insecure: bool = False,
) -> CKKSParameters:
    """The parameter set a config names: `auto` selects from the token count and precision target."""
    if params == "auto":
        return select_parameters(max_tokens, precision_bits, value_bits)
    chosen = preset(params, allow_insecure)
    if chosen.slots < max_tokens:
        raise SlotOverflow(
            f"he.params={params} has {chosen.slots} slots, fewer than he.max_tokens={max_tokens}; "
            "choose a larger ring or he.params=auto"
        )
    return chosen
