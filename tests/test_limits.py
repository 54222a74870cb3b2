"""Limits that hold under abuse (issue 12): frame and header caps, items per
message, per-user quotas, and function bodies that expire with their tasks.
Real relays, endpoints and sockets on loopback; see test_abuse.py for all
of it at once against a second user's work."""

from __future__ import annotations

import operator
import os
import sqlite3
import subprocess
import sys
import time
import uuid

import msgpack
import pytest
import zmq

from fedexec import FederatedExecutor, PayloadTooLarge, QuotaExceeded
from fedexec import protocol as P
from fedexec.relay.query import share_endpoint
from fedexec.relay.server import Relay
from fedexec.serialize import serialize_arguments, serialize_function

from test_access import RawClient, fedexec_cli, running_endpoint, slow_value, wait_connected
from test_faults import running_relay


# -- the wire -----------------------------------------------------------------------

def test_libzmq_applies_maxmsgsize_per_frame():
    """What the design rests on: a message of frames each within the limit
    passes whatever its total, one frame over it never arrives (its sender's
    connection is dropped), and the socket goes on for others."""
    ctx = zmq.Context()
    try:
        router = P.limit_frames(ctx.socket(zmq.ROUTER))
        router.setsockopt(zmq.MAXMSGSIZE, 1000)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send_multipart([b"a" * 1000] * 5)
        assert router.poll(5000) and len(router.recv_multipart()) == 6
        dealer.send(b"b" * 1001)
        assert not router.poll(500)
        other = ctx.socket(zmq.DEALER)
        other.connect(f"tcp://127.0.0.1:{port}")
        other.send(b"still here")
        assert router.poll(5000) and router.recv_multipart()[-1] == b"still here"
        for sock in (router, dealer, other):
            sock.close(linger=0)
    finally:
        ctx.term()


