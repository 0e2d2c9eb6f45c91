"""A `tensafe` server started as a subprocess for benchmarks, ready once its URL answers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `tensafe` subprocess that is ready once `ready_url` answers 200."""

    def __init__(self, args: list[str], ready_url: str, env: dict[str, str], log: Path, timeout_s: float):
        exe = Path(sys.executable).with_name("tensafe")
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen([str(exe), *args], stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
        deadline = time.time() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`tensafe {' '.join(args[:2])}` exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"`tensafe {args[0]}` not ready after {timeout_s} s:\n"
                                   f"{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
