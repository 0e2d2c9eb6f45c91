"""Circuit-private coefficient HE-LoRA: the key holder decrypts the outputs and nothing else.

Without this option (`coefficient_lora`) a result's coefficients hold far more than the outputs,
and its â-half is â·ŵ for an â the key holder drew itself, so a single reply shows it the encoded
weights. Here, before it returns a result, the evaluator (Cheetah's extraction, Huang et al.,
USENIX Security 2022):

1. re-randomises it with a fresh public-key encryption of zero, (b, a) + (p_b·u + e0, p_a·u + e1)
   with u ternary and e0, e1 Gaussian, under the public key (p_b = −p_a·s + e, p_a) of the key
   holder's context: the a-half becomes an RLWE sample, independent of the weights;
2. floods the noise of every output coefficient with uniform noise in [−B, B), B = 2^flood_bits
   times the bound (12σ) on the noise its products carry, so that what the key holder decrypts is
   within 2^−flood_bits (statistical distance, per coefficient) of a value that depends on the
   weights only through the output;
3. sends, of the b-half, only the output coefficients (t·n of each block's N), and the whole
   a-half. The other coefficients, the other linear combinations of the weights, never leave.

The key holder then decrypts exactly the outputs: Δ in one round (`rounds=1`), or U = X·A and
then Δ in two, where U still shows it A (as the two-round protocol must).

Flooding costs modulus: B is about 2^70, so the key holder lifts its inputs by 2^d (`lift_bits`)
for the outputs to stand far above it, and the results need Q ≈ 2^100: two 50-bit NTT primes
(RNS), within the HE Standard's 109 bits at N = 4096, so this option needs N ≥ 4096. Each result
costs three more NTTs per prime (û, and both halves back to coefficients), and its download is
the a-half plus t·n residues per block instead of both halves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from tensafe.he import wire
from tensafe.he.coefficient import (
    Ciphertexts,
    CoefficientContext,
    CoefficientParameters,
    choose_blocks,
    encode_inputs,
    encode_weights,
    error_std,
)
from tensafe.he.coefficient_lora import (
    INPUT_BITS,
    WEIGHT_BITS,
    RowQuantized,
    check_stage,
    checked_activations,
    checked_factors,
    most_weight_bits,
    quantize_rows,
    quantize_weights,
    stage_bound,
)
from tensafe.he.coefficient_lora import NOISE_TAIL as STAGE_TAIL
from tensafe.he.counters import OpCounters
from tensafe.he.errors import HEError, InsecureParameters, SerializationError, ValueOutOfRange
from tensafe.he.params import HE_STANDARD_MAX_LOG_Q
from tensafe.kernels import modular
from tensafe.kernels.modular import MAX_MODULUS_BITS, Moduli
from tensafe.kernels.ntt import NTT
from tensafe.kernels.primes import is_prime, ntt_primes
from tensafe.kernels.sampling import GAUSSIAN_SIGMA, ChaChaStream, discrete_gaussian, ternary, uniform_rns

FLOOD_BITS = 40  # statistical security of the flooding, per coefficient
NOISE_TAIL = 12.0  # σ of a product's noise that the flood is sized against (tail below 2^-100)
PRIMES = 2  # RNS primes of MAX_MODULUS_BITS bits: Q ≈ 2^100
SEED_BYTES = 32
_CONTEXT = struct.Struct("<IIQQIII")  # N, L, q1, q2, input bits, rounds, flood bits
_BATCH = struct.Struct("<IIIII")  # tokens, T, blocks (I or O), t, n


@dataclass(frozen=True)
class CircuitPrivateParameters:
    """Ring degree N and two NTT primes (Q = q1·q2) within the HE Standard's 128-bit bound."""

    ring_degree: int
    moduli: tuple[int, int]
    sigma: float = GAUSSIAN_SIGMA
    flood_bits: int = FLOOD_BITS
    digest: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n, moduli = self.ring_degree, self.moduli
        if n < 8 or n & (n - 1):
            raise HEError(f"he.params: ring degree {n} is not a power of two ≥ 8")
        if len(moduli) != PRIMES or len(set(moduli)) != PRIMES:
            raise HEError(f"circuit-private packing uses {PRIMES} distinct primes, got {moduli}")
        for q in moduli:
            if not is_prime(q) or (q - 1) % (2 * n) or q.bit_length() > MAX_MODULUS_BITS:
                raise HEError(f"he.params: modulus {q} is not a prime ≡ 1 mod 2N below 2^{MAX_MODULUS_BITS}")
        log_q, limit = math.log2(self.modulus), HE_STANDARD_MAX_LOG_Q.get(n, 0)
        if log_q > limit:
            raise InsecureParameters(
                f"he.params: log2 Q = {log_q:.1f} bits at N = {n} is below 128-bit security (the HE "
                f"Standard allows at most {limit} bits); circuit privacy needs N ≥ 4096"
            )
        canonical = json.dumps({"packing": "coefficients", "circuit_private": True, "n": n,
                                "q": [str(q) for q in moduli], "sigma": self.sigma,
                                "flood_bits": self.flood_bits, "secret": "ternary"}, sort_keys=True)
        object.__setattr__(self, "digest", hashlib.sha256(canonical.encode()).hexdigest())

    @property
    def modulus(self) -> int:
        return math.prod(self.moduli)

    @property
    def name(self) -> str:
        return f"coefficients-private-n{self.ring_degree}-q{PRIMES}x{MAX_MODULUS_BITS}"

    @classmethod
    def for_ring(cls, ring_degree: int) -> CircuitPrivateParameters:
        limit = HE_STANDARD_MAX_LOG_Q.get(ring_degree, 0)
        if limit < PRIMES * MAX_MODULUS_BITS:
            raise HEError(f"circuit privacy needs {PRIMES} primes of {MAX_MODULUS_BITS} bits, which the HE "
                          f"Standard allows from N = 4096; he.coefficient_ring_degree={ring_degree} is "
                          "too small")
        first, second = ntt_primes(MAX_MODULUS_BITS, ring_degree, PRIMES)
        return cls(ring_degree, (first, second))


