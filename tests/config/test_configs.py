"""Every option of every config group composes, validates and instantiates; bad values exit 2."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import pytest
from hydra.utils import instantiate

from tensafe.config import validate_config
from tensafe.errors import ConfigError
from tests.cli import run_tensafe
from tests.conftest import compose_cfg, compose_raw

CONF = Path(str(files("tensafe.conf")))
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_"))


def _options(group: str) -> list[str]:
    """A group's options; files named _* are shared fragments the options include."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_validates(group, option):
    extra = {
        "task": {"evaluate": ["task.adapter=/nonexistent"], "report": ["task.sweep_dir=/nonexistent"],
                 "he_evaluator": ["task.adapter=/nonexistent"], "package": ["task.run_dir=/nonexistent"]},
        "data": {"jsonl": ["data.path=/nonexistent.jsonl"]},
    }
    raw = compose_raw(f"{group}={option}", *extra.get(group, {}).get(option, []))
    cfg = validate_config(raw)
    if group == "task":
        assert callable(instantiate(raw.task.runner))
    if group == "launcher":
        assert hasattr(instantiate(raw.launcher), "launch")
    if group == "logger":
        assert instantiate(raw.logger, save_dir="/tmp") is not None
    if group == "benchmark":
        assert callable(instantiate(raw.benchmark.runner)) and cfg.benchmark.name == option
    if group == "model":
        assert cfg.model.name == option


def test_groups_match_the_architecture():
    assert set(GROUPS) >= {
        "task",
        "model",
        "data",
        "privacy",
        "hardware",
        "he",
        "serving",
        "launcher",
        "logger",
        "benchmark",
        "experiment",
    }


@pytest.mark.parametrize(
    "override,key",
    [
        ("privacy.noise_multiplier=-1", "privacy.noise_multiplier"),
        ("privacy.max_grad_norm=0", "privacy.max_grad_norm"),
        ("privacy.delta=1.5", "privacy.delta"),
        ("privacy.accountant=moments", "privacy.accountant"),
        ("privacy.grad_sample_mode=magic", "privacy.grad_sample_mode"),
        ("+model.flavour=x", "model.flavour"),
        ("train.batch_size=0", "train.batch_size"),
        ("optim.lr=0", "optim.lr"),
        ("he=ckks_numpy he.params=n9", "he"),
        ("he=ckks_numpy he.precision_bits=60", "he.precision_bits"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_raw(*override.split()))
    assert err.value.key == key


def test_noise_multiplier_alone_replaces_the_default_target():
    cfg = validate_config(compose_raw("privacy.noise_multiplier=0.3"))
    assert cfg.privacy.noise_multiplier == 0.3 and cfg.privacy.target_epsilon is None
    default = validate_config(compose_raw())
    assert default.privacy.target_epsilon == 8.0 and default.privacy.noise_multiplier is None
    assert validate_config(compose_raw("privacy.target_epsilon=2")).privacy.target_epsilon == 2


def test_noise_multiplier_and_target_epsilon_together_are_refused_naming_both():
    with pytest.raises(ConfigError) as err:
        validate_config(compose_raw("privacy.noise_multiplier=0.3", "privacy.target_epsilon=1"))
    assert "privacy.noise_multiplier=0.3" in str(err.value) and "privacy.target_epsilon=1" in str(err.value)


def _tensafe(*args, cwd):
    env = {**os.environ, "HYDRA_FULL_ERROR": "", "HF_HUB_OFFLINE": "1"}  # no hub here: fail fast
    return run_tensafe(*args, cwd=cwd, env=env, timeout=120)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["privacy.noise_multiplier=-1"], "privacy.noise_multiplier=-1"),
        (["model=llama_unknown"], "model/llama_unknown"),
        (["model.flavour=x"], "model.flavour"),
        (["privacy.max_grad_norm=0"], "privacy.max_grad_norm=0"),
        (
            ["privacy.noise_multiplier=0.3", "privacy.target_epsilon=1"],
            "privacy.target_epsilon=1.0 are both set",
        ),
        (
            ["model=tiny_llama", "data.max_examples=20", "privacy.delta=0.1", "train.max_steps=1"],
            "privacy.delta=0.1",
        ),
        (["hardware=h100_80gb", "model=tiny_llama"], "hardware='h100_80gb'"),
        (["model.source=hub", "train.max_steps=1"], "model.hf_id="),
        (["he=ckks_numpy", "he.params=insecure_n256"], "allow_insecure"),
        (["he=rot13"], "he/rot13"),
        (["task=serve", "model=tiny_llama"], "serving.api_key_sha256"),
        (["task=serve", "serving.api_key_sha256=[abc]"], "serving.api_key_sha256"),
    ],
)
def test_entrypoint_exits_2_with_one_line(args, needle, tmp_path):
    if "hardware=h100_80gb" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is visible: the hardware choice is valid here")
    done = _tensafe(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.parametrize("override,owner", [
    ("+fooo=1", "TenSafeConfig"), ("+serving.fooo=1", "ServingConfig"), ("+he.fooo=1", "HEConfig"),
    ("+security.fooo=1", "SecurityConfig"), ("+privacy.fooo=1", "DPSGD"),
    ("+model.lora.fooo=1", "LoraConfig"), ("+task.fooo=1", "TrainTask"),
    ("+serving.vllm.fooo=2", "VLLMOptions"),
])
def test_an_unknown_key_lists_the_keys_of_its_own_group(override, owner):
    from tensafe.config import schema

    with pytest.raises(ConfigError, match="unknown key") as err:
        compose_cfg(override)
    allowed = str(err.value).split("allowed keys: ", 1)[1].split(", ")
    model = getattr(schema, owner)
    assert allowed == [f.alias or name for name, f in model.model_fields.items()]


def test_engines_and_backends_share_their_common_keys_from_one_fragment():
    embedded, vllm = (compose_raw(f"serving={e}").serving for e in ("embedded", "vllm"))
    shared = set(compose_raw("serving=embedded").serving) & set(vllm)
    assert {"header_timeout_s", "max_connections", "allow_unsigned", "api_key_sha256"} <= shared
    assert "prefill_chunk" in embedded and "prefill_chunk" not in vllm and "vllm" not in embedded
    numpy, openfhe = (compose_raw(f"he={b}").he for b in ("ckks_numpy", "openfhe"))
    common = lambda he: {k: v for k, v in he.items() if k not in ("backend", "packing")}  # noqa: E731
    assert common(numpy) == common(openfhe)
    assert (numpy.packing, openfhe.packing) == ("auto", "slots")  # coefficient packing: TenSafe's kernels


def test_coefficient_packing_on_a_backend_without_it_names_the_fix():
    from tensafe.config.schema import HEConfig

    with pytest.raises(ValueError, match="he.packing=slots"):
        HEConfig(backend="openfhe", packing="coefficients")


def test_circuit_privacy_needs_coefficient_packing_and_a_two_prime_ring():
    from tensafe.config.schema import HEConfig

    with pytest.raises(ValueError, match="he.packing=coefficients"):
        HEConfig(backend="ckks_numpy", packing="slots", circuit_private=True)
    with pytest.raises(ValueError, match="he.coefficient_ring_degree=4096"):
        HEConfig(backend="ckks_numpy", packing="coefficients", circuit_private=True)
    assert HEConfig(backend="ckks_numpy", packing="coefficients", circuit_private=True,
                    coefficient_ring_degree=4096).circuit_private
