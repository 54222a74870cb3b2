"""The results a dead worker had finished and not sent: taken from its file.

A worker writes each result it holds for a few milliseconds (to send
several together) into a file beside its marker (``worker/heldlog.py``).
When it dies, before the tasks it held are dealt with
(``PoolManager._recover_tasks_of``: the culprit fails or runs again, the
others run again), the pool reads that file and takes, for each task the
worker still held, other than the one its marker names as running, the
result found there, as if the worker had sent it. Those tasks finish once
rather than run a second time elsewhere.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .. import protocol as P
from ..worker import heldlog

if TYPE_CHECKING:
    from .workers import LocalWorkerPool, WorkerSlot

log = logging.getLogger("fedexec.pool")


class HeldRecovery:
    """Mixed into ``PoolManager``: what a dead worker's held-results file gives back."""

    pool: "LocalWorkerPool | None"

    if TYPE_CHECKING:   # (the pool manager's)
        def _on_worker_results(self, slot: WorkerSlot, msg: P.Message) -> None: ...
        def _running_task(self, slot: WorkerSlot) -> bytes | None: ...

    def _recover_held(self, slot: "WorkerSlot") -> int:
        """Take the results ``slot``'s dead worker held, for the tasks it still
        held (not the one it was running); how many."""
        if not slot.tasks or self.pool is None or self.pool.sandbox != "none":
            return 0
        running = slot.timed_out if slot.timed_out is not None else self._running_task(slot)
        latest: dict[bytes, tuple[int, bytes]] = {}
        # a task retried after an exception may be back on the same worker: the records of the tries whose
        # results came already are stale (as many as came; fewer when the file started over or a quick try
        # was not recorded): only a record past them is the try it holds now, else it runs again
        seen: dict[bytes, int] = {}
        for task_id, status, blob in heldlog.read_held(heldlog.path_for(slot.marker.path)):
            if task_id in slot.tasks and task_id != running:
                seen[task_id] = count = seen.get(task_id, 0) + 1
                answered = slot.tasks[task_id].answered
                if count > (answered.get(slot.name, 0) if answered else 0):
                    latest.setdefault(task_id, (status, blob))
        if not latest:
            return 0
        blobs = P.Blobs()
        rows: list[list[Any]] = [blobs.result_row(task_id, status, blob) for task_id, (status, blob) in latest.items()
                                 if status in (P.OK, P.EXCEPTION, P.FAILED, P.CANCELLED)]
        if rows:
            self._on_worker_results(slot, P.Message(P.RESULTS, {"rows": rows}, blobs.frames))
            log.info("worker %d died holding the results of %d finished task(s), not sent yet: taken from its "
                     "file", slot.pid, len(rows))
        return len(rows)
