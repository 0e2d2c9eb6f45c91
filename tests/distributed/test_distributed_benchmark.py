"""The distributed-DP benchmark's measured per-unit costs and its projection (no Ray needed)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from tensafe.benchmarks.distributed_dp import lora_parameters, per_unit_costs, project
from tensafe.conf import __file__ as conf_file


def test_the_projection_uses_measured_costs_and_grows_with_log_n_masks():
    costs = {
        "32": per_unit_costs(repeats=2, modulus_bits=32),
        "64": per_unit_costs(repeats=2, modulus_bits=48),
    }
    for word, measured in costs.items():
        assert all(v >= 0 for v in measured.values()) and measured["mask_per_coordinate_per_neighbour_s"] > 0
        assert measured["mask_word_bytes"] * 8 == int(word)
    bench = OmegaConf.to_container(
        OmegaConf.load(conf_file.replace("__init__.py", "benchmark/distributed_dp.yaml"))
    )
    assert isinstance(bench, dict)
    projected = project(costs, bench["projection"], [16, 256, 2000])
    assert (
        projected["adapter_parameters"]
        == lora_parameters(32, 4096, 1024, 16, ["q_proj", "v_proj"])
        == 6_815_744
    )
    rows = projected["workers"]
    assert [rows[n]["neighbours"] for n in ("16", "256", "2000")] == [8, 16, 22]
    # the modulus grows with the batch: 32-bit words hold up to 256 workers' sums here, not 2,000's
    assert [rows[n]["mask_word_bits"] for n in ("16", "256", "2000")] == [32, 32, 64]
    assert all(rows[n]["modulus_bits_needed"] <= (32 if n != "2000" else 62) for n in rows)
    masks = [rows[n]["per_worker_seconds"]["mask"] for n in ("16", "256", "2000")]
    assert masks[1] < 3 * masks[0]  # 16× the workers, 2× the neighbours (both 32-bit words)
    wide = costs["64"]  # 2,000 workers: 22 neighbours of 64-bit words
    d = projected["adapter_parameters"]
    per_mask = wide["mask_per_coordinate_base_s"] + 22 * wide["mask_per_coordinate_per_neighbour_s"]
    assert masks[2] == pytest.approx(d * per_mask)
    assert all(
        rows[n]["complete_graph_overhead_fraction"] >= rows[n]["overhead_fraction_of_step"] for n in rows
    )
