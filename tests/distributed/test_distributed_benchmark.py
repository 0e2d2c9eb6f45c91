"""The distributed-DP benchmark's measured per-unit costs and its projection (no Ray needed)."""

from __future__ import annotations

from omegaconf import OmegaConf
from tensafe.benchmarks.distributed_dp import lora_parameters, per_unit_costs, project
from tensafe.conf import __file__ as conf_file


def test_the_projection_uses_measured_costs_and_grows_with_log_n_masks():
    costs = per_unit_costs(repeats=2)
    assert all(v >= 0 for v in costs.values()) and costs["mask_per_coordinate_per_neighbour_s"] > 0
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
    masks = [rows[n]["per_worker_seconds"]["mask"] for n in ("16", "256", "2000")]
    assert masks[2] < 4 * masks[0]  # 125× the workers, under 3× the neighbours
    assert all(
        rows[n]["complete_graph_overhead_fraction"] >= rows[n]["overhead_fraction_of_step"] for n in rows
    )
