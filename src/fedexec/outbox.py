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
# Start notices alone (no result to ride with) wait this long: a quick task's
# result comes first and the notice is dropped (``take``), so it costs no
# message at each hop to the client (three of them) and no timer wake-up
# here; a task running longer shows as running this much later.
START_DELAY = 0.01


def notices_wait(task_seconds: float | None) -> bool:
    """Whether start notices should wait START_DELAY even when nothing else
    would join them (``ResultOutbox.due``'s ``notices_wait``), for a sender
    whose tasks take ``task_seconds`` on average (None: not known yet).

    True when its tasks are known to end within START_DELAY: a shell
    command, which goes to its worker alone (one at a time), ends a few
    milliseconds later, and its result then comes before the notice is due,
    which is dropped; sent at once it would cost three messages on the way to
    the client (pool, agent, relay) and their CPU beside every command. Not
    before the first tasks have been measured (their notices go at once,
    and so does the credit an agent sends with them), nor for longer tasks
    (their notices would be sent anyway)."""
    return task_seconds is not None and task_seconds < START_DELAY


class ResultOutbox:
    """Result rows (with their payloads) and start notices not yet sent."""

    __slots__ = ("rows", "blobs", "started", "since", "started_since", "answer")

    def __init__(self) -> None:
        self.rows: list[list[Any]] = []
        self.blobs = P.Blobs()
        self.started: list[bytes] = []
        self.since = 0.0          # time.monotonic() when the oldest result row came
        self.started_since = 0.0  # time.monotonic() when the oldest start notice came
        self.answer = False       # a notice here answers a cancel: due at once

    def __bool__(self) -> bool:
        return bool(self.rows or self.started)

    def add(self, task_id: bytes, status: int, blob: Any, trace: list[float] | None = None) -> None:
        if not self.rows:
            self.since = time.monotonic()
        self.rows.append(self.blobs.result_row(task_id, status, blob, trace))

    def start(self, task_id: bytes, answer: bool = False) -> None:
        """The task is running now (the client's future shows it).
        ``answer``: this says so to a cancel (whose ``cancel()`` waits for
        it), so it is due at once whatever ``due`` would say otherwise."""
        if not self.started:
            self.started_since = time.monotonic()
        self.started.append(task_id)
        if answer:
            self.answer = True

    def due(self, now: float, *, nothing_else: bool, notices_wait: bool = False) -> bool:
        """Whether to send now: ``nothing_else`` when no other work would
        join the batch soon (the sender holds nothing more, or only tasks
        that go one at a time, whose results bring the next ones). Start
        notices alone wait START_DELAY unless ``nothing_else`` and not
        ``notices_wait`` (the sender's tasks are short: :func:`notices_wait`),
        or one answers a cancel."""
        if self.rows:
            return nothing_else or len(self.rows) >= FLUSH_BATCH or now - self.since >= FLUSH_DELAY
        if not self.started:
            return False
        return (self.answer or (nothing_else and not notices_wait)
                or now - self.started_since >= START_DELAY)

    def wait_ms(self, now: float, default: int) -> int:
        """How long the sender's poll may wait before this is due, in whole
        milliseconds rounded up (a 0 ms poll would spin)."""
        if self.rows:
            due = self.since + FLUSH_DELAY
        elif self.started:
            due = now if self.answer else self.started_since + START_DELAY
        else:
            return default
        return max(0, math.ceil((due - now) * 1000))

    def take(self, **fields: Any) -> list[list[Any]]:
        """The RESULTS messages of everything here (``fields`` with the first;
        more than one when more than MAX_ITEMS rows or notices wait), emptied.
        A task that finished is not also announced as started."""
        started = self.started
        if started:
            finished = {row[0] for row in self.rows}
            started = [t for t in started if t not in finished]
        messages = P.results_messages(self.rows, self.blobs.frames, started, **fields)
        self.rows, self.blobs, self.started, self.answer = [], P.Blobs(), [], False
        return messages
