"""Shared HE fixtures: parameter sets and every backend that can run in this interpreter."""

from __future__ import annotations

import importlib.util

import pytest

from tensafe.he.params import preset

OPENFHE_IMPORTABLE = importlib.util.find_spec("openfhe") is not None
# Secure (128-bit) backends under test: own kernels always; OpenFHE where its wheel imports (3.10 env).
BACKEND_NAMES = ["ckks_numpy"] + (["openfhe"] if OPENFHE_IMPORTABLE else [])


@pytest.fixture(scope="session")
def n4096():
    return preset("n4096")


@pytest.fixture(scope="session")
def toy():
    """The insecure 256-degree ring, for fast checks of error handling only."""
    return preset("insecure_n256", allow_insecure=True)