def test_max_payload_is_checked(tmp_path):
    # larger payloads travel in chunks (transfer.py), so the limit is not a frame's
    with pytest.raises(ValueError, match="max_payload must be from 1 to"):
        Relay("tcp://127.0.0.1:*", tmp_path / "r", max_payload=P.MAX_PAYLOAD_SETTING + 1)
    out = subprocess.run([sys.executable, "-m", "fedexec.relay", "--address", "tcp://127.0.0.1:*",
                          "--data-dir", str(tmp_path / "r2"), "--max-payload", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--max-payload" in out.stderr and f"{P.MAX_PAYLOAD_SETTING:,}" in out.stderr
    out = fedexec_cli("relay", "start", "--data-dir", tmp_path / "r3", "--max-payload", -5, check=False)
    assert out.returncode != 0 and "max_payload must be from 1 to" in out.stderr
    assert not (tmp_path / "r3").exists() or not any((tmp_path / "r3").iterdir())


def test_headers_are_refused_before_they_amplify():
    big = [P.encode(P.ACK, {"tids": [b"x" * 16] * 10})[0] + b"\x00" * P.MAX_HEADER]
    with pytest.raises(P.ProtocolError, match="over the limit of .* bytes \\(MAX_HEADER\\)"):
        P.decode(big)
    n = P.MAX_HEADER - 64   # within the size limit: one huge list of empty maps
    empty_maps = msgpack.packb({"v": 1, "t": "ack", "tids": [{}] * n})
    assert len(empty_maps) <= P.MAX_HEADER
    started = time.perf_counter()
    with pytest.raises(P.ProtocolError, match=f"more than {P.MAX_ITEMS} items.*MAX_ITEMS"):
        P.decode([empty_maps])
    assert time.perf_counter() - started < 0.05
    with pytest.raises(P.ProtocolError, match="MAX_MAP"):
        P.decode([msgpack.packb({"v": 1, "t": "ack", "m": {str(i): 0 for i in range(P.MAX_MAP + 1)}})])
    with pytest.raises(P.ProtocolError, match="MAX_ITEMS"):
        P.task_ids([b"x" * 16] * (P.MAX_ITEMS + 1))


def test_full_messages_stay_within_the_header_cap():
    """The largest rows senders make, MAX_ITEMS of them with inline payloads
    as large as allowed, fit MAX_HEADER: the inline budget sends the rest
    as frames."""
    blobs = P.Blobs()
    rows = []
    for _ in range(P.MAX_ITEMS):
        options = {"m": b"k" * 32, "tr": [time.time()] * len(P.TRACE_STAGES), "r": P.MAX_RETRIES,
                   "to": 1.5}
        rows.append([uuid.uuid4().bytes, b"h" * 32, blobs.ref(b"a" * P.INLINE_MAX), blobs.ref(b"f" * P.INLINE_MAX),
                     P.TASK_CALL, P.PYTHON_VERSION, options])
    frames = P.encode(P.SUBMIT, {"ep": str(uuid.uuid4()), "tasks": rows}, blobs.frames)
    assert len(frames[0]) <= P.MAX_HEADER and blobs.inline <= P.INLINE_BUDGET and len(frames) > P.MAX_ITEMS
    assert len(P.decode(frames).fields["tasks"]) == P.MAX_ITEMS


def test_results_are_split_into_messages_of_max_items():
    blobs = P.Blobs()
    rows = [blobs.result_row(i.to_bytes(16, "big"), P.OK, bytes([i % 256]) * (100 if i % 3 else 20_000))
            for i in range(2 * P.MAX_ITEMS + 5)]
    started = [b"s" * 16] * (P.MAX_ITEMS + 1)
    messages = P.results_messages(rows, blobs.frames, started, credit=7)
    assert len(messages) == 3
    seen = {}
    for i, frames in enumerate(messages):
        msg = P.decode(frames)
        assert len(msg.fields["rows"]) <= P.MAX_ITEMS and len(msg.fields.get("started", ())) <= P.MAX_ITEMS
        assert ("credit" in msg.fields) == (i == 0)
        for row in msg.fields["rows"]:
            seen[row[0]] = P.as_bytes(P.blob(msg.blobs, row[2]))
    assert len(seen) == len(rows)
    for i in range(len(rows)):
        assert seen[i.to_bytes(16, "big")] == bytes([i % 256]) * (100 if i % 3 else 20_000)


# -- quotas and function bodies at a relay ------------------------------------------------

def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def stored_functions(data_dir) -> list[bytes]:
    db = sqlite3.connect(f"file:{data_dir / 'relay.sqlite3'}?mode=ro", uri=True)
    try:
        return [row[0] for row in db.execute("SELECT hash FROM functions")]
    finally:
        db.close()


def double(x):
    return 2 * x


@pytest.mark.timeout(180)
def test_quotas_refuse_one_user_and_leave_the_other_alone(tmp_path):
    data = tmp_path / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "bob")}
    with running_relay(tmp_path, "--auth", "token", "--max-tasks-per-user", "3",
                       "--max-bytes-per-user", "200000") as address:
        with running_endpoint(tmp_path, "shared", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address) as ep:
            wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
            share_endpoint(address, ep.id, add_users=["bob"], token=tokens["alice"])
            with FederatedExecutor(ep.id, relay=address, token=tokens["bob"]) as bob, \
                    FederatedExecutor(ep.id, relay=address, token=tokens["alice"]) as alice:
                slow = [bob.submit(slow_value, 3.0, i) for i in range(3)]
                over = bob.submit(slow_value, 0, "over")
                with pytest.raises(QuotaExceeded) as info:
                    over.result(30)
                assert info.value.quota == "tasks" and info.value.usage == 3 and info.value.limit == 3
                assert "3 task(s) in flight" in str(info.value) and "--max-tasks-per-user" in str(info.value)
                # alice has her own quota: three of hers run meanwhile
                assert [f.result(30) for f in [alice.submit(operator.add, i, 1) for i in range(3)]] == [1, 2, 3]
                assert [f.result(30) for f in slow] == [0, 1, 2]
                # bytes: arguments over what is left of bob's 200,000 bytes
                with pytest.raises(QuotaExceeded, match="over its quota of 200,000 bytes") as info:
                    bob.submit(len, b"x" * 250_000).result(30)
                assert info.value.quota == "bytes" and info.value.limit == 200_000
                # finished and acknowledged: the quota is free again
                assert wait_for(lambda: bob.submit(len, b"x" * 150_000).result(30) == 150_000, 30, "room again")
                assert alice.submit(len, b"y" * 150_000).result(30) == 150_000


