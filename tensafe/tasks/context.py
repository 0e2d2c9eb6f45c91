"""What every task receives: the validated config, the raw config (for instantiate) and its folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from tensafe.config import TenSafeConfig, config_digest, validate_config

T = TypeVar("T")


@dataclass(frozen=True)
class RunContext:
    cfg: TenSafeConfig  # typed, validated
    raw: DictConfig  # the composed config, for hydra.utils.instantiate
    output_dir: Path
    config_digest: str

    @classmethod
    def create(cls, raw: DictConfig, output_dir: str | Path) -> RunContext:
        typed = validate_config(raw)
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        digest = config_digest(raw)
        (out / "resolved_config.yaml").write_text(OmegaConf.to_yaml(raw, resolve=True))
        (out / "config_digest.txt").write_text(digest + "\n")
        return cls(cfg=typed, raw=raw, output_dir=out, config_digest=digest)

    def task_config(self, kind: type[T]) -> T:
        """The `task` group as the task that runs expects it (its schema class)."""
        task = self.cfg.task
        if not isinstance(task, kind):
            raise TypeError(f"task={task.name} is running a {kind.__name__} task")
        return task

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        """Write the job's machine-readable `metrics.json` (read by task=report)."""
        path = self.output_dir / "metrics.json"
        payload = {"task": self.cfg.task.name, "config_digest": self.config_digest, **metrics}
        path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
        return path
