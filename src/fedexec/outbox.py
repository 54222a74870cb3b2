"""Results on their way upstream, sent in batches under load.

The endpoint agent (to the relay) and the pool manager (to its endpoint)
both gather the results and start notices of a loop turn or more into one
RESULTS message: at once when there is nothing else to do, so a lone task's
latency does not pay for batching, else when ``FLUSH_BATCH`` results wait or
the oldest has waited ``FLUSH_DELAY``.
"""

from __future__ import annotations

import math
import time
from typing import Any

from . import protocol as P

FLUSH_BATCH = 256
FLUSH_DELAY = 0.001


class ResultOutbox:
    """Result rows (with their payloads) and start notices not yet sent."""

    __slots__ = ("rows", "blobs", "started", "since")

    def __init__(self) -> None:
        self.rows: list[list[Any]] = []
        self.blobs = P.Blobs()
        self.started: list[bytes] = []
        self.since = 0.0          # time.monotonic() when the oldest entry came

    def __bool__(self) -> bool:
        return bool(self.rows or self.started)

    def _note(self) -> None:
        if not (self.rows or self.started):
            self.since = time.monotonic()

    def add(self, task_id: bytes, status: int, blob: Any, trace: list[float] | None = None) -> None:
        self._note()
        self.rows.append(self.blobs.result_row(task_id, status, blob, trace))

    def start(self, task_id: bytes) -> None:
        """The task is running now (the client's future shows it)."""
        self._note()
        self.started.append(task_id)

    def due(self, now: float, *, nothing_else: bool) -> bool:
        """Whether to send now: ``nothing_else`` when no other work would
        join the batch soon (the sender holds nothing more, or only tasks
        that go one at a time, whose results bring the next ones)."""
        return bool(self) and (nothing_else or len(self.rows) >= FLUSH_BATCH or now - self.since >= FLUSH_DELAY)

    def wait_ms(self, now: float, default: int) -> int:
        """How long the sender's poll may wait before this is due, in whole
        milliseconds rounded up (a 0 ms poll would spin)."""
        if not self:
            return default
        return max(0, math.ceil((self.since + FLUSH_DELAY - now) * 1000))

    def take(self, **fields: Any) -> list[list[Any]]:
        """The RESULTS messages of everything here (``fields`` with the first;
        more than one when more than MAX_ITEMS rows or notices wait), emptied.
        A task that finished is not also announced as started."""
        started = self.started
        if started:
            finished = {row[0] for row in self.rows}
            started = [t for t in started if t not in finished]
        messages = P.results_messages(self.rows, self.blobs.frames, started, **fields)
        self.rows, self.blobs, self.started = [], P.Blobs(), []
        return messages
