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
    m = result.metrics().model_dump()
    assert m["steps"] == 25 and 0 < m["epsilon"] < 100
    assert m["eval_loss_adapter"] < m["eval_loss_base"] - 0.5, m
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
    assert 2.9 < longer.metrics().model_dump()["epsilon"] <= 3.0
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
    m = result.metrics().model_dump()
    assert m["stopped_by_budget"] and 0 < m["steps"] < 200
    assert m["epsilon"] <= 4.0
    assert result.mechanism.accountant.epsilon_if(0.8, m["sample_rate"], 1, m["delta"]) > 4.0


def test_target_epsilon_is_met_by_calibration(tmp_path):
    result = _train(tmp_path, "privacy.target_epsilon=2.0", "train.batch_size=16", "train.max_steps=6")
    m = result.metrics().model_dump()
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
        result.metrics().steps == 2
        and result.metrics().eval_loss_adapter < result.metrics().eval_loss_base
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
    rows = list(csv.DictReader((tmp_path / "run" / "private" / "train_steps.csv").open()))
    sizes = [float(r["batch_examples"]) for r in rows]
    assert len(sizes) == 8 and 0.0 in sizes  # this seed draws empty batches (P(empty) ≈ 1/e)…
    assert result.metrics().model_dump()["steps"] == 8  # …and each is still a step of the accounted mechanism
    assert any(float(v.abs().max()) > 0 for k, v in _adapter(result.adapter_dir).items() if "lora_B" in k)


def _recording_noise(monkeypatch):
    """Record every noise tensor DP-SGD adds, in order."""
    import tensafe.privacy.dp_sgd as dp_sgd

    drawn: list[torch.Tensor] = []
    real = dp_sgd.gaussian_like

    def record(draws, ref, std):
        noise = real(draws, ref, std)
        drawn.append(noise.flatten().clone())
        return noise

    monkeypatch.setattr(dp_sgd, "gaussian_like", record)
    return drawn


def test_a_resumed_seeded_run_continues_its_noise_and_batches_instead_of_replaying_them(
    tmp_path, monkeypatch
):
    """Resuming at step 3 must draw the noise and Poisson batches of steps 4–6, not those of 1–3 again:
    replayed noise cancels in update 4 − update 1, and the ledger would count 6 independent steps."""
    common = ["privacy.noise_multiplier=1.0", "train.batch_size=16", "train.checkpoint_every_n_steps=3",
              "optim.name=sgd", "optim.lr=0.1"]
    drawn = _recording_noise(monkeypatch)
    straight = _train(tmp_path, *common, "train.max_steps=6", name="straight")
    per_step = len(drawn) // 6
    straight_noise = [torch.cat(drawn[i * per_step : (i + 1) * per_step]) for i in range(6)]
    _train(tmp_path, *common, "train.max_steps=3", name="first")
    drawn.clear()
    _train(tmp_path, *common, "train.max_steps=6",
           f"train.resume_from={tmp_path / 'first' / 'checkpoints' / 'step-000003'}", name="resumed")
    resumed_noise = [torch.cat(drawn[i * per_step : (i + 1) * per_step]) for i in range(3)]
    for later, earlier, same in zip(resumed_noise, straight_noise[:3], straight_noise[3:]):
        # Independent draws: |correlation| within 5 standard errors of 0 (a replay gives exactly 1).
        assert abs(float(torch.corrcoef(torch.stack([later, earlier]))[0, 1])) < 5 / later.numel() ** 0.5
        assert torch.equal(later, same)  # exactly what the uninterrupted run drew at that step
    # The same noise and the same batches: the resumed adapter is the uninterrupted run's.
    a, b = _adapter(straight.adapter_dir), _adapter(tmp_path / "resumed" / "adapter")
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    rows = [r for r in (tmp_path / "resumed" / "private" / "train_steps.csv").read_text().splitlines()[1:]]
    straight_rows = (tmp_path / "straight" / "private" / "train_steps.csv").read_text().splitlines()[1:]
    assert [r.split(",")[2] for r in rows] == [r.split(",")[2] for r in straight_rows[3:]]  # batch sizes


