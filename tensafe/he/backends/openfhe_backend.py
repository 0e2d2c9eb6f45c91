"""HE-LoRA on OpenFHE's Python wheel: the audited reference and the benchmark baseline.

`openfhe` is imported lazily: this module imports in every interpreter, and constructing the
backend where the wheel cannot load raises `BackendUnavailable`. OpenFHE's PyPI wheels (1.x)
import on CPython 3.10; `make test-openfhe` builds and uses the `.venv-openfhe` environment.

What OpenFHE is asked for, and what it picks
--------------------------------------------
CKKSRNS with ring dimension N, multiplicative depth = params.depth, ScalingModSize =
params.scale_bits, FirstModSize = bits of params.moduli[0], FIXEDMANUAL rescaling, batch size
N/2, a uniform ternary secret, and the PKE, LEVELEDSHE and ADVANCEDSHE features (the last for
EvalLinearWSum, a benchmark point). No evaluation key of any
kind is generated (no relinearization, no rotation/automorphism keys): HE-LoRA multiplies
ciphertexts by plaintext scalars only.

OpenFHE chooses its own NTT primes, so its chain differs from `params.moduli` (same bit sizes
within one bit: for N = 4096 it picks 40 + 31 + 32 bits where our set has 40 + 31 + 31). Its
FIXEDMANUAL mode tracks the scale as exactly Δ = 2^scale_bits after every rescale although the
dropped prime q is only close to Δ, which leaves a relative error |Δ/q − 1| ≈ 2^-14 per level.
With `scale_correction=True` (the default) each weight w is passed to EvalMult as w·q/Δ, so that
OpenFHE encodes round(w·q) and the rescale by q returns exactly scale Δ: the convention of
`tensafe.he.params` ("weights are encoded at scale q_i"), at no cost in operations. With
`scale_correction=False` the results carry OpenFHE's plain FIXEDMANUAL drift Π Δ/q_i.

Levels: `batch_info` reports the level as the number of rescales still available (params.depth for
a fresh batch, 0 when spent), so that `linear_map` returns a batch "one level lower"; OpenFHE's own
`Ciphertext.GetLevel()` counts the other way (rescales done).

Wire format
-----------
Every object travels in the `tensafe.he.wire` envelope (BackendId.OPENFHE). Inside, numbers only
(`tensafe.he.backends.openfhe_wire` says why and how they become OpenFHE objects):

- ciphertext batch: u32 count | u32 level | key tag (64 B) | count × 2 × towers × N u64 residues
- public context: key tag (64 B) | 2 × (depth + 1) × N u64 residues | CryptoContext bytes

The context is never taken from the wire: the evaluator builds it from the parameter set and the
received context bytes must equal that build byte for byte. Residues are checked against their
tower's modulus and written into a serialization this side made itself, so no received byte
reaches OpenFHE's deserializer. The envelope's checksum catches accidental corruption; the peer is
authenticated by the transport (the evaluator service's API key, TLS), not here.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensafe.he import wire
from tensafe.he.backends import openfhe_wire
from tensafe.he.backends.base import CKKSBackend
from tensafe.he.counters import OpCounters
from tensafe.he.errors import (
    BackendUnavailable,
    HEError,
    InsecureParameters,
    LevelExhausted,
    ParameterMismatch,
    SerializationError,
    SlotOverflow,
    ValueOutOfRange,
)
from tensafe.he.params import HE_STANDARD_MAX_LOG_Q, CKKSParameters

_BATCH_HEAD = struct.Struct("<II")  # count, OpenFHE level


def load_openfhe():
    """The `openfhe` module, or `BackendUnavailable` saying where it does run."""
    try:
        import openfhe  # noqa: PLC0415  (optional, and only importable on some interpreters)
    except (ImportError, OSError) as exc:
        raise BackendUnavailable(
            f"he=openfhe: the openfhe wheel cannot be imported here ({exc}). OpenFHE's PyPI wheels "
            "import on CPython 3.10: run `make test-openfhe`, or use the "
            "`.venv-openfhe` environment that it builds (.venv-openfhe/bin/python)"
        ) from exc
    return openfhe


@dataclass(eq=False)
class OpenFHEPublic:
    """What the evaluator holds: the CryptoContext and the public key. No secret key."""

    context: Any  # openfhe.CryptoContext (carries no evaluation keys)
    public_key: Any  # openfhe.PublicKey
    chain: tuple[int, ...]  # the moduli OpenFHE chose, q0 (base) first
    context_bytes: bytes  # OpenFHE's serialization of the context as built (PKE, LEVELEDSHE, ADVANCEDSHE)
    templates: dict[int, Any] = field(default_factory=dict, repr=False)  # own ciphertexts, by OpenFHE level
    zeros: dict[int, Any] = field(default_factory=dict, repr=False)  # (0, 0) in this context, by level

    def __repr__(self) -> str:
        bits = "+".join(str(q.bit_length()) for q in self.chain)
        return f"OpenFHEPublic(N={self.context.GetRingDimension()}, chain={bits} bits)"


@dataclass(eq=False)
class OpenFHESecret:
    """The key holder's secret key, with the public side it belongs to."""

    public: OpenFHEPublic
    secret_key: Any = field(repr=False)  # openfhe.PrivateKey

    def __repr__(self) -> str:
        return f"OpenFHESecret({self.public!r})"


