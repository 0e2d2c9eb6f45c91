"""Running the installed `tensafe` entrypoint from tests, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TENSAFE = Path(sys.executable).with_name("tensafe")


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", **(extra or {})}  # no hub from tests: fail fast


def run_tensafe(*args: str, cwd: Path | str | None = None, input: str | None = None, timeout: float = 600,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`tensafe ARGS` to completion, output captured as text. The timeout leaves room for a loaded
    machine; a test that needs a bound on time measures it itself."""
    return subprocess.run([str(TENSAFE), *args], cwd=cwd, input=input, capture_output=True, text=True,
                          timeout=timeout, env=_env(env))


def start_tensafe(*args: str, cwd: Path | str | None = None, env: dict[str, str] | None = None,
                  **popen) -> subprocess.Popen:
    """`tensafe ARGS` started in the background (a server); stdout and stderr piped as text."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen([str(TENSAFE), *args], cwd=cwd, env=_env(env), **popen)