def lift_bits(params: CircuitPrivateParameters, input_bits: int, h_in: int) -> int:
    """d: the key holder multiplies its quantized inputs by 2^d before encrypting, so that any
    output, at most 2^(d + input_bits + max weight bits) · h_in, takes at most Q/8, whatever the
    weights; the evaluator checks its flood against the rest (`check_room`)."""
    used = input_bits + WEIGHT_BITS[1] + math.ceil(math.log2(max(h_in, 2)))
    d = int(math.log2(params.modulus)) - 3 - used
    if d < 1:
        raise ValueOutOfRange(f"a width of {h_in} leaves no room to lift the inputs above the flood")
    return d


def _flood_bound(weights: np.ndarray, params: CircuitPrivateParameters, h_in: int, h_out: int,
                 tokens: int) -> int:
    """B = 2^(flood_bits + ⌈log2 12σ·‖noise‖⌉): the flood's half-width, for the blocks of this product."""
    blocks = choose_blocks(params.ring_degree, tokens, h_in, h_out)
    noise = NOISE_TAIL * error_std(weights, blocks, params.sigma)
    return 1 << (params.flood_bits + max(0, math.ceil(math.log2(max(noise, 1.0)))))


def check_room(params: CircuitPrivateParameters, input_bits: int, weights: np.ndarray) -> None:
    """Refuse weights whose lifted outputs plus the largest flood could wrap modulo Q."""
    h_in = weights.shape[0]
    worst_noise = NOISE_TAIL * params.sigma * math.sqrt(float((weights.astype(np.float64) ** 2).sum()))
    flood = 2.0 ** (params.flood_bits + max(0, math.ceil(math.log2(max(worst_noise, 1.0)))))
    lift = lift_bits(params, input_bits, h_in)
    outputs = 2.0 ** (lift + input_bits) * float(np.abs(weights).sum(axis=0).max())
    if outputs + 2 * flood >= params.modulus / 4:
        raise ValueOutOfRange(f"outputs up to 2^{math.log2(outputs):.1f} and a flood of "
                              f"2^{math.log2(flood):.1f} do not fit Q/4 = "
                              f"2^{math.log2(params.modulus) - 2:.1f}")


