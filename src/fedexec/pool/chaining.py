"""A pool sends a dependent on to the worker running the tasks it depends on.

A task the endpoint sent to wait at the pool for its dependencies (option
``"d"``, ``endpoint/graph.py``) would wait there until their results come
back from the worker, and then go to a worker with them wrapped in: each
link of a chain a round trip worker -> pool -> worker. Instead, when its
dependencies all went to one worker and the newest of them is still the last
task sent there, it goes on to that worker at once, with its raw arguments
and ``"d"``; the worker keeps those dependencies' results and runs it with
them (``worker/chain.py``). So does one whose one dependency finished as the
last task its worker ran, with nothing sent there since (its links reach the
pool just after the link before them ended: the worker still has the value).

Only the first dependent of a task is sent on so (the next one's newest
dependency is no longer the last task there): a fan-out still spreads over
the workers. Tasks going on to one worker within a turn go in one message.
A dependent that comes back unrun (the worker did not keep a value: the
dependency failed, is to be tried again or is large; or the worker died)
waits at the pool, or at the endpoint, as any other.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from .. import protocol as P
from ..dispatch import QueuedTask
from .workers import WorkerSlot

if TYPE_CHECKING:
    from ..endpoint.graph import HeldTasks
    from .workers import LocalWorkerPool

CHAIN_AHEAD = 256   # tasks a worker may hold at most for a dependent to be sent on to it


class WorkerChains:
    """(A part of :class:`~fedexec.pool.manager.PoolManager`) dependents sent
    on to the worker that runs their dependencies."""

    pool: LocalWorkerPool | None
    at_worker: dict[bytes, WorkerSlot]
    graph: HeldTasks
    functions: dict[bytes, Any]
    draining: bool
    _ran_last: dict[bytes, bytes]           # worker id -> the task it answered for last
    _chaining: dict[bytes, list[QueuedTask]]   # worker id -> tasks going on to it this turn
    _going: dict[bytes, WorkerSlot]         # ... and where each of those goes

    queue: deque[QueuedTask]

    if TYPE_CHECKING:   # (the pool manager's)
        def _send_batch(self, slot: WorkerSlot, count: int) -> None: ...
        def _give_back(self, tasks: list[QueuedTask]) -> None: ...
        def _hold_dependent(self, task: QueuedTask, chain: bool = True) -> None: ...

    def _chainable(self, task: QueuedTask, slot: WorkerSlot | None, after: bytes | None = None) -> bool:
        """Whether a task held here for its dependencies may go on to
        ``slot`` now: they all went there, unfinished, and the newest of them
        is the last task sent there (the worker still has it queued, or as
        the task it ran last); or (``after``: its one dependency) that one
        finished as the last task ``slot`` ran and nothing went there since.
        A plain pool only (no sandbox, pickles), and a worker of its user."""
        pool = self.pool
        if (slot is None or pool is None or pool.sandbox != "none" or pool.data_only or self.draining
                or slot.retiring or slot.yielding):
            return False
        going = self._chaining.get(slot.worker_id, ())
        if len(slot.tasks) + len(going) >= CHAIN_AHEAD:
            return False
        row = task.row
        if after is None:
            dependencies = row[6]["d"]
            tail = going[-1].row[0] if going else next(reversed(slot.tasks), None)
            if tail is None or tail not in dependencies:
                return False
            at_worker, to = self.at_worker, self._going
            if len(dependencies) > 1 and not all(at_worker.get(d) is slot or to.get(d) is slot
                                                 for d in dependencies):
                return False
        elif going or slot.tasks:
            return False
        return ((row[6].get("u") or "") == slot.user and row[5] == P.PYTHON_VERSION
                and (row[1] in slot.known_functions or row[1] in self.functions))

    def _go_on(self, task: QueuedTask, slot: WorkerSlot) -> None:
        """``task`` goes on to ``slot`` (:meth:`_send_chained` sends it)."""
        self._chaining.setdefault(slot.worker_id, []).append(task)
        self._going[task.row[0]] = slot

    def _send_chained(self) -> None:
        """Send the tasks going on to workers, one message for each worker."""
        for tasks in self._chaining.values():
            slot = self._going[tasks[0].row[0]]
            self.queue.extendleft(reversed(tasks))
            # (those: _chainable checked everything that would make it pass one by)
            self._send_batch(slot, len(tasks))
        self._chaining.clear()
        self._going.clear()

    def _chain_to_worker(self, task: QueuedTask) -> bool:
        """A task that came to wait here goes on to the worker its
        dependencies went to, if it may (:meth:`_chainable`). Whether it does."""
        first = task.row[6]["d"][0]
        slot = self.at_worker.get(first) or self._going.get(first)
        if not self._chainable(task, slot):
            return False
        assert slot is not None
        self._go_on(task, slot)
        return True

    def _chain_after_last(self, task: QueuedTask) -> bool:
        """A task that came to wait here for one dependency which has
        finished already goes on to the worker that ran it, if that was the
        last task the worker ran and nothing went there since: it still has
        the value at hand (``KeptResults.last``). So a chain whose links come
        just after the link before them ended (it runs as fast as they come)
        does not send each back to the endpoint to wait there. Whether it
        does (if the worker has not the value after all, it comes back:
        :meth:`_unchained`)."""
        dependencies = task.row[6]["d"]
        if len(dependencies) != 1 or self.pool is None:
            return False
        ran_last = self._ran_last
        slot = next((slot for slot in self.pool.slots.values()
                     if ran_last.get(slot.worker_id) == dependencies[0]), None)
        if not self._chainable(task, slot, after=dependencies[0]):
            return False
        assert slot is not None
        self._go_on(task, slot)
        return True

    def _chain_held(self) -> None:
        """Tasks held here that may now go on to a worker: their newest
        dependency was sent there since they came (a chain that reached the
        pool ahead of its first link)."""
        assert self.pool is not None
        waiting_on, graph = self.graph.waiting_on, self.graph
        for slot in self.pool.slots.values():
            while True:
                going = self._chaining.get(slot.worker_id)
                tail = going[-1].row[0] if going else next(reversed(slot.tasks), None)
                waiting = waiting_on.get(tail) if tail is not None else None
                entry = graph.held.get(waiting[0]) if waiting else None
                if entry is None or entry.results or not self._chainable(entry.task, slot):
                    break
                graph.take(waiting[0])
                self._go_on(entry.task, slot)
        if self._chaining:
            self._send_chained()

    def _unchained(self, task: QueuedTask) -> None:
        """A task sent on to a worker came back unrun (its worker did not
        keep a dependency's value, or died): it waits here again, or goes
        back to the endpoint, which has its dependencies' results."""
        if self.draining:
            self._give_back([task])
        else:
            self._hold_dependent(task, chain=False)

    def _ran(self, slot: WorkerSlot, rows: list[Any]) -> None:
        """A worker answered for these tasks (the last: the task it ran last)."""
        if rows:
            self._ran_last[slot.worker_id] = rows[-1][0]