@dataclass(eq=False)
class OpenFHEBatch:
    """One ciphertext per packed column, all at the same OpenFHE level (rescales done)."""

    ciphertexts: list
    level: int

    def __len__(self) -> int:
        return len(self.ciphertexts)


class OpenFHEBackend(CKKSBackend):
    """CKKS through OpenFHE: per-scalar EvalMult + EvalAdd, one Rescale per output ciphertext."""

    name = "openfhe"

    def __init__(self, params: CKKSParameters, scale_correction: bool = True, threads: int | None = 1,
                 weighted_sum: bool = False):
        """`threads`: OpenFHE's OpenMP threads for the process (None: OpenFHE's default, one per core).
        One by default: on two cores OpenFHE's OpenMP default ran the HE-LoRA loop up to 8× slower
        than one thread when other work shared the machine, and never faster when idle.
        `weighted_sum`: each output of `linear_map` is one EvalLinearWSum call instead of a loop of
        EvalMult and EvalAdd (the same scheme operations; OpenFHE's fastest linear combination)."""
        super().__init__(params)
        self.weighted_sum = weighted_sum
        self._ofhe = load_openfhe()
        if threads is not None:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=threads, user_api="openmp")
        self.scale_correction = scale_correction
        self._context = self._build_context()
        self._context_bytes = self._ofhe.Serialize(self._context, self._ofhe.BINARY)
        self._chain = read_chain(self._context, params.depth)
        self._check_chain()
        self._key_shape: openfhe_wire.Template | None = None

    # --- context ----------------------------------------------------------------------------
    def _build_context(self):
        o, p = self._ofhe, self.params
        cp = o.CCParamsCKKSRNS()
        cp.SetRingDim(p.ring_degree)
        cp.SetMultiplicativeDepth(p.depth)
        cp.SetScalingModSize(p.scale_bits)
        cp.SetFirstModSize(p.moduli[0].bit_length())
        cp.SetScalingTechnique(o.FIXEDMANUAL)
        cp.SetBatchSize(p.slots)
        cp.SetSecretKeyDist(o.UNIFORM_TERNARY)
        # HEStd_NotSet: OpenFHE would otherwise pick its own ring dimension. Security is enforced by
        # tensafe.he.params (HE Standard table, 128-bit classical) on our parameter set, and
        # `_check_chain` re-checks the chain OpenFHE actually chose against the same table.
        cp.SetSecurityLevel(o.HEStd_NotSet)
        try:
            cc = o.GenCryptoContext(cp)
        except RuntimeError as exc:
            raise HEError(f"he=openfhe: OpenFHE refused parameter set {p.name}: {exc}") from exc
        cc.Enable(o.PKE)
        cc.Enable(o.LEVELEDSHE)
        # A feature flag for EvalLinearWSum (no key): set here, not on first use, because OpenFHE
        # shares contexts of equal parameters within a process and the flag is part of the bytes
        # an evaluator compares its own context against.
        cc.Enable(o.ADVANCEDSHE)
        return cc

    def _check_chain(self) -> None:
        p, chain = self.params, self._chain
        if (len(chain) != p.depth + 1 or chain[0].bit_length() != p.moduli[0].bit_length()
                or any(abs(q.bit_length() - p.scale_bits) > 1 for q in chain[1:])):
            raise HEError(
                f"he=openfhe: OpenFHE built a chain of {self.chain_bits()} bits for {p.describe()}; "
                "this backend needs one base prime and one prime near Δ per level"
            )
        log_q = sum(math.log2(q) for q in chain)
        limit = HE_STANDARD_MAX_LOG_Q.get(p.ring_degree, 0)
        if log_q > limit and not p.allow_insecure:
            raise InsecureParameters(
                f"he=openfhe: OpenFHE's chain for {p.name} has log2 Q = {log_q:.1f} > {limit} bits at "
                f"N = {p.ring_degree} (HE Standard, 128-bit); lower he.precision_bits or raise the ring"
            )

    def chain(self) -> tuple[int, ...]:
        """The moduli OpenFHE chose, q0 (base) first, then one prime per rescale."""
        return self._chain

    def chain_bits(self) -> tuple[int, ...]:
        """Bit sizes of OpenFHE's chain, q0 first (for benchmark reports)."""
        return tuple(q.bit_length() for q in self._chain)

    def scale_drift(self) -> float:
        """The factor Π Δ/q_i that plain FIXEDMANUAL leaves on a result after all `depth` levels."""
        return math.prod(self.params.scale / q for q in self._chain[1:])

    # --- key holder -------------------------------------------------------------------------
    def generate_keys(self) -> tuple[OpenFHESecret, OpenFHEPublic]:
        keys = self._context.KeyGen()
        if not keys.good():
            raise HEError("he=openfhe: OpenFHE key generation failed")
        public = OpenFHEPublic(self._context, keys.publicKey, self._chain, self._context_bytes)
        return OpenFHESecret(public, keys.secretKey), public

    def secret_slot_norm2(self, secret: OpenFHESecret) -> float | None:
        """max_j |s(ζ_j)|² of the secret key (it sets the worst slot's rescale noise), or None.

        Read from OpenFHE's JSON serialization of the key, which holds s mod q0 in evaluation form:
        value i is s(ψ^(2·brv(i)+1)) for the tower's primitive 2N-th root ψ (bit-reversed order).
        The inverse transform must give a ternary polynomial, else the layout is not the one
        expected (another OpenFHE version) and the answer is None.
        """
        o = self._ofhe
        try:
            tree = json.loads(o.Serialize(secret.secret_key, o.JSON))
            tower = next(_find(tree, "s"))["v"][0]
            values = [int(v) for v in tower["v"]["ptr_wrapper"]["data"]["v"]]
            q = int(tower["v"]["ptr_wrapper"]["data"]["m"]["v"])
            chain = next(_find(tree, "elp"))["ptr_wrapper"]["data"]["p"]
            towers = [t["ptr_wrapper"]["data"]["value0"] for t in chain]
            roots = {int(t["cm"]["v"]): int(t["ru"]["v"]) for t in towers}
            coefficients = values if tower["f"] == 1 else _negacyclic_inverse(values, roots[q], q)
        except (StopIteration, KeyError, IndexError, TypeError, ValueError):
            return None
        if len(coefficients) != self.params.ring_degree or any(c not in (0, 1, q - 1) for c in coefficients):
            return None
        n = len(coefficients)
        s = np.array([c if c <= 1 else -1 for c in coefficients], dtype=np.float64)
        at_roots = n * np.fft.ifft(s * np.exp(1j * np.pi * np.arange(n) / n))  # s(e^{iπ(2k+1)/N})
        return float(np.max(np.abs(at_roots) ** 2))

    def encrypt(self, secret: OpenFHESecret, columns: np.ndarray) -> OpenFHEBatch:
        x = np.asarray(columns, dtype=np.float64)
        p = self.params
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise HEError(f"he: encrypt takes a non-empty (columns × tokens) array, got shape {x.shape}")
        if x.shape[1] > p.slots:
            raise SlotOverflow(
                f"he: {x.shape[1]} tokens exceed the {p.slots} slots of {p.name}; split the batch or "
                "use a larger ring (he.params)"
            )
        bound = 2.0**p.value_bits
        if not np.isfinite(x).all() or np.abs(x).max() >= bound:
            raise ValueOutOfRange(
                f"he: inputs must be finite with |x| < 2^{p.value_bits} (he.value_bits), got max "
                f"{np.abs(x).max():.4g}"
            )
        cc, sk = secret.public.context, secret.secret_key
        cts = [cc.Encrypt(sk, cc.MakeCKKSPackedPlaintext(np.ascontiguousarray(row))) for row in x]
        return OpenFHEBatch(cts, 0)

    def decrypt(self, secret: OpenFHESecret, batch: OpenFHEBatch) -> np.ndarray:
        cc, sk, slots = secret.public.context, secret.secret_key, self.params.slots
        out = np.empty((len(batch.ciphertexts), slots), dtype=np.float64)
        for i, ct in enumerate(batch.ciphertexts):
            try:
                pt = cc.Decrypt(sk, ct)
            except RuntimeError as exc:
                raise HEError(
                    f"he=openfhe: ciphertext {i} does not decrypt ({exc}); its noise exceeds the "
                    "precision of the scale (the wrong key, or a reply not computed by HE-LoRA)"
                ) from exc
            pt.SetLength(slots)
            out[i] = pt.GetRealPackedValueArray()
        return out

    # --- evaluator --------------------------------------------------------------------------
    def _scalars(self, public: OpenFHEPublic, batch: OpenFHEBatch, weights: np.ndarray) -> np.ndarray:
        """Checked weights as passed to EvalMult (scale-corrected for the prime the rescale drops)."""
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 2 or w.shape[0] != len(batch.ciphertexts) or w.shape[1] == 0:
            raise HEError(
                f"he: weights of shape {w.shape} do not map a batch of {len(batch.ciphertexts)} "
                "ciphertexts (expected n_in × n_out)"
            )
        if not np.isfinite(w).all():
            raise ValueOutOfRange("he: weights must be finite")
        if batch.level >= self.params.depth:
            raise LevelExhausted(
                f"he: the batch has used all {self.params.depth} levels of {self.params.name}; no prime "
                "is left to rescale by (HE-LoRA needs one level per stage)"
            )
        if self.scale_correction:
            dropped = public.chain[self.params.depth - batch.level]
            w = w * (dropped / self.params.scale)
        return w

    def linear_map(
        self, public: OpenFHEPublic, batch: OpenFHEBatch, weights: np.ndarray, counters: OpCounters,
    ) -> OpenFHEBatch:
        """One rescaled output per weight column. With `weighted_sum`, through EvalLinearWSum (it
        needs the ADVANCEDSHE feature, enabled with the context, and generates no key; under
        FIXEDMANUAL it rescales the sum itself); both are counted the same way."""

        def multiply_add(cc, cts, col):
            acc = cc.EvalMult(cts[0], col[0])
            for ct, c in zip(cts[1:], col[1:]):
                cc.EvalAddInPlace(acc, cc.EvalMult(ct, c))
            cc.RescaleInPlace(acc)
            return acc

        def weighted_sum(cc, cts, col):
            acc = cc.EvalLinearWSum(cts, col)
            if acc.GetNoiseScaleDeg() > 1:  # not rescaled inside (other OpenFHE versions)
                cc.RescaleInPlace(acc)
            return acc

        return self._map_columns(public, batch, weights, counters,
                                 weighted_sum if self.weighted_sum else multiply_add)

    def _map_columns(self, public, batch, weights, counters: OpCounters, column) -> OpenFHEBatch:
        """One rescaled output ciphertext per weight column, `column(cc, cts, weights as floats)`."""
        w = self._scalars(public, batch, weights)
        n_in, n_out = w.shape
        out = [column(public.context, batch.ciphertexts, w[:, i].tolist()) for i in range(n_out)]
        counters.ct_scalar_mults += n_in * n_out
        counters.additions += (n_in - 1) * n_out
        counters.rescales += n_out
        counters.levels_used += 1
        return OpenFHEBatch(out, batch.level + 1)

    def batch_to_bytes(self, batch: OpenFHEBatch) -> bytearray:
        o, p = self._ofhe, self.params
        if not batch.ciphertexts:
            raise HEError("he: an empty ciphertext batch has no wire form")
        towers = p.depth + 1 - batch.level
        moduli, n = self._chain[:towers], p.ring_degree
        values = np.empty((len(batch.ciphertexts), 2 * towers * n), dtype=np.uint64)
        for i, ct in enumerate(batch.ciphertexts):
            values[i] = openfhe_wire.residues(o.Serialize(ct, o.BINARY), n, moduli)
        head = _BATCH_HEAD.pack(len(batch.ciphertexts), batch.level)
        tag = openfhe_wire.pack_tag(batch.ciphertexts[0].GetKeyTag())
        return wire.pack(wire.Kind.CIPHERTEXT_BATCH, wire.BackendId.OPENFHE, p, head, tag, values)

    def batch_from_bytes(self, public: OpenFHEPublic, data: bytes, max_bytes: int) -> OpenFHEBatch:
        """Residues checked against their moduli and written into this side's own ciphertext of
        that level (see tensafe.he.backends.openfhe_wire): no received byte reaches OpenFHE's parser."""
        o, p = self._ofhe, self.params
        payload = wire.unpack(data, wire.Kind.CIPHERTEXT_BATCH, wire.BackendId.OPENFHE, p, max_bytes)
        fixed = _BATCH_HEAD.size + openfhe_wire.TAG_FIELD
        if len(payload) < fixed:
            raise SerializationError("openfhe ciphertext batch: payload shorter than its header")
        count, level = _BATCH_HEAD.unpack_from(payload)
        if level > p.depth:
            raise SerializationError(
                f"openfhe ciphertext batch: level {level} beyond depth {p.depth} of {p.name}"
            )
        tag = openfhe_wire.unpack_tag(payload[_BATCH_HEAD.size : fixed], "openfhe ciphertext batch")
        if tag != public.public_key.GetKeyTag().encode():
            raise ParameterMismatch("openfhe ciphertext batch was encrypted under another key pair")
        shape = self._template(public, level)
        per = shape.residue_count * 8
        if count == 0 or len(payload) - fixed != count * per:
            raise SerializationError(
                f"openfhe ciphertext batch: {len(payload) - fixed} bytes of residues do not hold {count} "
                f"ciphertexts at level {level} ({per} bytes each)"
            )
        values = np.frombuffer(payload, dtype="<u8", offset=fixed).reshape(count, 2, shape.towers, -1)
        openfhe_wire.check_residues(values, shape.moduli, "openfhe ciphertext batch")
        cts = []
        for i in range(count):
            blob = openfhe_wire.build(shape, values[i])
            cts.append(_deserialize(o.DeserializeCiphertextString, blob, o.BINARY, f"ciphertext {i}"))
        return OpenFHEBatch(cts, level)

    def adopt(self, public: OpenFHEPublic, batch: OpenFHEBatch) -> OpenFHEBatch:
        """Re-home deserialized ciphertexts in this context: EvalAdd with the trivial ciphertext
        (0, 0), which changes no bit of them. OpenFHE's arithmetic on ciphertexts that come out of
        its deserializer runs about 4× slower than on ciphertexts its context allocated (measured:
        stage 1 at h=256, r=16 took 3.2 s against 0.74 s); one exact addition each removes that."""
        cc = public.context
        if batch.level not in public.zeros:
            fresh = cc.Encrypt(public.public_key, cc.MakeCKKSPackedPlaintext(np.zeros(1), 1, batch.level))
            public.zeros[batch.level] = cc.EvalSub(fresh, fresh)
        zero = public.zeros[batch.level]
        return OpenFHEBatch([cc.EvalAdd(zero, ct) for ct in batch.ciphertexts], batch.level)

    def public_to_bytes(self, public: OpenFHEPublic) -> bytearray:
        o, p = self._ofhe, self.params
        key = public.public_key
        values = openfhe_wire.residues(o.Serialize(key, o.BINARY), p.ring_degree, self._chain)
        tag = openfhe_wire.pack_tag(key.GetKeyTag())
        context = public.context_bytes
        return wire.pack(wire.Kind.PUBLIC_CONTEXT, wire.BackendId.OPENFHE, p, tag, values, context)

    def public_from_bytes(self, data: bytes, max_bytes: int) -> OpenFHEPublic:
        """The key's residues checked and written into a key of this side's own context; the
        context bytes must equal this side's build and are never parsed."""
        o, p = self._ofhe, self.params
        payload = wire.unpack(data, wire.Kind.PUBLIC_CONTEXT, wire.BackendId.OPENFHE, p, max_bytes)
        shape = self._key_template()
        size = openfhe_wire.TAG_FIELD + shape.residue_count * 8
        if len(payload) != size + len(self._context_bytes):
            raise SerializationError(
                f"openfhe public context: {len(payload)} bytes, a {p.name} public key and context take "
                f"{size + len(self._context_bytes)}"
            )
        if payload[size:] != self._context_bytes:
            raise ParameterMismatch(
                f"openfhe public context differs from the one this side builds for {p.name} (another "
                "OpenFHE version or other settings); both sides must run the same openfhe and he.params"
            )
        tag = openfhe_wire.unpack_tag(payload[: openfhe_wire.TAG_FIELD], "openfhe public key")
        values = np.frombuffer(payload, dtype="<u8", offset=openfhe_wire.TAG_FIELD, count=shape.residue_count)
        openfhe_wire.check_residues(values.reshape(2, shape.towers, -1), shape.moduli, "openfhe public key")
        blob = openfhe_wire.build(shape, values, tag)
        key = _deserialize(o.DeserializePublicKeyString, blob, o.BINARY, "public key")
        return OpenFHEPublic(self._context, key, self._chain, self._context_bytes)

    def batch_info(self, batch: OpenFHEBatch) -> tuple[int, int, float]:
        scale = batch.ciphertexts[0].GetScalingFactor() if batch.ciphertexts else self.params.scale
        return len(batch.ciphertexts), self.params.depth - batch.level, float(scale)

    def _template(self, public: OpenFHEPublic, level: int) -> openfhe_wire.Template:
        """This side's own ciphertext at `level` under the session's key, with its residues located."""
        if level not in public.templates:
            o, cc, p = self._ofhe, public.context, self.params
            ct = cc.Encrypt(public.public_key, cc.MakeCKKSPackedPlaintext(np.zeros(1), 1, level))
            if (ct.GetLevel() != level or ct.GetNoiseScaleDeg() != 1 or ct.GetSlots() != p.slots
                    or ct.GetScalingFactor() != p.scale):
                raise HEError(f"he=openfhe: a fresh ciphertext at level {level} is not what TenSafe expects")
            towers = p.depth + 1 - level
            public.templates[level] = openfhe_wire.template(o.Serialize(ct, o.BINARY), p.ring_degree,
                                                            self._chain[:towers])
        return public.templates[level]

    def _key_template(self) -> openfhe_wire.Template:
        """A public key of this side's own context (a throwaway key pair), with its parts located."""
        if self._key_shape is None:
            o = self._ofhe
            key = self._context.KeyGen().publicKey
            self._key_shape = openfhe_wire.template(o.Serialize(key, o.BINARY), self.params.ring_degree,
                                                    self._chain, tag=key.GetKeyTag().encode())
        return self._key_shape


