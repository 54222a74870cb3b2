"""Tasks an endpoint agent holds until tasks they depend on, run here, finish.

The relay sends a task whose dependencies (option ``"d"``: their ids) all
went to this endpoint before it, on the same connection, with those ids
instead of holding it itself (see ``relay/graph.py``). The agent keeps it
here, out of its queue, until each dependency's result is in hand (it passes
through this agent on its way to the relay), then queues it with the
results wrapped around its arguments, exactly as the relay would have
(:func:`fedexec.dependencies.wrap_arguments`: the agent unpickles nothing).
So a dependency's value never leaves the endpoint for its dependent, and a
chain's links do not wait for the relay.

One step further, a held task whose dependencies all went to the same pool
(or wait there themselves) goes to that pool with their ids, and waits
there (the pool keeps its own :class:`HeldTasks`): a finished result then
releases the next task within the pool (worker -> pool -> worker). The
agent keeps its entry meanwhile, marked with that pool, and stores the
dependencies' results in it as they pass by (without queueing it): should
the pool go away or give the task back, the agent queues it itself.

The relay stays the authority: it checked that every dependency is a task of
the same user before sending, it still records every result, and it sends
the task again (or holds it itself) if this agent goes away. A dependency
that fails or is cancelled here fails its dependents at once, as at the
relay, with failure kind ``dependency``.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from .. import protocol as P
from ..dataref import wrap_arguments as wrap_with_files
from ..dependencies import result_in_file, wrap_arguments
from ..dispatch import QueuedTask
from ..transfer import SPOOL_ENV, is_big, is_local, parse_local


HELD_EXTRA = 1024   # held tasks an agent takes beyond its capacity, at least


class _Held:
    __slots__ = ("task", "dependencies", "results", "pool", "failure")

    def __init__(self, task: QueuedTask, dependencies: list[bytes]) -> None:
        self.task = task
        self.dependencies = dependencies
        self.results: dict[bytes, bytes] = {}
        self.pool: Any = None   # (agent) the pool it waits at instead, if any
        self.failure: bytes | None = None   # (waiting at a pool) its failure, should it come back


def dependency_failure(dependency: bytes, what: str) -> bytes:
    """The failure of a task whose dependency ``what`` ("failed", "was cancelled")."""
    return P.pack_failure(P.DEPENDENCY, f"task {uuid.UUID(bytes=dependency)}, which this task depends on, {what}, "
                                        f"so this task was not run", dep=dependency)


class HeldTasks:
    """The agent's index of tasks held for dependencies running here."""

    def __init__(self) -> None:
        self.held: dict[bytes, _Held] = {}
        self.waiting_on: dict[bytes, list[bytes]] = {}   # unfinished dependency -> tasks held for it
        self._cascade: list[tuple[bytes, int, Any]] | None = None   # (settle) results still to go through

    @staticmethod
    def extra(capacity: int) -> int:
        """How many held tasks an agent of this ``capacity`` takes beyond it
        (they wait, so they need no worker; the bound keeps the agent's
        memory bounded whatever a graph's shape)."""
        return max(HELD_EXTRA, 16 * capacity)

    def __bool__(self) -> bool:
        return bool(self.held)

    def hold(self, task: QueuedTask, dependencies: list[bytes], holding: set[bytes],
             finished: dict[bytes, tuple[int, Any, Any]]) -> tuple[QueuedTask | None, bytes | None]:
        """Take a task with dependencies: ``(task ready to queue, None)``,
        ``(None, failure)`` if it cannot run, or ``(None, None)`` if it is
        held. ``holding``: tasks unfinished here; ``finished``: outcomes of
        tasks finished here whose results the relay has not acknowledged."""
        entry = _Held(task, dependencies)
        unfinished = []
        for dependency in dependencies:
            if dependency in holding:
                unfinished.append(dependency)
                continue
            outcome = finished.get(dependency)
            if outcome is None:   # the relay sends only after its dependencies: not expected
                return None, P.pack_failure(P.LOST, f"task {uuid.UUID(bytes=dependency)}, which this task depends "
                                                    f"on, is unknown at this endpoint")
            if outcome[0] != P.OK:
                return None, dependency_failure(dependency, "failed" if outcome[0] != P.CANCELLED
                                                else "was cancelled")
            entry.results[dependency] = outcome[1]
        if not unfinished:
            return self._wrapped(entry)
        task_id = task.row[0]
        self.held[task_id] = entry
        for dependency in unfinished:
            self.waiting_on.setdefault(dependency, []).append(task_id)
        return None, None

    def finished(self, task_id: bytes, status: int, blob: Any) -> tuple[list[QueuedTask], list[tuple[bytes, bytes]]]:
        """A task here finished: the held tasks now ready (arguments
        wrapped), and ``(task id, failure)`` of those that fail with it."""
        waiting_ids = self.waiting_on.pop(task_id, None)
        ready: list[QueuedTask] = []
        failed: list[tuple[bytes, bytes]] = []
        if waiting_ids is None:
            return ready, failed
        for waiting_id in waiting_ids:
            entry = self.held.get(waiting_id)
            if entry is None:
                continue
            if entry.pool is not None:   # the pool it waits at releases (or fails) it: noted only
                if status != P.OK:
                    entry.failure = entry.failure or dependency_failure(
                        task_id, "was cancelled" if status == P.CANCELLED else "failed")
                else:
                    entry.results[task_id] = blob
                continue
            if status != P.OK:
                del self.held[waiting_id]
                failed.append((waiting_id, dependency_failure(
                    task_id, "was cancelled" if status == P.CANCELLED else "failed")))
                continue
            entry.results[task_id] = blob
            if len(entry.results) == len(entry.dependencies):
                self._release(waiting_id, entry, ready, failed)
        return ready, failed

    def cancel(self, task_ids: set[bytes]) -> list[bytes]:
        """Of these, the held tasks, taken out (their dependents fail when
        their cancellation is reported through :meth:`finished`); those
        waiting at a pool stay (the pool answers for them: :meth:`pool_of`)."""
        held = self.held
        return [task_id for task_id in task_ids
                if (entry := held.get(task_id)) is not None and entry.pool is None and held.pop(task_id)]

    def take(self, task_id: bytes) -> QueuedTask | None:
        """(Pool) a held task, taken out to go on elsewhere (to the worker
        its dependencies went to: ``pool/manager.py``), or None."""
        entry = self.held.pop(task_id, None)
        if entry is None:
            return None
        for dependency in entry.dependencies:
            waiting = self.waiting_on.get(dependency)
            if waiting is not None and task_id in waiting:
                waiting.remove(task_id)
                if not waiting:
                    del self.waiting_on[dependency]
        return entry.task

    def take_all(self) -> list[QueuedTask]:
        """(Pool) every held task, as it came, taken out (to give back)."""
        tasks = [entry.task for entry in self.held.values()]
        self.held.clear()
        self.waiting_on.clear()
        return tasks

    # -- (agent) tasks that wait at a pool ---------------------------------------
    def pool_of(self, task_id: bytes) -> Any:
        """The pool a held task waits at, or None."""
        entry = self.held.get(task_id)
        return None if entry is None else entry.pool

    def send_to_pool(self, task_id: bytes, where: dict[bytes, Any]) -> Any:
        """The pool a task just held may wait at instead: the one every
        dependency of it went to (``where``: task id -> pool) or waits at,
        if none of them has finished; else None."""
        entry = self.held.get(task_id)
        if entry is None or entry.results:
            return None
        pool = None
        for dependency in entry.dependencies:
            there = where.get(dependency) or self.pool_of(dependency)
            if there is None or (pool is not None and there is not pool):
                return None
            pool = there
        return pool

    def waits_at(self, task_id: bytes, pool: Any) -> None:
        """A held task went to ``pool`` to wait there."""
        self.held[task_id].pool = pool

    def from_pool(self, task_id: bytes, pool: Any) -> bool:
        """A result came from ``pool`` for this task: whether it was one
        waiting there (its entry goes)."""
        entry = self.held.get(task_id)
        if entry is None or entry.pool is not pool:
            return False
        del self.held[task_id]
        return True

    def back_from(self, pool: Any, task_ids: list[bytes] | None = None
                  ) -> tuple[list[QueuedTask], list[tuple[bytes, bytes]]]:
        """Tasks that waited at ``pool`` (those of ``task_ids``, or all: it
        is gone) wait here again: those ready now (arguments wrapped), and
        ``(task id, failure)`` of those that fail; the rest stay held."""
        ready: list[QueuedTask] = []
        failed: list[tuple[bytes, bytes]] = []
        ids = [t for t, e in self.held.items() if e.pool is pool] if task_ids is None else task_ids
        for task_id in ids:
            entry = self.held.get(task_id)
            if entry is None or entry.pool is not pool:
                continue
            entry.pool = None
            if entry.failure is not None:
                del self.held[task_id]
                failed.append((task_id, entry.failure))
            elif len(entry.results) == len(entry.dependencies):
                self._release(task_id, entry, ready, failed)
        return ready, failed

    def _release(self, task_id: bytes, entry: "_Held", ready: list[QueuedTask],
                 failed: list[tuple[bytes, bytes]]) -> None:
        """A held task whose dependencies' results are all here leaves: to
        ``ready`` with them wrapped in, or to ``failed`` if they cannot be."""
        del self.held[task_id]
        task, failure = self._wrapped(entry)
        if task is not None:
            ready.append(task)
        else:
            failed.append((task_id, failure or b""))

    def settle(self, task_id: bytes, status: int, blob: Any, admit: Any, fail: Any) -> None:
        """A task finished: :meth:`finished`, then ``admit(task)`` each one
        ready and ``fail(task_id, failure)`` each one failing, down the
        graph (``fail`` reports a result, which calls this again: such calls
        within it are taken by its loop, not a recursion)."""
        if self._cascade is not None:
            self._cascade.append((task_id, status, blob))
            return
        self._cascade = work = [(task_id, status, blob)]
        try:
            while work:
                ready, failed = self.finished(*work.pop())
                for task in ready:
                    admit(task)
                for failed_id, failure in failed:
                    fail(failed_id, failure)
        finally:
            self._cascade = None

    @staticmethod
    def _wrapped(entry: _Held) -> tuple[QueuedTask | None, bytes | None]:
        results = [entry.results[d] for d in entry.dependencies]
        task = entry.task
        row = task.row
        files: dict[bytes, str] = {}
        if any(is_big(r) or is_local(r) for r in results):
            # results that travel in chunks: the files their workers wrote here (kept by the
            # agent until this task is done), named by a DataRef-style wrapper (see
            # dependencies.result_in_file); one already uploaded is not at hand here
            why = ("its arguments travel in chunks too" if is_local(task.args) or is_big(task.args)
                   else "it also names DataRefs" if "rf" in row[6] else "")
            for position, (dependency, result) in enumerate(zip(entry.dependencies, results)):
                if why:
                    break
                if is_big(result):
                    why = "its result is no longer at this endpoint"
                elif is_local(result):
                    path, size, _ = parse_local(P.as_bytes(result))
                    if not _in_spool(path, dependency):
                        why = "its result is not a file of that task in the endpoint's spool"
                        break
                    files[dependency] = path
                    results[position] = result_in_file(dependency, size)
            if why:
                return None, P.pack_failure(
                    P.REJECTED, f"this task depends on a result that travels in chunks (over 16 MiB pickled), "
                                f"and {why}: pass the futures' values yourself (future.result())")
        options = {k: v for k, v in row[6].items() if k != "d"}
        row = row[:6] + [options] if options else row[:6]
        args = wrap_arguments(bytes(task.args), [bytes(r) for r in results])
        return QueuedTask(row, wrap_with_files(args, files) if files else args), None


def _in_spool(path: str, task_id: bytes) -> bool:
    """Whether ``path`` is a file of task ``task_id`` in the endpoint's spool
    (where its workers write large results; a worker's reference to any
    other file is not shared with a dependent, as the agent uploads none)."""
    spool = os.environ.get(SPOOL_ENV)
    real = os.path.realpath(path)
    return (spool is not None and os.path.dirname(real) == os.path.realpath(spool)
            and os.path.basename(real).startswith(task_id.hex() + "."))
