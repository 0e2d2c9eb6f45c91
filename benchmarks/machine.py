"""What every benchmark's JSON records about the machine that measured it."""

from __future__ import annotations

import os
import platform


def machine(**versions: str) -> dict[str, object]:
    """Platform, processor, Python, CPU count, and the library versions passed (e.g. torch=...)."""
    return {"platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "cpus": os.cpu_count(), **versions}