@pytest.mark.timeout(180)
def test_function_bodies_expire_with_their_last_task_and_are_sent_again(tmp_path):
    """A body is kept for --function-grace seconds after its last task (1 s
    here; 300 by default, so a warm function's next call needs no resend),
    then dropped; a later call sends it again, transparently."""
    data = tmp_path / "relay-data"
    tokens = {"alice": fedexec_cli("relay", "add-user", "alice", "--data-dir", data).stdout.strip()}
    with running_relay(tmp_path, "--auth", "token", "--function-grace", "1") as address:
        with running_endpoint(tmp_path, "ep2", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address) as ep:
            wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
            with FederatedExecutor(ep.id, relay=address, token=tokens["alice"]) as ex:
                fn_hash = serialize_function(double)[0]
                assert ex.submit(double, 21).result(30) == 42
                # its last task finished: the body is gone from the record
                wait_for(lambda: fn_hash not in stored_functions(data), 20, "the body to expire")
                # the executor sends later tasks of it without the body; the relay asks for
                # it again and the task runs, transparently
                assert ex.submit(double, 5).result(30) == 10
                assert [f.result(30) for f in [ex.submit(double, i) for i in range(50)]] == \
                    [2 * i for i in range(50)]
            wait_for(lambda: not stored_functions(data), 20, "every body to expire")
            # a refused task (unknown endpoint) stores no body; an oversized one is refused by name
            raw = RawClient(address, tokens["alice"])
            try:
                failure = raw.failure_of(raw.submit(str(uuid.uuid4()), double, 1))
                assert failure["kind"] == P.REJECTED and "unknown endpoint" in failure["msg"]
                time.sleep(0.5)
                assert not stored_functions(data)
                huge = b"\x80\x04" + b"x" * (P.MAX_PAYLOAD_LIMIT + 10)   # a function body's limit: one frame
                blobs = P.Blobs()
                task_id = uuid.uuid4().bytes
                row = [task_id, P.content_hash(huge), blobs.ref(serialize_arguments(double, (1,), {})),
                       blobs.ref(huge), P.TASK_CALL, P.PYTHON_VERSION]
                raw.send(P.SUBMIT, {"ep": ep.id, "tasks": [row]}, blobs.frames)
                failure = raw.failure_of(task_id)
                assert failure["kind"] == P.TOO_LARGE and "the function is" in failure["msg"]
                assert not stored_functions(data)
            finally:
                raw.close()


def test_executor_refuses_an_oversized_function_before_sending(executor):
    blob = b"z" * (P.MAX_PAYLOAD_LIMIT + 1)   # a function body travels in one frame

    def closure():
        return len(blob)
    with pytest.raises(PayloadTooLarge, match="the function is"):
        executor.submit(closure).result(30)


@pytest.mark.timeout(180)
def test_a_restarted_relay_rebuilds_usage_and_function_counts(tmp_path):
    data = tmp_path / "relay-data"
    tokens = {"alice": fedexec_cli("relay", "add-user", "alice", "--data-dir", data).stdout.strip()}
    # (no grace: the body of len goes with its task, as the record shows below)
    with running_relay(tmp_path, "--auth", "token", "--function-grace", "0") as address:
        with running_endpoint(tmp_path, "ep", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address) as ep:
            wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
            with FederatedExecutor(ep.id, relay=address, token=tokens["alice"]) as ex:
                assert ex.submit(len, b"r" * 5000).result(30) == 5000   # a result, acknowledged
        # the endpoint is gone: these wait at the relay
        raw = RawClient(address, tokens["alice"])
        try:
            ids = {raw.submit(ep.id, operator.add, i, 1) for i in range(4)}
            while ids:
                accepted = raw.expect(P.ACCEPTED)
                assert accepted, f"{len(ids)} task(s) not accepted"
                ids -= set(accepted.fields["tids"])
        finally:
            raw.close()
        time.sleep(0.3)
    relay = Relay("tcp://127.0.0.1:*", data, auth="token")
    try:
        tasks, stored = relay.quotas.usage["alice"]
        from fedexec.relay.quota import row_bytes   # a stored row costs at least MIN_ROW_BYTES
        args = sum(row_bytes(len(serialize_arguments(operator.add, (i, 1), {}))) for i in range(4))
        body = len(serialize_function(operator.add)[1])
        # (the result it received stays, kept at the relay: charged to alice's bytes, issue 15)
        kept = sum(relay.quotas.retained.by_user["alice"].values())
        assert kept == row_bytes(0)   # (a small result costs MIN_ROW_BYTES)
        assert tasks == 4 and stored == args + body + kept
        assert relay.functions.refs == {serialize_function(operator.add)[0]: 4}
        assert stored_functions(data) and serialize_function(len)[0] not in stored_functions(data)
    finally:
        closed(relay)


