"""The relay's store: group-committed SQLite, large blobs as files beside it."""

from __future__ import annotations

import os
import time
import uuid

from fedexec.relay.store import FILE_BLOB, RelayStore


def test_large_blobs_live_in_files_and_go_with_their_task(tmp_path):
    store = RelayStore(tmp_path)
    small, big = uuid.uuid4().bytes, uuid.uuid4().bytes
    big_args = os.urandom(FILE_BLOB * 3)
    store.add_function(b"h" * 32, b"body")
    store.add_task(small, b"C", "ep", b"h" * 32, 0, "3.11", b"tiny", "local")
    store.add_task(big, b"C", "ep", b"h" * 32, 0, "3.11", memoryview(big_args), "local")
    store.close()

    store = RelayStore(tmp_path)  # as after a restart: what was accepted is there
    pending = {row[0]: row[7] for row in store.pending_tasks()}
    assert pending == {small: b"tiny", big: big_args}
    assert [name.split("-")[1] for name in os.listdir(tmp_path / "blobs")] == [f"{big.hex()}.args"]

    big_result = os.urandom(FILE_BLOB * 2)
    store.add_result(big, 0, big_result, "local")
    store.add_result(small, 0, b"r", "local")
    store.close()
    store = RelayStore(tmp_path)
    assert list(store.pending_tasks()) == []
    assert store.read_blob(big, "result", "local") == big_result
    assert [name.split("-")[1] for name in os.listdir(tmp_path / "blobs")] == [f"{big.hex()}.result"]  # arguments dropped once done
    store.acknowledge([big, small], "local")
    store.close()
    assert os.listdir(tmp_path / "blobs") == []


def _rows(path):
    import sqlite3

    db = sqlite3.connect(path / "relay.sqlite3")
    try:
        return {row[0]: row[1:] for row in db.execute("SELECT id, state, status, result, args FROM tasks")}
    finally:
        db.close()


def test_writes_that_cancel_out_within_one_commit_are_not_made(tmp_path):
    store = RelayStore(tmp_path)
    gone, finished, waiting = (uuid.uuid4().bytes for _ in range(3))
    store.add_function(b"h" * 32, b"body")
    for task_id in (gone, finished, waiting):
        store.add_task(task_id, b"C", "ep", b"h" * 32, 0, "3.11", b"args", "local")
    store.add_result(gone, 0, b"r1", "local")
    store.add_result(finished, 0, b"r2", "local")
    store.acknowledge([gone], "local")
    store.close()  # one commit holds all of it
    rows = _rows(tmp_path)
    assert set(rows) == {finished, waiting}
    assert rows[finished] == (1, 0, b"r2", None)   # inserted finished, arguments dropped
    assert rows[waiting] == (0, None, None, b"args")

    store = RelayStore(tmp_path)
    assert [row[0] for row in store.pending_tasks()] == [waiting]
    store.add_result(waiting, 0, b"r3", "local")
    store.acknowledge([finished, waiting], "local")   # result and acknowledgement in one commit: a delete
    store.close()
    assert _rows(tmp_path) == {}


def test_an_older_record_is_upgraded_blob_files_renamed_and_memo_dropped(tmp_path):
    import sqlite3

    store = RelayStore(tmp_path)
    task_id, args = uuid.uuid4().bytes, os.urandom(FILE_BLOB * 2)
    store.add_task(task_id, b"C", "ep", b"h" * 32, 0, "3.11", args, "alice")
    store.add_memo(b"k" * 32, b"an unscoped result", "alice", time.time())
    store.close()
    # as an older fedexec left it: blob files named by task id alone, memo keys unscoped
    (name,) = os.listdir(tmp_path / "blobs")
    os.rename(tmp_path / "blobs" / name, tmp_path / "blobs" / f"{task_id.hex()}.args")
    (tmp_path / "blobs" / f"{uuid.uuid4().hex}.result").write_bytes(b"an orphan")
    db = sqlite3.connect(tmp_path / "relay.sqlite3")
    db.execute("PRAGMA user_version=0")
    db.commit()
    db.close()
    store = RelayStore(tmp_path)
    try:
        assert [(row[0], row[6], row[7]) for row in store.pending_tasks()] == [(task_id, "alice", args)]
        assert os.listdir(tmp_path / "blobs") == [name]
        assert store.memo_keys() == set()
    finally:
        store.close()


