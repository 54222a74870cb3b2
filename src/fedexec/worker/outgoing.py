"""A worker's results not sent yet, and who sends them.

The main thread batches the results of quick tasks and sends them between
tasks (process.py's FLUSH_* rules, checked when a task ends). A task that then
runs for seconds would hold the results of the quick tasks that ran just
before it until it ends, and their callers would wait for nothing. So the
worker's control thread (control.py) also looks at the batch: once its oldest
row has waited :data:`HELD_LIMIT`, it sends the batch on its own connection
(the pool takes RESULTS from either). One lock makes each row go out once.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .. import protocol as P

HELD_LIMIT = 0.02    # seconds a result may wait in the batch while the main thread runs a task
IDLE_CHECK = 0.05    # seconds between the control thread's looks when nothing is held


class OutgoingResults:
    """The batch of result rows (with their payload frames and run times) a
    worker has not sent; filled by its main thread, taken by either thread."""

    __slots__ = ("rows", "blobs", "times", "since", "lock")

    def __init__(self) -> None:
        self.rows: list[list[Any]] = []
        self.blobs = P.Blobs()
        self.times: list[float] = []
        self.since = 0.0   # time.perf_counter() when the oldest row came
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, task_id: bytes, status: int, blob: Any, seconds: float, trace: list[float] | None) -> None:
        with self.lock:
            if not self.rows:
                self.since = time.perf_counter()
            self.rows.append(self.blobs.result_row(task_id, status, blob, trace))
            self.times.append(seconds)

    def take(self, older_than: float = 0.0) -> list[Any] | None:
        """The RESULTS message of every row held, which then are no longer
        held; None when none is held (or, with ``older_than``, when the oldest
        has waited less than that many seconds)."""
        if not self.rows:   # (a plain read: only the main thread adds, and it checks again below)
            return None
        with self.lock:
            if not self.rows or (older_than and time.perf_counter() - self.since < older_than):
                return None
            frames = P.encode(P.RESULTS, {"rows": self.rows, "secs": self.times}, self.blobs.frames)
            self.rows, self.blobs, self.times = [], P.Blobs(), []
            return frames

    def wait_ms(self) -> int:
        """Milliseconds until the control thread should look again."""
        if not self.rows:
            return int(IDLE_CHECK * 1000)
        left = HELD_LIMIT - (time.perf_counter() - self.since)
        return max(1, int(left * 1000) + 1)
