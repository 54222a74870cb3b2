"""Limits on what one message may make the relay do (issue 12, review
findings): frames per message, reads from the record per RESUME, frames
referenced twice, ACKs of unknown ids, log lines per message. A real
token-mode relay with users alice and bob; bob attacks through raw sockets."""

from __future__ import annotations

import os
import time
import uuid

import pytest
import zmq

from fedexec import protocol as P

from test_access import RawClient, fedexec_cli, running_endpoint, wait_connected
from test_faults import running_relay


@pytest.fixture(scope="module")
def two_users(tmp_path_factory):
    """A token-mode relay with users alice and bob, and an endpoint of each."""
    directory = tmp_path_factory.mktemp("message-limits")
    data = directory / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "bob")}
    with running_relay(directory, "--auth", "token") as address, \
            running_endpoint(directory, "bob-ep", {"FEDEXEC_TOKEN": tokens["bob"]}, relay=address) as bob_ep, \
            running_endpoint(directory, "alice-ep", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address) as alice_ep:
        wait_connected(address, bob_ep.id, tokens["bob"], bob_ep.proc, bob_ep.log)
        wait_connected(address, alice_ep.id, tokens["alice"], alice_ep.proc, alice_ep.log)
        yield address, tokens, bob_ep, directory / "relay.log", alice_ep


def test_junk_acks_never_reach_the_store_writer(tmp_path):
    """Only the ids the record holds as the user's finished tasks are
    queued for the writer: a flood of others leaves its backlog at 0."""
    from fedexec.relay.store import RelayStore

    store = RelayStore(tmp_path / "record")
    try:
        seq = store.flush()
        for _ in range(200):   # 204,800 ids: over MAX_STORE_BACKLOG, which pauses dispatch for everyone
            assert store.acknowledge([uuid.uuid4().bytes for _ in range(P.MAX_ITEMS)], "bob") == []
        assert store.flush() == seq and store.backlog == 0    # nothing was handed to the writer
        mine = uuid.uuid4().bytes
        store.add_result(mine, P.OK, b"done", "alice")
        seq = store.flush()
        assert store.acknowledge([mine] * 3, "bob") == []        # another user's: dropped
        assert store.flush() == seq
        assert store.acknowledge([mine, mine], "alice") == [mine]   # hers: handed over, once
        assert store.flush() == seq + 1
    finally:
        store.close()


def test_decode_refuses_more_frames_than_rows_can_use():
    header = P.encode(P.ACK, {"tids": []})
    assert P.decode(header + [b"x"] * (P.MAX_FRAMES - 1)).type == P.ACK
    with pytest.raises(P.ProtocolError, match=f"more than {P.MAX_FRAMES:,} frames.*MAX_FRAMES"):
        P.decode(header + [b"x"] * P.MAX_FRAMES)


def test_waiting_messages_keeps_no_more_than_a_message_may_have():
    ctx = zmq.Context()
    try:
        router = ctx.socket(zmq.ROUTER)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send_multipart([b"h"] + [b"x"] * 100_000)
        dealer.send_multipart([b"next"])
        assert router.poll(5000)
        time.sleep(0.2)
        got = list(P.waiting_messages(router, 10))
        assert [len(frames) for frames in got] == [P.MAX_FRAMES + 2, 2]   # routing id + MAX_FRAMES + 1; the next
        assert got[1][1].bytes == b"next"
        for sock in (router, dealer):
            sock.close(linger=0)
    finally:
        ctx.term()


@pytest.mark.timeout(120)
def test_a_message_of_many_tiny_frames_is_refused_and_others_are_served(two_users):
    address, tokens, bob_ep, _log, _alice_ep = two_users
    bob = RawClient(address, tokens["bob"])
    alice = RawClient(address, tokens["alice"])
    try:
        bob.sock.send_multipart(P.encode(P.ACK, {"tids": []}) + [b"x"] * 3000)
        error = bob.expect(P.ERROR, 20)
        assert error is not None, "no answer to a message of 3,000 frames"
        assert f"more than {P.MAX_FRAMES:,} frames" in error.fields["msg"] and "MAX_FRAMES" in error.fields["msg"]
        alice.send(P.LOOKUP, {"ep": bob_ep.id})   # the relay goes on, for another user too
        reply = alice.expect(P.LOOKUP_REPLY, 20)
        assert reply is not None and "found" in reply.fields
        bob.send(P.HELLO, {"role": "client", "py": P.PYTHON_VERSION})
        assert bob.expect(P.WELCOME, 20)
    finally:
        bob.close()
        alice.close()


BIG_RESULT = 10 * 1024 * 1024 - 1024


def big_result(n):
    return b"r" * n