def closed(relay: Relay) -> None:
    """Close a relay made in this process (that never served)."""
    relay.store.close()
    relay.sock.close(linger=0)
    relay.zap.stop()
    relay.ctx.term()
    if relay.tokens is not None:
        relay.tokens.close()


@pytest.mark.timeout(180)
def test_results_count_against_the_task_quota_until_acknowledged(tmp_path):
    """Bob's finished tasks whose results he never acknowledges (each a row
    and an id at the relay) count against his task quota and at least
    MIN_ROW_BYTES each: he is refused by name, alice is not; his ACK frees
    the quota; a restarted relay counts them again."""
    from fedexec.relay.quota import MIN_ROW_BYTES
    data = tmp_path / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "bob")}
    with running_relay(tmp_path, "--auth", "token", "--max-tasks-per-user", "3") as address:
        with running_endpoint(tmp_path, "shared", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address) as ep:
            wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
            share_endpoint(address, ep.id, add_users=["bob"], token=tokens["alice"])
            bob = RawClient(address, tokens["bob"])
            try:
                ids = [bob.submit(ep.id, operator.add, i, 1) for i in range(3)]
                got: dict[bytes, int] = {}
                deadline = time.monotonic() + 30
                while len(got) < 3 and time.monotonic() < deadline:
                    msg = bob.expect(P.RESULTS, 1.0)
                    for row in msg.fields["rows"] if msg else ():
                        got[row[0]] = row[1]
                assert got == {task_id: P.OK for task_id in ids}   # finished, never acknowledged
                failure = bob.failure_of(bob.submit(ep.id, operator.add, 9, 1))
                assert failure["kind"] == P.QUOTA and failure["quota"] == "tasks", failure
                assert "3 task(s) in flight or finished with results not yet acknowledged" in failure["msg"]
                with FederatedExecutor(ep.id, relay=address, token=tokens["alice"]) as alice:
                    # alice acknowledges hers: more than 3 in turn, one after the other
                    assert [alice.submit(operator.add, i, 2).result(30) for i in range(6)] == [i + 2 for i in range(6)]
                    with pytest.raises(QuotaExceeded, match="--max-tasks-per-user"):
                        # bob through the executor, which acknowledges what it gets: refused too
                        with FederatedExecutor(ep.id, relay=address, token=tokens["bob"]) as bob_ex:
                            bob_ex.submit(operator.add, 1, 1).result(30)
                bob.send(P.ACK, {"tids": ids[:1]})
                # one acknowledged: one more task fits, and its result comes back
                task_id = wait_for(lambda: _ok_or_none(bob, bob.submit(ep.id, operator.add, 40, 2)), 20,
                                   "room after the acknowledgement")
                assert task_id
            finally:
                bob.close()
    relay = Relay("tcp://127.0.0.1:*", data, auth="token")
    try:   # three of bob's results are still unacknowledged (two of the first and the last)
        tasks, stored = relay.quotas.usage["bob"]
        assert tasks == 3 and stored >= 3 * MIN_ROW_BYTES
        # alice has no task in flight; her six received results are kept (issue 15), charged to her bytes
        tasks, stored = relay.quotas.usage["alice"]
        assert tasks == 0 and stored == sum(relay.quotas.retained.by_user["alice"].values()) == 6 * MIN_ROW_BYTES
    finally:
        closed(relay)


