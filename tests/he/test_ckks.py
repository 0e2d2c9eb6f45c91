"""The own-kernel CKKS scheme: encoding, encryption, decryption and each operation, against float64."""

from __future__ import annotations

import numpy as np
import pytest

from tensafe.he.ckks import CKKSContext
from tensafe.he.encoder import Encoder
from tensafe.he.errors import LevelExhausted, ParameterMismatch, SlotOverflow, ValueOutOfRange
from tensafe.he.lora import default_secret_slot_norm2
from tensafe.he.params import preset


@pytest.fixture(scope="module")
def ctx(n4096):
    return CKKSContext(n4096)


@pytest.fixture(scope="module")
def keys(ctx):
    sk = ctx.generate_secret_key()
    return sk, ctx.generate_public_key(sk)


def _fresh_bound(ctx, sk, pk: bool = False) -> float:
    """7σ of the worst slot's noise of a fresh ciphertext (see tensafe.he.lora.error_bound).

    Secret key: e + encoding rounding, N/2·(σ² + 1/12) per slot. Public key adds v·e_pk + e1·s,
    whose slot-j variance depends on |e_pk(ζ_j)|² and on this key's |s(ζ_j)|²: an average over
    slots is exceeded at a key's worst slot, so the bound takes the worst slot of s (exact) and of
    e_pk (the tail bound of `default_secret_slot_norm2`, scaled to σ²)."""
    params = ctx.params
    n, var_e = params.ring_degree, params.sigma**2
    variance = n / 2 * (var_e + 1 / 12)
    if pk:
        s_worst = float((np.abs(ctx.encoder.to_slots(sk.s_coeffs.astype(np.float64))) ** 2).max())
        e_worst = default_secret_slot_norm2(n) * 1.5 * var_e
        variance += n / 3 * e_worst + n / 2 * var_e * s_worst
    return 7 * np.sqrt(variance) / params.scale


def test_encoding_is_a_ring_homomorphism():
    enc, rng = Encoder(64), np.random.default_rng(0)
    x, y = rng.normal(size=32), rng.normal(size=32)
    cx, cy = enc.to_coefficients(x), enc.to_coefficients(y)
    full = np.convolve(cx, cy)
    negacyclic = full[:64].copy()
    negacyclic[:63] -= full[64:]
    np.testing.assert_allclose(enc.to_slots(cx).real, x, atol=1e-12)
    np.testing.assert_allclose(enc.to_slots(negacyclic).real, x * y, atol=1e-12)


def test_too_many_values_for_the_slots_is_refused():
    with pytest.raises(SlotOverflow, match="slots"):
        Encoder(64).to_coefficients(np.zeros(33))


@pytest.mark.parametrize("mode", ["secret_key", "public_key"])
def test_decryption_recovers_the_message_within_the_fresh_noise_bound(ctx, keys, mode):
    sk, pk = keys
    x = np.random.default_rng(1).uniform(-100, 100, size=(3, ctx.params.slots))
    ct = ctx.encrypt_symmetric(sk, x) if mode == "secret_key" else ctx.encrypt_public(pk, x)
    err = np.abs(ctx.decrypt(sk, ct) - x).max()
    assert 0 < err <= _fresh_bound(ctx, sk, pk=mode == "public_key")


def test_a_wrong_secret_key_decrypts_to_noise(ctx, keys):
    sk, _ = keys
    x = np.random.default_rng(2).normal(size=(1, 64))
    ct = ctx.encrypt_symmetric(sk, x)
    garbage = ctx.decrypt(ctx.generate_secret_key(), ct)[:, :64]
    assert np.abs(garbage - x).mean() > 1e3  # uniform mod q0, not the message


def test_add_scalar_plain_products_and_rescale_track_value_and_scale(ctx, keys):
    sk, _ = keys
    rng = np.random.default_rng(3)
    x, y, v = (rng.normal(size=(2, ctx.params.slots)) for _ in range(3))
    cx, cy = ctx.encrypt_symmetric(sk, x), ctx.encrypt_symmetric(sk, y)
    assert np.abs(ctx.decrypt(sk, ctx.add(cx, cy)) - (x + y)).max() < 2 * _fresh_bound(ctx, sk)
    scaled = ctx.mul_scalar(cx, -0.375)
    assert scaled.level == cx.level and scaled.scale == cx.scale * ctx.params.moduli[-1]
    rescaled = ctx.rescale(scaled)
    assert rescaled.level == cx.level - 1 and rescaled.scale == pytest.approx(ctx.params.scale)
    assert np.abs(ctx.decrypt(sk, rescaled) - (-0.375 * x)).max() < 1e-5
    product = ctx.rescale(ctx.mul_plain(cx, v[0]))
    assert np.abs(ctx.decrypt(sk, product) - x * v[0]).max() < 1e-4


def test_linear_map_is_one_gemm_and_one_rescale(ctx, keys):
    sk, _ = keys
    rng = np.random.default_rng(4)
    x, w = rng.normal(size=(8, ctx.params.slots)), rng.normal(size=(8, 3))
    out = ctx.linear_map(ctx.encrypt_symmetric(sk, x), w)
    assert out.count == 3 and out.level == ctx.params.depth - 1
    assert np.abs(ctx.decrypt(sk, out) - w.T @ x).max() < 1e-5


def test_the_chain_runs_out_after_depth_rescales(ctx, keys):
    sk, _ = keys
    ct = ctx.encrypt_symmetric(sk, np.ones((1, 4)))
    for _ in range(ctx.params.depth):
        ct = ctx.rescale(ctx.mul_scalar(ct, 0.5))
    with pytest.raises(LevelExhausted, match="level 0"):
        ctx.mul_scalar(ct, 0.5)
    with pytest.raises(LevelExhausted):
        ctx.rescale(ct)


def test_values_beyond_the_headroom_are_refused_before_they_wrap(ctx, keys):
    sk, _ = keys
    with pytest.raises(ValueOutOfRange, match="value_bits"):
        ctx.encrypt_symmetric(sk, np.full((1, 4), 2.0**ctx.params.value_bits))


def test_keys_of_another_parameter_set_are_refused(ctx):
    other = CKKSContext(preset("insecure_n256", allow_insecure=True))
    with pytest.raises(ParameterMismatch, match="he.params"):
        ctx.encrypt_symmetric(other.generate_secret_key(), np.ones((1, 4)))


def test_fresh_ciphertexts_look_uniform(ctx, keys):
    """c0 = −a·s + m + e must be indistinguishable from uniform mod q (a sanity check of IND-CPA)."""
    sk, _ = keys
    ct = ctx.encrypt_symmetric(sk, np.zeros((4, ctx.params.slots)))
    for i, q in enumerate(ctx.params.moduli):
        c0 = ct.data[:, 0, i].astype(np.float64).ravel() / q
        counts = np.histogram(c0, bins=16, range=(0, 1))[0]
        expected = c0.size / 16
        assert ((counts - expected) ** 2 / expected).sum() < 60  # χ²(15): p ≈ 1e-7
