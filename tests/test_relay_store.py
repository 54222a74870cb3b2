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
    store.add_task(small, b"C", "ep", b"h" * 32, 0, "3.11", b"tiny")
    store.add_task(big, b"C", "ep", b"h" * 32, 0, "3.11", memoryview(big_args))
    store.close()

    store = RelayStore(tmp_path)  # as after a restart: what was accepted is there
    pending = {row[0]: row[6] for row in store.pending_tasks()}
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
    store.acknowledge([big, small])
    store.close()
    assert os.listdir(tmp_path / "blobs") == []
