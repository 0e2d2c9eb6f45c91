"""task=bench: run the benchmark chosen by `benchmark=` and record where its JSON went."""

from __future__ import annotations

import inspect
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf

from tensafe.errors import ConfigError
from tensafe.tasks.context import RunContext


def run(ctx: RunContext) -> dict[str, Any]:
    bench = ctx.raw.get("benchmark")
    if bench is None:
        raise ConfigError("benchmark", None, "task=bench needs a benchmark, e.g. benchmark=dp_overhead")
    resolved = OmegaConf.to_container(bench, resolve=True)
    assert isinstance(resolved, dict)
    params: dict[str, Any] = {str(k): v for k, v in resolved.items() if k != "runner"}
    runner = instantiate(bench.runner)
    try:
        inspect.signature(runner).bind(ctx.cfg, **params)
    except TypeError as err:
        raise ConfigError(
            "benchmark", bench.name, f"its parameters do not match the benchmark: {err}"
        ) from None
    result = runner(ctx.cfg, **params)
    ctx.write_metrics(result)
    print(f"{bench.name}: wrote {result['path']}")
    print_summary(result)
    return result


def print_summary(result: dict[str, Any]) -> None:
    for name, v in result.get("variants", {}).items():
        if not isinstance(v, dict) or "median_step_seconds" not in v:
            continue  # benchmarks that print their own rows as they run
        rss = f"   peak RSS {v['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in v else ""
        print(f"  {name:28} median step {v['median_step_seconds']:.3f} s{rss}")
    for key, value in result.get("ratios", {}).items():
        if not isinstance(value, dict):  # per-level ratios are printed by their benchmark
            print(f"  {key}: {value}")