def results_for(client: RawClient, task_id: bytes, seconds: float) -> list[tuple[int, int]]:
    """(status, payload size) of every result row for ``task_id`` that arrives within ``seconds``."""
    found = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        msg = client.expect(P.RESULTS, max(0.1, deadline - time.monotonic()))
        for row in msg.fields["rows"] if msg else ():
            if row[0] == task_id:
                blob = P.blob(msg.blobs, row[2])
                found.append((row[1], P.unpack_failure(blob)["msg"] if row[1] == P.FAILED else len(P.as_buffer(blob))))
    return found


@pytest.mark.timeout(180)
def test_a_resume_repeating_a_large_result_reads_it_once(two_users):
    from test_abuse import RssWatch, relay_process

    address, tokens, bob_ep, _log, _alice_ep = two_users
    bob = RawClient(address, tokens["bob"])
    try:
        task_id = bob.submit(bob_ep.id, big_result, BIG_RESULT)
        deadline = time.monotonic() + 60
        got: list = []
        while not got and time.monotonic() < deadline:
            got = results_for(bob, task_id, 1.0)
        assert got and got[0][0] == P.OK, (got, bob.outcomes)   # finished, in the record, not acknowledged
        relay = relay_process(address)
        before = relay.memory_info().rss
        watch = RssWatch(relay)
        watch.start()
        try:
            for _ in range(3):   # 3 x 1,024 copies of one 10 MiB id: 30 GiB to read without de-duplication
                bob.send(P.RESUME, {"tids": [task_id] * P.MAX_ITEMS})
            answers = results_for(bob, task_id, 8.0)
        finally:
            watch.stopped.set()
            watch.join(5)
        assert [a[0] for a in answers] == [P.OK] * 3 and len({a[1] for a in answers}) == 1, answers   # once per RESUME
        growth = watch.peak - before
        print(f"\nrelay RSS grew by {growth / 2**20:.0f} MiB answering 3 RESUMEs of one 10 MiB result x 1,024")
        assert growth < 150 * 1024 * 1024, f"the relay grew by {growth / 2**20:.0f} MiB"
        bob.send(P.ACK, {"tids": [task_id]})
    finally:
        bob.close()


@pytest.mark.timeout(180)
def test_results_over_a_turns_record_budget_come_in_later_turns(two_users):
    """More finished results than RECORD_BYTES_PER_TURN in one RESUME: all
    of them arrive, each once (the rest in later turns)."""
    from fedexec.relay.server import RECORD_BYTES_PER_TURN

    address, tokens, bob_ep, _log, _alice_ep = two_users
    bob = RawClient(address, tokens["bob"])
    try:
        count = RECORD_BYTES_PER_TURN // BIG_RESULT + 2
        task_ids = [bob.submit(bob_ep.id, big_result, BIG_RESULT) for _ in range(count)]
        done: set[bytes] = set()
        deadline = time.monotonic() + 120
        while len(done) < count and time.monotonic() < deadline:
            msg = bob.expect(P.RESULTS, 1.0)
            done.update(row[0] for row in msg.fields["rows"] if row[1] == P.OK) if msg else None
        assert done == set(task_ids)
        bob.send(P.RESUME, {"tids": task_ids + task_ids})
        seen: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(seen) < count and time.monotonic() < deadline:
            msg = bob.expect(P.RESULTS, 1.0)
            seen.extend(row[0] for row in msg.fields["rows"] if row[1] == P.OK and len(row) >= 3) if msg else None
        time.sleep(1.0)
        while (msg := bob.expect(P.RESULTS, 0.5)) is not None:
            seen.extend(row[0] for row in msg.fields["rows"])
        assert sorted(seen) == sorted(task_ids), (len(seen), count)
        bob.send(P.ACK, {"tids": task_ids})
    finally:
        bob.close()


