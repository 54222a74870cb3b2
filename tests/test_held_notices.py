"""The relay holds ACCEPTED and ACK notices back for their peer's next
message (relay/notices.py), a few milliseconds at most: with no other
traffic they still come promptly, each to its own peer only, and a full
message's worth goes at once. The class first, then a real relay on
loopback with a raw client and a raw endpoint."""

from __future__ import annotations

import os
import time

import pytest
import zmq

from fedexec import protocol as P
from fedexec.auth import connect_plainly
from fedexec.relay.notices import NOTICE_DELAY, HeldNotices

from test_faults import running_relay
from test_row_checks import _hello_endpoint

DEADLINE = 30
# The relay's turn with nothing to do comes every 0.5 s (MAINTENANCE_INTERVAL):
# a notice held until then, not for its delay, arrives later than this.
PROMPT = 0.25


def _ids(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def _sent(messages: list[tuple[bytes, list]]) -> dict[tuple[bytes, str], list[bytes]]:
    out: dict[tuple[bytes, str], list[bytes]] = {}
    for peer, frames in messages:
        msg = P.decode(frames)
        out.setdefault((peer, msg.type), []).extend(msg.fields["tids"])
    return out


def test_notices_wait_for_their_peers_next_message_or_their_delay():
    notices = HeldNotices(delay=0.005)
    client, endpoint = b"C" + os.urandom(16), b"E" + os.urandom(16)
    accepted, stored = _ids(3), _ids(2)
    notices.hold(client, P.ACCEPTED, accepted[:2], now=100.0)
    notices.hold(endpoint, P.ACK, stored, now=100.001)
    notices.hold(client, P.ACCEPTED, accepted[2:], now=100.002)
    assert notices.wait_ms(100.002, 500) in (3, 4)   # due 5 ms after the first was held
    assert notices.wait_ms(100.002, 2) == 2
    assert list(notices.due(set(), now=100.003)) == []   # nobody was sent anything, nothing due
    # the client got a message this turn: its notices go with it, the endpoint's stay
    assert _sent(list(notices.due({client, b"someone else"}, now=100.003))) == {(client, P.ACCEPTED): accepted}
    assert notices
    assert _sent(list(notices.due(set(), now=100.0049))) == {}
    # the oldest has waited its delay: everything goes
    assert _sent(list(notices.due(set(), now=100.0051))) == {(endpoint, P.ACK): stored}
    assert not notices and notices.wait_ms(100.0051, 500) == 500


def test_a_full_messages_worth_of_notices_goes_at_once_in_messages_within_limits():
    notices = HeldNotices(delay=60.0)
    client = b"C" + os.urandom(16)
    many = _ids(P.MAX_ITEMS + 5)
    notices.hold(client, P.ACCEPTED, many, now=0.0)
    messages = list(notices.due(set(), now=0.0))
    assert len(messages) == 2 and all(len(P.decode(frames).fields["tids"]) <= P.MAX_ITEMS for _, frames in messages)
    assert _sent(messages) == {(client, P.ACCEPTED): many}


def test_held_notices_are_a_copy_of_what_was_handed():
    notices = HeldNotices()
    mine = _ids(2)
    notices.hold(b"C1", P.ACCEPTED, mine, now=0.0)
    notices.hold(b"C1", P.ACCEPTED, _ids(1), now=0.0)
    assert len(mine) == 2   # (extended a list of its own, not the caller's)


def _raw_client(ctx: zmq.Context, address: str) -> zmq.Socket:
    """A raw client, welcomed by the relay."""
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    connect_plainly(client, address)
    client.send_multipart(P.encode(P.HELLO, {"role": "client", "py": P.PYTHON_VERSION}))
    assert _next(client, P.WELCOME, DEADLINE) is not None, "the relay did not welcome the raw client"
    return client


def _next(sock: zmq.Socket, kind: int, timeout: float) -> P.Message | None:
    """The next message of ``kind`` on ``sock`` within ``timeout`` seconds (others are passed over)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(max(1, int(left * 1000))):
            msg = P.decode(sock.recv_multipart())
            if msg.type == kind:
                return msg
    return None


@pytest.mark.timeout(120)
def test_a_relay_sends_held_notices_promptly_with_no_other_traffic(tmp_path):
    """Five tasks one at a time, on a durable relay: each task's ACCEPTED
    reaches the client, and its result's ACK the endpoint, well within
    PROMPT of the message they answer, though nothing else is sent to
    either meanwhile (the endpoint holds each task until its ACCEPTED has
    come; the client sends nothing after its SUBMIT)."""
    assert NOTICE_DELAY < PROMPT / 10
    ctx = zmq.Context()
    try:
        with running_relay(tmp_path) as address:
            endpoint, endpoint_id = _hello_endpoint(ctx, address, P.PYTHON_VERSION)
            client = _raw_client(ctx, address)
            body = b"function body"
            fn_hash = P.content_hash(body)
            for i in range(5):
                task_id = os.urandom(16)
                client.send_multipart(P.encode(P.SUBMIT, {"ep": endpoint_id, "tasks": [
                    [task_id, fn_hash, b"args", 0, P.TASK_CALL, P.PYTHON_VERSION]]}, [body]))
                sent = time.monotonic()
                tasks = _next(endpoint, P.TASKS, DEADLINE)
                assert tasks is not None and tasks.fields["tasks"][0][0] == task_id
                accepted = _next(client, P.ACCEPTED, DEADLINE)
                took = time.monotonic() - sent
                assert accepted is not None and list(accepted.fields["tids"]) == [task_id], f"task {i}"
                assert took < PROMPT, f"task {i}: ACCEPTED came {took:.3f} s after the SUBMIT"
                blobs = P.Blobs()
                endpoint.send_multipart(P.encode(P.RESULTS, {
                    "rows": [blobs.result_row(task_id, P.OK, b"value")], "credit": 1}, blobs.frames))
                answered = time.monotonic()
                ack = _next(endpoint, P.ACK, DEADLINE)
                took = time.monotonic() - answered
                assert ack is not None and list(ack.fields["tids"]) == [task_id], f"task {i}"
                assert took < PROMPT, f"task {i}: ACK came {took:.3f} s after the result"
                results = _next(client, P.RESULTS, DEADLINE)
                assert results is not None and results.fields["rows"][0][0] == task_id
                client.send_multipart(P.encode(P.ACK, {"tids": [task_id]}))
    finally:
        ctx.destroy(linger=0)   # (the sockets too, when an assertion failed)


@pytest.mark.timeout(120)
def test_each_client_gets_the_notices_of_its_own_tasks_only(tmp_path):
    """Two clients of one relay (the same user: local mode) submit tasks to
    one endpoint, which answers them all in one message: each client's
    ACCEPTED notices name its own tasks, all of them, and none of the other's,
    and the endpoint's ACKs name every result it sent."""
    ctx = zmq.Context()
    try:
        with running_relay(tmp_path) as address:
            endpoint, endpoint_id = _hello_endpoint(ctx, address, P.PYTHON_VERSION)
            body = b"function body"
            fn_hash = P.content_hash(body)
            clients, mine = [], []
            for _ in range(2):
                client = _raw_client(ctx, address)
                ids = _ids(3)
                client.send_multipart(P.encode(P.SUBMIT, {"ep": endpoint_id, "tasks": [
                    [task_id, fn_hash, b"args", 0 if i == 0 else -1, P.TASK_CALL, P.PYTHON_VERSION]
                    for i, task_id in enumerate(ids)]}, [body]))
                clients.append(client)
                mine.append(set(ids))
            handed: set[bytes] = set()
            deadline = time.monotonic() + DEADLINE
            while handed != mine[0] | mine[1] and time.monotonic() < deadline:
                tasks = _next(endpoint, P.TASKS, 1.0)
                if tasks is not None:
                    handed.update(row[0] for row in tasks.fields["tasks"])
            assert handed == mine[0] | mine[1]
            blobs = P.Blobs()
            endpoint.send_multipart(P.encode(P.RESULTS, {
                "rows": [blobs.result_row(task_id, P.OK, b"value") for task_id in handed], "credit": 6},
                blobs.frames))
            acked: set[bytes] = set()
            while acked != handed and time.monotonic() < deadline:
                ack = _next(endpoint, P.ACK, 1.0)
                if ack is not None:
                    acked.update(ack.fields["tids"])
            assert acked == handed
            for client, own in zip(clients, mine):
                accepted: set[bytes] = set()
                results: set[bytes] = set()
                while (accepted != own or results != own) and time.monotonic() < deadline:
                    if client.poll(100):
                        msg = P.decode(client.recv_multipart())
                        if msg.type == P.ACCEPTED:
                            accepted.update(msg.fields["tids"])
                        elif msg.type == P.RESULTS:
                            results.update(row[0] for row in msg.fields["rows"])
                assert accepted == own and results == own
                time.sleep(0.05)   # nothing else comes: no notice of the other client's tasks
                while client.poll(0):
                    msg = P.decode(client.recv_multipart())
                    if msg.type in (P.ACCEPTED, P.RESULTS):
                        assert not set(msg.fields.get("tids", ())) - own, "another client's task named"
    finally:
        ctx.destroy(linger=0)
