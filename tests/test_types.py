"""The package type-checks: mypy over tensafe, kernels, launchers and benchmarks (pyproject [tool.mypy])."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_passes():
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary"], capture_output=True,
                          text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
