"""The relay's durable record: functions, endpoints, tasks and results in SQLite.

Writes are collected during the relay loop's turns and handed by
:meth:`RelayStore.flush` to a writer thread, which commits whatever has
gathered in one transaction (group commit). SQLite releases the GIL while it
writes, so the loop keeps routing meanwhile and the hot path pays one
transaction per few milliseconds, not one per task or per turn. Blobs are
stored as the opaque bytes they arrived as.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from operator import itemgetter
from pathlib import Path
from typing import Any, Iterable, Iterator

import msgpack

from .. import protocol as P
from ..private import create_private_file, private_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
    hash BLOB PRIMARY KEY,
    body BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS endpoints (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    python TEXT NOT NULL,
    workers INTEGER NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    owner TEXT,
    access BLOB
);
CREATE TABLE IF NOT EXISTS memo (
    key BLOB PRIMARY KEY,
    result BLOB NOT NULL,
    created REAL NOT NULL,
    user TEXT NOT NULL DEFAULT ''
);
"""
# Tasks in SQLite's rowid order (their order of arrival) with a unique index
# on their ids: a new row goes at the end of the table, a result into a page
# the rows arrived with, and only the index (~40 bytes an id) takes random
# ids. (Keyed by id, WITHOUT ROWID, every insert, result and acknowledgement
# wrote a random page of the whole table: 2-3x the writer's time per task.)
TASKS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    id BLOB NOT NULL,
    client BLOB NOT NULL,
    endpoint TEXT NOT NULL,
    fn_hash BLOB NOT NULL,
    kind INTEGER NOT NULL,
    python TEXT NOT NULL,
    args BLOB,
    state INTEGER NOT NULL,
    submitted REAL NOT NULL,
    status INTEGER,
    result BLOB,
    finished REAL,
    args_file INTEGER NOT NULL DEFAULT 0,
    result_file INTEGER NOT NULL DEFAULT 0,
    user TEXT NOT NULL DEFAULT 'local',
    options BLOB
);
"""
TASKS_COLUMNS = ("id, client, endpoint, fn_hash, kind, python, args, state, submitted, status, result, finished, "
                 "args_file, result_file, user, options")
TASKS_BY_ID = "CREATE UNIQUE INDEX IF NOT EXISTS tasks_by_id ON tasks (id)"
# The Client API (relay/inspect.py): a user's tasks by submission time, for
# listing them; functions registered by a user (register_function), kept
# until deleted, bodies as the opaque bytes they came as.
TASKS_BY_USER = "CREATE INDEX IF NOT EXISTS tasks_by_user ON tasks (user, submitted)"
REGISTERED_SCHEMA = """
CREATE TABLE IF NOT EXISTS registered (
    user TEXT NOT NULL,
    hash BLOB NOT NULL,
    body BLOB NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    public INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (user, hash)
);
"""

# Endpoints their owners deleted (relay/deregister.py): their ids are never
# registered again, by anyone.
DELETED_SCHEMA = """
CREATE TABLE IF NOT EXISTS deleted_endpoints (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    deleted REAL NOT NULL
);
"""

log = logging.getLogger("fedexec.relay.store")

# Seconds the writer waits for more writes to join a transaction. No round
# trip waits for a commit: what does are ACCEPTED and ACK notices, which only
# free memory (relay/notices.py), answers to RESUMEs of tasks whose result
# is on its way to disk, and the release of large uploads (bulk.py: the
# relay asks for that commit at once, hurry()); reads of the record commit
# at once too (sync()). At 10 ms rather than 2, a task whose
# round trip straddles fewer commits is more often never written, and
# sequential round trips through a started relay cost its writer ~55 us of
# CPU each rather than ~150 (2 cores).
GROUP_COMMIT_WINDOW = 0.010
# Seconds between attempts to write batches whose commit failed (_commit_failed).
COMMIT_RETRY = 1.0
# Blobs this large go to files beside the database (one write, no B-tree
# pages, the GIL released), with only a flag in SQLite.
FILE_BLOB = 64 * 1024
# The writer's page cache (KiB) and WAL pages between checkpoints (_connect_writer).
WRITER_CACHE_KIB = 16 * 1024
WRITER_CHECKPOINT_PAGES = 16384

# task states in the store
PENDING = 0   # accepted, not finished (queued or out at an endpoint)
FINISHED = 1  # has a result (or failure, or cancellation) not yet acknowledged
KEPT = 2      # acknowledged by its client, kept readable until it expires or its user deletes it
              # (a relay started with keep_acknowledged: relay/retained.py)


def take_owned(owners: dict[bytes, str], task_ids: Iterable[bytes], user: str) -> list[bytes]:
    """Remove from ``owners`` the ids among ``task_ids`` that are ``user``'s;
    those ids (another user's, or unknown ones, are left alone)."""
    taken = []
    for task_id in task_ids:
        if owners.get(task_id) == user:
            del owners[task_id]
            taken.append(task_id)
    return taken


def take_results(finished: dict[bytes, str], kept: dict[bytes, str], task_ids: Iterable[bytes],
                 user: str) -> tuple[list[bytes], list[bytes]]:
    """Remove ``user``'s ids among ``task_ids`` from ``finished`` (results not
    acknowledged) or else from ``kept``; the ids taken from each."""
    unacked, was_kept = [], []
    for task_id in task_ids:
        if finished.get(task_id) == user:
            del finished[task_id]
            unacked.append(task_id)
        elif kept.get(task_id) == user:
            del kept[task_id]
            was_kept.append(task_id)
    return unacked, was_kept


def _row_count(batch: tuple[list, ...]) -> int:
    """Task, result, acknowledgement and kept rows in a handed batch."""
    return len(batch[2]) + len(batch[3]) + len(batch[4]) + len(batch[6])


class RelayStore:
    """SQLite-backed record with write batching; one instance per relay process."""

    def __init__(self, data_dir: Path, commit_window: float = GROUP_COMMIT_WINDOW,
                 keep_acknowledged: bool = False) -> None:
        """``commit_window``: the seconds the writer waits, once woken, for
        more writes to join its transaction (embedded.py's is longer).
        ``keep_acknowledged``: an acknowledged result stays (state KEPT) until
        it expires or :meth:`delete_results` (relay/retained.py bounds them)."""
        if not 0 <= commit_window <= 1:
            raise ValueError(f"commit_window must be between 0 and 1 second, not {commit_window!r}")
        self.commit_window = commit_window
        # private whatever the umask (also when used as a library): the
        # record holds every user's arguments and results
        private_dir(data_dir)
        self.path = data_dir / "relay.sqlite3"
        self.blob_dir = private_dir(data_dir / "blobs")
        for path in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            if path == self.path or path.exists():   # SQLite makes the WAL and SHM with the db file's mode
                create_private_file(path)
        self.db = self._connect()           # reads, from the relay's loop
        self.db.executescript(SCHEMA)
        self._upgrade()
        self.db.executescript(REGISTERED_SCHEMA)
        self.db.executescript(DELETED_SCHEMA)
        if keep_acknowledged:   # a relay for many clients, which list their tasks (the embedded one's
            self.db.execute(TASKS_BY_USER)   # writer is spared the index: its one client lists none)
        self.keep_acknowledged = keep_acknowledged
        self._writer_db = self._connect_writer()   # writes, from the writer thread
        self._new_functions: list[tuple[bytes, bytes, float]] = []
        self._new_tasks: list[tuple[Any, ...]] = []
        self._results: list[tuple[Any, ...]] = []
        self._acked: list[tuple[bytes, str]] = []
        self._kept: list[tuple[bytes, str]] = []   # acknowledged, kept (keep_acknowledged)
        self._endpoints: dict[str, tuple[Any, ...]] = {}
        self._memo: list[tuple[bytes, bytes, float, str]] = []
        self._handed: list[tuple[list, ...]] = []
        # the blobs kept in files, (task id, "args"|"result") -> file name, so
        # that only those are unlinked and most rows (no file) cost a set
        # look-up, not a path (writer thread; read from the directory here)
        self._files: dict[tuple[bytes, str], str] = {}
        for entry in self.blob_dir.iterdir():
            stem, _, what = entry.name.partition(".")
            try:
                self._files[(bytes.fromhex(stem.rpartition("-")[2]), what)] = entry.name
            except ValueError:
                continue
        # Whose each finished, unacknowledged task is (its id is bound to its
        # user until then): so that the relay refuses another user's
        # submission of that id without asking SQLite. Kept by add_result and
        # acknowledge (the relay's loop) and expiry (the writer).
        # Whose each KEPT task is, oldest acknowledged first (the same for ids
        # as finished_owners; the writer's expiry removes entries too).
        # Both are read in one pass over the record (_read_results), which
        # also keeps the rows for the restart's first unacknowledged_results()
        # and kept_results().
        self._restart_results = self._read_results()
        self.finished_owners: dict[bytes, str] = {
            row[0]: row[1] for row in self._restart_results[FINISHED]}
        self.kept_owners: dict[bytes, str] = {row[0]: row[1] for row in self._restart_results[KEPT]}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._urgent = threading.Event()   # cuts the writer's window short (sync)
        self._closing = False
        self._expire_before: float | None = None
        self.backlog = 0              # rows handed to the writer and not yet committed
        self._seq = 0                 # numbers the batches handed to the writer
        self.committed_seq = 0        # the newest batch known to be committed
        self.failed_commits = 0       # attempts in a row that could not write the oldest batches
        # the writer writes a byte here after each commit, so the relay's
        # poll loop wakes to send what waited for it
        self.commit_fd, self._commit_w = os.pipe()
        os.set_blocking(self.commit_fd, False)
        self._writer = threading.Thread(target=self._write_loop, name="relay-store-writer", daemon=True)
        self._writer.start()

    def _upgrade(self) -> None:
        """Bring a record written by an older fedexec up to date: add the
        columns it lacks, and (``PRAGMA user_version``) drop what the newer
        rules make unreachable."""
        self._upgrade_tasks_layout()
        self.db.execute(TASKS_TABLE.format(name="tasks"))   # (a new record's, in arrival order)
        self.db.execute(TASKS_BY_ID)
        for table, column, kind in (("endpoints", "owner", "TEXT"), ("endpoints", "access", "BLOB"),
                                    ("tasks", "user", "TEXT NOT NULL DEFAULT 'local'"),
                                    ("tasks", "options", "BLOB"),
                                    ("memo", "user", "TEXT NOT NULL DEFAULT ''")):
            columns = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version < 1:
            # memo keys were the client's (function and arguments only), for
            # any user: the relay now keys them by scope (user and endpoint)
            self.db.execute("DELETE FROM memo")
            self.db.execute("PRAGMA user_version=1")
        if version < 2:
            # blob files were named by task id alone: now by user and id
            users = dict(self.db.execute("SELECT id, user FROM tasks"))
            for entry in self.blob_dir.iterdir():
                stem, _, what = entry.name.partition(".")
                try:
                    task_id = bytes.fromhex(stem)
                except ValueError:
                    continue   # named the new way already
                if task_id in users:
                    entry.rename(self._blob_path(task_id, what, users[task_id]))
                else:
                    entry.unlink()   # no task of the record's
            self.db.execute("PRAGMA user_version=2")

    def _upgrade_tasks_layout(self) -> None:
        """A record written before tasks were kept in arrival order (keyed by
        id, WITHOUT ROWID, and lacking columns added since): its rows copied,
        oldest first, into the table as it is now, in one transaction."""
        row = self.db.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name='tasks'").fetchone()
        if row is None or "WITHOUT ROWID" not in row[0].upper():
            return
        old = {column[1] for column in self.db.execute("PRAGMA table_info(tasks)")}
        wanted = [c.strip() for c in TASKS_COLUMNS.split(",")]
        copied = ", ".join(c for c in wanted if c in old)
        started = time.monotonic()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("DROP TABLE IF EXISTS tasks_layout")
            self.db.execute(TASKS_TABLE.format(name="tasks_layout"))
            self.db.execute(f"INSERT INTO tasks_layout ({copied}) SELECT {copied} FROM tasks ORDER BY submitted")
            self.db.execute("DROP TABLE tasks")
            self.db.execute("ALTER TABLE tasks_layout RENAME TO tasks")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        log.info("the record's tasks now kept in arrival order (%.1f s)", time.monotonic() - started)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _connect_writer(self) -> sqlite3.Connection:
        """The writer thread's connection: a page cache that holds the pages
        a busy record keeps touching (the default's 2 MiB made every result
        and acknowledgement read its row's page again), and checkpoints
        every WRITER_CHECKPOINT_PAGES pages of WAL rather than every 1,000,
        so a page written by many commits is copied back once. Neither
        changes what a commit promises (WAL, synchronous=NORMAL: on disk
        when the process dies, not necessarily when the power goes); a
        larger WAL only takes longer to read back after a crash."""
        db = self._connect()
        db.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
        db.execute(f"PRAGMA wal_autocheckpoint={WRITER_CHECKPOINT_PAGES}")
        db.execute(f"PRAGMA journal_size_limit={WRITER_CHECKPOINT_PAGES * 4096}")   # the WAL file shrinks back to it
        return db

    # -- writes, buffered until flush() ------------------------------------
    def add_function(self, fn_hash: bytes, body: bytes) -> None:
        self._new_functions.append((fn_hash, body, time.time()))

    def delete_function(self, fn_hash: bytes) -> None:
        """Forget a function body (no unfinished task uses it any more)."""
        self._new_functions.append((fn_hash, None, 0.0))

    def add_task(self, task_id: bytes, client: bytes, endpoint: str, fn_hash: bytes,
                 kind: int, python: str, args: Any, user: str, options: bytes | None = None) -> None:
        """(``options``: the task options that shape its run, :func:`durable_options`)"""
        self._new_tasks.append((task_id, client, endpoint, fn_hash, kind, python, args, PENDING, time.time(),
                                user, options))

    def add_result(self, task_id: bytes, status: int, blob: Any, user: str) -> None:
        """``user``'s task finished (its id stays theirs until acknowledged)."""
        self._results.append((FINISHED, status, blob, time.time(), task_id, user))
        self.finished_owners[task_id] = user

    def _blob_path(self, task_id: bytes, what: str, user: str) -> Path:
        """A blob's file, named by its user (a hash: any name is safe) and
        task id, so that no task's file is ever another user's."""
        tag = hashlib.sha256(user.encode()).hexdigest()[:16]
        return self.blob_dir / f"{tag}-{task_id.hex()}.{what}"

    def _to_file(self, task_id: bytes, what: str, blob: Any, user: str) -> None:
        path = self._blob_path(task_id, what, user)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        self._files[(task_id, what)] = path.name

    def _spill(self, task_id: bytes, what: str, blob: Any, user: str) -> tuple[Any, int]:
        """``(blob, 0)`` to keep in the row, or ``(None, 1)`` once a large
        blob is written to its file instead."""
        if blob is None or len(blob) < FILE_BLOB:
            return blob, 0
        self._to_file(task_id, what, blob, user)
        return None, 1

    def _drop_file(self, task_id: bytes, what: str, user: str) -> None:
        if (task_id, what) not in self._files:
            return   # the common case: the blob was kept in its row
        path = self._blob_path(task_id, what, user)
        if self._files.get((task_id, what)) == path.name:
            del self._files[(task_id, what)]
            path.unlink(missing_ok=True)

    def read_blob(self, task_id: bytes, what: str, user: str) -> bytes | None:
        try:
            return self._blob_path(task_id, what, user).read_bytes()
        except OSError:
            return None

    def add_memo(self, key: bytes, result: Any, user: str, created: float) -> None:
        """Keep a memoized result produced by a task of ``user`` (charged to
        them) until it expires with the results nobody fetched. The relay
        stores a key only when it holds none under it (an expired one may
        still be here: it is replaced)."""
        self._memo.append((key, result, created, user))

    def acknowledge(self, task_ids: Iterable[bytes], user: str) -> list[bytes]:
        """Forget these finished tasks of ``user`` (with keep_acknowledged:
        keep them, as KEPT); the ids it did forget.
        Others' ids and ids it does not know as ``user``'s finished tasks
        are dropped here, never queued for the writer: a flood of junk ACKs
        cannot fill the writer's backlog (which pauses dispatch for all)."""
        known = take_owned(self.finished_owners, task_ids, user)
        if self.keep_acknowledged:
            kept = self.kept_owners
            for task_id in known:
                kept[task_id] = user
            self._kept.extend((t, user) for t in known)
        else:
            self._acked.extend((t, user) for t in known)
        return known

    def delete_results(self, task_ids: Iterable[bytes], user: str) -> tuple[list[bytes], list[bytes]]:
        """Forget these results of ``user`` for good, acknowledged (KEPT) or
        not: the ids of the unacknowledged ones and of the kept ones it
        forgot (others' and unknown ids are ignored, as :meth:`acknowledge` does)."""
        unacked, was_kept = take_results(self.finished_owners, self.kept_owners, task_ids, user)
        self._acked.extend((t, user) for t in (*unacked, *was_kept))
        return unacked, was_kept

    def owner_of(self, task_id: bytes) -> str | None:
        """The user a finished task of the record (unacknowledged, or kept) belongs to."""
        owner = self.finished_owners.get(task_id)
        return owner if owner is not None else self.kept_owners.get(task_id)

    def save_endpoint(self, endpoint_id: str, name: str, python: str, workers: int, owner: str,
                      access: bytes) -> None:
        now = time.time()
        self._endpoints[endpoint_id] = (endpoint_id, name, python, workers, now, now, owner, access)

    def flush(self) -> int:
        """Hand everything buffered since the last flush to the writer thread;
        the number to compare with :attr:`committed_seq` to know it is on disk."""
        if self._restart_results:   # the restart's rows are read by now, or never will be
            self._restart_results = {}
        if not (self._new_functions or self._new_tasks or self._results or self._acked or self._endpoints
                or self._memo or self._kept):
            return self._seq
        batch = (self._new_functions, list(self._endpoints.values()), self._new_tasks, self._results, self._acked,
                 self._memo, self._kept)
        self._new_functions, self._new_tasks, self._results, self._acked, self._memo = [], [], [], [], []
        self._kept = []
        self._endpoints = {}
        rows = _row_count(batch)
        with self._lock:
            self._seq += 1
            self._handed.append((self._seq, batch))
            self.backlog += rows
        self._wake.set()
        return self._seq

    def hurry(self) -> None:
        """Have the writer commit what it was handed without waiting out
        its window (the caller does not wait for it: see :meth:`sync`)."""
        self._urgent.set()

    def sync(self, timeout: float = 30.0) -> bool:
        """(Rare paths: a read of what was just recorded) flush, have the
        writer commit at once rather than at the end of its window, and wait
        until it has; whether it did within ``timeout`` seconds."""
        seq = self.flush()
        if self.committed_seq >= seq:
            return True
        self.hurry()
        deadline = time.monotonic() + timeout
        while self.committed_seq < seq:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.0005)
        return True

    def drain_commit_notices(self) -> None:
        """Empty the commit pipe (the relay loop, after it woke on it)."""
        try:
            while os.read(self.commit_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def _write_loop(self) -> None:
        while True:
            self._wake.wait()
            if not self._closing and self.commit_window:
                self._urgent.wait(self.commit_window)  # let more writes join this transaction
            with self._lock:
                batches, self._handed = self._handed, []
                self._wake.clear()
                self._urgent.clear()
                closing = self._closing
            if batches:
                try:
                    self._commit([batch for _, batch in batches])
                except Exception:
                    self._commit_failed(batches, closing)
                else:
                    if self.failed_commits:
                        log.warning("wrote the record again (%s) after %d failed attempt(s)", self.path,
                                    self.failed_commits)
                        self.failed_commits = 0
                    self.committed_seq = batches[-1][0]
                    with self._lock:
                        self.backlog -= sum(_row_count(batch) for _, batch in batches)
                    try:
                        os.write(self._commit_w, b"c")
                    except (BlockingIOError, OSError):
                        pass  # the pipe is full of notices already, or closed
            expire, self._expire_before = self._expire_before, None
            if expire is not None:
                try:
                    self._expire(expire)
                except Exception:
                    log.exception("could not expire old results in %s", self.path)
            if closing:
                return

    def _commit_failed(self, batches: list[tuple[int, tuple]], closing: bool) -> None:
        """Nothing of ``batches`` is on disk (the transaction was rolled
        back: a full disk, an I/O error). They go back to the front of the
        line, to be written again with what follows them after
        COMMIT_RETRY seconds: :attr:`committed_seq` never passes them, so no
        task or result in them is reported stored (ACCEPTED, ACK) before it
        is. (Dropped, a later commit would have passed over them.) A
        closing store gives up: what it could not write is lost with its
        notices, which were never sent."""
        self.failed_commits += 1
        if self.failed_commits == 1 or self.failed_commits % 60 == 0 or closing:
            log.exception("could not write %d batch(es) to %s (attempt %d)%s", len(batches), self.path,
                          self.failed_commits, "; closing, they are lost" if closing else
                          f"; trying again every {COMMIT_RETRY:g} s, nothing after them is reported stored")
        if closing:
            return
        with self._lock:
            self._handed[:0] = batches
        self._urgent.wait(COMMIT_RETRY)   # (close() cuts the pause short)
        self._wake.set()

    def _expire(self, before: float) -> None:
        db = self._writer_db
        memo = db.execute("DELETE FROM memo WHERE created<?", (before,)).rowcount
        if memo > 0:
            log.info("expired %d memoized result(s)", memo)
        old = db.execute("SELECT id, user FROM tasks WHERE state IN (?,?) AND finished<?",
                         (FINISHED, KEPT, before)).fetchall()
        if not old:
            return
        db.execute("BEGIN")
        db.executemany("DELETE FROM tasks WHERE id=? AND user=?", old)
        db.execute("COMMIT")
        for task_id, user in old:
            self._drop_file(task_id, "result", user)
            if self.finished_owners.get(task_id) == user:   # (dict operations are atomic)
                self.finished_owners.pop(task_id, None)
            if self.kept_owners.get(task_id) == user:
                self.kept_owners.pop(task_id, None)
        log.info("expired %d result(s) nobody fetched", len(old))

    def _commit(self, batches: list[tuple[list, ...]]) -> None:
        """Write the batches in one transaction, net of what cancels out: a
        task submitted, finished and acknowledged within the same commit is
        never written; one submitted and finished is inserted finished; one
        finished and acknowledged is only deleted; one finished and kept
        (keep_acknowledged) is updated once, kept."""
        endpoints: list[tuple] = []
        memo: list[tuple] = []
        inserts: dict[bytes, list[Any]] = {}   # new task rows, updated in place by results
        updates: dict[bytes, tuple] = {}       # results for tasks inserted by earlier commits
        deletes: list[tuple[bytes, str]] = []
        kept: dict[tuple[bytes, str], None] = {}   # acknowledged, kept: rows of earlier commits set KEPT
        function_ops: dict[bytes, tuple] = {}   # the last of each function's adds and deletes, in order
        for b_functions, b_endpoints, tasks, results, acked, b_memo, b_kept in batches:
            for op in b_functions:
                function_ops.pop(op[0], None)
                function_ops[op[0]] = op
            endpoints += b_endpoints
            memo += b_memo
            for row in tasks:
                inserts[row[0]] = list(row)
            for state, status, blob, finished, task_id, user in results:
                new = inserts.get(task_id)
                if new is not None and new[9] == user:  # its arguments are no longer needed
                    new[6], new[7] = None, state
                    new.append((status, blob, finished))
                else:
                    updates[task_id] = (state, status, blob, finished, user)
            for ack in acked:
                task_id, user = ack
                new = inserts.get(task_id)
                if new is not None and new[9] == user:
                    del inserts[task_id]
                    continue
                if kept:
                    kept.pop(ack, None)
                update = updates.get(task_id)
                if update is not None and update[4] == user:
                    del updates[task_id]   # its row goes: no result to write into it first
                deletes.append(ack)
            for entry in b_kept:
                new = inserts.get(entry[0])
                if new is not None and new[9] == entry[1]:
                    new[7] = KEPT   # inserted finished (its result is appended) and kept at once
                    continue
                update = updates.get(entry[0])
                if update is not None and update[4] == entry[1]:
                    updates[entry[0]] = (KEPT, *update[1:])   # its result written kept: one UPDATE, not two
                else:
                    kept[entry] = None
        functions = [op for op in function_ops.values() if op[1] is not None]
        dropped_functions = [(op[0],) for op in function_ops.values() if op[1] is None]
        task_rows = []
        spill = self._spill
        for task_id, row in inserts.items():
            args = row[6]
            args_file = 0
            if args is not None and len(args) >= FILE_BLOB:
                row[6], args_file = spill(task_id, "args", args, row[9])
            status = result = finished = None
            result_file = 0
            if len(row) == 12:  # finished in this same commit
                status, result, finished = row.pop()
                if result is not None and len(result) >= FILE_BLOB:
                    result, result_file = spill(task_id, "result", result, row[9])
            task_rows.append((*row, finished, status, result, args_file, result_file))
        update_rows = []
        for task_id, (state, status, blob, finished, user) in updates.items():
            result_file = 0
            if blob is not None and len(blob) >= FILE_BLOB:
                blob, result_file = spill(task_id, "result", blob, user)
            update_rows.append((state, status, blob, finished, result_file, task_id, user))
        db = self._writer_db
        db.execute("BEGIN")
        try:
            if functions:
                db.executemany("INSERT OR IGNORE INTO functions VALUES (?,?,?)", functions)
            if dropped_functions:
                db.executemany("DELETE FROM functions WHERE hash=?", dropped_functions)
            if endpoints:
                db.executemany(
                    "INSERT INTO endpoints VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
                    "name=excluded.name, python=excluded.python, workers=excluded.workers, "
                    "last_seen=excluded.last_seen, owner=excluded.owner, access=excluded.access",
                    endpoints,
                )
            if deletes:   # first: an id acknowledged by its user may be another user's new task
                db.executemany("DELETE FROM tasks WHERE id=? AND user=?", deletes)
            if task_rows:   # an id the record holds stays its user's (the relay refuses it before)
                db.executemany("INSERT OR IGNORE INTO tasks (id, client, endpoint, fn_hash, kind, python, args, "
                               "state, submitted, user, options, finished, status, result, args_file, result_file) "
                               "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", task_rows)
            if update_rows:   # only the row of the result's user: never another user's task
                db.executemany("UPDATE tasks SET state=?, status=?, result=?, finished=?, result_file=?, "
                               "args=NULL WHERE id=? AND user=?", update_rows)
            if kept:   # (after the results they follow)
                db.executemany(f"UPDATE tasks SET state={KEPT} WHERE id=? AND user=? AND state={FINISHED}", kept)
            if memo:
                # the relay stores a key only when it holds none: an older row left is an expired one
                db.executemany("INSERT OR REPLACE INTO memo (key, result, created, user) VALUES (?,?,?,?)", memo)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if self._files:   # (most blobs are kept in their rows: then there is no file to drop)
            for row in update_rows:  # finished: the arguments are no longer needed
                self._drop_file(row[-2], "args", row[-1])
            for task_id, user in deletes:
                self._drop_file(task_id, "args", user)
                self._drop_file(task_id, "result", user)

    # -- reads (startup and rare paths) ------------------------------------
    def function_body(self, fn_hash: bytes) -> bytes | None:
        row = self.db.execute("SELECT body FROM functions WHERE hash=?", (fn_hash,)).fetchone()
        return row[0] if row else None

    def function_sizes(self) -> dict[bytes, int]:
        """The size of every stored function body, by hash (for a restart)."""
        return dict(self.db.execute("SELECT hash, length(body) FROM functions"))

    def _read_results(self) -> dict[int, list[tuple[bytes, str, int, int, int, float]]]:
        """``{FINISHED: rows, KEPT: rows}``, each ``(task id, user, state,
        bytes in the row, result_file, finished)`` oldest finished first:
        every result in the record, in one pass and sorted here. (A restart:
        with no index on state, each query of one state, sorted by SQLite,
        scanned the whole table again; 1M kept rows took a minute.)"""
        rows = self.db.execute(
            "SELECT id, user, state, COALESCE(length(result), 0), result_file, COALESCE(finished, 0) "
            "FROM tasks WHERE state<>?", (PENDING,)).fetchall()
        rows.sort(key=itemgetter(5))
        return {FINISHED: [row for row in rows if row[2] == FINISHED], KEPT: [row for row in rows if row[2] == KEPT]}

    def _results_of(self, state: int, missing_file_size: int | None) -> Iterator[tuple[bytes, str, int, float]]:
        """``(task id, user, bytes, finished)`` of every result in ``state``,
        oldest finished first; one whose file is gone counts
        ``missing_file_size`` bytes (None: it is left out). The first call
        for each state after opening uses the rows read then, while no
        result, acknowledgement or deletion has been recorded since."""
        rows = self._restart_results.pop(state, None)
        if rows is None or self._seq or self._results or self._acked or self._kept:
            rows = self._read_results()[state]
        blob_path = self._blob_path
        for task_id, user, _, size, result_file, finished in rows:
            if result_file:
                try:
                    size = blob_path(task_id, "result", user).stat().st_size
                except OSError:
                    if missing_file_size is None:
                        continue
                    size = missing_file_size
            yield task_id, user, size, finished

    def unacknowledged_results(self) -> Iterator[tuple[bytes, str, int, float]]:
        """``(task id, user, bytes, finished)`` of every result not yet
        acknowledged (for a restart: they count against their user's quota)."""
        return self._results_of(FINISHED, None)

    def memo_keys(self) -> set[bytes]:
        return {row[0] for row in self.db.execute("SELECT key FROM memo")}

    def memo_entries(self) -> Iterator[tuple[bytes, str, int, float]]:
        """``(key, user, bytes, created)`` of every memoized result, oldest
        first (for a restart: they count against their user's quota)."""
        yield from self.db.execute("SELECT key, user, length(result), created FROM memo ORDER BY created")

    def memo_result(self, key: bytes) -> bytes | None:
        row = self.db.execute("SELECT result FROM memo WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def endpoints(self) -> Iterator[tuple[str, str, str, int, float, str | None, bytes | None]]:
        yield from self.db.execute("SELECT id, name, python, workers, last_seen, owner, access FROM endpoints")

    def pending_tasks(self) -> Iterator[tuple[Any, ...]]:
        """Tasks accepted but not finished, oldest first (for a restart):
        (id, client, endpoint, fn_hash, kind, python, user, args, options)."""
        for *row, args, args_file, options in self.db.execute(
                "SELECT id, client, endpoint, fn_hash, kind, python, user, args, args_file, options FROM tasks "
                "WHERE state=? ORDER BY submitted", (PENDING,)):
            if args_file:
                args = self.read_blob(row[0], "args", row[6])
                if args is None:
                    log.error("the arguments of task %s are missing from %s", row[0].hex(), self.blob_dir)
                    continue
            yield (*row, args, restored_options(options))

    def known_tasks(self, task_ids: list[bytes]) -> set[bytes]:
        """Which of these task ids (at most protocol.MAX_ITEMS) the record
        holds, in one query: a flood of unknown ids costs one lookup, not one each."""
        if not task_ids:
            return set()
        marks = ",".join("?" * len(task_ids))
        return {row[0] for row in self.db.execute(f"SELECT id FROM tasks WHERE id IN ({marks})", task_ids)}

    def task_outcome(self, task_id: bytes) -> tuple[int, int | None, bytes | None, str] | None:
        """``(state, status, result, user)`` of a task in the record, None if
        unknown (a rare path: a client resuming after a restart, or
        reattaching). The caller checks ``user``."""
        row = self.db.execute("SELECT state, status, result, result_file, user FROM tasks WHERE id=?",
                              (task_id,)).fetchone()
        if row is None:
            return None
        state, status, result, result_file, user = row
        if result_file:
            result = self.read_blob(task_id, "result", user)
            if result is None:
                return None
        return state, status, result, user

    def kept_results(self) -> Iterator[tuple[bytes, str, int, float]]:
        """``(task id, user, bytes, finished)`` of every KEPT result, oldest
        first (for a restart: they count against their user's byte quota)."""
        return self._results_of(KEPT, 0)

    def result_references(self) -> Iterator[tuple[bytes, str, bytes]]:
        """``(task id, user, reference)`` of every stored result (unacknowledged
        or kept) that is a reference to an upload, a result over 16 MiB (for
        a restart: relay/retained.py holds their uploads again)."""
        from ..transfer import MAX_REF, REF_MAGIC

        yield from self.db.execute(
            "SELECT id, user, result FROM tasks WHERE state IN (?,?) AND status=? AND result_file=0 "
            "AND length(result)<=? AND substr(result,1,?)=?",
            (FINISHED, KEPT, P.OK, MAX_REF, len(REF_MAGIC), REF_MAGIC))

    # -- the Client API's reads (relay/inspect.py; rare, rate-limited paths) --
    def task_summaries(self, task_ids: list[bytes], user: str) -> dict[bytes, tuple[Any, ...]]:
        """``{task id: (endpoint, state, status, submitted, finished)}`` of
        these tasks of ``user`` in the record (at most protocol.MAX_ITEMS
        ids, one query); others' ids are not among them."""
        if not task_ids:
            return {}
        marks = ",".join("?" * len(task_ids))
        return {row[0]: row[1:] for row in self.db.execute(
            f"SELECT id, endpoint, state, status, submitted, finished FROM tasks WHERE user=? AND id IN ({marks})",
            (user, *task_ids))}

    def list_tasks(self, user: str, *, endpoint: str | None, since: float | None, states: tuple[int, ...] | None,
                   statuses: tuple[int, ...] | None, before: tuple[float, bytes] | None,
                   limit: int) -> list[tuple[Any, ...]]:
        """``(id, endpoint, state, status, submitted, finished)`` of at most
        ``limit`` tasks of ``user``, newest first, submitted before the
        cursor ``before`` (``(submitted, id)`` of the last row of the page
        before), on ``endpoint``, since ``since``, in ``states`` with
        ``statuses`` (None: any); one query on the (user, submitted) index."""
        where, params = ["user=?"], [user]
        if endpoint is not None:
            where.append("endpoint=?")
            params.append(endpoint)
        if since is not None:
            where.append("submitted>=?")
            params.append(since)
        if states is not None:
            where.append(f"state IN ({','.join('?' * len(states))})")
            params += states
        if statuses is not None:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            params += statuses
        if before is not None:
            where.append("(submitted<? OR (submitted=? AND id<?))")
            params += [before[0], before[0], before[1]]
        return self.db.execute(f"SELECT id, endpoint, state, status, submitted, finished FROM tasks WHERE "
                               f"{' AND '.join(where)} ORDER BY submitted DESC, id DESC LIMIT ?",
                               (*params, limit)).fetchall()

    def register_function(self, user: str, fn_hash: bytes, body: bytes, name: str, description: str,
                          public: bool) -> None:
        """Keep a function ``user`` registered (written at once: a rare path)."""
        self.db.execute("INSERT OR REPLACE INTO registered VALUES (?,?,?,?,?,?,?)",
                        (user, fn_hash, body, name, description, int(public), time.time()))

    def unregister_function(self, user: str, fn_hash: bytes) -> None:
        """Forget a function ``user`` registered (written at once: a rare path)."""
        self.db.execute("DELETE FROM registered WHERE user=? AND hash=?", (user, fn_hash))

    def registered_function(self, fn_hash: bytes, user: str) -> tuple[Any, ...] | None:
        """``(owner, body, name, description, public, created)`` of a function
        ``user`` registered, or another user registered as public; else None."""
        row = self.db.execute("SELECT user, body, name, description, public, created FROM registered WHERE hash=? "
                              "AND (user=? OR public=1) ORDER BY user=? DESC LIMIT 1",
                              (fn_hash, user, user)).fetchone()
        return tuple(row) if row else None

    def registered_sizes(self) -> Iterator[tuple[str, bytes, int]]:
        """``(user, hash, bytes)`` of every registered function (for a restart: charged to their user)."""
        yield from self.db.execute("SELECT user, hash, length(body) FROM registered")

    def delete_endpoint(self, endpoint_id: str, owner: str) -> None:
        """Forget an endpoint for good (its owner deleted it): its row goes
        and its id is kept as deleted. Everything recorded before (its
        tasks' failures above all) is committed first, then this, at once
        (a rare path), so a relay restarted after the answer no longer knows it."""
        self.sync()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("DELETE FROM endpoints WHERE id=?", (endpoint_id,))
            self.db.execute("INSERT OR REPLACE INTO deleted_endpoints VALUES (?,?,?)",
                            (endpoint_id, owner, time.time()))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def deleted_endpoints(self) -> Iterator[tuple[str, str]]:
        """``(id, owner)`` of every deleted endpoint, oldest first (for a restart)."""
        yield from self.db.execute("SELECT id, owner FROM deleted_endpoints ORDER BY deleted")

    def expire_results(self, older_than: float) -> None:
        """Forget results nobody fetched before ``older_than`` (a time.time())."""
        self._expire_before = older_than
        self._wake.set()

    def close(self) -> None:
        """Write everything handed over so far, then close."""
        self.flush()
        with self._lock:
            self._closing = True
        self._urgent.set()
        self._wake.set()
        self._writer.join()
        self._writer_db.close()
        self.db.close()
        os.close(self.commit_fd)
        os.close(self._commit_w)


#: the task options that shape how a task runs, kept with it in the record so
#: that a restarted relay sends it on as it was submitted: its walltime,
#: retries, resources and output limit (protocol.TASK_OPTIONS; the others are
#: rebuilt or are for one run of the relay only)
DURABLE_OPTIONS = ("to", "r", "rs", "ol")


def durable_options(options: dict[str, Any] | None) -> bytes | None:
    """What of a task's options the record keeps (None: nothing)."""
    if not options:
        return None
    kept = {key: options[key] for key in DURABLE_OPTIONS if key in options}
    return msgpack.packb(kept, use_bin_type=True) if kept else None


def restored_options(blob: bytes | None) -> dict[str, Any] | None:
    """The options :func:`durable_options` kept, or None (checked as a task
    row's are: a record edited by hand cannot give a task what no client could)."""
    if not blob:
        return None
    try:
        options = msgpack.unpackb(blob, raw=False)
        P.task_row([b"\0" * 16, b"\0" * 32, b"", -1, P.TASK_CALL, "", options])
    except Exception as exc:
        log.error("ignored a task's unreadable options in the record: %s", exc)
        return None
    return {key: options[key] for key in DURABLE_OPTIONS if key in options} or None
