"""The relay's durable record: functions, endpoints, tasks and results in SQLite.

Writes are collected during one turn of the relay's loop and committed
together by :meth:`RelayStore.flush`, before anything that depends on them is
sent on, so the hot path pays one transaction per batch, not one per task.
Blobs are stored as the opaque bytes they arrived as.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
    hash BLOB PRIMARY KEY,
    body BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS endpoints (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    python TEXT NOT NULL,
    workers INTEGER NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    id BLOB PRIMARY KEY,
    client BLOB NOT NULL,
    endpoint TEXT NOT NULL,
    fn_hash BLOB NOT NULL,
    kind INTEGER NOT NULL,
    python TEXT NOT NULL,
    args BLOB,
    state INTEGER NOT NULL,
    submitted REAL NOT NULL,
    status INTEGER,
    result BLOB,
    finished REAL
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);
"""

# task states in the store
PENDING = 0   # accepted, not finished (queued or out at an endpoint)
FINISHED = 1  # has a result (or failure, or cancellation) not yet acknowledged


class RelayStore:
    """SQLite-backed record with write batching; one instance per relay process."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "relay.sqlite3"
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._new_functions: list[tuple[bytes, bytes, float]] = []
        self._new_tasks: list[tuple[Any, ...]] = []
        self._results: list[tuple[Any, ...]] = []
        self._acked: list[tuple[bytes]] = []
        self._endpoints: dict[str, tuple[Any, ...]] = {}

    # -- writes, buffered until flush() ------------------------------------
    def add_function(self, fn_hash: bytes, body: bytes) -> None:
        self._new_functions.append((fn_hash, body, time.time()))

    def add_task(self, task_id: bytes, client: bytes, endpoint: str, fn_hash: bytes,
                 kind: int, python: str, args: bytes) -> None:
        self._new_tasks.append((task_id, client, endpoint, fn_hash, kind, python, args, PENDING, time.time()))

    def add_result(self, task_id: bytes, status: int, blob: bytes) -> None:
        self._results.append((FINISHED, status, blob, time.time(), task_id))

    def acknowledge(self, task_ids: Iterable[bytes]) -> None:
        self._acked.extend((t,) for t in task_ids)

    def save_endpoint(self, endpoint_id: str, name: str, python: str, workers: int) -> None:
        now = time.time()
        self._endpoints[endpoint_id] = (endpoint_id, name, python, workers, now, now)

    def flush(self) -> None:
        """Commit everything buffered since the last flush in one transaction."""
        if not (self._new_functions or self._new_tasks or self._results or self._acked or self._endpoints):
            return
        db = self.db
        db.execute("BEGIN")
        try:
            if self._new_functions:
                db.executemany("INSERT OR IGNORE INTO functions VALUES (?,?,?)", self._new_functions)
            if self._endpoints:
                db.executemany(
                    "INSERT INTO endpoints VALUES (?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
                    "name=excluded.name, python=excluded.python, workers=excluded.workers, "
                    "last_seen=excluded.last_seen",
                    self._endpoints.values(),
                )
            if self._new_tasks:
                db.executemany("INSERT OR IGNORE INTO tasks (id, client, endpoint, fn_hash, kind, python, args, "
                               "state, submitted) VALUES (?,?,?,?,?,?,?,?,?)", self._new_tasks)
            if self._results:
                db.executemany("UPDATE tasks SET state=?, status=?, result=?, finished=?, args=NULL WHERE id=?",
                               self._results)
            if self._acked:
                db.executemany("DELETE FROM tasks WHERE id=?", self._acked)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._new_functions.clear()
        self._new_tasks.clear()
        self._results.clear()
        self._acked.clear()
        self._endpoints.clear()

    # -- reads (startup and rare paths) ------------------------------------
    def function_body(self, fn_hash: bytes) -> bytes | None:
        row = self.db.execute("SELECT body FROM functions WHERE hash=?", (fn_hash,)).fetchone()
        return row[0] if row else None

    def endpoints(self) -> Iterator[tuple[str, str, str, int, float]]:
        yield from self.db.execute("SELECT id, name, python, workers, last_seen FROM endpoints")

    def pending_tasks(self) -> Iterator[tuple[Any, ...]]:
        """Tasks accepted but not finished, oldest first (for a restart)."""
        yield from self.db.execute(
            "SELECT id, client, endpoint, fn_hash, kind, python, args FROM tasks WHERE state=? ORDER BY rowid",
            (PENDING,),
        )

    def close(self) -> None:
        self.flush()
        self.db.close()
