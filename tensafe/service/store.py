"""What the training service keeps across restarts, in one SQLite database (WAL): sessions, models,
futures with their results, checkpoints' metadata, sampling sessions and each training lineage's
privacy history. Every row carries its tenant, and every read is by (tenant, id): another tenant's
id reads as unknown.

Weights and datasets are not here: they are files encrypted at rest (tensafe.service.vault).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

FutureState = Literal["queued", "running", "done", "failed"]
Category = Literal["user", "server"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, sdk_version TEXT NOT NULL,
    created_at REAL NOT NULL, last_seen REAL NOT NULL, finished_at REAL
);
CREATE TABLE IF NOT EXISTS lineages (
    lineage_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, policy TEXT NOT NULL,
    history TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, session_id TEXT NOT NULL,
    lineage_id TEXT NOT NULL, spec TEXT NOT NULL, state TEXT NOT NULL,
    restore_from TEXT, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS futures (
    request_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, scope TEXT NOT NULL, seq_id INTEGER,
    kind TEXT NOT NULL, state TEXT NOT NULL, content_type TEXT, result BLOB,
    error TEXT, category TEXT, code TEXT, created_at REAL NOT NULL, finished_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS futures_by_seq ON futures (scope, seq_id) WHERE seq_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS checkpoints (
    path TEXT PRIMARY KEY, tenant TEXT NOT NULL, model_id TEXT NOT NULL, lineage_id TEXT NOT NULL,
    kind TEXT NOT NULL, file TEXT NOT NULL, spec TEXT NOT NULL, steps INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS datasets (
    dataset_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, size INTEGER NOT NULL,
    digest TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sampling_sessions (
    sampling_session_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, session_id TEXT NOT NULL,
    base_model TEXT NOT NULL, model_path TEXT, created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Future:
    request_id: str
    tenant: str
    scope: str
    seq_id: int | None
    kind: str
    state: FutureState
    content_type: str | None
    result: bytes | None
    error: str | None
    category: Category | None
    code: str | None


@dataclass(frozen=True)
class ModelRow:
    model_id: str
    tenant: str
    session_id: str
    lineage_id: str
    spec: dict[str, Any]
    state: Literal["active", "suspended", "finished"]
    restore_from: str | None  # the checkpoint a suspended model continues from


@dataclass(frozen=True)
class Checkpoint:
    path: str
    tenant: str
    model_id: str
    lineage_id: str
    kind: Literal["weights", "sampler"]
    file: str
    spec: dict[str, Any]
    steps: int


class Store:
    """Thread-safe: the event loop and the compute thread share one connection under a lock."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- restart -------------------------------------------------------------------------------

    def recover(self, reason: str) -> int:
        """After a restart: every future that had not finished fails with `reason`, and every active
        model is suspended (its weights were in memory). Returns the futures failed."""
        now = time.time()
        with self._lock:
            failed = self._db.execute(
                "UPDATE futures SET state='failed', error=?, category='server', code='service_restarted', "
                "finished_at=? "
                "WHERE state IN ('queued', 'running')",
                (reason, now),
            ).rowcount
            self._db.execute("UPDATE models SET state='suspended' WHERE state='active'")
        return failed

    # --- sessions ------------------------------------------------------------------------------

    def add_session(self, session_id: str, tenant: str, sdk_version: str) -> None:
        now = time.time()
        self._run(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, NULL)", (session_id, tenant, sdk_version, now, now)
        )

    def session(self, tenant: str, session_id: str) -> dict[str, Any] | None:
        rows = self._run(
            "SELECT sdk_version, finished_at FROM sessions WHERE tenant=? AND session_id=?",
            (tenant, session_id),
        )
        return {"sdk_version": rows[0][0], "finished": rows[0][1] is not None} if rows else None

    def touch_session(self, tenant: str, session_id: str) -> bool:
        with self._lock:
            return (
                self._db.execute(
                    "UPDATE sessions SET last_seen=? WHERE tenant=? AND session_id=?",
                    (time.time(), tenant, session_id),
                ).rowcount
                == 1
            )

    def finish_session(self, tenant: str, session_id: str) -> list[str]:
        """Mark the session finished and its models finished; returns those models' ids."""
        with self._lock:
            self._db.execute(
                "UPDATE sessions SET finished_at=? WHERE tenant=? AND session_id=? AND finished_at IS NULL",
                (time.time(), tenant, session_id),
            )
            models = [
                r[0]
                for r in self._db.execute(
                    "SELECT model_id FROM models WHERE tenant=? AND session_id=?", (tenant, session_id)
                )
            ]
            self._db.execute(
                "UPDATE models SET state='finished' WHERE tenant=? AND session_id=?", (tenant, session_id)
            )
        return models

    # --- lineages: one training run's privacy history, shared by every model continuing it -----

    def add_lineage(self, lineage_id: str, tenant: str, policy: dict[str, Any]) -> None:
        now = time.time()
        self._run(
            "INSERT INTO lineages VALUES (?, ?, ?, '[]', ?, ?)",
            (lineage_id, tenant, json.dumps(policy), now, now),
        )

    def lineage(self, tenant: str, lineage_id: str) -> tuple[dict[str, Any], list[list]] | None:
        rows = self._run(
            "SELECT policy, history FROM lineages WHERE tenant=? AND lineage_id=?", (tenant, lineage_id)
        )
        return (json.loads(rows[0][0]), json.loads(rows[0][1])) if rows else None

    def set_history(self, tenant: str, lineage_id: str, history: list[list]) -> None:
        self._run(
            "UPDATE lineages SET history=?, updated_at=? WHERE tenant=? AND lineage_id=?",
            (json.dumps(history), time.time(), tenant, lineage_id),
        )

    # --- models --------------------------------------------------------------------------------

    def add_model(self, row: ModelRow) -> None:
        self._run(
            "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.model_id,
                row.tenant,
                row.session_id,
                row.lineage_id,
                json.dumps(row.spec),
                row.state,
                row.restore_from,
                time.time(),
            ),
        )

    def model(self, tenant: str, model_id: str) -> ModelRow | None:
        rows = self._run(
            "SELECT model_id, tenant, session_id, lineage_id, spec, state, restore_from "
            "FROM models WHERE tenant=? AND model_id=?",
            (tenant, model_id),
        )
        if not rows:
            return None
        r = rows[0]
        return ModelRow(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6])

    def set_model_state(self, model_id: str, state: str, restore_from: str | None = None) -> None:
        if restore_from is None:
            self._run("UPDATE models SET state=? WHERE model_id=?", (state, model_id))
        else:
            self._run(
                "UPDATE models SET state=?, restore_from=? WHERE model_id=?", (state, restore_from, model_id)
            )

    def set_restore_point(self, model_id: str, path: str) -> None:
        self._run("UPDATE models SET restore_from=? WHERE model_id=?", (path, model_id))

    # --- futures -------------------------------------------------------------------------------

    def add_future(self, request_id: str, tenant: str, scope: str, seq_id: int | None, kind: str) -> str:
        """A new queued future, or the request id already stored for (scope, seq_id): a retried or
        replayed request is answered by the first one's future and never runs twice."""
        with self._lock:
            if seq_id is not None:
                row = self._db.execute(
                    "SELECT request_id, tenant, kind FROM futures WHERE scope=? AND seq_id=?", (scope, seq_id)
                ).fetchone()
                if row is not None:
                    if row[1] != tenant or row[2] != kind:
                        raise ValueError(f"seq_id {seq_id} of {scope} was already used by another request")
                    return row[0]
            self._db.execute(
                "INSERT INTO futures VALUES (?, ?, ?, ?, ?, 'queued', NULL, NULL, NULL, NULL, NULL, ?, NULL)",
                (request_id, tenant, scope, seq_id, kind, time.time()),
            )
        return request_id

    def last_seq(self, scope: str) -> int | None:
        rows = self._run("SELECT MAX(seq_id) FROM futures WHERE scope=?", (scope,))
        return rows[0][0]

    def set_running(self, request_id: str) -> None:
        self._run("UPDATE futures SET state='running' WHERE request_id=?", (request_id,))

    def finish(self, request_id: str, content_type: str, result: bytes) -> None:
        self._run(
            "UPDATE futures SET state='done', content_type=?, result=?, finished_at=? WHERE request_id=?",
            (content_type, result, time.time(), request_id),
        )

    def fail(self, request_id: str, error: str, category: Category, code: str | None = None) -> None:
        self._run(
            "UPDATE futures SET state='failed', error=?, category=?, code=?, finished_at=? "
            "WHERE request_id=?",
            (error, category, code, time.time(), request_id),
        )

    def future(self, tenant: str, request_id: str) -> Future | None:
        rows = self._run(
            "SELECT request_id, tenant, scope, seq_id, kind, state, content_type, result, error, "
            "category, code FROM futures WHERE tenant=? AND request_id=?",
            (tenant, request_id),
        )
        return Future(*rows[0]) if rows else None

    # --- checkpoints and sampling sessions -----------------------------------------------------

    def add_checkpoint(self, ckpt: Checkpoint) -> None:
        self._run(
            "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                ckpt.path,
                ckpt.tenant,
                ckpt.model_id,
                ckpt.lineage_id,
                ckpt.kind,
                ckpt.file,
                json.dumps(ckpt.spec),
                ckpt.steps,
                time.time(),
            ),
        )

    def checkpoint(self, tenant: str, path: str) -> Checkpoint | None:
        rows = self._run(
            "SELECT path, tenant, model_id, lineage_id, kind, file, spec, steps FROM checkpoints "
            "WHERE tenant=? AND path=?",
            (tenant, path),
        )
        if not rows:
            return None
        r = rows[0]
        return Checkpoint(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7])

    def add_dataset(self, dataset_id: str, tenant: str, name: str, size: int, digest: str) -> None:
        self._run(
            "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?)",
            (dataset_id, tenant, name, size, digest, time.time()),
        )

    def dataset(self, tenant: str, dataset_id: str) -> tuple[str, int, str] | None:
        rows = self._run(
            "SELECT name, size, digest FROM datasets WHERE tenant=? AND dataset_id=?", (tenant, dataset_id)
        )
        return (rows[0][0], rows[0][1], rows[0][2]) if rows else None

    def add_sampling_session(
        self, sid: str, tenant: str, session_id: str, base_model: str, model_path: str | None
    ) -> None:
        self._run(
            "INSERT OR IGNORE INTO sampling_sessions VALUES (?, ?, ?, ?, ?, ?)",
            (sid, tenant, session_id, base_model, model_path, time.time()),
        )

    def sampling_session(self, tenant: str, sid: str) -> tuple[str, str | None] | None:
        rows = self._run(
            "SELECT base_model, model_path FROM sampling_sessions WHERE tenant=? AND sampling_session_id=?",
            (tenant, sid),
        )
        return (rows[0][0], rows[0][1]) if rows else None
