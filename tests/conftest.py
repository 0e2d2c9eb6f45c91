"""Shared fixtures: composed configs and the tiny model used across the suite."""

from __future__ import annotations

import os
import tempfile

import pytest
from hydra import compose, initialize_config_module

from tensafe.config import validate_config

try:
    import torch
except ImportError:  # the HE-only CPython 3.10 environment (make test-openfhe) has no torch
    torch = None
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


# Keys and audit records of the suite (and of the `tensafe` subprocesses it starts) stay out of ~/.tensafe.
_STATE = tempfile.mkdtemp(prefix="tensafe-tests-")
os.environ.setdefault("TENSAFE_KEYSTORE", os.path.join(_STATE, "keys"))
os.environ.setdefault("TENSAFE_AUDIT_DB", os.path.join(_STATE, "audit.sqlite3"))


def compose_raw(*overrides: str):
    """The composed (unvalidated) config for `overrides`, exactly as the entrypoint sees it."""
    with initialize_config_module("tensafe.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def compose_cfg(*overrides: str):
    return validate_config(compose_raw(*overrides))


@pytest.fixture(scope="session")
def tiny_cfg():
    return compose_cfg("model=tiny_llama")


@pytest.fixture(scope="session")
def tokenizer(tiny_cfg):
    from tensafe.models.loader import load_tokenizer

    return load_tokenizer(tiny_cfg.model)
