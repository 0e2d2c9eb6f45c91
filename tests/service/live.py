"""A live `tensafe task=service` subprocess on loopback for the service tests, with two tenants."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tensafe.serving.auth import hash_api_key
from tests.cli import start_tensafe
from tests.serving.live import free_port

KEYS = {"acme": "tml-acme-0123456789abcdef", "globex": "tml-globex-0123456789abcdef"}


@dataclass
class Service:
    url: str
    state_dir: Path
    process: subprocess.Popen
    log: str = ""  # what the service wrote to stderr, once it has stopped


def service_args(state_dir: Path, port: int, *extra: str) -> list[str]:
    tenants = ",".join(f"{name}:{{api_key_sha256:[{hash_api_key(key)}]}}" for name, key in KEYS.items())
    return [
        "task=service",
        "model=tiny_llama",
        f"service.state_dir={state_dir}",
        f"service.port={port}",
        f"service.tenants={{{tenants}}}",
        f"security.audit_db={state_dir / 'audit.sqlite3'}",
        f"hydra.run.dir={state_dir / 'run'}",
        *extra,
    ]


@contextlib.contextmanager
def live_service(state_dir: Path, *extra: str, timeout_s: float = 300) -> Iterator[Service]:
    """The service until the block ends (SIGTERM, then wait); yields its base URL and folder."""
    port = free_port()
    proc = start_tensafe(
        *service_args(state_dir, port, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    try:
        while True:
            assert proc.poll() is None, f"the service exited: {proc.stderr.read() if proc.stderr else ''}"
            assert time.time() < deadline, "the service did not start"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        svc = Service(url, state_dir, proc)
        yield svc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if "svc" in locals():
            svc.log = err or ""