class _RNS:
    """The ring Z_Q[x]/(x^N + 1) in RNS form: residues (..., L, N)."""

    def __init__(self, params: CircuitPrivateParameters):
        self.params = params
        self.moduli = Moduli.build(params.moduli)
        self.ntt = NTT(params.ring_degree, self.moduli)
        # per prime, a one-prime coefficient context: its products (compiled where numba imports)
        self.primes = [CoefficientContext(CoefficientParameters(params.ring_degree, q))
                       for q in params.moduli]

    def residues(self, values: np.ndarray) -> np.ndarray:
        """Signed int64 (..., N) → residues (..., L, N)."""
        return modular.reduce_signed(np.asarray(values, dtype=np.int64)[..., None, :], self.moduli)

    def uniform(self, seed: bytes | None, shape: tuple[int, ...]) -> np.ndarray:
        """Uniform residues (*shape[:-1], L, N) from `seed` (fresh randomness if None)."""
        return uniform_rns(ChaChaStream(seed), self.params.moduli, shape)

    def gaussian(self, shape: tuple[int, ...]) -> np.ndarray:
        return discrete_gaussian(ChaChaStream(), math.prod(shape), self.params.sigma).reshape(shape)

    def flood(self, shape: tuple[int, ...], bound: int) -> np.ndarray:
        """Uniform integers in [−bound, bound) (bound a power of two, up to 2^100), as residues
        (*shape[:-1], L, N): the high and the low 32 bits drawn apart, composed modulo each prime."""
        bits, stream, m = bound.bit_length(), ChaChaStream(), self.moduli
        count = math.prod(shape)
        low = stream.words(count) & np.uint64((1 << min(bits, 32)) - 1)
        high = stream.words(count) >> np.uint64(64 - (bits - 32)) if bits > 32 else np.zeros(count, np.uint64)
        q = m.q.reshape(-1)
        value = modular.add(modular.mul((high[None, :] % q[:, None]), modular.scalar_residues(1 << 32, m), m),
                            low[None, :] % q[:, None], m)  # (L, count): uniform in [0, 2·bound)
        value = modular.sub(value, np.broadcast_to(modular.scalar_residues(bound, m), value.shape), m)
        return np.moveaxis(value.reshape(len(m), *shape), 0, -2)

    def to_float(self, residues: np.ndarray) -> np.ndarray:
        """Residues (..., L=2, k) → their centred values modulo Q, as float64 (CRT, Garner)."""
        (q1, q2), m2 = self.params.moduli, Moduli.build((self.params.moduli[1],))
        r1, r2 = residues[..., 0, :], residues[..., 1, :]
        inverse = np.uint64(pow(q1, -1, q2))
        t = modular.mul(modular.sub(r2, r1 % np.uint64(q2), m2), np.full_like(r2, inverse), m2)
        t_signed = np.where(t > q2 // 2, t.astype(np.int64) - q2, t.astype(np.int64))
        return r1.astype(np.float64) + float(q1) * t_signed.astype(np.float64)


def _outputs_of(blocks) -> np.ndarray:
    """The coefficient indices of a block's outputs: i·m·n + k·m + m − 1 for i < t, k < n."""
    t, m, n = blocks.tokens, blocks.inputs, blocks.outputs
    return (np.arange(t)[:, None] * m * n + np.arange(n)[None, :] * m + m - 1).reshape(-1)


class CircuitPrivateKeyHolder:
    """The key holder: the secret key, a public key for the evaluator's re-randomisation,
    lifted seeded uploads, decryption of the output coefficients only."""

    def __init__(self, params: CircuitPrivateParameters, input_bits: int = INPUT_BITS,
                 max_message_bytes: int = wire.DEFAULT_MAX_BYTES, rounds: int = 2):
        if rounds not in (1, 2):
            raise HEError(f"coefficient HE-LoRA runs in 1 or 2 rounds, not {rounds}")
        self.params, self.input_bits, self.rounds = params, input_bits, rounds
        self.max_message_bytes = max_message_bytes
        self._ring = ring = _RNS(params)
        s = ternary(ChaChaStream(), params.ring_degree)
        self._secret = ring.ntt.forward(ring.residues(s))  # (L, N)
        self._public_seed = os.urandom(SEED_BYTES)
        p_a = ring.uniform(self._public_seed, (params.ring_degree,))  # NTT form
        e = ring.ntt.forward(ring.residues(ring.gaussian((params.ring_degree,))))
        self._public_b = modular.sub(e, modular.mul(p_a, self._secret, ring.moduli), ring.moduli)  # NTT form

    def public_context(self) -> bytearray:
        """The ring, both primes, input bits, rounds, flood bits and the public key (p̂_b, seed of p̂_a)."""
        p = self.params
        return wire.pack(wire.Kind.PRIVATE_CONTEXT, wire.BackendId.KERNELS, p,
                         _CONTEXT.pack(p.ring_degree, PRIMES, *p.moduli, self.input_bits, self.rounds,
                                       p.flood_bits),
                         self._public_seed, _pack(self._public_b, p))

    def upload(self, x: np.ndarray, h_out: int) -> tuple[bytearray, RowQuantized]:
        x = checked_activations(x)
        ring, n = self._ring, self.params.ring_degree
        quantized = quantize_rows(x, self.input_bits)
        blocks = choose_blocks(n, x.shape[0], x.shape[1], h_out)
        lift = modular.scalar_residues(1 << lift_bits(self.params, self.input_bits, x.shape[1]), ring.moduli)
        messages = ring.residues(encode_inputs(quantized.values, blocks, n))  # (T, I, L, N)
        messages = modular.mul(messages, np.broadcast_to(lift, messages.shape), ring.moduli)
        seed = os.urandom(SEED_BYTES)
        a = ring.uniform(seed, messages.shape[:2] + (n,))
        a_s = ring.ntt.inverse(modular.mul(a, self._secret, ring.moduli))
        e = ring.residues(ring.gaussian(messages.shape[:2] + (n,)))
        b = modular.sub(modular.add(messages, e, ring.moduli), a_s, ring.moduli)
        header = _BATCH.pack(x.shape[0], b.shape[0], b.shape[1], blocks.tokens, blocks.inputs)
        return wire.pack(wire.Kind.PRIVATE_UPLOAD, wire.BackendId.KERNELS, self.params, header, seed,
                         _pack(b, self.params)), quantized

    def download(self, data: bytes, quantized: RowQuantized, weights_scale: float, h_in: int,
                 h_out: int) -> np.ndarray:
        """The (tokens × h_out) product from a result frame: c0 + (c1·s) at the output coefficients."""
        payload = wire.unpack(data, wire.Kind.PRIVATE_RESULT, wire.BackendId.KERNELS, self.params,
                              self.max_message_bytes)
        tokens, big_t, big_o, t, n_out = _header(payload)
        blocks = choose_blocks(self.params.ring_degree, quantized.values.shape[0], h_in, h_out)
        expected = blocks.counts(quantized.values.shape[0], h_in, h_out)
        if tokens != quantized.values.shape[0] or (big_t, big_o) != (expected[0], expected[2]) \
                or (t, n_out) != (blocks.tokens, blocks.outputs):
            raise HEError(f"the reply is not this upload's result: {tokens} tokens in {big_t} × {big_o} "
                          f"blocks, expected {quantized.values.shape[0]} in {expected[0]} × {expected[2]}")
        ring, n = self._ring, self.params.ring_degree
        used = t * n_out
        body = payload[_BATCH.size:]
        if len(body) != _bytes(big_t * big_o * (used + n), self.params):
            raise SerializationError("a circuit-private result is truncated or padded")
        c0 = _unpack(body, self.params, (big_t, big_o), used, 0)
        c1 = _unpack(body, self.params, (big_t, big_o), n, _bytes(big_t * big_o * used, self.params))
        c1_s = ring.ntt.inverse(modular.mul(ring.ntt.forward(c1), self._secret, ring.moduli))
        values = ring.to_float(modular.add(c0, c1_s[..., _outputs_of(blocks)], ring.moduli))  # (T, O, t·n)
        values = values.reshape(big_t, big_o, t, n_out).transpose(0, 2, 1, 3)
        values = values.reshape(big_t * t, big_o * n_out)
        lift = 2.0 ** lift_bits(self.params, self.input_bits, h_in)
        return values[:tokens, :h_out] / (quantized.scales[:, None] * weights_scale * lift)


class CircuitPrivateEvaluator:
    """Owns A, B and s; multiplies, re-randomises, floods and extracts (module docstring)."""

    def __init__(self, public_context: bytes, a: np.ndarray, b: np.ndarray, scale: float,
                 max_message_bytes: int = wire.DEFAULT_MAX_BYTES):
        params, input_bits, rounds, seed, public_b = read_context(public_context, max_message_bytes)
        a, b = checked_factors(a, b, scale)
        self.params, self.rounds, self.max_message_bytes = params, rounds, max_message_bytes
        self.input_bits = input_bits
        self._ring = ring = _RNS(params)
        self._public = (public_b, ring.uniform(seed, (params.ring_degree,)))
        self.shape = (a.shape[0], a.shape[1], b.shape[1])
        factors = (a, scale * b) if rounds == 2 else (a @ (scale * b),)
        self.stages = [quantize_weights(w, _weight_bits(w, params, input_bits)) for w in factors]
        self._encoded: dict[tuple[int, object], list[np.ndarray]] = {}
        self.last_counters = OpCounters()

    @property
    def weight_scales(self) -> tuple[float, ...]:
        return tuple(w.scale for w in self.stages)

    def evaluate_bytes(self, data: bytes, stage: int) -> bytearray:
        check_stage(stage, self.rounds)
        weights = self.stages[stage - 1]
        h_in, h_out = weights.values.shape
        payload = wire.unpack(data, wire.Kind.PRIVATE_UPLOAD, wire.BackendId.KERNELS, self.params,
                              self.max_message_bytes)
        tokens, big_t, big_i, t, m = _header(payload)
        ring, n = self._ring, self.params.ring_degree
        blocks = choose_blocks(n, tokens, h_in, h_out)
        if (big_t, big_i, t, m) != (*blocks.counts(tokens, h_in, h_out)[:2], blocks.tokens, blocks.inputs):
            raise HEError(f"stage {stage} takes {blocks.counts(tokens, h_in, h_out)[:2]} blocks of {blocks} "
                          f"for {tokens} tokens of width {h_in}, got {big_t} × {big_i} of {t} × {m}")
        body = payload[_BATCH.size:]
        seed = bytes(body[:SEED_BYTES])
        b = _unpack(body, self.params, (big_t, big_i), n, SEED_BYTES)
        a = ring.uniform(seed, (big_t, big_i, n))
        key = (stage, blocks)
        if key not in self._encoded:
            encoded = encode_weights(weights.values, blocks, n)
            self._encoded[key] = [prime.plain_weights(encoded) for prime in ring.primes]
        counters, b_hats, a_hats = OpCounters(), [], []
        for i, (prime, w) in enumerate(zip(ring.primes, self._encoded[key], strict=True)):
            out = prime.multiply(Ciphertexts(b[..., i, :], a[..., i, :]), w, counters if i == 0 else None)
            b_hats.append(out.b)
            a_hats.append(out.a)
        self.last_counters = counters  # one product of RNS polynomials per block pair
        halves = [np.stack(b_hats, axis=-2), np.stack(a_hats, axis=-2)]
        c0, c1 = self._rerandomise(halves[0], halves[1])
        outputs = _outputs_of(blocks)
        bound = _flood_bound(weights.values, self.params, h_in, h_out, tokens)
        c0 = c0[..., outputs]
        c0 = modular.add(c0, ring.flood(c0.shape[:-2] + (c0.shape[-1],), bound), ring.moduli)
        header = _BATCH.pack(tokens, big_t, c1.shape[1], blocks.tokens, blocks.outputs)
        return wire.pack(wire.Kind.PRIVATE_RESULT, wire.BackendId.KERNELS, self.params, header,
                         _pack(c0, self.params), _pack(c1, self.params))

    def _rerandomise(self, b_hat: np.ndarray, a_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(b̂, â) (NTT form) + a fresh public-key encryption of zero, back in coefficient form."""
        ring, (p_b, p_a) = self._ring, self._public
        lead = b_hat.shape[:-2] + (self.params.ring_degree,)
        u = ring.ntt.forward(ring.residues(ternary(ChaChaStream(), math.prod(lead)).reshape(lead)))
        b = ring.ntt.inverse(modular.add(b_hat, modular.mul(u, np.broadcast_to(p_b, u.shape), ring.moduli),
                                         ring.moduli))
        a = ring.ntt.inverse(modular.add(a_hat, modular.mul(u, np.broadcast_to(p_a, u.shape), ring.moduli),
                                         ring.moduli))
        e0, e1 = ring.residues(ring.gaussian(lead)), ring.residues(ring.gaussian(lead))
        return modular.add(b, e0, ring.moduli), modular.add(a, e1, ring.moduli)


def _weight_bits(w: np.ndarray, params: CircuitPrivateParameters, input_bits: int) -> int:
    bits = most_weight_bits(w, lambda values: check_room(params, input_bits, values))
    if bits is not None:
        return bits
    raise ValueOutOfRange(f"a {w.shape[0]} × {w.shape[1]} weight matrix does not fit circuit-private "
                          f"packing at N = {params.ring_degree}; use a larger he.coefficient_ring_degree")


def read_context(data: bytes, max_bytes: int):
    """(params, input bits, rounds, public seed, p̂_b) from a circuit-private context, checked."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise HEError("an evaluator takes the key holder's public context as bytes, nothing else")
    view = memoryview(data).cast("B")
    if wire.kind_of(view) != wire.Kind.PRIVATE_CONTEXT or len(view) < wire.payload_offset + _CONTEXT.size:
        raise SerializationError("expected a private_context message; refused")
    n, primes, q1, q2, input_bits, rounds, flood_bits = _CONTEXT.unpack_from(view, wire.payload_offset)
    if primes != PRIMES:
        raise SerializationError(f"a circuit-private context has {PRIMES} primes, got {primes}")
    if flood_bits < FLOOD_BITS:
        raise HEError(f"a flood of {flood_bits} bits is below the {FLOOD_BITS} bits of statistical security "
                      "this evaluator gives")
    params = CircuitPrivateParameters(n, (q1, q2), flood_bits=flood_bits)
    payload = wire.unpack(view, wire.Kind.PRIVATE_CONTEXT, wire.BackendId.KERNELS, params, max_bytes)
    if len(payload) != _CONTEXT.size + SEED_BYTES + _bytes(n, params):
        raise SerializationError("a circuit-private context is truncated or padded")
    if not 8 <= input_bits <= 30 or rounds not in (1, 2):
        raise HEError(f"a circuit-private context asks for {input_bits} input bits and {rounds} rounds; "
                      "input bits lie in [8, 30], rounds are 1 or 2")
    seed = bytes(payload[_CONTEXT.size : _CONTEXT.size + SEED_BYTES])
    public_b = _unpack(payload, params, (), n, _CONTEXT.size + SEED_BYTES)
    return params, input_bits, rounds, seed, public_b


def _header(payload: memoryview) -> tuple[int, int, int, int, int]:
    if len(payload) < _BATCH.size:
        raise SerializationError("circuit-private batch truncated: no header")
    fields = _BATCH.unpack_from(payload)
    if not all(fields):
        raise SerializationError(f"circuit-private batch header {fields} has a zero count; refused")
    return fields


def _width(params: CircuitPrivateParameters) -> int:
    return max(wire.residue_bytes(q) for q in params.moduli)


def _bytes(polys_times_n: int, params: CircuitPrivateParameters) -> int:
    return polys_times_n * PRIMES * _width(params)


def _pack(residues: np.ndarray, params: CircuitPrivateParameters) -> np.ndarray:
    return wire.pack_residues(residues, _width(params))


def _unpack(body: memoryview, params: CircuitPrivateParameters, lead: tuple[int, ...], k: int,
            offset: int) -> np.ndarray:
    """Residues (*lead, L, k) read from `body` at `offset`; each checked below its prime."""
    count = math.prod(lead) * PRIMES * k
    size = count * _width(params)
    data = body[offset : offset + size]
    if len(data) != size:
        raise SerializationError(f"circuit-private batch needs {size} bytes of residues here, "
                                 f"got {len(data)}")
    values = wire.unpack_residues(np.frombuffer(data, dtype=np.uint8), _width(params), k)
    values = values.reshape(*lead, PRIMES, k)
    if (values >= np.array(params.moduli, dtype=np.uint64).reshape(PRIMES, 1)).any():
        raise SerializationError("a residue is not below its modulus; refused")
    return values


def circuit_private_delta(
    holder: CircuitPrivateKeyHolder, evaluator: CircuitPrivateEvaluator, x: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(Δ, bound) as `coefficient_lora.coefficient_delta`, through the circuit-private stages. Each
    stage's noise: the flood B, the products' 12σ tail and the re-randomisation's (2N + 1)·10σ,
    divided by the lift and both scales; stage 2 carries stage 1's bound through |s·B|. Both roles
    run here: a measurement, not a deployment."""
    n, sigma, tokens = holder.params.ring_degree, holder.params.sigma, x.shape[0]
    values, bound = np.asarray(x, dtype=np.float64), None
    for stage, weights in enumerate(evaluator.stages, start=1):
        h_in, h_out = weights.values.shape
        upload, quantized = holder.upload(values, h_out)
        out = holder.download(evaluator.evaluate_bytes(upload, stage), quantized, weights.scale, h_in, h_out)
        blocks = choose_blocks(n, tokens, h_in, h_out)
        noise = (_flood_bound(weights.values, holder.params, h_in, h_out, tokens)
                 + NOISE_TAIL * error_std(weights.values, blocks, sigma) + (2 * n + 1) * 10 * sigma)
        lift = 2.0 ** lift_bits(holder.params, holder.input_bits, h_in)
        magnitude = values if bound is None else np.abs(values) + bound
        own = stage_bound(magnitude, quantized.scales, weights, noise / (STAGE_TAIL * lift))
        bound = own if bound is None else own + bound @ np.abs(weights.source)
        values = out
    assert bound is not None
    return values, bound
