"""Two-stage HE-LoRA over coefficient-encoded products: Δ equals float64 s·X·A·B within the
derived bound, an outlier token costs only its own precision, and no rotation or key switch runs."""

from __future__ import annotations

import numpy as np
import pytest

from tensafe.he.coefficient import CoefficientParameters
from tensafe.he.coefficient_lora import CoefficientKeyHolder, CoefficientStage, two_stage_delta
from tensafe.he.counters import OpCounters


def _roles(n, h, r, seed=0):
    rng = np.random.default_rng(seed)
    holder = CoefficientKeyHolder(CoefficientParameters.for_ring(n), input_bits=22)
    a, b, s = rng.normal(size=(h, r)) / np.sqrt(h), rng.normal(size=(r, h)) / np.sqrt(r), 2.0
    stages = CoefficientStage(holder.context, a, 16), CoefficientStage(holder.context, s * b, 16)
    return holder, stages, s * a @ b


@pytest.mark.parametrize(
    "n, h, r, tokens", [(2048, 64, 4, 1), (2048, 576, 8, 16), (4096, 1024, 16, 16), (4096, 576, 8, 64)]
)
def test_delta_is_s_x_a_b_within_the_bound(n, h, r, tokens):
    holder, (first, second), product = _roles(n, h, r)
    x = np.random.default_rng(tokens).normal(size=(tokens, h))
    counters = OpCounters()
    delta, bound = two_stage_delta(holder, first, second, x, counters)
    error = np.abs(delta - x @ product)
    assert (error <= bound).all()
    assert bound.max() < 0.05 and error.max() > 1e-7  # a real computation with a useful bound
    assert counters.ct_plain_mults > 0 and counters.rotations == counters.key_switches == 0


def test_an_outlier_token_costs_only_its_own_precision():
    holder, (first, second), product = _roles(2048, 576, 8)
    x = np.random.default_rng(1).normal(size=(16, 576))
    _, plain_bound = two_stage_delta(holder, first, second, x)
    x[0, 5] = 500.0
    delta, bound = two_stage_delta(holder, first, second, x)
    assert (np.abs(delta - x @ product) <= bound).all()
    assert bound[0].max() > 10 * plain_bound[0].max()  # the outlier's own row is coarser
    np.testing.assert_allclose(bound[1:], plain_bound[1:], rtol=0.05)  # every other row keeps its bound