def test_memoized_results_expire_and_an_older_memo_table_gains_its_user(tmp_path):
    """Memo rows older than the expiry cutoff are deleted with the results
    nobody fetched; each row says whose task produced it (for the quota),
    also in a record written before memo rows had a user."""
    import sqlite3

    db = sqlite3.connect(tmp_path / "relay.sqlite3")
    db.execute("CREATE TABLE memo (key BLOB PRIMARY KEY, result BLOB NOT NULL, created REAL NOT NULL)")
    db.execute("PRAGMA user_version=2")
    db.execute("INSERT INTO memo VALUES (?,?,?)", (b"o" * 32, b"older", 1.0))
    db.commit()
    db.close()
    store = RelayStore(tmp_path)
    now = time.time()
    store.add_memo(b"a" * 32, b"x" * 1000, "alice", now - 100)
    store.add_memo(b"b" * 32, b"y" * 10, "bob", now)
    store.close()
    store = RelayStore(tmp_path)
    try:
        assert list(store.memo_entries()) == [(b"o" * 32, "", 5, 1.0), (b"a" * 32, "alice", 1000, now - 100),
                                              (b"b" * 32, "bob", 10, now)]
        store.expire_results(now - 50)
    finally:
        store.close()
    store = RelayStore(tmp_path)
    try:
        assert list(store.memo_entries()) == [(b"b" * 32, "bob", 10, now)]
    finally:
        store.close()


def test_a_result_kept_or_acknowledged_in_its_own_commit_is_written_once(tmp_path):
    """Tasks inserted by an earlier commit: a result and its keeping in one
    commit leave the row kept; a result and its acknowledgement delete it;
    another user's keeping or acknowledgement of the id changes nothing."""
    import sqlite3

    store = RelayStore(tmp_path, keep_acknowledged=True)
    kept, acked, others = (uuid.uuid4().bytes for _ in range(3))
    for task_id in (kept, acked, others):
        store.add_task(task_id, b"C", "ep", b"h" * 32, 0, "3.11", b"args", "alice")
    assert store.sync()
    store.add_result(kept, 0, b"r1", "alice")
    store.add_result(others, 0, b"r3", "alice")
    store.acknowledge([kept, others], "bob")   # not bob's: ignored
    store.acknowledge([kept], "alice")          # kept
    store.delete_results([acked], "alice")      # unknown as finished yet: ignored
    store.add_result(acked, 0, b"r2", "alice")
    store.delete_results([acked], "alice")      # finished and gone in the same commit
    store.close()
    db = sqlite3.connect(tmp_path / "relay.sqlite3")
    try:
        rows = {row[0]: row[1:] for row in db.execute("SELECT id, state, result, args, user FROM tasks")}
    finally:
        db.close()
    assert rows == {kept: (2, b"r1", None, "alice"), others: (1, b"r3", None, "alice")}
    store = RelayStore(tmp_path, keep_acknowledged=True)
    try:
        assert store.kept_owners == {kept: "alice"} and store.finished_owners == {others: "alice"}
    finally:
        store.close()


OLD_TASKS_TABLE = """CREATE TABLE tasks (
    id BLOB PRIMARY KEY, client BLOB NOT NULL, endpoint TEXT NOT NULL, fn_hash BLOB NOT NULL,
    kind INTEGER NOT NULL, python TEXT NOT NULL, args BLOB, state INTEGER NOT NULL, submitted REAL NOT NULL,
    status INTEGER, result BLOB, finished REAL, args_file INTEGER NOT NULL DEFAULT 0,
    result_file INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID"""