def _ok_or_none(raw: RawClient, task_id: bytes) -> bytes | None:
    """The task's id if it ran, None if it was refused for a quota."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg = raw.expect(P.RESULTS, 1.0)
        for row in msg.fields["rows"] if msg else ():
            if row[0] == task_id:
                if row[1] == P.OK:
                    return task_id
                assert P.unpack_failure(P.blob(msg.blobs, row[2]))["kind"] == P.QUOTA
                return None
    return None


def sized_result(log: str, size: int, tag: int) -> bytes:
    """``size`` bytes, noting in ``log`` that it ran (memoized: once per tag)."""
    with open(log, "a") as out:
        out.write(f"{tag}\n")
    return bytes([tag % 256]) * size


def rss_of(pid: int) -> int:
    """A process's resident memory, in bytes."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    pytest.fail(f"no VmRSS for process {pid}")


def memo_rows(data_dir) -> tuple[int, int]:
    db = sqlite3.connect(f"file:{data_dir / 'relay.sqlite3'}?mode=ro", uri=True)
    try:
        count, size = db.execute("SELECT count(*), COALESCE(sum(length(result)), 0) FROM memo").fetchone()
        return count, size
    finally:
        db.close()


@pytest.mark.timeout(240)
def test_memoized_results_are_bounded_in_memory_charged_and_expire(tmp_path):
    """70 memoized results of 2 MiB: none is pinned in the relay's memory
    (RSS, once transient buffers are released, grows by less than 64 MiB: 2 MiB
    measured; 164 MiB when it kept them all, as before), a hit
    on one is read from the record, they count against their user's byte
    quota (memoizing stops at it, and a task that does not fit is refused),
    and after result_ttl they are gone from the record, the quota free."""
    import json
    data = tmp_path / "relay-data"
    tokens = {"alice": fedexec_cli("relay", "add-user", "alice", "--data-dir", data).stdout.strip()}
    size, limit, ttl = 2 * 1024 * 1024, 130_000_000, 30
    log = str(tmp_path / "runs")
    # large blocks mmapped (a fixed threshold): freed ones go back to the system, so the
    # RSS shows what the relay holds, not what the allocator kept of its transient buffers
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    with running_relay(tmp_path, "--auth", "token", "--max-bytes-per-user", str(limit),
                       "--result-ttl", str(ttl), env=env) as address:
        pid = json.loads((data / "relay.json").read_text())["pid"]
        with running_endpoint(tmp_path, "ep", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address) as ep:
            wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
            with FederatedExecutor(ep.id, relay=address, token=tokens["alice"]) as ex:
                assert ex.submit(sized_result, log, size, 255).result(30) == b"\xff" * size   # warm
            before = rss_of(pid)
            with FederatedExecutor(ep.id, relay=address, token=tokens["alice"], memoize=True) as ex:
                for tag in range(70):
                    assert len(ex.submit(sized_result, log, size, tag).result(60)) == size
            # transient buffers (results on their way to the store's writer and to the client)
            # are released within seconds; memoized results kept in memory would stay
            deadline = time.monotonic() + 30
            while (grown := rss_of(pid) - before) >= 64 * 2 ** 20:
                assert time.monotonic() < deadline, f"the relay's RSS grew by {grown / 2 ** 20:.0f} MiB"
                time.sleep(0.1)
            count, stored = memo_rows(data)
            assert 50 <= count < 70 and stored <= limit, (count, stored)   # memoizing stopped at the quota
            with FederatedExecutor(ep.id, relay=address, token=tokens["alice"], memoize=True) as ex:
                assert ex.submit(sized_result, log, size, 0).result(30) == b"\x00" * size   # a hit
                assert open(log).read().split().count("0") == 1, "the hit ran the function again"
                with pytest.raises(QuotaExceeded, match="bytes stored") as info:
                    ex.submit(len, b"z" * 8_000_000).result(30)
                assert info.value.quota == "bytes" and info.value.usage >= stored
                wait_for(lambda: memo_rows(data)[0] == 0, ttl + 30, "the memoized results to expire")
                assert ex.submit(len, b"z" * 8_000_000).result(30) == 8_000_000   # the quota is free again


# -- HOLDING: cost by the ids held, only right after the connection's HELLO --------------

