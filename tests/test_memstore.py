"""The embedded default's memory-only record (relay/memstore.py).

The same operations on a MemoryStore and on the SQLite RelayStore give the
same answers (what the relay reads back: function bodies, task outcomes,
memoized results, the Client API's listings, owners); the embedded default
writes no SQLite record and everything it offers that reads the record back
still works (dependencies, memoized results, registered functions, the
Client API's task rows and listings)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from fedexec import FederatedExecutor
from fedexec import protocol as P
from fedexec.relay.memstore import MemoryStore
from fedexec.relay.store import FINISHED, KEPT, PENDING, RelayStore

DEADLINE = 30.0

ALICE, BOB = "alice", "bob"
A, B, C, D = (bytes([n]) * 16 for n in (1, 2, 3, 4))
F = b"f" * 32


def play(store, keep: bool) -> None:
    """One sequence of the relay's writes, as its loop makes them."""
    store.add_function(F, b"body")
    store.add_task(A, b"client", "ep", F, P.TASK_CALL, "3.11", b"args-a", ALICE)
    store.add_task(B, b"client", "ep", F, P.TASK_CALL, "3.11", b"args-b", ALICE, b"\x81\xa2to\x05")
    store.add_task(C, b"client", "other", F, P.TASK_CALL, "3.11", b"args-c", BOB)
    store.add_task(D, b"client", "ep", F, P.TASK_CALL, "3.11", b"args-d", ALICE)
    store.flush()
    store.add_result(A, P.OK, b"result-a", ALICE)
    store.add_result(C, P.EXCEPTION, b"boom", BOB)
    store.add_result(D, P.OK, b"result-d", ALICE)
    store.add_memo(b"k" * 32, b"memo", ALICE, time.time())
    store.flush()
    assert store.acknowledge([A, C, b"?" * 16], ALICE) == [A]   # Bob's and unknown ids are not Alice's
    store.register_function(ALICE, F, b"body", "f", "desc", False)
    store.register_function(BOB, b"g" * 32, b"gbody", "g", "", True)
    store.save_endpoint("ep", "name", "3.11", 2, ALICE, b"access")
    store.flush()
    assert store.sync()


def answers(store) -> dict:
    """Everything the relay reads back from its record."""
    found = {
        "body": store.function_body(F),
        "sizes": store.function_sizes(),
        "outcomes": {t: store.task_outcome(t) for t in (A, B, C, D)},
        "known": store.known_tasks([A, B, C, D, b"?" * 16]),
        "summaries": {k: v[:3] for k, v in store.task_summaries([A, B, C, D], ALICE).items()},
        "list": [row[:4] for row in store.list_tasks(ALICE, endpoint=None, since=None, states=None, statuses=None,
                                                     before=None, limit=10)],
        "list_pending": [row[0] for row in store.list_tasks(ALICE, endpoint="ep", since=None, states=(PENDING,),
                                                            statuses=None, before=None, limit=10)],
        "pending": [(row[0], row[6], row[7], row[8]) for row in store.pending_tasks()],
        "unacked": [row[:3] for row in store.unacknowledged_results()],
        "memo": store.memo_result(b"k" * 32),
        "memo_keys": store.memo_keys(),
        "memo_entries": [row[:3] for row in store.memo_entries()],
        "registered_alice": store.registered_function(F, ALICE),
        "registered_bobs_for_alice": store.registered_function(b"g" * 32, ALICE),
        "registered_alices_for_bob": store.registered_function(F, BOB),
        "registered_sizes": sorted(store.registered_sizes()),
        "endpoints": [row[:4] + row[5:] for row in store.endpoints()],
        "owners": {t: store.owner_of(t) for t in (A, B, C, D)},
        "finished": dict(store.finished_owners),
        "kept": dict(store.kept_owners),
    }
    found["registered_alice"] = found["registered_alice"][:5]
    found["registered_bobs_for_alice"] = found["registered_bobs_for_alice"][:5]
    return found


@pytest.mark.parametrize("keep", [False, True])
def test_the_memory_record_answers_as_the_sqlite_record_does(tmp_path, keep):
    disk = RelayStore(tmp_path / "disk", keep_acknowledged=keep)
    memory = MemoryStore(tmp_path / "memory", keep_acknowledged=keep)
    try:
        for store in (disk, memory):
            play(store, keep)
        expected = answers(disk)
        assert answers(memory) == expected
        # what the sequence left, spelled out (so that both agreeing on nothing cannot pass)
        assert expected["outcomes"][B] == (PENDING, None, None, ALICE)
        assert expected["outcomes"][D] == (FINISHED, P.OK, b"result-d", ALICE)
        assert expected["outcomes"][A] == ((KEPT, P.OK, b"result-a", ALICE) if keep else None)
        assert expected["pending"] == [(B, ALICE, b"args-b", {"to": 5})]
        assert expected["owners"] == {A: ALICE if keep else None, B: None, C: BOB, D: ALICE}
        assert expected["registered_alices_for_bob"] is None   # not public
        # deleting results: only the asker's, kept or not
        for store in (disk, memory):
            assert store.delete_results([A, C, D], ALICE) == ([D], [A] if keep else [])
            store.flush()
            assert store.sync()
        assert answers(memory) == answers(disk)
        # expiry: results finished before the cutoff go (the SQLite writer does it on its thread)
        for store in (disk, memory):
            store.expire_results(time.time() + 1)
        deadline = time.monotonic() + DEADLINE
        while disk.finished_owners and time.monotonic() < deadline:
            time.sleep(0.01)
        assert disk.finished_owners == memory.finished_owners == {}
        assert memory.task_outcome(C) is None and disk.task_outcome(C) is None
        assert memory.memo_result(b"k" * 32) is None
    finally:
        disk.close()
        memory.close()


