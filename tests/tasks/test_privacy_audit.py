"""The one-run audit catches a run whose reported ε is false: DP-SGD with its noise removed."""

from __future__ import annotations

import torch

import tensafe.privacy.dp_sgd as dp_sgd
from tensafe.tasks.context import RunContext
from tensafe.tasks.privacy_audit import run
from tests.conftest import compose_raw
from tests.tasks.test_cli_smoke import AUDIT


def test_a_run_trained_without_noise_but_reporting_epsilon_1_is_caught(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dp_sgd, "gaussian_like", lambda draws, ref, std: torch.zeros_like(ref))
    raw = compose_raw(*AUDIT, "privacy.target_epsilon=1")
    report = run(RunContext.create(raw, tmp_path))
    dp = report["dp"]
    assert 0.9 < dp["epsilon"] <= 1.0  # what the ledger claims
    assert (
        dp["one_run"]["epsilon_lower_bound"] > 1.0 and not dp["one_run"]["consistent_with_reported_epsilon"]
    )
    assert "PRIVACY VIOLATION" in capsys.readouterr().out
