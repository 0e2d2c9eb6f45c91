"""The service_training benchmark runs end to end (tiny model, few steps) and writes its JSON."""

from __future__ import annotations

import json

from tensafe.benchmarks.service_training import run

from tests.conftest import compose_cfg


def test_service_training_benchmark_measures_every_variant(tmp_path):
    cfg = compose_cfg("model=tiny_llama", "task=bench", "benchmark=service_training")
    run(
        cfg,
        name="service_training",
        batch_size=4,
        seq_len=16,
        rank=2,
        warmup_steps=1,
        measure_steps=2,
        rounds=1,
        two_client_steps=2,
        learning_rate=1e-3,
        startup_timeout_s=300,
        output_dir=str(tmp_path),
    )
    written = json.loads((tmp_path / "service_training-cpu-tiny_llama.json").read_text())
    assert set(written["variants"]) == {"a_in_process", "b_service_tinker", "c_service_tensafe_client"}
    assert all(
        v["median_step_seconds"] > 0 and v["steps_measured"] == 2 for v in written["variants"].values()
    )
    assert written["two_concurrent_clients"]["steps"] == 4
    assert set(written["ratios"]) == {"tinker_over_in_process", "tensafe_client_over_in_process"}
