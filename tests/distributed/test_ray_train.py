"""launcher=ray end to end, as a user runs it: two Ray Train workers reproduce the single-process
run, secure aggregation trains through a killed worker with every executed step accounted, and a
sweep dispatched to Ray reports the same table as a local one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant
from safetensors.torch import load_file

from tensafe.privacy.journal import JOURNAL_FILENAME, StepJournal
from tensafe.privacy.ledger import PrivacyLedger
from tensafe.privacy.skellam import Sensitivity, SkellamAccountant
from tests.cli import run_tensafe, start_tensafe
from tests.privacy.test_accounting import pld_epsilon

pytest.importorskip("ray")

COMMON = (
    "model=tiny_llama",
    "train.max_steps=30",
    "train.batch_size=64",
    "optim.lr=0.01",
    "train.eval_max_examples=32",
)
TRAIN = (*COMMON, "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0")
_TIMEOUT = 900  # a Ray job on a loaded 2-core machine: start-up alone can take 90 s


@pytest.fixture(scope="module")
def ray_env():
    """A temp HOME (Ray writes its auth token under ~/.ray) and a short temp dir per Ray start."""
    home = tempfile.mkdtemp(prefix="tsh")
    return {"HOME": home, "RAY_DEDUP_LOGS": "0"}


def _ray_args(tag: str) -> tuple[str, ...]:
    return (
        "launcher=ray",
        "launcher.init.num_cpus=2",
        f"+launcher.init._temp_dir={tempfile.mkdtemp(prefix=f'r{tag}')}",
    )


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    return result


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    _ok(run_tensafe(*TRAIN, "privacy.secure_mode=false", f"hydra.run.dir={out}", timeout=_TIMEOUT))
    return out


def test_two_ray_workers_reproduce_the_single_process_run(tmp_path, ray_env, single_process):
    """Seeded, rank-0 noise: the shards' union is the single-process batch and rank 0 draws the
    single-process noise, so the two runs agree to float rounding, ledger and all."""
    out = tmp_path / "ray"
    _ok(
        run_tensafe(
            *TRAIN,
            *_ray_args("a"),
            "privacy.secure_mode=false",
            f"hydra.run.dir={out}",
            env=ray_env,
            timeout=_TIMEOUT,
        )
    )
    here, there = PrivacyLedger.load(single_process), PrivacyLedger.load(out)
    assert there.epsilon == here.epsilon and there.steps == here.steps == there.steps_in_model == 30
    assert there.distributed is not None and there.distributed["workers"] == 2
    assert there.distributed["noise_placement"] == "rank0" and there.distributed["attempts"] == 1
    assert there.epsilon == pytest.approx(pld_epsilon(((1.0, there.sample_rate, 30),), there.delta), rel=0.01)
    a = load_file(single_process / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert _metrics(out)["eval_loss_adapter"] == pytest.approx(
        _metrics(single_process)["eval_loss_adapter"], abs=1e-3
    )


def test_secure_aggregation_survives_a_killed_worker_and_accounts_every_executed_step(
    tmp_path, ray_env, single_process
):
    """At the single-process run's ε: σ is calibrated by the Skellam accountant, and again after
    the restart for the steps the model still needs, so the re-executed steps are paid for and the
    job lands on the target."""
    out, store = tmp_path / "ray", tmp_path / "store"
    target = PrivacyLedger.load(single_process).epsilon
    job = start_tensafe(
        *COMMON,
        f"privacy.target_epsilon={target}",
        "privacy.noise_multiplier=null",
        *_ray_args("b"),
        "privacy.secure_aggregation=true",
        "train.checkpoint_every_n_steps=5",
        f"launcher.storage_path={store}",
        "launcher.run_name=killed",
        f"hydra.run.dir={out}",
        env=ray_env,
    )
    journal, workers = store / "killed" / JOURNAL_FILENAME, store / "killed" / "workers.jsonl"
    deadline = time.monotonic() + _TIMEOUT
    while not (journal.exists() and len(journal.read_text().splitlines()) >= 8):
        assert job.poll() is None, job.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "the job never reached step 8"
        time.sleep(0.2)
    victim = next(w for w in map(json.loads, workers.read_text().splitlines()) if w["rank"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    stdout, stderr = job.communicate(timeout=_TIMEOUT)
    assert job.returncode == 0, stderr[-4000:]

    ledger = PrivacyLedger.load(out)
    executed = StepJournal(out / JOURNAL_FILENAME)
    assert ledger.distributed is not None
    assert ledger.distributed["attempts"] == 2 and ledger.distributed["noise"] == "skellam"
    assert ledger.steps == executed.executed > ledger.steps_in_model == 30  # re-executed steps count again
    model_steps = [e["model_step"] for e in executed.entries()]
    assert any(b <= a for a, b in zip(model_steps, model_steps[1:]))  # it resumed behind where it died
    # The ledger's ε is the Skellam accountant's over the journal: recomputed here from the file.
    replay = SkellamAccountant(
        Sensitivity(ledger.distributed["l2_sensitivity"], ledger.distributed["l1_sensitivity"])
    )
    for sigma, q, n in executed.history():
        replay.step(sigma, q, n)
    assert replay.epsilon(ledger.delta) == pytest.approx(ledger.epsilon, rel=1e-12)
    assert ledger.epsilon == pytest.approx(target, rel=0.03) and ledger.epsilon <= 1.001 * target
    sigmas = [sigma for sigma, _, _ in executed.history()]
    # The Skellam bound needs more noise than the Gaussian's σ = 1 for the same ε, and the second
    # attempt more again: it pays for the steps it re-executes.
    assert 1.0 < sigmas[0] < sigmas[-1] < 1.5
    gaussian = RdpAccountant()  # Google's dp_accounting, the Gaussian at the same steps: below the bound
    for sigma, q, n in executed.history():
        gaussian.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n
            )
        )
    assert gaussian.get_epsilon(ledger.delta) <= ledger.epsilon <= 1.4 * gaussian.get_epsilon(ledger.delta)
    base, single = _metrics(single_process)["eval_loss_base"], _metrics(single_process)["eval_loss_adapter"]
    assert _metrics(out)["eval_loss_adapter"] < base - 1.0  # it learned
    assert _metrics(out)["eval_loss_adapter"] == pytest.approx(single, abs=0.35)
    assert "over 2 attempt(s)" in stdout


def test_a_sweep_on_ray_reports_the_same_table_as_a_local_sweep(tmp_path, ray_env):
    sweep = (
        "-m",
        "model=tiny_llama",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=0.8,1.5",
        "train.max_steps=4",
        "train.eval_max_examples=16",
        "privacy.secure_mode=false",
        "hardware.num_threads=1",
    )
    temp = tempfile.mkdtemp(prefix="rs")
    on_ray = (
        "hydra/launcher=ray",
        "+hydra.launcher.ray.init.num_cpus=2",
        "+hydra.launcher.ray.init.include_dashboard=false",
        f"+hydra.launcher.ray.init._temp_dir={temp}",
    )
    tables = []
    for name, extra in (("local", ()), ("ray", on_ray)):
        _ok(run_tensafe(*sweep, *extra, f"hydra.sweep.dir={tmp_path / name}", env=ray_env, timeout=_TIMEOUT))
        assert sorted(p.name for p in (tmp_path / name).iterdir() if p.is_dir()) == ["0", "1"]
        _ok(
            run_tensafe(
                "task=report", f"task.sweep_dir={tmp_path / name}", f"hydra.run.dir={tmp_path / name}-report"
            )
        )
        tables.append(
            [
                line
                for line in (tmp_path / name / "report.md").read_text().splitlines()
                if line.startswith("|")
            ]
        )
    assert len(tables[0]) == 4 and tables[0] == tables[1]
