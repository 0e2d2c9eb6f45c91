"""The local launcher: runs a task in this process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class LocalLauncher:
    """Runs `task(cfg)` here and returns what it returns."""

    def launch(self, task: Callable[..., Any], cfg: Any) -> Any:
        return task(cfg)