def test_the_memory_record_lists_pages_of_tasks_as_the_sqlite_record_does(tmp_path):
    disk = RelayStore(tmp_path / "disk", keep_acknowledged=True)
    memory = MemoryStore(tmp_path / "memory", keep_acknowledged=True)
    try:
        pages = {}
        for name, store in (("disk", disk), ("memory", memory)):
            for n in range(40):   # Alice's and Bob's, on two endpoints, some finished
                task_id = n.to_bytes(16, "big")
                store.add_task(task_id, b"client", f"ep{n % 2}", F, P.TASK_CALL, "3.11", b"a", (ALICE, BOB)[n % 3 == 0])
                if n % 4 == 0:
                    store.add_result(task_id, P.OK, b"r", (ALICE, BOB)[n % 3 == 0])
                time.sleep(0.001 if n % 5 else 0)   # some with the same time, some apart
            store.flush()
            assert store.sync()
            seen, before = [], None
            while True:
                page = store.list_tasks(ALICE, endpoint=None, since=None, states=None, statuses=None,
                                        before=before, limit=7)
                seen.append([row[0] for row in page])
                if len(page) < 7:
                    break
                before = (page[-1][4], page[-1][0])
            pending_ep0 = [row[0] for row in store.list_tasks(ALICE, endpoint="ep0", since=None, states=(PENDING,),
                                                              statuses=None, before=None, limit=100)]
            pages[name] = (seen, pending_ep0)
        assert pages["memory"] == pages["disk"]
        seen, pending_ep0 = pages["memory"]
        flat = [task_id for page in seen for task_id in page]
        assert len(flat) == len(set(flat)) == sum(1 for n in range(40) if n % 3 != 0)   # every one of Alice's, once
        assert pending_ep0 == [n.to_bytes(16, "big") for n in reversed(range(40)) if n % 3 and n % 2 == 0
                               and n % 4]
    finally:
        disk.close()
        memory.close()


def test_the_memory_record_is_committed_at_once_and_writes_no_file(tmp_path):
    store = MemoryStore(tmp_path / "record")
    try:
        store.add_task(A, b"client", "ep", F, P.TASK_CALL, "3.11", memoryview(b"args"), ALICE)
        seq = store.flush()
        assert store.committed_seq == seq and store.backlog == 0
        store.add_result(A, P.OK, memoryview(b"xresult")[1:], ALICE)   # a buffer, as the relay passes frames
        assert store.task_outcome(A) == (FINISHED, P.OK, b"result", ALICE)   # read back as bytes
        assert store.sync()
        assert not (tmp_path / "record").exists()
    finally:
        store.close()


def add(x, y):
    return x + y


def wait_for_file(path: str, timeout: float = DEADLINE) -> str:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.01)
    return "opened"


def test_the_embedded_default_keeps_no_sqlite_record_and_its_record_reads_still_work(tmp_path):
    gate = tmp_path / "gate"
    with FederatedExecutor(max_workers=2) as ex:
        relay_dir = Path(ex._dispatcher.services.directory) / "relay"
        try:
            first = ex.submit(add, 1, 2)
            assert ex.submit(add, first, 10).result(DEADLINE) == 13   # a dependency's result, read by the relay
            assert list(ex.map(add, range(200), range(200))) == [2 * i for i in range(200)]
            function_id = ex.register_function(add, "adds")
            assert ex.submit_to_registered_function(function_id, (2, 3)).result(DEADLINE) == 5
            questions = ex._questions()
            assert questions.get_function(function_id)["function_name"] == "add"
            waiting = ex.submit(wait_for_file, str(gate))
            deadline = time.monotonic() + DEADLINE
            while not waiting.running() and time.monotonic() < deadline:
                time.sleep(0.01)
            listed = [str(uuid.UUID(bytes=row[0])) for row in questions.list_tasks()]
            assert waiting.task_id in listed, listed   # the Client API lists it
            row = questions.task_rows([waiting.task_id], results=False)[waiting.task_id]
            assert row[1] == "running", row
        finally:
            gate.touch()
        assert waiting.result(DEADLINE) == "opened"
        assert not [p.name for p in relay_dir.rglob("*") if "sqlite" in p.name]
