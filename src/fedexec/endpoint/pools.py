"""The endpoint's view of its pools: who they are, what they hold."""

from __future__ import annotations

import time
from typing import Any

from ..dispatch import QueuedTask


class PoolLink:
    """One connected pool manager (one node of a block)."""

    def __init__(self, pool_id: bytes, fields: dict[str, Any]) -> None:
        self.pool_id = pool_id
        self.block_id: str = fields.get("block") or ""
        self.host: str = fields.get("host") or "?"
        self.node: str = fields.get("node") or self.host   # its node's name (Slurm's, in a job): for MPI
        self.pid: int = fields.get("pid") or 0
        self.workers: int = fields["workers"]
        self.cores: int = fields.get("cores") or 0
        self.memory: int = fields.get("mem") or 0
        self.gpus: int = fields.get("gpus") or 0
        self.python: str = fields.get("py") or ""
        self.ends_at: float | None = fields.get("ends")
        self.tasks: dict[bytes, QueuedTask] = {}
        self.started: set[bytes] = set()          # tasks it said are running
        self.known_functions: set[bytes] = set()
        self.draining = False
        self.unreachable_until = 0.0              # time.monotonic() before which it gets no tasks
        self.idle_workers = self.workers
        self.last_seen = time.monotonic()
        self.idle_since: float | None = self.last_seen

    def room(self, per_worker: int) -> int:
        if self.draining:
            return 0
        return max(0, self.workers * per_worker - len(self.tasks))

    def note_load(self) -> None:
        """Call after its task set changed: keeps ``idle_since``."""
        if self.tasks:
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = time.monotonic()

    def describe(self, now: float) -> dict[str, Any]:
        return {"id": self.pool_id.decode(errors="replace"), "block": self.block_id, "host": self.host,
                "pid": self.pid, "workers": self.workers, "idle_workers": self.idle_workers,
                "tasks": len(self.tasks), "cores": self.cores, "memory": self.memory, "gpus": self.gpus,
                "draining": self.draining, "idle_for": None if self.idle_since is None else now - self.idle_since,
                "ends_at": self.ends_at}
