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

The relay stays the authority: it checked that every dependency is a task of
the same user before sending, it still records every result, and it sends
the task again (or holds it itself) if this agent goes away. A dependency
that fails or is cancelled here fails its dependents at once, as at the
relay, with failure kind ``dependency``.
"""

from __future__ import annotations

import uuid
from typing import Any

from .. import protocol as P
from ..dependencies import wrap_arguments
from ..dispatch import QueuedTask
from ..transfer import is_big, is_local


HELD_EXTRA = 1024   # held tasks an agent takes beyond its capacity, at least


class _Held:
    __slots__ = ("task", "dependencies", "results")

    def __init__(self, task: QueuedTask, dependencies: list[bytes]) -> None:
        self.task = task
        self.dependencies = dependencies
        self.results: dict[bytes, bytes] = {}


def dependency_failure(dependency: bytes, what: str) -> bytes:
    """The failure of a task whose dependency ``what`` ("failed", "was cancelled")."""
    return P.pack_failure(P.DEPENDENCY, f"task {uuid.UUID(bytes=dependency)}, which this task depends on, {what}, "
                                        f"so this task was not run", dep=dependency)


class HeldTasks:
    """The agent's index of tasks held for dependencies running here."""

    def __init__(self) -> None:
        self.held: dict[bytes, _Held] = {}
        self.waiting_on: dict[bytes, list[bytes]] = {}   # unfinished dependency -> tasks held for it

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
            if status != P.OK:
                del self.held[waiting_id]
                failed.append((waiting_id, dependency_failure(
                    task_id, "was cancelled" if status == P.CANCELLED else "failed")))
                continue
            entry.results[task_id] = blob
            if len(entry.results) == len(entry.dependencies):
                del self.held[waiting_id]
                task, failure = self._wrapped(entry)
                if task is not None:
                    ready.append(task)
                else:
                    failed.append((waiting_id, failure or b""))
        return ready, failed

    def cancel(self, task_ids: set[bytes]) -> list[bytes]:
        """Of these, the held tasks, taken out (their dependents fail when
        their cancellation is reported through :meth:`finished`)."""
        return [task_id for task_id in task_ids if self.held.pop(task_id, None) is not None]

    @staticmethod
    def _wrapped(entry: _Held) -> tuple[QueuedTask | None, bytes | None]:
        results = [entry.results[d] for d in entry.dependencies]
        if any(is_big(r) or is_local(r) for r in results):
            return None, P.pack_failure(
                P.REJECTED, "a task whose arguments hold other tasks' futures cannot yet depend on results that "
                            "travel in chunks (over 16 MiB pickled): pass the futures' values yourself "
                            "(future.result())")
        task = entry.task
        row = task.row
        options = {k: v for k, v in row[6].items() if k != "d"}
        row = row[:6] + [options] if options else row[:6]
        return QueuedTask(row, wrap_arguments(bytes(task.args), [bytes(r) for r in results])), None