@pytest.mark.timeout(120)
def test_holding_costs_the_ids_held_not_the_queue(tmp_path):
    """A HOLDING of 1024 ids against an endpoint with 200,000 queued tasks
    takes what the ids take (~1 ms measured; 24 ms when each scanned the
    queue); the tasks it names count as sent and are not sent again; a
    HOLDING is refused from a connection that did not say HELLO, or later
    than HOLDING_WINDOW after it."""
    from fedexec.relay.access import Session
    from fedexec.relay.registry import DISPATCHED, QUEUED, TaskRecord
    from fedexec.relay.server import HOLDING_WINDOW

    relay = Relay("tcp://127.0.0.1:*", tmp_path / "r")
    try:
        session = Session("local")
        sender, endpoint_id = b"E" + uuid.uuid4().bytes, str(uuid.uuid4())
        hello = {"role": "endpoint", "id": endpoint_id, "name": "ep", "py": P.PYTHON_VERSION, "workers": 1,
                 "capacity": 0}
        relay._handle(sender, session, P.decode(P.encode(P.HELLO, hello)))
        state = relay.endpoints.get(endpoint_id)
        ids = [uuid.uuid4().bytes for _ in range(200_000)]
        for task_id in ids:   # queued as accepted tasks are (200,000 SUBMITs would take a while)
            record = TaskRecord(task_id, b"C", endpoint_id, b"h" * 32, 0, P.PYTHON_VERSION, b"a", user="local")
            state.queue.append(record)
            relay.tasks[task_id] = record
        times = []
        for n in range(5):
            msg = P.decode(P.encode(P.HOLDING, {"tids": ids[n * 1024:(n + 1) * 1024]}))
            start = time.perf_counter()
            relay._handle(sender, session, msg)
            times.append(time.perf_counter() - start)
        assert sorted(times)[2] < 0.008, f"a HOLDING of 1024 ids took {sorted(times)[2] * 1000:.1f} ms"
        held = ids[:5 * 1024]
        assert set(state.dispatched) == set(held) and all(relay.tasks[t].state == DISPATCHED for t in held)
        # the dispatcher skips them: what it would send next is the first task not held
        assert next(r for r in state.queue if r.state == QUEUED).task_id == ids[5 * 1024]
        # half the queue held: it is compacted once, not scanned per HOLDING
        for start in range(5 * 1024, 100_000, P.MAX_ITEMS):
            relay._handle(sender, session, P.decode(P.encode(P.HOLDING, {"tids": ids[start:min(start + P.MAX_ITEMS, 100_000)]})))
        assert len(state.queue) == 100_000 and state.stale == 0
        state.hello_at -= HOLDING_WINDOW + 1
        with pytest.raises(P.ProtocolError, match="within 30 s of the HELLO"):
            relay._handle(sender, session, P.decode(P.encode(P.HOLDING, {"tids": ids[-10:]})))
        with pytest.raises(P.ProtocolError, match="did not say hello"):
            relay._handle(b"E" + uuid.uuid4().bytes, session, P.decode(P.encode(P.HOLDING, {"tids": ids[-10:]})))
        assert all(relay.tasks[t].state == QUEUED for t in ids[-10:])
    finally:
        closed(relay)


# -- endpoints and groups per user ------------------------------------------------------------

def endpoint_hello(address: str, token: str, endpoint_id: str) -> P.Message | None:
    """A HELLO as an endpoint from a raw socket (an attacker's): the relay's answer."""
    from fedexec.auth import connect_plainly
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"E" + uuid.uuid4().bytes)
    try:
        connect_plainly(sock, address, token)
        sock.send_multipart(P.encode(P.HELLO, {"role": "endpoint", "id": endpoint_id, "name": "raw",
                                               "py": P.PYTHON_VERSION, "workers": 1, "capacity": 0}))
        if sock.poll(10_000):
            return P.decode(sock.recv_multipart())
        return None
    finally:
        sock.close(linger=0)
        ctx.term()


