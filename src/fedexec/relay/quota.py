"""Per-user quotas at the relay, and the function bodies tasks share.

Each user may have at most ``max_tasks`` tasks at the relay (accepted and
not finished, or finished with a result not yet acknowledged: a task counts
until its user has fetched its outcome or it expired) and ``max_bytes``
bytes stored at the relay: the arguments of their unfinished tasks, their
results not yet acknowledged, and the function bodies stored for their
tasks, and the memoized results their tasks produced (until they expire,
after ``result_ttl`` as unfetched results do). Every stored task row costs at least ``MIN_ROW_BYTES`` (an empty
result or a cancellation still takes a row and an id's worth of memory). Usage is counted in memory (per task, no SQL) and
rebuilt from the record after a restart; a task over a quota is refused with
a FAILED result of kind ``quota`` naming the quota, the usage and the limit,
and nobody else is affected.

A function body is stored only once a task using it is accepted, is charged
to the user whose task brought it, and is deleted (from memory and the
record) when the last unfinished task using it finishes.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from .memstore import Record
    from .retained import RetainedResults

DEFAULT_MAX_TASKS_PER_USER = 1_000_000
DEFAULT_MAX_BYTES_PER_USER = 16 * 1024 ** 3   # room for large payloads (transfer.py) in and out
# Endpoints one user may register (each is kept in the record and its state
# in memory for good), and distinct endpoint groups one user may have tasks
# waiting for (the router visits every group with tasks each turn).
DEFAULT_MAX_ENDPOINTS_PER_USER = 1_000
DEFAULT_MAX_GROUPS_PER_USER = 100
# What a stored task row (arguments or result) costs at least against the
# byte quota: what the row, its index and the relay's bookkeeping take.
MIN_ROW_BYTES = 256
# Seconds a function body is kept after the last task using it finished:
# clients send a body once, so dropping it at once would cost every next call
# of a warm function a round trip to send it again (NEED_FUNCTION). It stays
# charged to its user meanwhile.
DEFAULT_FUNCTION_GRACE = 300.0


def row_bytes(size: int) -> int:
    """What a stored blob of ``size`` bytes is charged against the byte quota."""
    return size if size > MIN_ROW_BYTES else MIN_ROW_BYTES


class Quotas:
    """Tasks in flight and bytes stored, per user, against two limits."""

    def __init__(self, max_tasks: int = DEFAULT_MAX_TASKS_PER_USER,
                 max_bytes: int = DEFAULT_MAX_BYTES_PER_USER) -> None:
        for name, value in (("max_tasks_per_user", max_tasks), ("max_bytes_per_user", max_bytes)):
            if type(value) is not int or value <= 0:
                raise ValueError(f"{name} must be an integer greater than 0, not {value!r}")
        self.max_tasks = max_tasks
        self.max_bytes = max_bytes
        self.usage: dict[str, list[int]] = {}          # user -> [tasks held, bytes stored]
        # results stored and not yet acknowledged: task id -> (user, bytes),
        # and (time.time() stored, task id) oldest first, to release what expires
        self.unacked: dict[bytes, tuple[str, int]] = {}
        self.unacked_order: deque[tuple[float, bytes]] = deque()
        # memoized results in the record: key -> (user charged, bytes), and
        # (time.time() stored, key) oldest first (a key is never stored twice)
        self.memo: dict[bytes, tuple[str, int]] = {}
        self.memo_order: deque[tuple[float, bytes]] = deque()
        # results kept after their acknowledgement (retained.py), when the relay keeps them
        self.retained: "RetainedResults | None" = None

    def refusal(self, user: str, tasks: int, nbytes: int) -> tuple[str, dict[str, Any]] | None:
        """Why ``user`` may not take ``tasks`` more tasks and ``nbytes`` more
        bytes (the message and details of a QUOTA failure), or None."""
        used = self.usage.get(user)
        in_flight, stored = used if used is not None else (0, 0)
        if stored + nbytes > self.max_bytes and self.retained is not None \
                and self.retained.free(user, stored + nbytes - self.max_bytes):   # kept results yield to new work
            used = self.usage.get(user)
            in_flight, stored = used if used is not None else (0, 0)
        if in_flight + tasks > self.max_tasks:
            return (f"user {user!r} has {in_flight:,} task(s) in flight or finished with results not yet "
                    f"acknowledged at the relay, at its quota of {self.max_tasks:,} tasks per user "
                    f"(--max-tasks-per-user); wait for some to finish and fetch their results",
                    {"quota": "tasks", "usage": in_flight, "limit": self.max_tasks})
        if stored + nbytes > self.max_bytes:
            return (f"user {user!r} has {stored:,} bytes stored at the relay (arguments, unacknowledged results, "
                    f"function bodies); this task's {nbytes:,} more would go over its quota of "
                    f"{self.max_bytes:,} bytes per user (--max-bytes-per-user)",
                    {"quota": "bytes", "usage": stored, "limit": self.max_bytes, "size": nbytes})
        return None

    def room(self, user: str) -> tuple[int, int]:
        """The tasks and bytes ``user`` may still take (may be negative)."""
        used = self.usage.get(user)
        if used is None:
            return self.max_tasks, self.max_bytes
        return self.max_tasks - used[0], self.max_bytes - used[1]

    def charge(self, user: str, tasks: int, nbytes: int) -> None:
        used = self.usage.get(user)
        if used is None:
            self.usage[user] = [tasks, nbytes]
        else:
            used[0] += tasks
            used[1] += nbytes

    def release(self, user: str, tasks: int, nbytes: int) -> None:
        used = self.usage.get(user)
        if used is None:
            return
        used[0] -= tasks
        used[1] -= nbytes
        if used[0] <= 0 and used[1] <= 0:
            del self.usage[user]

    def result_stored(self, task_id: bytes, user: str, nbytes: int, now: float) -> None:
        """A result (or a failure, or a cancellation) is kept for ``user``
        until they acknowledge it or it expires: until then it counts as one
        of their tasks and at least ``MIN_ROW_BYTES`` bytes."""
        if task_id in self.unacked:
            return
        nbytes = row_bytes(nbytes)
        self.unacked[task_id] = (user, nbytes)
        self.unacked_order.append((now, task_id))
        self.charge(user, 1, nbytes)

    def results_replace(self, changes: Iterable[tuple[bytes, str, int, int]], now: float) -> None:
        """Tasks finished, each ``(task id, user, bytes of its arguments,
        bytes of its result)``: each result (as :meth:`result_stored`) takes
        the place of the task's arguments (as :meth:`release`) in its user's
        quotas; the task count is unchanged (a task counts until acknowledged)."""
        unacked, order, usage = self.unacked, self.unacked_order, self.usage
        for task_id, user, args_size, result_size in changes:
            used = usage.get(user)
            if used is None or task_id in unacked:   # (not charged, or stored already): the long way
                self.release(user, 1, row_bytes(args_size))
                self.result_stored(task_id, user, result_size, now)
                continue
            cost = result_size if result_size > MIN_ROW_BYTES else MIN_ROW_BYTES
            unacked[task_id] = (user, cost)
            order.append((now, task_id))
            used[1] += cost - (args_size if args_size > MIN_ROW_BYTES else MIN_ROW_BYTES)

    def acknowledged(self, task_ids: Iterable[bytes], user: str, keep: bool = True) -> None:
        """``user`` fetched these results (others' ids are ignored). When the
        relay keeps acknowledged results (:attr:`retained`) and ``keep``,
        their bytes stay charged until they go (retained.py)."""
        unacked = self.unacked
        if self.retained is not None and keep:
            kept = [(task_id, unacked.pop(task_id)[1]) for task_id in task_ids
                    if unacked.get(task_id, ("",))[0] == user]
            if kept:
                self.release(user, len(kept), 0)
                self.retained.keep(kept, user)
            return
        tasks = nbytes = 0
        for task_id in task_ids:
            entry = unacked.get(task_id)
            if entry is not None and entry[0] == user:
                del unacked[task_id]
                tasks += 1
                nbytes += entry[1]
        if tasks:
            self.release(user, tasks, nbytes)

    def memo_stored(self, key: bytes, user: str, nbytes: int, now: float) -> None:
        """A memoized result produced by a task of ``user`` is kept in the
        record (until it expires), charged to them."""
        if key in self.memo:
            return
        nbytes = row_bytes(nbytes)
        self.memo[key] = (user, nbytes)
        self.memo_order.append((now, key))
        self.charge(user, 0, nbytes)

    def expire(self, before: float) -> list[bytes]:
        """Results and memoized results stored before ``before`` (a
        time.time()) are forgotten by the record: their quota is released.
        The keys of the memoized results that expired."""
        memo_order, expired = self.memo_order, []
        while memo_order and memo_order[0][0] < before:
            key = memo_order.popleft()[1]
            memo = self.memo.pop(key, None)
            if memo is not None:
                self.release(memo[0], 0, memo[1])
                expired.append(key)
        order = self.unacked_order
        while order and order[0][0] < before:
            _, task_id = order.popleft()
            entry = self.unacked.pop(task_id, None)
            if entry is not None:
                self.release(entry[0], 1, entry[1])
                if self.retained is not None and self.retained.uploads:   # (a result over 16 MiB: its upload)
                    self.retained.results_gone([task_id], entry[0])
        if len(order) > 2 * len(self.unacked) + 1024:   # mostly acknowledged: drop their entries
            self.unacked_order = deque(item for item in order if item[1] in self.unacked)
        if self.retained is not None:
            self.retained.expire(before)
        return expired


class FunctionBodies:
    """Function bodies by hash, each kept while an unfinished task uses it
    (a count per body) and for ``grace`` seconds after the last one (so the
    next call of a warm function needs no resend: clients send a body once),
    charged to the user whose task brought it until it is dropped."""

    def __init__(self, store: "Record", quotas: Quotas, grace: float = DEFAULT_FUNCTION_GRACE) -> None:
        self.store = store
        self.quotas = quotas
        self.grace = grace
        self.bodies: dict[bytes, bytes] = {}              # loaded (from a submission, or the record)
        self.refs: dict[bytes, int] = {}                  # hash -> unfinished tasks using it (0: in its grace)
        self.charged: dict[bytes, tuple[str, int]] = {}   # hash -> (user charged, bytes)
        self.idle: dict[bytes, float] = {}                # hash -> time.monotonic() its last task finished

    def __contains__(self, fn_hash: bytes) -> bool:
        return fn_hash in self.refs

    def get(self, fn_hash: bytes) -> bytes | None:
        """A body by hash while a task uses it: from memory or (after a restart) the record."""
        body = self.bodies.get(fn_hash)
        if body is None and fn_hash in self.refs:
            body = self.store.function_body(fn_hash)
            if body is not None:
                self.bodies[fn_hash] = body
        return body

    def use(self, fn_hash: bytes, body: bytes | None, user: str) -> None:
        """A task using this function was accepted; ``body`` is stored (and
        charged to ``user``) if the relay did not have it."""
        count = self.refs.get(fn_hash)
        if count is not None:
            self.refs[fn_hash] = count + 1
            if count == 0:
                del self.idle[fn_hash]
            return
        assert body is not None, "a new function comes with its body"
        self.refs[fn_hash] = 1
        self.bodies[fn_hash] = body
        self.charged[fn_hash] = (user, len(body))
        self.quotas.charge(user, 0, len(body))
        self.store.add_function(fn_hash, body)

    def release(self, fn_hash: bytes) -> None:
        """A task using it finished: after the last one the body is kept for
        ``grace`` seconds (:meth:`expire_idle` drops it then)."""
        count = self.refs.get(fn_hash)
        if not count:
            return
        self.refs[fn_hash] = count - 1
        if count == 1:
            self.idle[fn_hash] = time.monotonic()
            if self.grace <= 0:
                self.expire_idle(self.idle[fn_hash])

    def release_all(self, fn_hashes: Iterable[bytes]) -> None:
        """:meth:`release` for each of these (a function once per task)."""
        refs = self.refs
        for fn_hash in fn_hashes:
            count = refs.get(fn_hash)
            if count is not None and count > 1:
                refs[fn_hash] = count - 1
            else:
                self.release(fn_hash)

    def expire_idle(self, now: float) -> None:
        """Drop the bodies whose last task finished ``grace`` seconds before
        ``now`` (a time.monotonic()); the relay calls this now and then."""
        due = [fn_hash for fn_hash, since in self.idle.items() if now - since >= self.grace]
        for fn_hash in due:
            self._drop(fn_hash)

    def _drop(self, fn_hash: bytes) -> None:
        del self.idle[fn_hash]
        del self.refs[fn_hash]
        self.bodies.pop(fn_hash, None)
        user, size = self.charged.pop(fn_hash, ("", 0))
        self.quotas.release(user, 0, size)
        self.store.delete_function(fn_hash)

    def recover(self, users_by_function: dict[bytes, list[str]]) -> None:
        """After a restart: counts from the unfinished tasks (the users of
        each function, oldest first: the first is charged), sizes from the
        record, and bodies no task uses any more deleted."""
        sizes = self.store.function_sizes()
        for fn_hash, users in users_by_function.items():
            size = sizes.get(fn_hash)
            if size is None:
                continue   # lost from the record: its tasks are refused when dispatched
            self.refs[fn_hash] = len(users)
            self.charged[fn_hash] = (users[0], size)
            self.quotas.charge(users[0], 0, size)
        for fn_hash in sizes.keys() - self.refs.keys():
            self.store.delete_function(fn_hash)
