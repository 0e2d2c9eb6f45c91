"""The wire format: versioned, bound to the parameter set, size-limited, and refusing anything else."""

from __future__ import annotations

import numpy as np
import pytest

from tensafe.he import wire
from tensafe.he.backends.kernels import KernelCKKSBackend
from tensafe.he.errors import HEError, ParameterMismatch, SerializationError
from tensafe.he.lora import Evaluator, KeyHolder
from tensafe.he.params import preset


@pytest.fixture(scope="module")
def setup(n4096):
    backend = KernelCKKSBackend(n4096)
    holder = KeyHolder(backend)
    x = np.random.default_rng(0).normal(size=(100, 8))
    batch = holder.encrypt(x, input_bound=8.0)
    return backend, holder, x, batch, holder.to_bytes(batch)


def test_a_batch_round_trips_and_decrypts_the_same(setup):
    backend, holder, x, batch, data = setup
    back = holder.from_bytes(data)
    assert np.array_equal(back.data, batch.data) and back.scale == batch.scale
    assert np.abs(backend.decrypt(holder._secret, back)[:, :100].T - x).max() < 1e-6
    with pytest.raises(HEError, match="not an HE-LoRA result"):  # the key holder decrypts replies only
        holder.decrypt(back, 100)


def test_fresh_batches_send_a_seed_instead_of_c1(setup):
    backend, holder, _, batch, data = setup
    p = backend.params
    full_size = 2 * batch.count * p.ring_degree * sum((q.bit_length() + 7) // 8 for q in p.moduli)
    assert len(data) < 0.55 * full_size
    unseeded = type(batch)(batch.data, batch.scale, None)
    assert len(holder.to_bytes(unseeded)) > 0.99 * full_size


@pytest.mark.parametrize("cut", [1, 100, 5000])
def test_truncated_messages_are_refused(setup, cut):
    *_, data = setup
    with pytest.raises(SerializationError, match="truncated"):
        setup[1].from_bytes(data[:-cut])


@pytest.mark.parametrize("where", [60, 200, -40])
def test_a_flipped_byte_is_refused(setup, where):
    *_, data = setup
    bad = bytearray(data)
    bad[where] ^= 0x10
    with pytest.raises(SerializationError, match="tampered"):
        setup[1].from_bytes(bytes(bad))


def test_a_batch_of_another_parameter_set_is_refused(setup):
    other = KeyHolder(KernelCKKSBackend(preset("n8192")))
    with pytest.raises(ParameterMismatch, match="he.params"):
        setup[1].from_bytes(other.to_bytes(other.encrypt(np.zeros((1, 2)), input_bound=1.0)))


def test_messages_over_the_size_limit_are_refused_before_parsing(setup):
    backend, holder, *_ , data = setup
    with pytest.raises(SerializationError, match="max_message_bytes"):
        backend.batch_from_bytes(None, data, max_bytes=len(data) - 1)


def test_a_residue_outside_its_modulus_is_refused(setup):
    backend, holder, _, batch, _ = setup
    bad = type(batch)(batch.data.copy(), batch.scale, None)
    bad.data[0, 1, 0, 0] = np.uint64(backend.params.moduli[0])  # = q0: not a residue
    with pytest.raises(SerializationError, match="modulus"):
        holder.from_bytes(holder.to_bytes(bad))


def test_other_kinds_bad_magic_and_future_versions_are_refused(setup):
    backend, holder, *_, data = setup
    with pytest.raises(SerializationError, match="expected a public_context"):
        backend.public_from_bytes(data)
    with pytest.raises(SerializationError, match="magic"):
        holder.from_bytes(b"XXXX" + data[4:])
    future = bytearray(data)
    future[4] = 9
    with pytest.raises(SerializationError, match="version"):
        holder.from_bytes(bytes(future))


def test_an_evaluator_refuses_a_secret_key_frame(setup, n4096):
    """Even a well-formed secret-key message is refused by kind before any parsing."""
    secret_frame = wire.pack(wire.Kind.SECRET_KEY, wire.BackendId.KERNELS, n4096, b"\x00" * 64)
    a, b = np.ones((8, 2)), np.ones((2, 8))
    with pytest.raises(SerializationError, match="got secret_key"):
        Evaluator(KernelCKKSBackend(n4096), secret_frame, a, b, 1.0)


def test_frames_back_to_back_split_whole_and_nothing_else():
    from tensafe.he.coefficient import CoefficientParameters
    from tensafe.he.coefficient_wire import pack_context

    params = CoefficientParameters.for_ring(2048)
    one, two = bytes(pack_context(params, 20)), bytes(pack_context(params, 22))
    assert [bytes(f) for f in wire.split(one + two, 2, wire.DEFAULT_MAX_BYTES)] == [one, two]
    cases = [(one + two, 1, "more than 1"), ((one + two)[:-3], 2, "runs past"), (b"", 1, "empty"),
             (one + b"x", 2, "shorter than its header")]
    for body, frames, message in cases:
        with pytest.raises(SerializationError, match=message):
            wire.split(body, frames, wire.DEFAULT_MAX_BYTES)
    with pytest.raises(SerializationError, match="exceeds"):
        wire.split(one, 1, len(one) - 1)
