"""What every benchmark's JSON records about the machine that measured it, and where it is written."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def machine(**versions: str) -> dict[str, object]:
    """Platform, processor, Python, CPU count, and the library versions passed (e.g. torch=...)."""
    return {"platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "cpus": os.cpu_count(), **versions}


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The median wall time of `repeats` calls of `fn`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write(result: dict[str, Any], output_dir: str, filename: str) -> dict[str, Any]:
    """`result` as `output_dir/filename` (indented JSON); returns it with "path" set to the file."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    path.write_text(json.dumps(result, indent=2) + "\n")
    return {**result, "path": str(path)}
