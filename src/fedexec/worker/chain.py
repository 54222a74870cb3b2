"""A worker runs a task straight after the task it depends on, with its value.

A task whose dependencies all went to the same worker, the last of them
still the newest task sent there, is sent on to that worker at once by its
pool (``pool/manager.py``: ``_chain_to_worker``), with its raw arguments
(their placeholders for the dependencies' values) and option ``"d"`` naming
the dependencies. The worker keeps those dependencies' results (the pickled
bytes it also sends back, so the dependent gets its own copy of each value,
as from any other worker) and runs the dependent with them, without the
results going worker -> pool -> worker first: a chain's links follow one
another within the worker.

A dependency that did not succeed, or whose result is large (it travels as a
file) or was not kept, sends the dependent back to its pool unrun
(:data:`NOT_KEPT`), which then holds it as any other (fails it, runs it once
its dependency has run again, or has the endpoint run it with the result).
"""

from __future__ import annotations

from typing import Any

from .. import protocol as P
from ..dependencies import wrap_arguments
from ..transfer import is_local

NOT_KEPT = "not_kept"   # failure kind: a dependent sent back to its pool unrun (never goes past the pool)
KEEP_MAX = 64 * 1024    # results kept for a dependent here, at most (larger: it goes back to its pool)


def not_kept(dependency: bytes) -> bytes:
    """The answer for a dependent this worker cannot run with ``dependency``'s value."""
    return P.pack_failure(NOT_KEPT, f"the result of task {dependency.hex()} is not kept at this worker")


def is_not_kept(blob: Any) -> bool:
    """Whether a FAILED result is :func:`not_kept`'s."""
    try:
        return P.unpack_failure(blob).get("kind") == NOT_KEPT
    except Exception:
        return False


class KeptResults:
    """Results of tasks run here that tasks queued here depend on.

    ``want`` counts, for each dependency, the dependents queued here; a
    dependency that finishes while wanted is kept (if it succeeded, and is
    small) until its last dependent here has taken it. The newest task's
    result is at hand too (``last``): a dependent may arrive just after its
    dependency ran."""

    __slots__ = ("wanted", "kept", "last")

    def __init__(self) -> None:
        self.wanted: dict[bytes, int] = {}
        self.kept: dict[bytes, bytes] = {}
        self.last: tuple[bytes, int, Any] | None = None   # (task id, status, result) of the newest task run

    def want(self, dependencies: list[bytes]) -> None:
        """A dependent of these came (it runs after them)."""
        wanted = self.wanted
        for dependency in dependencies:
            wanted[dependency] = wanted.get(dependency, 0) + 1
            last = self.last
            if last is not None and last[0] == dependency and dependency not in self.kept:
                self._keep(dependency, last[1], last[2])

    def unwant(self, dependencies: list[bytes]) -> None:
        """A dependent left without running (cancelled)."""
        for dependency in dependencies:
            count = self.wanted.get(dependency, 0) - 1
            if count > 0:
                self.wanted[dependency] = count
            else:
                self.wanted.pop(dependency, None)
                self.kept.pop(dependency, None)

    def ran(self, task_id: bytes, status: int, blob: Any) -> None:
        """A task ran here (every task: keeps it if wanted, and as the newest)."""
        self.last = (task_id, status, blob) if len(blob) <= KEEP_MAX else None
        if self.wanted and task_id in self.wanted:
            self._keep(task_id, status, blob)

    def _keep(self, task_id: bytes, status: int, blob: Any) -> None:
        if status == P.OK and len(blob) <= KEEP_MAX and not is_local(blob):
            self.kept[task_id] = bytes(blob)

    def arguments(self, dependencies: list[bytes], args: Any) -> tuple[bytes | None, bytes | None]:
        """``(arguments with the dependencies' values wrapped in, None)`` for a
        dependent about to run, or ``(None, missing dependency)`` if one is
        not kept; either way it is no longer wanted."""
        kept = self.kept
        missing = next((d for d in dependencies if d not in kept), None)
        results = None if missing is not None else [kept[d] for d in dependencies]
        self.unwant(dependencies)
        if results is None:
            return None, missing
        return wrap_arguments(bytes(args), results), None
