"""Tasks the relay holds until the tasks they depend on have finished.

A client sends a task whose arguments name other tasks' futures with option
``"d"``: the ids of those tasks (its dependencies, all of the same user and
unfinished when it arrives). The relay records it like any task (its stored
arguments are an envelope that also names its dependencies, so that a
restarted relay holds it again) and keeps it out of every queue, in the
index here, until each dependency has finished: then it is queued with the
dependencies' results wrapped around its arguments
(:func:`fedexec.dependencies.wrap_arguments`); if one fails or is cancelled,
it fails too (and so do the tasks waiting on it).

A dependency's result stays in the record until every task that depends on
it has finished (an acknowledgement of it meanwhile is put off), so that a
relay restarted meanwhile can send them again. Only results up to
``KEPT_IN_MEMORY`` bytes are also kept here, in memory, for the tasks
waiting on them; a larger one is read back from the record when such a task
goes (so the memory this index takes does not grow with result sizes). The
relay never unpickles any of it.
"""

from __future__ import annotations

from typing import Any

import msgpack

from ..transfer import is_big
from .registry import TaskRecord

RECENT_MAX = 4096   # results of finished dependent tasks kept for tasks naming them that come after
RECENT_BYTES = 16 * 1024 * 1024   # ... and their bytes, at most
SENT_AGAIN_MAX = 65536   # ids remembered as being sent again (then forgotten at once, all of them)
KEPT_IN_MEMORY = 64 * 1024   # larger results of dependencies are read from the record when needed
WAITING = 2   # a TaskRecord's state while it is held here (registry.QUEUED is 0, DISPATCHED 1)
ENVELOPE = b"\x00fedexec-dependent\x00"   # stored arguments of a task with dependencies begin so
# Header bytes the dependency options of the rows of one TASKS message may take,
# about (see option_bytes), beyond what ordinary rows take: a message's rows then
# fit MAX_HEADER whatever their dependencies (one row's options can take ~82 KiB).
OPTION_BYTES_PER_MESSAGE = 48 * 1024


def envelope(dependencies: list[bytes], args: Any) -> bytes:
    """What the record stores as a dependent task's arguments."""
    return ENVELOPE + msgpack.packb([dependencies, bytes(args)], use_bin_type=True)


def open_envelope(stored: Any) -> tuple[list[bytes], bytes] | None:
    """``(dependencies, arguments)`` of stored arguments made by
    :func:`envelope`; None for any other task's."""
    if bytes(stored[:len(ENVELOPE)]) != ENVELOPE:
        return None
    try:
        dependencies, args = msgpack.unpackb(bytes(stored[len(ENVELOPE):]), raw=False)
    except Exception:
        return None
    if not (isinstance(dependencies, list) and dependencies and isinstance(args, bytes)
            and all(isinstance(d, bytes) and len(d) == 16 for d in dependencies)):
        return None
    return dependencies, args


def option_bytes(options: dict) -> int:
    """About the header bytes a task row's long options take: the ids of the
    tasks it waits for (``d``), of its dependencies' uploads (``dr``) and of
    the DataRefs it names (``rf``, up to MAX_REFS of about 64 bytes each)."""
    return 18 * len(options.get("d", ())) + 78 * len(options.get("dr", ())) + 64 * len(options.get("rf", ()))


def in_memory(result: Any) -> bytes | None:
    """What the index keeps of a dependency's result: the bytes, or None
    (read from the record when needed) for one over ``KEPT_IN_MEMORY``."""
    return bytes(result) if len(result) <= KEPT_IN_MEMORY else None


class _Waiting:
    __slots__ = ("record", "dependencies", "results")

    def __init__(self, record: TaskRecord, dependencies: list[bytes]) -> None:
        self.record = record
        self.dependencies = dependencies
        self.results: dict[bytes, bytes | None] = {}   # of the dependencies finished so far (None: in the record)


