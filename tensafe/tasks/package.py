"""task=package: a signed (optionally encrypted) TSSP package from a training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tensafe.config.schema import PackageTask
from tensafe.errors import ConfigError
from tensafe.security.context import SecurityContext
from tensafe.tasks.context import RunContext


def run(ctx: RunContext) -> dict[str, Any]:
    task = ctx.task_config(PackageTask)
    run_dir = Path(task.run_dir)
    if not run_dir.is_dir():
        raise ConfigError("task.run_dir", str(run_dir), "no such folder (a task=train output folder)")
    out = Path(task.out) if task.out else run_dir / "adapter.tssp"
    manifest = SecurityContext(ctx.cfg.security).package_run(run_dir, out)
    result = {"package": str(out), "package_id": manifest["package_id"],
              "members": [m["name"] for m in manifest["members"]]}
    ctx.write_metrics(result)
    print(f"package: {out} ({manifest['package_id']})", flush=True)
    return result