def test_a_record_keyed_by_task_id_is_moved_to_arrival_order_with_every_row(tmp_path):
    """A record of an older fedexec (tasks WITHOUT ROWID, keyed by id, no
    user or options columns yet) is read back whole after the move; the
    table is then in arrival order with a unique index on ids, so an id it
    holds is still not inserted twice."""
    import sqlite3

    db = sqlite3.connect(tmp_path / "relay.sqlite3")
    db.execute(OLD_TASKS_TABLE)
    db.execute("PRAGMA user_version=2")
    first, second, done = (uuid.uuid4().bytes for _ in range(3))
    db.executemany("INSERT INTO tasks (id, client, endpoint, fn_hash, kind, python, args, state, submitted, status, "
                   "result, finished) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                   [(second, b"C", "ep", b"h" * 32, 0, "3.11", b"a2", 0, 20.0, None, None, None),
                    (first, b"C", "ep", b"h" * 32, 0, "3.11", b"a1", 0, 10.0, None, None, None),
                    (done, b"C", "ep", b"h" * 32, 0, "3.11", None, 1, 5.0, 0, b"r", 6.0)])
    db.commit()
    db.close()
    store = RelayStore(tmp_path)
    try:
        assert [(row[0], row[6], row[7], row[8]) for row in store.pending_tasks()] == [
            (first, "local", b"a1", None), (second, "local", b"a2", None)]
        assert store.finished_owners == {done: "local"}
        assert list(store.unacknowledged_results()) == [(done, "local", 1, 6.0)]
        store.add_task(first, b"C", "ep", b"h" * 32, 0, "3.11", b"again", "mallory")
    finally:
        store.close()
    db = sqlite3.connect(tmp_path / "relay.sqlite3")
    try:
        (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name='tasks'").fetchone()
        assert "WITHOUT ROWID" not in sql.upper()
        assert db.execute("SELECT name FROM sqlite_master WHERE name='tasks_by_id'").fetchone()
        assert db.execute("SELECT id, user, args FROM tasks ORDER BY rowid").fetchall() == [
            (done, "local", None), (first, "local", b"a1"), (second, "local", b"a2")]
    finally:
        db.close()


def test_a_commit_that_fails_is_tried_again_and_nothing_after_it_counts_as_written(tmp_path):
    """A full disk (here: SQLite's page limit) fails the commit of a large
    batch. A small batch after it would fit, but must not be committed past
    it: committed_seq (what the relay reports stored: ACCEPTED, ACK) stays
    below the failed batch until a commit holding both succeeds, which it
    does on its own once there is room again."""
    store = RelayStore(tmp_path, commit_window=0.0)
    try:
        store.add_function(b"h" * 32, b"body")
        assert store.sync()
        db = store._writer_db   # (the writer's connection: SQLite serializes its use)
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count={pages + 4}")   # a few rows fit, a thousand 4 KiB ones do not
        large = [uuid.uuid4().bytes for _ in range(1000)]
        for task_id in large:
            store.add_task(task_id, b"C", "ep", b"h" * 32, 0, "3.11", os.urandom(4000), "local")
        failed = store.flush()
        deadline = time.monotonic() + 10
        while not store.failed_commits and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.failed_commits >= 1 and store.committed_seq < failed
        small = uuid.uuid4().bytes
        store.add_task(small, b"C", "ep", b"h" * 32, 0, "3.11", b"args", "local")
        later = store.flush()
        time.sleep(2.5)   # past two retries (COMMIT_RETRY)
        assert store.committed_seq < failed, "a commit passed over a batch that was never written"
        assert store.failed_commits >= 2
        assert store.backlog >= len(large) + 1
        db.execute("PRAGMA max_page_count=1073741823")   # room again
        deadline = time.monotonic() + 10
        while store.committed_seq < later and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.committed_seq >= later and store.failed_commits == 0 and store.backlog == 0
    finally:
        store.close()
    assert set(_rows(tmp_path)) == {*large, small}