def test_under_dp_loggers_get_only_dp_quantities_and_the_rest_stays_private(tmp_path):
    import csv

    dp = _train(
        tmp_path, "privacy.noise_multiplier=1.0", "train.max_steps=4", "train.log_every_n_steps=1", name="dp"
    )
    logged = list(csv.DictReader(next((tmp_path / "dp" / "logs").rglob("metrics.csv")).open()))
    columns = set().union(*(row.keys() for row in logged))
    assert "epsilon" in columns and not columns & {"train_loss", "batch_examples"}, columns
    eps = [float(r["epsilon"]) for r in logged if r.get("epsilon")]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(dp.metrics().model_dump()["epsilon"], rel=1e-6)
    private = tmp_path / "dp" / "private"
    steps = list(csv.DictReader((private / "train_steps.csv").open()))
    assert [int(r["step"]) for r in steps] == [1, 2, 3, 4] and all(float(r["train_loss"]) > 0 for r in steps)
    assert private.stat().st_mode & 0o077 == 0  # the data owner's folder
    plain = _train(tmp_path, "privacy=none", "train.max_steps=2", "train.log_every_n_steps=1", name="plain")
    assert plain.metrics().model_dump()["epsilon"] is None
    logged = list(csv.DictReader(next((tmp_path / "plain" / "logs").rglob("metrics.csv")).open()))
    assert any(r.get("train_loss") for r in logged)  # no guarantee to keep: training statistics are logged


def test_the_dataset_digest_is_keyed_by_a_secret_only_the_data_owner_keeps(tmp_path):
    """An unkeyed hash of the records lets anyone who knows all records but one test candidates for it."""
    import hashlib
    import hmac

    from tensafe.data.digest import DatasetKey, canonical_records

    a = _train(tmp_path, "privacy.noise_multiplier=1.0", "train.max_steps=1", name="a")
    b = _train(tmp_path, "privacy.noise_multiplier=1.0", "train.max_steps=1", name="b")
    records = a.data.train.records
    ledger = PrivacyLedger.load(a.ledger_path)
    unkeyed = hashlib.sha256(canonical_records(records)).hexdigest()
    assert unkeyed not in ledger.dataset_digest
    assert ledger.dataset_digest != PrivacyLedger.load(b.ledger_path).dataset_digest  # a key per run
    key = DatasetKey.load(tmp_path / "a")  # the owner's key proves which records were used
    expected = hmac.new(key.key, canonical_records(records), hashlib.sha256).hexdigest()
    assert ledger.dataset_digest == f"hmac-sha256:{expected}" == a.metrics().model_dump()["dataset_digest"]
    assert (tmp_path / "a" / "private" / "dataset_key.json").stat().st_mode & 0o077 == 0
    public = [p for p in (tmp_path / "a").rglob("*") if p.is_file() and "private" not in p.parts]
    secrets = (key.key.hex().encode(), unkeyed.encode())
    assert not [p for p in public if any(secret in p.read_bytes() for secret in secrets)]


def test_resume_refuses_other_data_or_a_checkpoint_without_its_dataset_key(tmp_path):
    common = ["privacy.noise_multiplier=1.0", "train.batch_size=16"]
    _train(tmp_path, *common, "train.max_steps=1", name="first")
    checkpoint = tmp_path / "first" / "checkpoints" / "step-000001"
    with pytest.raises(ConfigError, match="other data"):
        _train(
            tmp_path, *common, "train.max_steps=2", "data.max_examples=300",
            f"train.resume_from={checkpoint}", name="other",
        )
    (checkpoint / "private" / "dataset_key.json").unlink()
    with pytest.raises(ConfigError, match="dataset_key.json"):
        _train(tmp_path, *common, "train.max_steps=2", f"train.resume_from={checkpoint}", name="keyless")
