"""The local launcher: runs a task in this process."""

from __future__ import annotations

from typing import Any, Callable


class LocalLauncher:
    """Runs `task(cfg)` here and returns what it returns."""

    def launch(self, task: Callable[..., Any], cfg: Any) -> Any:
        return task(cfg)
