"""The he_lora_micro benchmark runs end to end and writes the JSON its README figures come from."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tensafe.benchmarks.he_lora_micro import run

from tests.conftest import compose_cfg
from tests.he.conftest import OPENFHE_IMPORTABLE


def test_he_lora_micro_writes_timings_sizes_errors_and_op_counts(tmp_path):
    cfg = compose_cfg("task=bench", "benchmark=he_lora_micro")
    result = run(
        cfg, name="he_lora_micro", backends=["ckks_numpy", "openfhe", "openfhe_wsum"], params=["n4096"],
        openfhe_params=["n4096"], shapes=[[16, 4]], tokens=100, repeats=2, output_dir=str(tmp_path),
    )
    written = json.loads(Path(result["path"]).read_text())
    assert written["results"] == json.loads(json.dumps(result["results"]))
    own = written["results"][0]
    assert own["backend"] == "ckks_numpy" and own["tokens"] == 100 and len(own["times_s"]["evaluate"]) == 2
    assert own["within_bound"] and 0 < own["max_error"] <= own["error_bound"]
    assert own["op_counts"]["rotations"] == 0 and own["op_counts"]["ct_scalar_mults"] == 2 * 16 * 4
    assert own["upload_bytes"] > own["download_bytes"] > 0
    if OPENFHE_IMPORTABLE:
        assert {row["openfhe"] for row in written["speedups"]} == {"openfhe", "openfhe_wsum"}
        assert all(row["evaluate_speedup"] > 0 for row in written["speedups"])
        # OpenFHE at its best: every thread count measured, the speedup against the fastest one
        threads = {row["openfhe_threads"] for row in written["results"] if row["backend"] == "openfhe"}
        assert threads == set(range(1, (os.cpu_count() or 1) + 1))
        fastest = min(row["evaluator_total_s"] for row in written["results"] if row["backend"] == "openfhe")
        speedup = next(row for row in written["speedups"] if row["openfhe"] == "openfhe")
        assert speedup["openfhe_evaluator_total_s"] == fastest
        assert all(row["adopt_upload_s"] >= 0 for row in written["results"])
    else:
        assert {row["backend"] for row in written["skipped"]} == {"openfhe", "openfhe_wsum"}
