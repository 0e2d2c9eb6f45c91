
"""Every task runs through the real `tensafe` entrypoint on the tiny model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.cli import run_tensafe

# Seeded noise and sampling keep these runs reproducible; the default (secure) mode has its own test.
TINY = [
    "model=tiny_llama",
    "data.max_examples=200",
    "train.eval_max_examples=16",
    "train.batch_size=16",
    "privacy.secure_mode=false",
]


def tensafe(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    done = run_tensafe(*args, cwd=cwd, timeout=timeout, env={"HYDRA_FULL_ERROR": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _run_dir(cwd: Path, name: str = "run") -> Path:
    return cwd / name


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("train")
    done = tensafe(*TINY, "train.max_steps=3", "hydra.run.dir=run", cwd=cwd)
    assert "DP" in done.stdout and "privacy ledger" in done.stdout
    return cwd / "run"


def test_train_writes_adapter_ledger_config_and_digest(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    digest = (trained / "config_digest.txt").read_text().strip()
    assert metrics["config_digest"] == digest and len(digest) == 64
    assert metrics["steps"] == 3 and metrics["epsilon"] > 0
    assert (trained / "adapter" / "adapter_config.json").is_file()
    assert json.loads((trained / "privacy_ledger.json").read_text())["config_digest"] == digest
    assert (trained / ".hydra" / "config.yaml").is_file() and (trained / "resolved_config.yaml").is_file()


def test_evaluate_reports_base_and_adapter(trained, tmp_path):
    done = tensafe(
        *TINY, "task=evaluate", f"task.adapter={trained / 'adapter'}", "hydra.run.dir=eval", cwd=tmp_path
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["eval_loss_base"] > 0 and metrics["eval_loss_adapter"] > 0
    assert "adapter" in done.stdout and "base" in done.stdout


# The tiny model memorises single-copy canaries with every linear layer adapted and 300 steps.
AUDIT = [
    "model=tiny_llama",
    "data.max_examples=50",
    "train.eval_max_examples=16",
    "task=privacy_audit",
    "task.exposure.canaries=4",
    "task.exposure.repeats=16",
    "task.exposure.candidates=300",
    "task.one_run.canaries=128",
    "task.one_run.digits=6",
    "train.max_steps=300",
    "train.batch_size=32",
    "optim.lr=0.02",
    "model.lora.r=16",
    "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
    "privacy.secure_mode=false",
]


def test_privacy_audit_exposes_canaries_without_dp_and_bounds_epsilon_below_the_dp_claim(tmp_path):
    done = tensafe(*AUDIT, "privacy.noise_multiplier=4.0", "hydra.run.dir=audit", cwd=tmp_path, timeout=1200)
    report = json.loads((tmp_path / "audit" / "metrics.json").read_text())
    no_dp, dp = report["non_private"], report["dp"]
    assert no_dp["epsilon"] is None and 0 < dp["epsilon"] < 4
    # Exposure: the ceiling without DP, near the measured chance level with it; chance is ≈ log2(e).
    assert no_dp["exposure_sampled_mean"] > 6.0 and dp["exposure_sampled_mean"] < 3.0
    assert all(1.0 < arm[k] < 2.2 for arm in (no_dp, dp) for k in ("chance_sampled", "chance_extrapolated"))
    # 16 copies of a secret have only the group guarantee, far weaker than the per-record ε.
    assert dp["group_epsilon"] > 4 * dp["epsilon"] and no_dp["group_epsilon"] is None
    # One-run audit: without DP the model gives away membership (ε > 1 at 95%); the DP claim holds.
    assert no_dp["one_run"]["epsilon_lower_bound"] > 1.0
    assert dp["one_run"]["epsilon_lower_bound"] <= dp["epsilon"]
    assert dp["one_run"]["consistent_with_reported_epsilon"]
    assert "consistent with the audit" in done.stdout and "group" in done.stdout


def test_bench_dp_overhead_writes_json(tmp_path):
    tensafe(
        "task=bench",
        "benchmark=dp_overhead",
        "hardware=cpu",
        "model=tiny_llama",
        "benchmark.batch_size=4",
        "benchmark.seq_len=16",
        "benchmark.warmup_steps=1",
        "benchmark.measure_steps=2",
        "benchmark.rounds=1",
        f"benchmark.output_dir={tmp_path / 'results'}",
        "hydra.run.dir=bench",
        cwd=tmp_path,
    )
    result = json.loads((tmp_path / "results" / "dp_overhead-cpu-tiny_llama.json").read_text())
    assert set(result["variants"]) == {
        "a_plain_pytorch_peft",
        "b_tensafe_no_dp",
        "c_tensafe_dp_hooks",
        "c_tensafe_dp_functorch",
    }
    assert result["ratios"]["b_over_a"] > 0 and set(result["ratios"]["c_over_b"]) == {"hooks", "functorch"}


def test_multirun_sweep_then_report(tmp_path):
    tensafe(
        "-m",
        "task=train",
        *TINY,
        "train.max_steps=2",
        "privacy.noise_multiplier=0.5,2",
        "optim.lr=1e-3,3e-3",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
        timeout=600,
    )
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.name.isdigit())
    assert len(jobs) == 4 and all((j / "metrics.json").is_file() for j in jobs)
    overrides = [yaml.safe_load((j / ".hydra" / "overrides.yaml").read_text()) for j in jobs]
    assert {o for ov in overrides for o in ov} >= {"privacy.noise_multiplier=0.5", "optim.lr=0.003"}
    tensafe("task=report", f"task.sweep_dir={tmp_path / 'sweep'}", "hydra.run.dir=report", cwd=tmp_path)
    assert (tmp_path / "sweep" / "report.md").read_text().count("\n|") >= 5
    assert (tmp_path / "sweep" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
