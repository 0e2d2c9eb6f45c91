"""DP-SGD LoRA training end to end on the tiny model: it learns, it accounts, it stops, it resumes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tensafe.config import config_digest
from tensafe.errors import ConfigError
from tensafe.privacy.ledger import PrivacyLedger
from tensafe.training.pipeline import train_adapter
from tests.conftest import compose_cfg, compose_raw

# Seeded noise and sampling keep these runs reproducible; secure mode (the default) has its own test.
TINY = [
    "model=tiny_llama",
    "hardware.micro_batch_size=8",
    "train.eval_max_examples=32",
    "data.max_examples=400",
    "privacy.secure_mode=false",
]


def _train(tmp_path, *overrides, name="run"):
    base = [o for o in TINY if "privacy=none" not in overrides or not o.startswith("privacy.")]
    raw = compose_raw(*base, *overrides)
    cfg = compose_cfg(*base, *overrides)
    return train_adapter(cfg, raw.logger, tmp_path / name, config_digest(raw))


def _adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def test_dp_run_changes_and_improves_the_adapter(tmp_path):
    result = _train(
        tmp_path, "privacy.noise_multiplier=0.5", "train.batch_size=32", "train.max_steps=25", "optim.lr=0.05"
    )
    m = result.metrics()
    assert m["steps"] == 25 and 0 < m["epsilon"] < 100
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.5, m
    weights = _adapter(result.adapter_dir)
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b)  # PEFT starts B at exactly zero


def test_ledger_matches_the_run_and_sits_beside_every_checkpoint(tmp_path):
    result = _train(
        tmp_path,
        "privacy.noise_multiplier=1.0",
        "train.batch_size=16",
        "train.max_steps=4",
        "train.checkpoint_every_n_steps=2",
    )
    folders = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [f.name for f in folders] == ["step-000002", "step-000004"]
    for f, steps in zip(folders, (2, 4)):
        ledger = PrivacyLedger.load(f / "privacy_ledger.json")
        assert ledger.steps == steps and (f / "adapter" / "adapter_model.safetensors").is_file()
    final = PrivacyLedger.load(result.ledger_path)
    assert final.steps == 4 and final.noise_multiplier == 1.0 and final.dataset_size == result.data.train_size
    assert final.sample_rate == pytest.approx(16 / result.data.train_size)
    assert final.epsilon == pytest.approx(result.mechanism.epsilon())


def test_resume_continues_the_accountant_and_the_weights(tmp_path):
    common = ["privacy.noise_multiplier=1.0", "train.batch_size=16", "train.checkpoint_every_n_steps=2"]
    straight = _train(tmp_path, *common, "train.max_steps=4", name="straight")
    _train(tmp_path, *common, "train.max_steps=2", name="first")
    resumed = _train(
        tmp_path,
        *common,
        "train.max_steps=4",
        f"train.resume_from={tmp_path / 'first' / 'checkpoints' / 'step-000002'}",
        name="resumed",
    )
    a, b = PrivacyLedger.load(straight.ledger_path), PrivacyLedger.load(resumed.ledger_path)
    assert b.steps == 4 and b.epsilon == pytest.approx(a.epsilon, rel=1e-9)
    assert b.epsilon > PrivacyLedger.load(tmp_path / "first" / "privacy_ledger.json").epsilon
    # Resuming at the checkpoint's own step trains nothing: the adapter is the checkpoint's.
    checkpoint = tmp_path / "first" / "checkpoints" / "step-000002"
    same = _train(tmp_path, *common, "train.max_steps=2", f"train.resume_from={checkpoint}", name="same")
    before, after = _adapter(checkpoint / "adapter"), _adapter(same.adapter_dir)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(float(v.abs().max()) > 0 for k, v in after.items() if "lora_B" in k)


def test_resume_with_more_steps_still_meets_the_target_epsilon(tmp_path):
    common = ["train.batch_size=16", "train.checkpoint_every_n_steps=3"]
    _train(tmp_path, *common, "privacy.noise_multiplier=2.0", "train.max_steps=3", name="first")
    checkpoint = tmp_path / "first" / "checkpoints" / "step-000003"
    longer = _train(
        tmp_path,
        *common,
        "privacy.target_epsilon=3.0",
        "train.max_steps=9",
        f"train.resume_from={checkpoint}",
        name="longer",
    )
    history = longer.mechanism.accountant.history
    # The 3 steps already taken count against the target; σ is calibrated for the 6 left.
    assert history[0][::2] == (2.0, 3) and history[1][2] == 6
    assert 2.9 < longer.metrics()["epsilon"] <= 3.0
    with pytest.raises(ConfigError, match="already spent"):
        _train(
            tmp_path,
            *common,
            "privacy.target_epsilon=0.05",
            "train.max_steps=9",
            f"train.resume_from={checkpoint}",
            name="spent",
        )


def test_budget_stops_training_before_epsilon_passes_it(tmp_path):
    result = _train(
        tmp_path,
        "privacy.noise_multiplier=0.8",
        "train.batch_size=32",
        "train.max_steps=200",
        "privacy.max_epsilon=4.0",
    )
    m = result.metrics()
    assert m["stopped_by_budget"] and 0 < m["steps"] < 200
    assert m["epsilon"] <= 4.0
    assert result.mechanism.accountant.epsilon_if(0.8, m["sample_rate"], 1, m["delta"]) > 4.0


def test_target_epsilon_is_met_by_calibration(tmp_path):
    result = _train(tmp_path, "privacy.target_epsilon=2.0", "train.batch_size=16", "train.max_steps=6")
    m = result.metrics()
    assert m["epsilon"] <= 2.0 and m["epsilon"] > 1.8


def test_secure_mode_is_the_default_and_trains(tmp_path):
    assert compose_cfg().privacy.secure_mode
    result = _train(tmp_path, "privacy.noise_multiplier=1.0", "privacy.secure_mode=true", "train.max_steps=2")
    assert PrivacyLedger.load(result.ledger_path).secure_mode
    assert type(result.mechanism.rng).__name__ == "SecureRandom"


def test_non_private_training_reports_no_epsilon(tmp_path):
    result = _train(tmp_path, "privacy=none", "train.batch_size=16", "train.max_steps=3")
    ledger = json.loads(result.ledger_path.read_text())
    assert ledger["mechanism"] == "none" and ledger["epsilon"] is None


@pytest.mark.parametrize("option", ["hardware.compile=true", "hardware.gradient_checkpointing=true"])
def test_non_private_training_with_compile_or_checkpointing_runs(tmp_path, option):
    result = _train(tmp_path, "privacy=none", option, "train.batch_size=8", "train.max_steps=2")
    assert (
        result.metrics()["steps"] == 2
        and result.metrics()["eval_loss_after"] < result.metrics()["eval_loss_before"]
    )


def test_physical_micro_batches_do_not_change_the_private_step(tmp_path):
    """The logical (Poisson) batch is what privacy sees; how it is split for memory is not."""
    common = [
        "privacy.noise_multiplier=1.0",
        "train.batch_size=24",
        "train.max_steps=3",
        "optim.name=sgd",
        "optim.lr=0.5",
    ]
    small = _train(tmp_path, *common, "hardware.micro_batch_size=5", name="small")
    large = _train(tmp_path, *common, "hardware.micro_batch_size=64", name="large")
    a, b = _adapter(small.adapter_dir), _adapter(large.adapter_dir)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)


def test_empty_poisson_batches_still_take_a_noise_step(tmp_path):
    import csv

    result = _train(
        tmp_path,
        "privacy.noise_multiplier=1.0",
        "train.batch_size=1",
        "train.max_steps=8",
        "data.max_examples=200",
        "train.log_every_n_steps=1",
    )
    rows = list(csv.DictReader(next((tmp_path / "run" / "logs").rglob("metrics.csv")).open()))
    sizes = [float(r["batch_examples"]) for r in rows if r.get("batch_examples")]
    assert len(sizes) == 8 and 0.0 in sizes  # this seed draws empty batches (P(empty) ≈ 1/e)…
    assert result.metrics()["steps"] == 8  # …and each is still a step of the accounted mechanism
    assert any(float(v.abs().max()) > 0 for k, v in _adapter(result.adapter_dir).items() if "lora_B" in k)
