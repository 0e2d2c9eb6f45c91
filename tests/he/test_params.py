"""Parameter sets: secure against the HE Standard table, insecure ones refused, automatic choice."""

from __future__ import annotations

import importlib.util
import math

import pytest

from tensafe.he.errors import HEError, InsecureParameters, SlotOverflow
from tensafe.he.params import (
    HE_STANDARD_MAX_LOG_Q,
    PRESETS,
    build_parameters,
    noise_bits,
    preset,
    resolve_parameters,
    select_parameters,
)


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("insecure")])
def test_every_named_set_is_within_the_he_standard_bound(name):
    p = preset(name)
    assert p.log_q <= HE_STANDARD_MAX_LOG_Q[p.ring_degree]
    assert not p.insecure
    assert all((q - 1) % (2 * p.ring_degree) == 0 for q in p.moduli)
    assert p.moduli[0] > 2 * p.scale * 2**p.value_bits  # the base prime holds every value at scale Δ


def test_an_over_budget_chain_is_refused_and_names_the_fix():
    with pytest.raises(InsecureParameters, match="below 128-bit security"):
        build_parameters("too_big", 2048, 40, 8)  # 49 + 2·40 = 129 bits > 54 at N = 2048


def test_insecure_sets_need_allow_insecure_and_say_so_loudly(capsys):
    with pytest.raises(InsecureParameters, match="allow_insecure"):
        preset("insecure_n256")
    p = preset("insecure_n256", allow_insecure=True)
    assert p.insecure
    assert "INSECURE" in capsys.readouterr().err and "INSECURE" in p.describe()


def test_auto_selection_picks_the_smallest_ring_whose_slots_hold_the_tokens():
    assert select_parameters(1).ring_degree == 4096
    assert select_parameters(2048).ring_degree == 4096
    assert select_parameters(2049).ring_degree == 8192
    assert select_parameters(5000).ring_degree == 16384
    with pytest.raises(HEError, match="no secure ring"):
        select_parameters(40000)


def test_auto_selection_meets_the_precision_target():
    for tokens, precision in [(100, 18), (3000, 24), (10000, 20)]:
        p = select_parameters(tokens, precision_bits=precision)
        assert p.scale_bits - noise_bits(p.ring_degree) >= precision
        assert p.log_q <= HE_STANDARD_MAX_LOG_Q[p.ring_degree]
    # a precision the small ring cannot hold moves to a larger one
    assert select_parameters(100, precision_bits=26).ring_degree == 8192
    with pytest.raises(HEError, match="50-bit modulus limit .not a security limit"):
        select_parameters(100, precision_bits=30)  # Δ + headroom would pass the 50-bit prime limit


def test_the_digest_binds_the_moduli_and_scale():
    a, b = preset("n8192"), preset("n8192_uniform")
    assert a.digest != b.digest and a.ring_degree == b.ring_degree
    assert preset("n8192").digest == a.digest


def test_resolve_refuses_a_named_set_too_small_for_the_token_count():
    with pytest.raises(SlotOverflow, match="he.max_tokens"):
        resolve_parameters("n4096", 4096, 18, 8)
    assert resolve_parameters("auto", 4096, 18, 8).slots >= 4096


def test_noise_floor_grows_with_the_ring_degree():
    assert math.isclose(noise_bits(8192) - noise_bits(4096), 1.0, abs_tol=0.01)


def test_the_he_config_group_chooses_the_backend_and_the_ring():
    from tensafe.he.backends import backend_from_config
    from tensafe.he.backends.kernels import KernelCKKSBackend
    from tensafe.he.errors import BackendUnavailable
    from tests.conftest import compose_cfg

    assert backend_from_config(compose_cfg().he) is None  # he=off is the default
    backend = backend_from_config(compose_cfg("he=ckks_numpy", "he.max_tokens=3000").he)
    assert isinstance(backend, KernelCKKSBackend)
    assert backend.params.ring_degree == 8192 and "N=8192" in backend.params.describe()
    named = backend_from_config(compose_cfg("he=ckks_numpy", "he.params=n16384").he)
    assert named.params.name == "n16384"
    if importlib.util.find_spec("openfhe") is None:
        with pytest.raises(BackendUnavailable, match="CPython 3.10"):
            backend_from_config(compose_cfg("he=openfhe").he)
