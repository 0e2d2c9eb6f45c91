"""The he_lora_micro and he_lora_packing benchmarks run end to end and write the JSON their README
figures come from."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tensafe.benchmarks import he_lora_packing
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


def test_he_lora_packing_compares_coefficients_with_slots_and_openfhe_at_its_best(tmp_path):
    cfg = compose_cfg("task=bench", "benchmark=he_lora_packing")
    result = he_lora_packing.run(
        cfg, name="he_lora_packing", shapes=[[64, 4]], tokens=[1, 16], coefficient_rings=[4096],
        one_round_max_tokens=1, one_round_max_h=64, circuit_private_rings=[4096],
        circuit_private_max_tokens=1,
        slot_backends=["ckks_numpy", "openfhe"], openfhe_max_tokens=16, repeats=2, output_dir=str(tmp_path),
    )
    written = json.loads(Path(result["path"]).read_text())
    rows = {(row["packing"], row["tokens"], row["openfhe_threads"]): row for row in written["results"]}
    for tokens in (1, 16):
        coefficients, slots = rows[("coefficients", tokens, None)], rows[("slots", tokens, None)]
        assert coefficients["within_bound"] and slots["within_bound"]
        assert coefficients["round_trips"] == 2 and slots["round_trips"] == 1
        assert coefficients["op_counts"]["rotations"] == coefficients["op_counts"]["key_switches"] == 0
        assert coefficients["upload_bytes"] < slots["upload_bytes"]  # one prime, seeded halves
    one = rows[("coefficients_one_round", 1, None)]  # decode sizes only
    assert one["round_trips"] == 1 and one["within_bound"]
    assert ("coefficients_one_round", 16, None) not in rows
    private = rows[("coefficients_private", 1, None)]
    assert private["within_bound"] and private["round_trips"] == 2
    assert rows[("coefficients_one_round_private", 1, None)]["within_bound"]
    assert [(c["packing"], c["tokens"]) for c in written["comparisons"]] == [
        ("coefficients", 1), ("coefficients_one_round", 1), ("coefficients_private", 1),
        ("coefficients_one_round_private", 1), ("coefficients", 16)]
    assert all(c["speedup_vs_slots"] > 0 for c in written["comparisons"])
    if OPENFHE_IMPORTABLE:
        threads = {key[2] for key in rows if key[0] == "openfhe"}
        assert threads == set(range(1, (os.cpu_count() or 1) + 1))
        fastest = min(row["total_s"] for row in written["results"] if row["packing"] == "openfhe")
        assert all(c["openfhe_total_s"] == fastest for c in written["comparisons"])
        theirs = [row for row in written["results"] if row["packing"] == "openfhe_coefficients"]
        assert {row["openfhe_threads"] for row in theirs} == threads
        assert all(row["tokens"] == 16 for row in theirs)
        assert all(row["max_error"] < 0.05 for row in theirs)  # a real computation, at fewer bits
        at_16 = [c for c in written["comparisons"] if c["tokens"] == 16]
        best = min(row["total_s"] for row in theirs)
        assert at_16 and all(c["openfhe_coefficients_total_s"] == best for c in at_16)
    else:
        assert [row["packing"] for row in written["skipped"]] == ["openfhe"]
