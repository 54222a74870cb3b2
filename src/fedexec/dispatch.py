"""What the endpoint agent and its pools share about the tasks they hold and
hand on: the queued task, taking tasks out of a queue, and how many quick
tasks go to a worker at once."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Collection

# Tasks shorter than SLOW_TASK go to workers in batches worth about
# BATCH_WORK seconds each; slower ones one at a time.
SLOW_TASK = 0.0005
BATCH_WORK = 0.001
# Those slower ones that take less than DEEP_TASK: a worker holds a second
# one queued, which starts without waiting for a round trip to its pool (a
# second one stuck behind a task that turns out long is taken back for an
# idle worker: pool/stealing.py).
DEEP_TASK = 0.1
# ... and their endpoint keeps about HELD_WORK seconds of them per worker at
# its pools (the next ones at hand there when a worker's queued one starts),
# so that a late answer from the relay to a result (a loaded machine) does
# not leave a worker waiting. The shortest of them are queued at their worker
# a few milliseconds deep (pool/stealing.py's QUEUED_WORK), so this is about
# twice that: a worker's refill is at its pool when it asks for it.
HELD_WORK = 0.012
MOST_HELD = 16


class QueuedTask:
    """A task held here: its row, its argument blob, and how it has fared."""

    __slots__ = ("row", "args", "lost", "retried", "answered")

    def __init__(self, row: list[Any], args: Any) -> None:
        self.row = row
        self.args = args
        self.lost = 0      # times the worker or pool running it was lost
        self.retried = 0   # times it ran again after raising (its max_retries)
        # worker name -> results of its tries (retried) that came from that worker; their records in its
        # held-results file are stale should it die holding this task again (pool/recovery.py)
        self.answered: dict[str, int] | None = None

    def option(self, key: str) -> Any:
        return self.row[6].get(key) if len(self.row) == 7 else None


def take_out(queue: deque[QueuedTask], task_ids: Collection[bytes]) -> list[QueuedTask]:
    """Remove the tasks with these ids from ``queue`` (in place); them, in order."""
    taken = [task for task in queue if task.row[0] in task_ids]
    if taken:
        kept = [task for task in queue if task.row[0] not in task_ids]
        queue.clear()
        queue.extend(kept)
    return taken


def single_depth(task_seconds: float | None) -> int:
    """Tasks a worker holds at once (running and queued) when they go one at
    a time, from how long tasks have been taking."""
    return 2 if task_seconds is not None and task_seconds < DEEP_TASK else 1


def held_per_worker(task_seconds: float | None) -> int:
    """Tasks an endpoint keeps per worker at its pools (beyond its prefetch)
    when they go one at a time, from how long tasks have been taking."""
    if single_depth(task_seconds) == 1:
        return 1
    assert task_seconds is not None
    return max(2, min(MOST_HELD, math.ceil(HELD_WORK / max(task_seconds, 1e-6))))


def worker_batch_size(task_seconds: float | None, most: int) -> int:
    """Tasks to hand a worker at once, from how long tasks have been taking
    (a moving average; None before any finished), at most ``most``."""
    if task_seconds is None or task_seconds >= SLOW_TASK:
        return 1
    return max(1, min(most, int(BATCH_WORK / max(task_seconds, 1e-6))))
