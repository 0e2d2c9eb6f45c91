"""The packaging benchmark runs end to end (tiny model, rank 1) and writes its JSON."""

from __future__ import annotations

import json

from tensafe.benchmarks.packaging import run

from tests.conftest import compose_cfg


def test_packaging_benchmark_measures_both_adapters_signed_and_encrypted(tmp_path):
    cfg = compose_cfg("model=tiny_llama", "task=bench", "benchmark=packaging")
    run(cfg, name="packaging", rank=1, dtype="float16", repeats=1, output_dir=str(tmp_path))
    rows = json.loads((tmp_path / "packaging-cpu.json").read_text())["results"]
    assert [(r["encrypted"]) for r in rows] == [False, True, False, True]
    assert all(r["overhead_bytes"] > 0 and r["open_s"] > 0 for r in rows)
    assert rows[2]["members_bytes"] > 5_000_000  # the 8B-shaped adapter at rank 1 in float16
