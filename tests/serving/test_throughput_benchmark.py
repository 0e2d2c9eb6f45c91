"""The serving_throughput benchmark runs end to end (tiny model, small levels) and writes its JSON."""

from __future__ import annotations

import json

from tensafe.benchmarks.serving_throughput import run

from tests.conftest import compose_cfg


def test_serving_throughput_drives_live_servers_and_writes_every_variant(tmp_path):
    cfg = compose_cfg("model=tiny_llama", "task=bench", "benchmark=serving_throughput")
    result = run(cfg, name="serving_throughput", concurrency=[1, 2], requests_per_client=1,
                 he_requests_per_client=1, rounds=2, max_tokens=3, he_params="n4096", he_packing="auto",
                 he_modules=["*.layers.0.*"], he_every_module_forward=True, speculative_tokens=2,
                 speculative_drafters=["ngram", "base_model"], speculative_concurrency=[2],
                 speculative_requests_per_client=1,
                 baseline_requests=2, startup_timeout_s=300, output_dir=str(tmp_path))
    written = json.loads((tmp_path / "serving_throughput-cpu-tiny_llama.json").read_text())
    assert set(written["variants"]) == {"a_base", "b_plaintext_lora", "c_two_adapters_mixed", "d_he_lora"}
    for rows in written["variants"].values():
        assert [r["concurrency"] for r in rows] == [1, 2]
        assert all(r["output_tokens"] > 0 and r["output_tokens_per_s"] > 0 for r in rows)
    for rows in (written["variants"][v] for v in ("a_base", "b_plaintext_lora", "c_two_adapters_mixed")):
        for row in rows:  # the median of the rounds, which are all recorded
            assert len(row["rounds_output_tokens_per_s"]) == 2
            assert row["output_tokens_per_s"] == min(row["rounds_output_tokens_per_s"])
    # the HE variant really went through the evaluator process: the server's histogram counted calls
    assert all(row["total_calls"] > 0 and row["evaluator_seconds"] > 0 for row in written["he"]["breakdown"])
    assert written["baseline_sequential_generate"]["output_tokens"] > 0
    every = written["he"]["every_module_decode_forward_in_process"]
    assert [row["rows"] for row in every] == [1, 2]
    assert all(row["modules"] == written["he"]["adapted_modules"] for row in every)
    assert all(row["he_forward_s"] > 0 for row in every)
    wire = written["he"]["every_module_decode_forward_over_http"]  # the same, through the evaluator
    assert [(row["rows"], row["evaluator"]) for row in wire] == [
        (1, "separate process over HTTP on loopback"), (2, "separate process over HTTP on loopback")]
    assert all(row["modules"] == written["he"]["adapted_modules"] and row["he_forward_s"] > 0 for row in wire)
    assert set(result["ratios"]["he_lora_overhead_x"]) == {1, 2}
    levels = written["speculative"]["levels"]
    assert [(r["drafter"], r["variant"], r["concurrency"]) for r in levels] == [
        ("ngram", "b_plaintext_lora", 2), ("ngram", "d_he_lora", 2),
        ("base_model", "b_plaintext_lora", 2), ("base_model", "d_he_lora", 2)]
    assert levels[0]["without"] == levels[2]["without"]  # the drafter-less server, measured once
    for row in levels:  # both servers answered; only the speculative one drafted
        assert row["with"]["output_tokens"] > 0 and row["without"]["output_tokens"] > 0
        assert row["without"]["drafts"] == {"accepted": 0.0, "rejected": 0.0}