class DependencyGraph:
    """The relay's in-memory index of held tasks (rebuilt from the record
    after a restart): dependency -> tasks waiting on it, and the results in
    hand for each waiting task."""

    def __init__(self) -> None:
        self.waiting: dict[bytes, _Waiting] = {}          # task id -> a task held for its dependencies
        self.dependents: dict[bytes, list[bytes]] = {}    # unfinished dependency -> ids of tasks waiting on it
        self.dependencies_of: dict[bytes, list[bytes]] = {}   # a dependent task, until it finishes
        self.refs: dict[bytes, int] = {}     # dependency -> its unfinished dependents (its result stays)
        self.deferred: dict[bytes, str] = {}   # acknowledgements put off meanwhile: task id -> user
        self._ready: dict[bytes, dict[bytes, bytes]] = {}   # results of tasks ready, until taken
        # forwarded: tasks sent on to their endpoint with their dependencies' ids, to wait
        # there (all their dependencies went there before them); failed_there: those of
        # them that fail there with a dependency (the failure, should they come back here)
        self.forwarded: set[bytes] = set()
        self.failed_there: dict[bytes, bytes] = {}
        self._recent: dict[bytes, bytes] = {}   # finished dependent task -> its (small) result
        self._recent_bytes = 0
        self._sent_again: dict[bytes, tuple[str, str]] = {}   # task id -> (user, kind): refused, to come again

    def __bool__(self) -> bool:
        return bool(self.dependencies_of or self.dependents)

    def hold(self, record: TaskRecord, dependencies: list[bytes], unfinished: set[bytes],
             results: dict[bytes, bytes]) -> bool:
        """Hold ``record`` until its ``unfinished`` dependencies finish (the
        others' ``results`` are given); True if it is ready already."""
        task_id = record.task_id
        self.dependencies_of[task_id] = dependencies
        for dependency in dependencies:
            self.refs[dependency] = self.refs.get(dependency, 0) + 1
        waiting = _Waiting(record, dependencies)
        waiting.results.update(results)
        if not unfinished:
            self._ready[task_id] = waiting.results
            return True
        self.waiting[task_id] = waiting
        for dependency in unfinished:
            self.dependents.setdefault(dependency, []).append(task_id)
        return False

    def ready_results(self, task_id: bytes) -> list[bytes | None]:
        """The results of a ready task's dependencies, in their order (its
        placeholders 0, 1, ...); None for one to read from the record."""
        results = self._ready.pop(task_id)
        return [results[d] for d in self.dependencies_of[task_id]]

    def finished(self, task_id: bytes, ok: bool, result: Any) -> tuple[list[TaskRecord], list[TaskRecord]]:
        """A task finished (``ok``: with a value): the tasks now ready, and
        those that fail because it did not succeed."""
        waiting_ids = self.dependents.pop(task_id, None)
        if waiting_ids is None:
            return [], []
        ready: list[TaskRecord] = []
        failed: list[TaskRecord] = []
        value = in_memory(result) if ok else b""
        for waiting_id in waiting_ids:
            waiting = self.waiting.get(waiting_id)
            if waiting is None:
                continue   # cancelled or failed meanwhile
            if not ok:
                del self.waiting[waiting_id]
                failed.append(waiting.record)
                continue
            waiting.results[task_id] = value
            if len(waiting.results) == len(waiting.dependencies):
                self._ready[waiting_id] = waiting.results
                del self.waiting[waiting_id]
                ready.append(waiting.record)
        return ready, failed

    def is_ready(self, task_id: bytes) -> bool:
        """Whether every dependency of this task has succeeded (its results are in hand)."""
        return task_id in self._ready

    def may_go_on(self, task_id: bytes, sent_there: dict[bytes, Any]) -> bool:
        """Whether a forwarded task may go to its endpoint with its
        dependencies' ids: none of them has finished, and each went there
        (is in ``sent_there``, the endpoint's tasks) before it."""
        waiting = self.waiting.get(task_id)
        return (waiting is not None and not waiting.results
                and all(d in sent_there for d in waiting.dependencies))

    def drop(self, task_id: bytes) -> None:
        """A held task leaves (cancelled): it waits no more."""
        self.waiting.pop(task_id, None)

    def release(self, task_id: bytes) -> dict[bytes, str]:
        """A task with dependencies finished: the acknowledgements of
        dependency results that were put off for it and are now due."""
        dependencies = self.dependencies_of.pop(task_id, None)
        self.waiting.pop(task_id, None)
        self._ready.pop(task_id, None)
        if self.forwarded:
            self.forwarded.discard(task_id)
            self.failed_there.pop(task_id, None)
        due: dict[bytes, str] = {}
        for dependency in dependencies or ():
            count = self.refs.get(dependency, 0) - 1
            if count > 0:
                self.refs[dependency] = count
                continue
            self.refs.pop(dependency, None)
            user = self.deferred.pop(dependency, None)
            if user is not None:
                due[dependency] = user
        return due

    def remember(self, task_id: bytes, result: Any) -> None:
        """A task that had dependencies succeeded: its result, if small, is
        kept a while (the latest ``RECENT_MAX``, ``RECENT_BYTES`` in all), so that a task naming it
        that reaches the relay after it finished (its client had not seen
        that yet: a chain running faster than it is submitted) is held here
        and sent with it, rather than refused for its client to hold it
        (one round trip through the client per link from then on). Only
        tasks with dependencies: others pay nothing. Not a reference to an
        upload (a result over 16 MiB): its client may have dropped that by
        then (kept.py keeps it only for tasks held before it finished)."""
        kept = in_memory(result)
        if kept is None or is_big(kept):
            return
        recent = self._recent
        while recent and (len(recent) >= RECENT_MAX or self._recent_bytes + len(kept) > RECENT_BYTES):
            self._recent_bytes -= len(recent.pop(next(iter(recent))))
        old = recent.pop(task_id, None)
        if old is not None:
            self._recent_bytes -= len(old)
        recent[task_id] = kept
        self._recent_bytes += len(kept)

    def recent_result(self, task_id: bytes) -> bytes | None:
        """The result :meth:`remember` kept of this task, or None (the caller
        checks that the task is the user's, finished and unacknowledged)."""
        return self._recent.get(task_id)

    def sent_again(self, task_id: bytes, user: str, kind: str) -> None:
        """A task of ``user`` was refused (failure ``kind``) for its client
        to send it again: with its function's body (NEED_FUNCTION), or with
        its dependencies' values once it has them (DEPENDENCY_DONE). A task
        that depends on it and arrives before it does is refused the same
        way (its client, this user's, sends it again after it), not as a
        task naming an unknown or another user's id. Bounded: past
        ``SENT_AGAIN_MAX`` ids they are all forgotten (then such a task is
        refused as naming an unknown id, and its client holds it until it
        has the values)."""
        if len(self._sent_again) >= SENT_AGAIN_MAX:
            self._sent_again.clear()
        self._sent_again[task_id] = (user, kind)

    def sent_again_as(self, task_id: bytes, user: str) -> str | None:
        """How ``user``'s task ``task_id`` was refused to be sent again
        (see :meth:`sent_again`); None if it was not (or is another user's)."""
        entry = self._sent_again.get(task_id)
        return entry[1] if entry is not None and entry[0] == user else None

    def put_off(self, task_ids: list[bytes], user: str, owners: dict[bytes, str]) -> list[bytes]:
        """Of an acknowledgement's task ids, those that may be forgotten now;
        the results of ``user``'s tasks others still depend on are kept until
        then (``owners``: who each finished task belongs to; another user's
        id is passed through, for the record to ignore)."""
        refs = self.refs
        now = []
        for task_id in task_ids:
            if task_id in refs and owners.get(task_id) == user:
                self.deferred[task_id] = user
            else:
                now.append(task_id)
        return now