@pytest.mark.timeout(120)
def test_rows_referring_to_one_frame_are_refused_before_any_work(two_users):
    from fedexec.serialize import serialize_arguments, serialize_function

    address, tokens, bob_ep, _log, _alice_ep = two_users
    bob = RawClient(address, tokens["bob"])
    try:
        body = b"\x80\x04N." + os.urandom(8) + b"b" * (8 * 1024 * 1024)   # its hash is wrong below
        args = serialize_arguments(big_result, (1,), {})
        rows = [[uuid.uuid4().bytes, b"h" * 32, args, 0, P.TASK_CALL, P.PYTHON_VERSION] for _ in range(P.MAX_ITEMS)]
        started = time.monotonic()
        bob.send(P.SUBMIT, {"ep": bob_ep.id, "tasks": rows}, [body])
        error = bob.expect(P.ERROR, 20)
        took = time.monotonic() - started
        assert error is not None and "blob frame 0 is referred to twice" in error.fields["msg"], error
        assert took < 2.0, f"refused after {took:.1f} s"
        # the same for arguments: two rows, one frame; nothing of the message is accepted
        fn_hash, fn_body = serialize_function(big_result)
        ids = [uuid.uuid4().bytes, uuid.uuid4().bytes]
        rows = [[task_id, fn_hash, 0, fn_body, P.TASK_CALL, P.PYTHON_VERSION] for task_id in ids]
        bob.send(P.SUBMIT, {"ep": bob_ep.id, "tasks": rows}, [b"a" * (P.INLINE_MAX + 1)])
        error = bob.expect(P.ERROR, 20)
        assert error is not None and "referred to twice" in error.fields["msg"], error
        assert bob.expect(P.ACCEPTED, 1.0) is None and bob.expect(P.RESULTS, 1.0) is None
        # a well-formed submission (each payload its own frame) is served
        task_id = bob.submit(bob_ep.id, big_result, 3)
        deadline = time.monotonic() + 30
        got: list = []
        while not got and time.monotonic() < deadline:
            got = results_for(bob, task_id, 1.0)
        assert len(got) == 1 and got[0][0] == P.OK, got
        bob.send(P.ACK, {"tids": [task_id]})
    finally:
        bob.close()


@pytest.mark.timeout(120)
def test_a_junk_ack_flood_does_not_delay_another_users_tasks(two_users):
    address, tokens, _bob_ep, _log, alice_ep = two_users
    bob = RawClient(address, tokens["bob"])
    alice = RawClient(address, tokens["alice"])
    try:
        for _ in range(200):   # 204,800 unknown ids, twice MAX_STORE_BACKLOG
            bob.send(P.ACK, {"tids": [uuid.uuid4().bytes for _ in range(P.MAX_ITEMS)]})
        started = time.monotonic()
        task_id = alice.submit(alice_ep.id, big_result, 5)
        got: list = []
        while not got and time.monotonic() - started < 30:
            got = results_for(alice, task_id, 0.5)
        took = time.monotonic() - started
        assert len(got) == 1 and got[0][0] == P.OK, got
        print(f"\nalice's task took {took * 1000:.0f} ms right after 200 x 1,024 junk ACK ids")
        assert took < 10.0
        bob.send(P.HELLO, {"role": "client", "py": P.PYTHON_VERSION})
        assert bob.expect(P.WELCOME, 20)   # all of bob's ACKs were read by now
        alice.send(P.ACK, {"tids": [task_id]})
    finally:
        bob.close()
        alice.close()


@pytest.mark.timeout(120)
def test_refusals_and_malformed_messages_make_short_log_lines(two_users):
    address, tokens, _bob_ep, log, alice_ep = two_users
    bob = RawClient(address, tokens["bob"])
    alice = RawClient(address, tokens["alice"])
    start = log.stat().st_size   # this test's lines come after
    try:
        huge = "x" * 300_000
        bob.send(P.HELLO, {"role": huge, "py": P.PYTHON_VERSION})
        error = bob.expect(P.ERROR, 20)
        assert error is not None and "unknown role" in error.fields["msg"] and len(error.fields["msg"]) < 500, \
            len(error.fields["msg"]) if error else None
        bob.send(huge, {})
        error = bob.expect(P.ERROR, 20)
        assert error is not None and "unknown message type" in error.fields["msg"]
        assert len(error.fields["msg"]) < 500
        # alice's finished tasks, read by bob many times in one message: one log line, with the count
        ids = [alice.submit(alice_ep.id, big_result, 1) for _ in range(3)]
        deadline = time.monotonic() + 30
        done: set[bytes] = set()
        while len(done) < 3 and time.monotonic() < deadline:
            msg = alice.expect(P.RESULTS, 1.0)
            done.update(row[0] for row in msg.fields["rows"]) if msg else None
        assert done == set(ids)
        time.sleep(0.5)   # their results are on disk
        bob.send(P.RESUME, {"tids": (ids * 400)[:P.MAX_ITEMS]})
        refused: set[bytes] = set()
        while len(refused) < 3 and time.monotonic() < deadline:
            msg = bob.expect(P.RESULTS, 1.0)
            refused.update(row[0] for row in msg.fields["rows"] if row[1] == P.FAILED) if msg else None
        assert refused == set(ids)
        time.sleep(1.0)
        lines = log.read_bytes()[start:].decode(errors="replace").splitlines()
        malformed = [line for line in lines if "rejected a malformed message" in line]
        assert len(malformed) == 2 and all("from user 'bob'" in line and len(line) < 600 for line in malformed), \
            [line[:300] for line in malformed]
        read = [line for line in lines if "refused user 'bob': read the result of task(s) of another user" in line]
        assert len(read) == 1 and ": 3 task(s)" in read[0], read
        alice.send(P.ACK, {"tids": ids})
    finally:
        bob.close()
        alice.close()
