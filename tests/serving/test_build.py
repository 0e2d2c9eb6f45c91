"""Building the embedded engine from the serving config: HE adapters are checked before serving."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tensafe.errors import ConfigError
from tensafe.serving.build import build_embedded
from tests.conftest import compose_cfg, compose_raw
from tests.serving.made_adapters import trained_looking_adapter


@pytest.fixture(scope="module")
def folder(tiny_cfg, tmp_path_factory):
    path = tmp_path_factory.mktemp("build") / "a"
    trained_looking_adapter(tiny_cfg, path, seed=1)
    return path


def _cfg(folder, he: str, *extra: str):
    return compose_cfg("model=tiny_llama", *extra, f"+serving.adapters.a={{path: '{folder}', he: {he}}}")


def test_an_he_adapter_without_an_he_backend_names_the_key_and_the_fix(folder):
    with pytest.raises(ConfigError, match=r"serving\.adapters\.a\.he\.enabled.*he=ckks_numpy"):
        build_embedded(_cfg(folder, "{enabled: true, evaluator: in_process_protects_nothing}"))


def test_he_module_patterns_that_match_nothing_are_refused(folder):
    he = "{enabled: true, evaluator: in_process_protects_nothing, modules: ['*.mlp.*']}"
    with pytest.raises(ConfigError, match=r"he\.modules.*matches none"):
        build_embedded(_cfg(folder, he, "he=ckks_numpy", "he.params=n4096"))


def test_a_remote_evaluator_needs_its_key_in_the_environment(folder, monkeypatch):
    monkeypatch.delenv("TENSAFE_HE_EVALUATOR_KEY", raising=False)
    he = "{enabled: true, evaluator: 'http://127.0.0.1:9'}"
    with pytest.raises(ConfigError, match="TENSAFE_HE_EVALUATOR_KEY"):
        build_embedded(_cfg(folder, he, "he=ckks_numpy", "he.params=n4096"))


def test_an_evaluator_that_is_neither_a_url_nor_the_named_test_mode_is_refused(folder):
    from tensafe.config.validate import validate_config

    raw = compose_raw("model=tiny_llama", f"+serving.adapters.a={{path: '{folder}', he: {{enabled: true, "
                      "evaluator: in_process}}")
    with pytest.raises((ValidationError, ConfigError), match="in_process_protects_nothing"):
        validate_config(raw)


def test_the_in_process_evaluator_is_never_the_default():
    from tensafe.config.schema import HEAdapterOptions

    with pytest.raises(ValidationError):
        HEAdapterOptions(enabled=True)  # an evaluator must be named