@pytest.mark.timeout(120)
def test_endpoints_per_user_are_capped(tmp_path):
    """A user may register at most --max-endpoints-per-user endpoints: a new
    id beyond that is refused by name; their registered ids still connect;
    another user registers theirs."""
    data = tmp_path / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "bob")}
    with running_relay(tmp_path, "--auth", "token", "--max-endpoints-per-user", "2") as address:
        mine = [str(uuid.uuid4()) for _ in range(2)]
        for endpoint_id in mine:
            assert endpoint_hello(address, tokens["alice"], endpoint_id).type == P.WELCOME
        refused = endpoint_hello(address, tokens["alice"], str(uuid.uuid4()))
        assert refused.type == P.ERROR and refused.fields["refused"], refused.fields
        assert "2 endpoints registered" in refused.fields["msg"] and "--max-endpoints-per-user" in refused.fields["msg"]
        assert endpoint_hello(address, tokens["alice"], mine[0]).type == P.WELCOME   # hers, again
        assert endpoint_hello(address, tokens["bob"], str(uuid.uuid4())).type == P.WELCOME


@pytest.mark.timeout(120)
def test_distinct_groups_with_tasks_per_user_are_capped(tmp_path):
    """Tasks for a group of endpoints beyond a user's max_groups_per_user
    distinct groups with unfinished tasks fail with a QUOTA naming it;
    more tasks for groups they use are taken; other users are unaffected;
    once a group's tasks finish, another group is taken."""
    from fedexec.relay.access import Session
    relay = Relay("tcp://127.0.0.1:*", tmp_path / "r", max_groups_per_user=2)
    try:
        alice, bob = Session("alice"), Session("bob")
        members = [str(uuid.uuid4()) for _ in range(4)]
        for endpoint_id in members:
            hello = {"role": "endpoint", "id": endpoint_id, "name": "ep", "py": P.PYTHON_VERSION, "workers": 1,
                     "capacity": 0}
            relay._handle(b"E" + uuid.uuid4().bytes, alice, P.decode(P.encode(P.HELLO, hello)))
            relay._on_share(b"E", alice, {"ep": endpoint_id, "public": True})
        groups = [[members[0], members[1]], [members[1], members[2]], [members[2], members[3]]]

        def submit(session, group) -> tuple[bytes, int, dict | None]:
            """One task of ``session``'s user for ``group``: (id, status, failure or None if taken)."""
            client = b"C" + session.user.encode().ljust(16, b".")
            fn_hash, body = serialize_function(double)
            blobs = P.Blobs()
            task_id = uuid.uuid4().bytes
            row = [task_id, fn_hash, blobs.ref(serialize_arguments(double, (1,), {})), blobs.ref(body),
                   P.TASK_CALL, P.PYTHON_VERSION]
            relay._handle(client, session, P.decode(P.encode(P.SUBMIT, {"ep": group, "tasks": [row]}, blobs.frames)))
            rows, blobs = relay.client_results.pop(client, ([], P.Blobs()))
            if not rows:
                return task_id, P.OK, None
            msg = P.decode(next(iter(P.results_messages(rows, blobs.frames, ()))))
            row = msg.fields["rows"][0]
            return task_id, row[1], P.unpack_failure(P.blob(msg.blobs, row[2]))

        first = [submit(alice, groups[0]), submit(alice, groups[1]), submit(alice, groups[0])]
        assert all(failure is None for _, _, failure in first)   # taken (queued)
        task_id, status, failure = submit(alice, groups[2])
        assert status == P.FAILED and failure["kind"] == P.QUOTA and failure["quota"] == "groups", failure
        assert "2 different groups of endpoints" in failure["msg"] and failure["limit"] == 2
        more = submit(alice, groups[1])   # more for a group she has tasks for: taken
        assert more[2] is None
        assert submit(bob, groups[2])[2] is None     # bob has his own count
        assert relay.user_groups["alice"] == {tuple(sorted(groups[0])): 2, tuple(sorted(groups[1])): 2}
        # alice's tasks for the second group finish (cancelled): a third group is taken
        cancel = {"tids": [first[1][0], more[0]]}
        relay._on_cancel(b"C" + b"alice".ljust(16, b"."), alice, P.decode(P.encode(P.CANCEL, cancel)))
        assert relay.user_groups["alice"] == {tuple(sorted(groups[0])): 2}
        relay.client_results.clear()   # (the cancellations)
        assert submit(alice, groups[2])[2] is None
    finally:
        closed(relay)
