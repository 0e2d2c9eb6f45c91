"""The OpenFHE backend through the CKKSBackend interface: precision, HE-LoRA, evaluator side, wire.

Runs where `openfhe` imports: `make test-openfhe` (CPython 3.10, .venv-openfhe).

Error model behind every bound. Variances are per coefficient in the scaled domain (integers);
a slot's real part sums the N coefficients with unit-modulus weights, so a polynomial error of
i.i.d. coefficients with variance v gives a slot variance of N/2 · v.

- fresh secret-key encryption: error e with σ = 3.19 (OpenFHE's default) plus the encoding
  rounding (uniform ±½): v0 = σ² + 1/12.
- ct × w, then rescale by q, with w encoded as round(w·q) (scale correction): the error becomes
  w·e; the rescale adds τ0 + τ1·s (τ uniform ±½, s the uniform ternary secret). In slot k that
  is τ0(ζ_k) + τ1(ζ_k)·s(ζ_k): real-part variance N/24 · (1 + |s(ζ_k)|²). |s(ζ_k)|² averages
  2N/3 (the textbook (1 + 2N/3)/12 per coefficient) but differs from slot to slot for a fixed
  secret. The key holder reads max_k |s(ζ_k)|² off its key (secret_slot_norm2); were that not
  possible, the CLT bound applies: s(ζ_k) is complex Gaussian, |s(ζ_k)|² exponential of mean 2N/3,
  so over N/2 slots it stays below SECRET_TAIL · 2N/3 except with probability N/2 · e^-28 < 2e-9.
  The weight rounding (|δ| ≤ ½ over q) adds at most |x|/(2q) per term, deterministically.
- decrypt: OpenFHE's decoder (ckkspackedencoding.cpp, Decode) adds Gaussian noise of variance
  2 · max(σ̂², N/64) per coefficient, σ̂² ≈ v/2 being its estimate of the error variance v from
  the imaginary half.

Worst-case bounds are TAIL = 7 standard deviations of the worst slot over Δ (P(|Z| > 7) ≈ 2.6e-12
per slot, below 1e-6 over the ≤ 2^18 slots a test checks); the RMS error is also checked
against the model's average to ±10 %, which catches any systematic error (a drift, a wrong prime).
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("openfhe", reason="OpenFHE runs in make test-openfhe (CPython 3.10)")

import openfhe  # noqa: E402

from tensafe.he import wire  # noqa: E402
from tensafe.he.backends import openfhe_wire  # noqa: E402
from tensafe.he.backends.openfhe_backend import OpenFHEBackend  # noqa: E402
from tensafe.he.counters import OpCounters  # noqa: E402
from tensafe.he.errors import (  # noqa: E402
    LevelExhausted,
    ParameterMismatch,
    SerializationError,
    SlotOverflow,
    ValueOutOfRange,
)
from tensafe.he.params import HE_STANDARD_MAX_LOG_Q, preset  # noqa: E402

SIGMA = 3.19
V0 = SIGMA**2 + 1 / 12
TAIL = 7.0
SECRET_TAIL = 28.0
MAX = wire.DEFAULT_MAX_BYTES


def slot_std(n: int, v_fresh: float, rescales: float = 0.0, s2: float | None = None) -> float:
    """Std (scaled domain) of the real part decrypt() returns in one slot.

    v_fresh: coefficient variance of the propagated encryption errors; rescales: the sum of squared
    weights that each rescale error is carried by (1 for the last rescale); s2: |s(ζ)|² in that
    slot (default: its average 2N/3).
    """
    s2 = 2 * n / 3 if s2 is None else s2
    v_coeff = v_fresh + rescales * (1 + 2 * n / 3) / 12  # average over slots (Parseval)
    decoder = 2 * max(v_coeff / 2, n / 64)
    return math.sqrt(n / 2 * (v_fresh + decoder) + n / 24 * (1 + s2) * rescales)


def worst_s2(backend, secret) -> float:
    """max_j |s(ζ_j)|² of the key as the key holder computes it, else the SECRET_TAIL bound."""
    exact = backend.secret_slot_norm2(secret)
    return exact if exact is not None else SECRET_TAIL * 2 * backend.params.ring_degree / 3


@pytest.fixture(scope="module")
def params():
    return preset("n4096")


@pytest.fixture(scope="module")
def backend(params):
    return OpenFHEBackend(params)


@pytest.fixture(scope="module")
def keys(backend):
    return backend.generate_keys()


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(20240611)  # test data only; keys and noise come from OpenFHE / ChaCha20


def test_context_matches_the_parameter_set(backend, params, keys):
    _, public = keys
    cc = public.context
    assert cc.GetRingDimension() == params.ring_degree and cc.GetBatchSize() == params.slots
    assert cc.GetScalingTechnique() == openfhe.FIXEDMANUAL
    chain = backend.chain()
    assert len(chain) == params.depth + 1
    assert chain[0].bit_length() == params.moduli[0].bit_length()
    assert all(abs(q.bit_length() - params.scale_bits) <= 1 for q in chain[1:])
    assert all((q - 1) % (2 * params.ring_degree) == 0 for q in chain)
    assert sum(math.log2(q) for q in chain) <= HE_STANDARD_MAX_LOG_Q[params.ring_degree]
    assert math.isclose(math.prod(chain), cc.GetModulus(), rel_tol=1e-12)
    assert backend.chain_bits() == tuple(q.bit_length() for q in chain)


def test_secret_slot_norm_is_read_from_the_key(backend, params, keys):
    """max_j |s(ζ_j)|² of a uniform ternary key: about (2N/3)·(ln(N/2) + 0.58), the maximum of N/2
    exponentials of mean 2N/3 (the key is read back as a ternary polynomial, or None is returned)."""
    secret, _ = keys
    mean = 2 * params.ring_degree / 3
    ratio = backend.secret_slot_norm2(secret) / mean
    assert math.log(params.slots) - 2 < ratio < SECRET_TAIL


def test_round_trip_within_the_fresh_noise_bound(backend, params, keys, rng):
    secret, _ = keys
    n, t = 6, params.slots - 5  # the last slots stay empty
    x = rng.uniform(-1, 1, (n, t))
    x[0, :3] = [255.9, -255.9, 0.0]  # the whole value headroom (|x| < 2^value_bits)
    batch = backend.encrypt(secret, x)
    assert backend.batch_info(batch) == (n, params.depth, params.scale)
    out = backend.decrypt(secret, batch)
    assert out.shape == (n, params.slots) and out.dtype == np.float64
    std = slot_std(params.ring_degree, V0) / params.scale  # no rescale: the secret plays no part
    bound = TAIL * std  # ≈ 2^-19.2 at N = 4096, Δ = 2^31
    assert bound < 2.0 ** -(params.scale_bits - 13)
    err = out[:, :t] - x
    assert np.abs(err).max() <= bound
    assert np.abs(out[:, t:]).max() <= bound
    assert 0.9 < err.std() / std < 1.1


def lora_model(params, x, a, b, s2: float):
    """Per output of X·A·B: (worst-case bound on |error|, average error std), from the model above."""
    n, delta = params.ring_degree, params.scale
    v_fresh = V0 * (b**2 * (a**2).sum(axis=0)[:, None]).sum(axis=0)  # Σ_k B_ki² ‖A_k‖² v0
    rescales = 1 + (b**2).sum(axis=0)  # stage-2 rescale, plus the stage-1 ones carried by B
    q_min = 2.0 ** (params.scale_bits - 1)
    u = x @ a
    rounding = np.abs(x).max() * a.shape[0] * np.abs(b).sum(axis=0) + np.abs(u).max() * b.shape[0]
    rounding /= 2 * q_min
    worst = np.array([TAIL * slot_std(n, v, r, s2) for v, r in zip(v_fresh, rescales)]) / delta
    mean = np.array([slot_std(n, v, r) for v, r in zip(v_fresh, rescales)]) / delta
    return worst + rounding, mean


def check_lora_error(err, bound, mean):
    assert (np.abs(err).max(axis=0) <= bound).all(), (np.abs(err).max(axis=0) / bound).max()
    rms_ratio = math.sqrt((err**2).mean() / (mean**2).mean())
    assert 0.9 < rms_ratio < 1.1, rms_ratio


def lora_data(rng, params, h_in=64, r=4, h_out=64, tokens=None):
    tokens = tokens or params.slots
    x = rng.uniform(-1, 1, (tokens, h_in))
    a = rng.uniform(-1, 1, (h_in, r)) / math.sqrt(h_in)
    b = rng.uniform(-1, 1, (r, h_out))
    return x, a, b


def test_two_stage_lora_through_an_evaluator_built_from_bytes(backend, params, keys, rng):
    secret, public = keys
    x, a, b = lora_data(rng, params)  # tokens = slots, h_in = 64, r = 4, h_out = 64
    ref = x @ a @ b  # float64, (tokens × h_out)

    # Key holder → evaluator: only bytes cross, into a separately constructed backend.
    evaluator = OpenFHEBackend(params)
    public_e = evaluator.public_from_bytes(backend.public_to_bytes(public), MAX)
    batch_e = evaluator.batch_from_bytes(public_e, backend.batch_to_bytes(backend.encrypt(secret, x.T)), MAX)
    assert evaluator.batch_info(batch_e) == (64, 2, params.scale)

    c1, c2 = OpCounters(), OpCounters()
    u = evaluator.linear_map(public_e, batch_e, a, c1)
    assert evaluator.batch_info(u) == (4, 1, params.scale)
    delta = evaluator.linear_map(public_e, u, b, c2)
    assert evaluator.batch_info(delta) == (64, 0, params.scale)
    assert c1.as_dict() == dict(ct_scalar_mults=64 * 4, ct_plain_mults=0, additions=63 * 4, rescales=4,
                                rotations=0, key_switches=0, levels_used=1)
    assert c2.as_dict() == dict(ct_scalar_mults=4 * 64, ct_plain_mults=0, additions=3 * 64, rescales=64,
                                rotations=0, key_switches=0, levels_used=1)
    # No evaluation key exists anywhere in this process (OpenFHE keeps them in static maps).
    assert public_e.context.GetAllEvalMultKeys() == {} and public_e.context.GetAllEvalAutomorphismKeys() == {}

    back = backend.batch_from_bytes(public, evaluator.batch_to_bytes(delta), MAX)
    got = backend.decrypt(secret, back)[:, : x.shape[0]].T
    bound, mean = lora_model(params, x, a, b, worst_s2(backend, secret))
    check_lora_error(got - ref, bound, mean)
    # Not trivially satisfied: the worst-case bound is ~2^-16 against results of order 1, and
    # OpenFHE's plain FIXEDMANUAL drift (|ΠΔ/q_i − 1| ≈ 1e-5 relative here) would fail the RMS check.
    assert bound.max() < 2.0**-12 * np.sqrt((ref**2).mean())
    assert abs(backend.scale_drift() - 1) * np.sqrt((ref**2).mean()) > 3 * np.sqrt((mean**2).mean())


def test_plain_fixedmanual_drifts_by_the_predicted_factor(params, keys, rng):
    secret, public = keys
    plain = OpenFHEBackend(params, scale_correction=False)
    x, a, b = lora_data(rng, params, h_in=8, r=2, h_out=8, tokens=512)
    x *= 50  # the drift is relative, the noise absolute: large values make the drift stand out
    ref = x @ a @ b
    c = OpCounters()
    out = plain.linear_map(public, plain.linear_map(public, plain.encrypt(secret, x.T), a, c), b, c)
    got = plain.decrypt(secret, out)[:, :512].T
    bound, mean = lora_model(params, x, a, b, worst_s2(plain, secret))
    check_lora_error(got - ref * plain.scale_drift(), bound, mean)
    assert np.abs(got - ref).max() > 10 * bound.max()  # the drift is visible


EVALUATOR = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from tensafe.he.backends.openfhe_backend import OpenFHEBackend
    from tensafe.he.counters import OpCounters
    from tensafe.he.params import preset

    folder = Path(sys.argv[1])
    backend = OpenFHEBackend(preset("n4096"))
    public = backend.public_from_bytes((folder / "public").read_bytes(), 1 << 31)
    cc, tag = public.context, public.public_key.GetKeyTag()
    assert cc.GetAllEvalMultKeys() == {} and cc.GetAllEvalAutomorphismKeys() == {}
    for getter in (cc.GetEvalMultKeyVector, cc.GetEvalAutomorphismKeyMap):
        try:
            getter(tag)
        except RuntimeError:
            pass
        else:
            raise SystemExit(f"{getter.__name__} found evaluation keys")
    batch = backend.batch_from_bytes(public, (folder / "batch").read_bytes(), 1 << 31)
    weights = np.load(folder / "weights.npy")
    out = backend.linear_map(public, batch, weights, OpCounters())
    (folder / "out").write_bytes(backend.batch_to_bytes(out))
    """
)