def read_chain(cc, depth: int) -> tuple[int, ...]:
    """The moduli of a CKKS context, q0 first: the plaintext modulus at level l is q0·…·q_(depth−l)."""
    products = [int(cc.MakeCKKSPackedPlaintext(np.zeros(1), 1, level).GetElementModulus())
                for level in range(depth + 1)]
    chain = [products[depth]]
    for level in range(depth - 1, -1, -1):
        q, rest = divmod(products[level], products[level + 1])
        if rest:
            raise HEError("he=openfhe: could not read OpenFHE's modulus chain")
        chain.append(q)
    return tuple(chain)


def _find(node, key: str):
    """Every value stored under `key` in a JSON tree, depth first."""
    if isinstance(node, dict):
        if key in node:
            yield node[key]
        for value in node.values():
            yield from _find(value, key)
    elif isinstance(node, list):
        for value in node:
            yield from _find(value, key)


def _negacyclic_inverse(values: list[int], psi: int, q: int) -> list[int]:
    """Coefficients a_j (mod q) from values[i] = a(ψ^(2·brv(i)+1)), ψ a primitive 2N-th root mod q."""
    n = len(values)
    if n & (n - 1) or pow(psi, n, q) != q - 1:
        raise ValueError("not a power-of-two transform with a primitive 2N-th root")
    bits = n.bit_length() - 1
    evaluations = [0] * n  # evaluations[k] = a(ψ^(2k+1)) = Σ_j (a_j ψ^j) ω^(jk), ω = ψ²
    for i, v in enumerate(values):
        evaluations[int(format(i, f"0{bits}b")[::-1], 2)] = v

    def dft(a: list[int], root: int) -> list[int]:
        if len(a) == 1:
            return a
        square = root * root % q
        even, odd, half = dft(a[0::2], square), dft(a[1::2], square), len(a) // 2
        out, w = [0] * len(a), 1
        for k in range(half):
            t = w * odd[k] % q
            out[k], out[k + half] = (even[k] + t) % q, (even[k] - t) % q
            w = w * root % q
        return out

    twisted = dft(evaluations, pow(psi * psi % q, -1, q))
    n_inv, psi_inv, w, out = pow(n, -1, q), pow(psi, -1, q), 1, []
    for t in twisted:
        out.append(t * n_inv % q * w % q)
        w = w * psi_inv % q
    return out


def _deserialize(loader, blob: bytes, binary, what: str):
    """OpenFHE's loader on `blob`; any failure (OpenFHE raises several types, or returns None)
    becomes SerializationError."""
    try:
        obj = loader(blob, binary)
    except Exception as exc:  # RuntimeError, ValueError, MemoryError (bad_alloc), ... from C++
        kind = type(exc).__name__
        raise SerializationError(f"openfhe {what}: not a valid OpenFHE object ({kind})") from exc
    if obj is None:
        raise SerializationError(f"openfhe {what}: not a valid OpenFHE object")
    return obj
