"""A relay's record kept in memory only, for a relay that dies with its program.

The embedded default's relay (``FederatedExecutor()`` with nothing
configured: embedded.py, colocated.py) has one client, the program that
started it, and is killed with it: after a crash there is nobody to send its
tasks again to, and its directory is removed when it stops. A durable record
buys it nothing, and writing one was half of its relay's busy time in a
no-op ``map`` (each task INSERTed, UPDATEd with its result and DELETEd on
acknowledgement on a second thread: benchmarks/results/
profile-thru-s24-2026-12-01.md). :class:`MemoryStore` offers what the relay
reads back from :class:`~fedexec.relay.store.RelayStore` (function bodies,
task outcomes, memoized results, the Client API's listings, registered
functions, deleted endpoints) from dictionaries, within the process's life.

A write is "committed" as soon as it is made: :meth:`MemoryStore.flush`
returns a sequence number :attr:`MemoryStore.committed_seq` already equals,
so the relay sends ACCEPTED and the endpoint's ACKs at the end of the turn
that made them. Nothing is written to disk: no thread, no file, no SQL.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .. import protocol as P
from .store import FINISHED, KEPT, PENDING, RelayStore, restored_options, take_owned, take_results

# a task's row: list indexes (one list per task; mutated in place by results)
_CLIENT, _ENDPOINT, _FN, _KIND, _PYTHON, _ARGS, _STATE, _SUBMITTED, _STATUS, _RESULT, _FINISHED, _USER, \
    _OPTIONS = range(13)


def _as_bytes(blob: Any) -> bytes | None:
    """A stored blob (bytes, or a buffer it arrived in) as bytes, as SQLite gives it back."""
    return None if blob is None else bytes(blob)


class MemoryStore:
    """The relay's record in dictionaries: the interface of RelayStore, no durability.

    Every method is called from the relay's loop thread only (there is no
    writer thread), so no lock is needed."""

    def __init__(self, data_dir: Path, commit_window: float = 0.0, keep_acknowledged: bool = False) -> None:
        """``data_dir`` is only named (:attr:`path`, in log lines); nothing is
        written there. ``commit_window`` is accepted for RelayStore's
        signature and unused: nothing waits for a disk."""
        if not 0 <= commit_window <= 1:
            raise ValueError(f"commit_window must be between 0 and 1 second, not {commit_window!r}")
        self.commit_window = commit_window
        self.path = Path(data_dir) / "(memory)"
        self.keep_acknowledged = keep_acknowledged
        self._functions: dict[bytes, bytes] = {}
        self._endpoints: dict[str, tuple[Any, ...]] = {}
        # task id -> row (see the indexes above), in submission order
        self._tasks: dict[bytes, list[Any]] = {}
        self._last_submitted = 0.0
        self._memo: dict[bytes, tuple[Any, float, str]] = {}   # key -> (result, created, user)
        self._registered: dict[tuple[str, bytes], tuple[Any, ...]] = {}
        self._deleted: dict[str, tuple[str, float]] = {}
        # as RelayStore's: whose each finished, unacknowledged (or kept) task
        # is; in the order they finished (or were acknowledged), which expiry uses
        self.finished_owners: dict[bytes, str] = {}
        self.kept_owners: dict[bytes, str] = {}
        self.backlog = 0          # nothing is ever waiting for a writer
        self._seq = 0
        self.committed_seq = 0
        # the relay's loop polls this: nothing is ever written to it
        self.commit_fd, self._commit_w = os.pipe()
        os.set_blocking(self.commit_fd, False)

    # -- writes (take effect at once) ----------------------------------------
    def add_function(self, fn_hash: bytes, body: bytes) -> None:
        self._functions.setdefault(fn_hash, body)

    def delete_function(self, fn_hash: bytes) -> None:
        """Forget a function body (no unfinished task uses it any more)."""
        self._functions.pop(fn_hash, None)

    def add_task(self, task_id: bytes, client: bytes, endpoint: str, fn_hash: bytes,
                 kind: int, python: str, args: Any, user: str, options: bytes | None = None) -> None:
        """(an id the record holds stays its user's, as RelayStore's INSERT OR IGNORE)"""
        if task_id not in self._tasks:
            # never earlier than the task before (the clock may step back): rows stay in the order
            # of their times, which list_tasks relies on to stop early
            submitted = self._last_submitted = max(time.time(), self._last_submitted)
            self._tasks[task_id] = [client, endpoint, fn_hash, kind, python, args, PENDING, submitted,
                                    None, None, None, user, options]

    def add_result(self, task_id: bytes, status: int, blob: Any, user: str) -> None:
        """``user``'s task finished (its id stays theirs until acknowledged)."""
        row = self._tasks.get(task_id)
        if row is not None and row[_USER] == user:   # only the row of the result's user
            row[_ARGS] = None
            row[_STATE], row[_STATUS], row[_RESULT], row[_FINISHED] = FINISHED, status, blob, time.time()
        self.finished_owners[task_id] = user

    def add_memo(self, key: bytes, result: Any, user: str, created: float) -> None:
        """Keep a memoized result of ``user``'s (replacing an expired one)."""
        self._memo[key] = (result, created, user)

    def acknowledge(self, task_ids: Iterable[bytes], user: str) -> list[bytes]:
        """Forget (with keep_acknowledged: keep, as KEPT) these finished tasks
        of ``user``; the ids it did. Others' and unknown ids are ignored."""
        known = take_owned(self.finished_owners, task_ids, user)
        tasks = self._tasks
        if self.keep_acknowledged:
            kept = self.kept_owners
            for task_id in known:
                kept[task_id] = user
                row = tasks.get(task_id)
                if row is not None:
                    row[_STATE] = KEPT
        else:
            for task_id in known:
                tasks.pop(task_id, None)
        return known

    def delete_results(self, task_ids: Iterable[bytes], user: str) -> tuple[list[bytes], list[bytes]]:
        """Forget these results of ``user`` for good, acknowledged (KEPT) or
        not: the ids of the unacknowledged ones and of the kept ones it forgot."""
        unacked, was_kept = take_results(self.finished_owners, self.kept_owners, task_ids, user)
        for task_id in (*unacked, *was_kept):
            self._tasks.pop(task_id, None)
        return unacked, was_kept

    owner_of = RelayStore.owner_of   # (the same two dictionaries)

    def save_endpoint(self, endpoint_id: str, name: str, python: str, workers: int, owner: str,
                      access: bytes) -> None:
        now = time.time()
        first = self._endpoints.get(endpoint_id)
        self._endpoints[endpoint_id] = (endpoint_id, name, python, workers, first[4] if first else now, now,
                                        owner, access)

    def register_function(self, user: str, fn_hash: bytes, body: bytes, name: str, description: str,
                          public: bool) -> None:
        self._registered[(user, fn_hash)] = (user, body, name, description, int(public), time.time())

    def unregister_function(self, user: str, fn_hash: bytes) -> None:
        self._registered.pop((user, fn_hash), None)

    def delete_endpoint(self, endpoint_id: str, owner: str) -> None:
        """Forget an endpoint for good; its id is kept as deleted."""
        self._endpoints.pop(endpoint_id, None)
        self._deleted.pop(endpoint_id, None)
        self._deleted[endpoint_id] = (owner, time.time())

    def expire_results(self, older_than: float) -> None:
        """Forget memoized results and results nobody fetched (or kept ones)
        finished before ``older_than`` (a time.time()). The owner maps are in
        the order tasks finished (or were acknowledged), so this stops at the
        first younger one: it costs what it expires, not the record's size."""
        for key in [key for key, (_, created, _) in self._memo.items() if created < older_than]:
            del self._memo[key]
        tasks = self._tasks
        for owners in (self.finished_owners, self.kept_owners):
            old = []
            for task_id, user in owners.items():
                row = tasks.get(task_id)
                if row is not None and row[_FINISHED] is not None and row[_FINISHED] >= older_than:
                    break
                old.append((task_id, user))
            for task_id, user in old:
                del owners[task_id]
                row = tasks.get(task_id)
                if row is not None and row[_USER] == user:
                    del tasks[task_id]

    # -- commits (there is nothing to wait for) --------------------------------
    def flush(self) -> int:
        """A sequence number, already committed."""
        self._seq += 1
        self.committed_seq = self._seq
        return self._seq

    def hurry(self) -> None:
        """(RelayStore's: here every flush is committed already.)"""

    def sync(self, timeout: float = 30.0) -> bool:
        """Always True at once: everything is recorded when it is made."""
        self.flush()
        return True

    def drain_commit_notices(self) -> None:
        """Nothing to drain (no writer writes to the commit pipe)."""

    # -- reads -------------------------------------------------------------------
    def function_body(self, fn_hash: bytes) -> bytes | None:
        return _as_bytes(self._functions.get(fn_hash))

    def function_sizes(self) -> dict[bytes, int]:
        return {fn_hash: len(body) for fn_hash, body in self._functions.items()}

    def read_blob(self, task_id: bytes, what: str, user: str) -> bytes | None:
        """A task's arguments or result, if ``user``'s."""
        row = self._tasks.get(task_id)
        if row is None or row[_USER] != user:
            return None
        return _as_bytes(row[_ARGS] if what == "args" else row[_RESULT])

    def _results_in(self, owners: dict[bytes, str]) -> Iterator[tuple[bytes, str, int, float]]:
        tasks = self._tasks
        for task_id, user in owners.items():
            row = tasks.get(task_id)
            if row is not None:
                yield task_id, user, len(row[_RESULT] or b""), row[_FINISHED] or 0.0

    def unacknowledged_results(self) -> Iterator[tuple[bytes, str, int, float]]:
        """``(task id, user, bytes, finished)`` of every result not yet acknowledged."""
        yield from list(self._results_in(self.finished_owners))

    def kept_results(self) -> Iterator[tuple[bytes, str, int, float]]:
        """``(task id, user, bytes, finished)`` of every KEPT result."""
        yield from list(self._results_in(self.kept_owners))

    def memo_keys(self) -> set[bytes]:
        return set(self._memo)

    def memo_entries(self) -> Iterator[tuple[bytes, str, int, float]]:
        """``(key, user, bytes, created)`` of every memoized result, oldest first."""
        entries = sorted(self._memo.items(), key=lambda item: item[1][1])
        yield from [(key, user, len(result), created) for key, (result, created, user) in entries]

    def memo_result(self, key: bytes) -> bytes | None:
        entry = self._memo.get(key)
        return None if entry is None else _as_bytes(entry[0])

    def endpoints(self) -> Iterator[tuple[str, str, str, int, float, str | None, bytes | None]]:
        yield from [(e[0], e[1], e[2], e[3], e[5], e[6], e[7]) for e in self._endpoints.values()]

    def pending_tasks(self) -> Iterator[tuple[Any, ...]]:
        """Tasks accepted but not finished, oldest first:
        (id, client, endpoint, fn_hash, kind, python, user, args, options)."""
        rows = [(task_id, row) for task_id, row in self._tasks.items() if row[_STATE] == PENDING]
        for task_id, row in rows:
            yield (task_id, row[_CLIENT], row[_ENDPOINT], row[_FN], row[_KIND], row[_PYTHON], row[_USER],
                   _as_bytes(row[_ARGS]), restored_options(row[_OPTIONS]))

    def known_tasks(self, task_ids: list[bytes]) -> set[bytes]:
        tasks = self._tasks
        return {task_id for task_id in task_ids if task_id in tasks}

    def task_outcome(self, task_id: bytes) -> tuple[int, int | None, bytes | None, str] | None:
        """``(state, status, result, user)`` of a task, None if unknown. The caller checks ``user``."""
        row = self._tasks.get(task_id)
        if row is None:
            return None
        return row[_STATE], row[_STATUS], _as_bytes(row[_RESULT]), row[_USER]

    def result_references(self) -> Iterator[tuple[bytes, str, bytes]]:
        """``(task id, user, reference)`` of every stored result that is a reference to an upload."""
        from ..transfer import MAX_REF, REF_MAGIC

        found = []
        for task_id, row in self._tasks.items():
            result = row[_RESULT]
            if row[_STATE] in (FINISHED, KEPT) and row[_STATUS] == P.OK and result is not None \
                    and len(result) <= MAX_REF and bytes(result[:len(REF_MAGIC)]) == REF_MAGIC:
                found.append((task_id, row[_USER], bytes(result)))
        yield from found

    def task_summaries(self, task_ids: list[bytes], user: str) -> dict[bytes, tuple[Any, ...]]:
        """``{task id: (endpoint, state, status, submitted, finished)}`` of these tasks of ``user``."""
        found = {}
        for task_id in task_ids:
            row = self._tasks.get(task_id)
            if row is not None and row[_USER] == user:
                found[task_id] = (row[_ENDPOINT], row[_STATE], row[_STATUS], row[_SUBMITTED], row[_FINISHED])
        return found

    def list_tasks(self, user: str, *, endpoint: str | None, since: float | None, states: tuple[int, ...] | None,
                   statuses: tuple[int, ...] | None, before: tuple[float, bytes] | None,
                   limit: int) -> list[tuple[Any, ...]]:
        """As RelayStore.list_tasks: newest first, ``limit`` at most. The
        tasks are held in submission order, so this reads them newest first
        and stops once it has ``limit`` and the rest are older (rows read:
        the page, plus those it skips), not the whole record."""
        found: list[tuple[Any, ...]] = []
        for task_id, row in reversed(self._tasks.items()):
            submitted = row[_SUBMITTED]
            if len(found) >= limit and submitted < found[-1][4]:
                break   # (ties with the last one taken are still read: they sort by id)
            if row[_USER] != user or (endpoint is not None and row[_ENDPOINT] != endpoint):
                continue
            if since is not None and submitted < since:
                break   # (the rest are older still)
            if states is not None and row[_STATE] not in states:
                continue
            if statuses is not None and row[_STATUS] not in statuses:
                continue
            if before is not None and not (submitted < before[0] or (submitted == before[0]
                                                                     and task_id < before[1])):
                continue
            found.append((task_id, row[_ENDPOINT], row[_STATE], row[_STATUS], submitted, row[_FINISHED]))
        found.sort(key=lambda found_row: (found_row[4], found_row[0]), reverse=True)
        return found[:limit]

    def registered_function(self, fn_hash: bytes, user: str) -> tuple[Any, ...] | None:
        """``(owner, body, name, description, public, created)`` of a function
        ``user`` registered, or another user registered as public; else None."""
        own = self._registered.get((user, fn_hash))
        if own is not None:
            return own
        public = [entry for (owner, found), entry in self._registered.items() if found == fn_hash and entry[4]]
        return min(public, key=lambda entry: entry[0]) if public else None

    def registered_sizes(self) -> Iterator[tuple[str, bytes, int]]:
        yield from [(user, fn_hash, len(entry[1])) for (user, fn_hash), entry in self._registered.items()]

    def deleted_endpoints(self) -> Iterator[tuple[str, str]]:
        """``(id, owner)`` of every deleted endpoint, oldest first."""
        yield from [(endpoint_id, owner) for endpoint_id, (owner, _) in self._deleted.items()]

    def close(self) -> None:
        os.close(self.commit_fd)
        os.close(self._commit_w)


#: a relay's record, either kind (what Relay.store is)
Record = RelayStore | MemoryStore