def test_evaluator_in_a_fresh_process_has_no_evaluation_keys(backend, params, keys, rng, tmp_path):
    secret, public = keys
    x = rng.uniform(-1, 1, (8, 256))
    w = rng.uniform(-1, 1, (8, 3))
    (tmp_path / "public").write_bytes(backend.public_to_bytes(public))
    (tmp_path / "batch").write_bytes(backend.batch_to_bytes(backend.encrypt(secret, x)))
    np.save(tmp_path / "weights.npy", w)
    done = subprocess.run([sys.executable, "-c", EVALUATOR, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = backend.batch_from_bytes(public, (tmp_path / "out").read_bytes(), MAX)
    got = backend.decrypt(secret, out)[:, :256]
    v_fresh = V0 * (w**2).sum(axis=0).max()
    bound = TAIL * slot_std(params.ring_degree, v_fresh, 1.0, worst_s2(backend, secret)) / params.scale
    bound += 8 / 2**30  # weight rounding
    assert np.abs(got - w.T @ x).max() <= bound


def test_public_context_holds_no_secret_key(backend, keys):
    secret, public = keys
    data = backend.public_to_bytes(public)
    key = openfhe.Serialize(secret.secret_key, openfhe.BINARY)
    for start in (len(key) // 4, len(key) // 2, 3 * len(key) // 4):
        assert key[start : start + 64] not in data
    assert not hasattr(public, "secret_key")
    payload = bytes(wire.unpack(data, wire.Kind.PUBLIC_CONTEXT, wire.BackendId.OPENFHE, backend.params, MAX))
    assert len(payload) < len(key) * 2 + 4096  # context (~600 B) + public key (two polynomials)


def test_third_linear_map_at_depth_two_is_level_exhausted(backend, keys, rng):
    secret, public = keys
    batch = backend.encrypt(secret, rng.uniform(-1, 1, (4, 16)))
    w = np.eye(4)
    c = OpCounters()
    spent = backend.linear_map(public, backend.linear_map(public, batch, w, c), w, c)
    assert backend.batch_info(spent)[1] == 0
    with pytest.raises(LevelExhausted, match="levels"):
        backend.linear_map(public, spent, w, c)
    assert c.levels_used == 2 and c.rescales == 8


def test_input_checks(backend, params, keys):
    secret, _ = keys
    with pytest.raises(SlotOverflow, match="slots"):
        backend.encrypt(secret, np.zeros((2, params.slots + 1)))
    with pytest.raises(ValueOutOfRange):
        backend.encrypt(secret, np.full((1, 4), 2.0**params.value_bits))
    with pytest.raises(ValueOutOfRange):
        backend.encrypt(secret, np.array([[0.0, np.nan]]))


@pytest.fixture(scope="module")
def small_batch_bytes(backend, keys):
    secret, _ = keys
    return backend.batch_to_bytes(backend.encrypt(secret, np.ones((2, 8))))


def repack(payload: bytes, params, kind=wire.Kind.CIPHERTEXT_BATCH) -> bytes:
    return wire.pack(kind, wire.BackendId.OPENFHE, params, payload)


def test_wire_errors_are_typed(backend, params, keys, small_batch_bytes):
    secret, public = keys
    data = small_batch_bytes
    payload = bytes(wire.unpack(data, wire.Kind.CIPHERTEXT_BATCH, wire.BackendId.OPENFHE, params, MAX))
    assert len(backend.batch_from_bytes(public, data, MAX)) == 2

    with pytest.raises(SerializationError, match="truncated"):
        backend.batch_from_bytes(public, data[:-1000], MAX)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    with pytest.raises(SerializationError, match="checksum"):
        backend.batch_from_bytes(public, bytes(flipped), MAX)
    with pytest.raises(ParameterMismatch):
        backend.batch_from_bytes(public, repack(payload, preset("n8192")), MAX)
    key = openfhe.Serialize(secret.secret_key, openfhe.BINARY)
    with pytest.raises(SerializationError, match="secret_key"):
        backend.batch_from_bytes(public, repack(key, params, wire.Kind.SECRET_KEY), MAX)
    with pytest.raises(SerializationError, match="max_message_bytes"):
        backend.batch_from_bytes(public, data, len(data) - 1)

    public_payload = bytes(wire.unpack(backend.public_to_bytes(public), wire.Kind.PUBLIC_CONTEXT,
                                 wire.BackendId.OPENFHE, params, MAX))
    with pytest.raises(ParameterMismatch):
        backend.public_from_bytes(repack(public_payload, preset("n8192"), wire.Kind.PUBLIC_CONTEXT), MAX)
    with pytest.raises(SerializationError, match="public_context"):
        backend.public_from_bytes(data, MAX)


def test_malformed_payloads_inside_a_valid_envelope(backend, params, keys, rng, small_batch_bytes):
    """Checksum-valid frames whose numbers are wrong are refused before any OpenFHE object is built;
    frames whose numbers are right become ciphertexts of this side's own layout."""
    secret, public = keys
    kind = wire.Kind.CIPHERTEXT_BATCH
    payload = bytes(wire.unpack(small_batch_bytes, kind, wire.BackendId.OPENFHE, params, MAX))
    head, tag, residues = payload[:8], payload[8:72], payload[72:]
    per = len(residues) // 2

    def refused(inner, error=SerializationError, match=None):
        with pytest.raises(error, match=match):
            backend.batch_from_bytes(public, repack(inner, params), MAX)

    refused(b"", match="header")
    refused(struct.pack("<II", 0, 0) + tag, match="do not hold")
    refused(struct.pack("<II", 1 << 30, 0) + tag + residues, match="do not hold")  # count beyond the bytes
    refused(payload + b"\x00", match="do not hold")
    refused(struct.pack("<II", 2, 1) + tag + residues, match="do not hold")  # level 1 has fewer towers
    refused(struct.pack("<II", 2, 3) + tag + residues, match="beyond depth")
    refused(head + b"g" * 32 + bytes(32) + residues, match="key tag")
    refused(head + tag[:31] + b"\x00x" + tag[33:] + residues, match="key tag")
    q0 = int(backend.chain()[0])
    too_big = bytearray(residues)
    struct.pack_into("<Q", too_big, 8 * 5, q0)  # element 0, tower 0, coefficient 5: equal to its modulus
    refused(head + tag + bytes(too_big), match=r"residue \(0, 0, 0, 5\)")
    struct.pack_into("<Q", too_big, 8 * 5, (1 << 64) - 1)
    refused(head + tag + bytes(too_big), match="modulus")
    other_secret, _ = backend.generate_keys()
    foreign = backend.batch_to_bytes(backend.encrypt(other_secret, np.ones((1, 8))))
    foreign_payload = bytes(wire.unpack(foreign, kind, wire.BackendId.OPENFHE, params, MAX))
    refused(foreign_payload, ParameterMismatch, "key pair")
    # All-zero residues are a well-formed ciphertext (of zero): numbers in range are all a peer can choose
    zero = backend.batch_from_bytes(public, repack(struct.pack("<II", 1, 0) + tag + bytes(per), params), MAX)
    assert backend.batch_info(zero) == (1, params.depth, params.scale)
    assert np.abs(backend.decrypt(secret, zero)).max() < 1e-3

    public_payload = bytes(wire.unpack(backend.public_to_bytes(public), wire.Kind.PUBLIC_CONTEXT,
                                       wire.BackendId.OPENFHE, params, MAX))

    def public_refused(inner, error=SerializationError, match=None):
        with pytest.raises(error, match=match):
            backend.public_from_bytes(repack(inner, params, wire.Kind.PUBLIC_CONTEXT), MAX)

    context = bytearray(public_payload)
    context[-1] ^= 0x01
    public_refused(bytes(context), ParameterMismatch, "differs")
    public_refused(public_payload[:-1], match="bytes")
    public_refused(public_payload + b"\x00", match="bytes")
    key = bytearray(public_payload)
    struct.pack_into("<Q", key, 64, q0 + 1)
    public_refused(bytes(key), match="modulus")
    public_refused(b"z" * 64 + public_payload[64:], match="key tag")
    rebuilt = backend.public_from_bytes(backend.public_to_bytes(public), MAX)
    assert rebuilt.public_key.GetKeyTag() == public.public_key.GetKeyTag()

    def key_residues(key):
        blob = openfhe.Serialize(key, openfhe.BINARY)
        return openfhe_wire.residues(blob, params.ring_degree, backend.chain())

    assert np.array_equal(key_residues(rebuilt.public_key), key_residues(public.public_key))


def test_the_weighted_sum_linear_map_agrees_with_multiply_add(params, keys, rng):
    secret, public = keys
    backend, wsum = OpenFHEBackend(params), OpenFHEBackend(params, weighted_sum=True)
    x, a, b = lora_data(rng, params, h_in=16, r=4, h_out=8, tokens=1024)
    batch = backend.encrypt(secret, x.T)
    c1 = OpCounters()
    u = wsum.linear_map(public, batch, a, c1)
    out = wsum.linear_map(public, u, b, c1)
    assert backend.batch_info(out) == (8, 0, params.scale)
    got = backend.decrypt(secret, out)[:, :1024].T
    check_lora_error(got - x @ a @ b, *lora_model(params, x, a, b, worst_s2(backend, secret)))
    ref = OpCounters()
    backend.linear_map(public, backend.linear_map(public, batch, a, ref), b, ref)
    assert c1 == ref


def test_adopt_rehomes_deserialized_ciphertexts_without_changing_them(backend, params, keys, rng):
    secret, public = keys
    x = rng.uniform(-1, 1, (4, params.slots))
    parsed = backend.batch_from_bytes(public, backend.batch_to_bytes(backend.encrypt(secret, x)), MAX)
    adopted = backend.adopt(public, parsed)
    assert backend.batch_info(adopted) == backend.batch_info(parsed)
    # OpenFHE's decryption adds noise of its own (about 1e-6 here): equal ciphertexts decrypt alike to that
    assert np.abs(backend.decrypt(secret, adopted) - backend.decrypt(secret, parsed)).max() < 1e-4
