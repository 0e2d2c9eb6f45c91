"""Distributed settings a run cannot honour are refused up front, in one line, before Ray starts."""

from __future__ import annotations

import pytest

from tests.cli import run_tensafe


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["launcher=ray", "task=report", "task.sweep_dir=nowhere"], "launcher='ray': runs task=train"),
        (["launcher=ray", "privacy=none"], "privacy='none': launcher=ray trains with DP-SGD"),
        (["launcher=ray", "launcher.storage_path=s3://bucket/x"], "launcher.storage_path"),
        (["launcher=ray", "launcher.num_workers=0"], "launcher.num_workers=0"),
        (
            ["privacy.secure_aggregation=true", "model=tiny_llama", "train.max_steps=1"],
            "privacy.secure_aggregation=True: sums the clipped gradients of several workers",
        ),
        (
            ["launcher=ray", "privacy.distributed.noise_placement=driver"],
            "privacy.distributed.noise_placement",
        ),
    ],
)
def test_refused_in_one_line(tmp_path, overrides, message):
    result = run_tensafe(*overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
