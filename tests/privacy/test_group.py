"""Group privacy: the ε of k records added or removed together, checked against independent bounds."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from tensafe.privacy.accounting import PrivacyAccountant
from tensafe.privacy.group import group_epsilon

HISTORY = [(1.5, 0.05, 200), (2.0, 0.05, 100)]
DELTA = 1e-5


def test_a_group_of_one_is_the_per_record_epsilon():
    accountant = PrivacyAccountant("prv")
    for sigma, q, n in HISTORY:
        accountant.step(sigma, q, n)
    assert group_epsilon(HISTORY, 1, DELTA) == pytest.approx(accountant.epsilon(DELTA), rel=0.02)


def test_a_group_of_two_lies_between_one_record_and_the_rdp_group_bound():
    """Mironov (2017), Prop. 2: (2α, ε)-RDP for neighbours gives (α, 3ε)-RDP for pairs."""
    orders = np.array([1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64])
    rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=2 * orders) for s, q, n in HISTORY)
    rdp_bound, _ = get_privacy_spent(orders=orders, rdp=3 * rdp, delta=DELTA)
    pair = group_epsilon(HISTORY, 2, DELTA)
    assert group_epsilon(HISTORY, 1, DELTA) < pair < rdp_bound


def test_group_epsilon_grows_with_the_group():
    values = [group_epsilon(HISTORY, k, DELTA) for k in (1, 2, 4, 8)]
    assert values == sorted(values) and values[-1] > 4 * values[0]
    assert group_epsilon([], 8, DELTA) == 0.0
