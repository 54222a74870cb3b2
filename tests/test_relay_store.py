"""The relay's store: group-committed SQLite, large blobs as files beside it."""

from __future__ import annotations

import os
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
    assert (tmp_path / "blobs" / f"{big.hex()}.args").exists()
    assert not (tmp_path / "blobs" / f"{small.hex()}.args").exists()

    big_result = os.urandom(FILE_BLOB * 2)
    store.add_result(big, 0, big_result)
    store.add_result(small, 0, b"r")
    store.close()
    store = RelayStore(tmp_path)
    assert list(store.pending_tasks()) == []
    assert store.read_blob(big, "result") == big_result
    assert not (tmp_path / "blobs" / f"{big.hex()}.args").exists()  # arguments dropped once done
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
    store.add_result(gone, 0, b"r1")
    store.add_result(finished, 0, b"r2")
    store.acknowledge([gone], "local")
    store.close()  # one commit holds all of it
    rows = _rows(tmp_path)
    assert set(rows) == {finished, waiting}
    assert rows[finished] == (1, 0, b"r2", None)   # inserted finished, arguments dropped
    assert rows[waiting] == (0, None, None, b"args")

    store = RelayStore(tmp_path)
    assert [row[0] for row in store.pending_tasks()] == [waiting]
    store.add_result(waiting, 0, b"r3")
    store.acknowledge([finished, waiting], "local")   # result and acknowledgement in one commit: a delete
    store.close()
    assert _rows(tmp_path) == {}
