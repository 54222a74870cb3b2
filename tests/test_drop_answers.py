"""An endpoint's answer to being told to drop a task is not that task's
outcome. When an endpoint says (HELLO) it holds tasks the relay has no
unfinished record of for it, the relay tells it to drop them, and it answers
CANCELLED. The same task may be sent to it again before that answer comes: a
client sends again what a restarted relay had not recorded, with the same
id. Before, the late answer was taken for the outcome of the copy sent
again: the client saw its task cancelled though nobody cancelled it (review
of session 27, findings 2 and 3). A real relay; the endpoint and the client
are raw sockets on loopback, so the order of the messages is the test's."""

from __future__ import annotations

import operator
import os
import uuid

import psutil
import pytest
import zmq

from fedexec import protocol as P
from fedexec.auth import connect_plainly
from fedexec.serialize import serialize_arguments, serialize_function

from test_access import RawClient, fedexec_cli
from test_faults import running_relay

DEADLINE = 10.0


class RawEndpoint:
    """An endpoint speaking the wire protocol itself, saying it holds ``holding``."""

    def __init__(self, address: str, token: str, holding: list[bytes]) -> None:
        self.id = str(uuid.uuid4())
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, b"E" + os.urandom(16))
        connect_plainly(self.sock, address, token)
        self.sock.send_multipart(P.encode(P.HELLO, {
            "role": "endpoint", "id": self.id, "name": "raw", "py": P.PYTHON_VERSION, "workers": 1,
            "capacity": 10, "hb": 60.0, "hbm": 100, "holding": holding}))

    def expect(self, kind: str) -> P.Message:
        while self.sock.poll(int(DEADLINE * 1000)):
            msg = P.decode(self.sock.recv_multipart())
            if msg.type == kind:
                return msg
        pytest.fail(f"the relay sent the endpoint no {kind}")

    def results(self, rows: list[tuple[bytes, int, bytes]], credit: int) -> None:
        blobs = P.Blobs()
        self.sock.send_multipart(P.encode(P.RESULTS, {
            "rows": [blobs.result_row(task_id, status, blob) for task_id, status, blob in rows],
            "credit": credit}, blobs.frames))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def submit_with_id(client: RawClient, endpoint_id: str, task_id: bytes, *args, resend: bool = True) -> None:
    fn_hash, body = serialize_function(operator.add)
    blobs = P.Blobs()
    row = [task_id, fn_hash, blobs.ref(serialize_arguments(operator.add, args, {})), blobs.ref(body), P.TASK_CALL,
           P.PYTHON_VERSION]
    client.send(P.SUBMIT, {"ep": endpoint_id, "tasks": [row], **({"resend": True} if resend else {})}, blobs.frames)


def outcome(client: RawClient, task_id: bytes) -> tuple[int, bytes]:
    while task_id not in client.outcomes:
        msg = client.expect(P.RESULTS, DEADLINE)
        assert msg is not None, f"no outcome for task {task_id.hex()}"
        for row in msg.fields["rows"]:
            client.outcomes[row[0]] = (row[1], bytes(P.blob(msg.blobs, row[2])))
    return client.outcomes.pop(task_id)


@pytest.mark.timeout(120)
def test_an_answer_to_a_drop_is_not_taken_for_the_outcome_of_the_copy_sent_again(tmp_path):
    token = fedexec_cli("relay", "add-user", "alice", "--data-dir", tmp_path / "relay-data").stdout.strip()
    again, cancelled = uuid.uuid4().bytes, uuid.uuid4().bytes   # ids the relay has no record of
    with running_relay(tmp_path, "--auth", "token") as address:
        endpoint = RawEndpoint(address, token, holding=[again, cancelled])
        client = None
        try:
            told = endpoint.expect(P.CANCEL)   # drop them: the relay has no record of either
            assert sorted(told.fields["tids"]) == sorted([again, cancelled])
            endpoint.expect(P.WELCOME)
            client = RawClient(address, token)
            # the client sends both again (as after a restart that lost them); they reach the
            # endpoint before its answers to the drop do
            submit_with_id(client, endpoint.id, again, 2, 3)
            submit_with_id(client, endpoint.id, cancelled, 4, 5)
            sent = set()
            while len(sent) < 2:
                sent.update(row[0] for row in endpoint.expect(P.TASKS).fields["tasks"])
            assert sent == {again, cancelled}
            endpoint.results([(again, P.CANCELLED, b""), (cancelled, P.CANCELLED, b"")], credit=0)
            # the copy sent again runs there: its outcome is the client's, not the drop's answer
            endpoint.results([(again, P.OK, b"five")], credit=1)
            assert outcome(client, again) == (P.OK, b"five")
            # the client cancels the other: the endpoint's next CANCELLED answers that
            client.send(P.CANCEL, {"tids": [cancelled]})
            assert endpoint.expect(P.CANCEL).fields["tids"] == [cancelled]
            endpoint.results([(cancelled, P.CANCELLED, b"")], credit=1)
            assert outcome(client, cancelled) == (P.CANCELLED, b"")
        finally:
            endpoint.close()
            if client is not None:
                client.close()


@pytest.mark.timeout(120)
def test_a_finished_task_sent_again_without_the_resend_mark_gets_its_result_not_a_second_run(tmp_path):
    """A client that changes transports (a same-host link ended, samehost.py)
    can have a task's first SUBMIT arrive after the copy it sent again, marked
    as such, has finished: every SUBMIT of a task of its user the relay holds
    finished is answered with its result; it never runs twice (review s32,
    finding 3: it ran again)."""
    token = fedexec_cli("relay", "add-user", "alice", "--data-dir", tmp_path / "relay-data").stdout.strip()
    with running_relay(tmp_path, "--auth", "token") as address:
        endpoint = RawEndpoint(address, token, holding=[])
        client = None
        try:
            endpoint.expect(P.WELCOME)
            client = RawClient(address, token)
            task_id = uuid.uuid4().bytes
            submit_with_id(client, endpoint.id, task_id, 2, 3)
            assert [row[0] for row in endpoint.expect(P.TASKS).fields["tasks"]] == [task_id]
            endpoint.results([(task_id, P.OK, b"five")], credit=1)
            assert outcome(client, task_id) == (P.OK, b"five")
            for resend in (False, True):   # not acknowledged, both copies come late
                submit_with_id(client, endpoint.id, task_id, 2, 3, resend=resend)
                assert outcome(client, task_id) == (P.OK, b"five")
            # nothing ran again: the endpoint was sent no task since
            while endpoint.sock.poll(1000):
                msg = P.decode(endpoint.sock.recv_multipart())
                assert msg.type != P.TASKS, msg.fields
        finally:
            endpoint.close()
            if client is not None:
                client.close()


def _relay_process(address: str) -> psutil.Process:
    for child in psutil.Process().children():
        if "fedexec.relay" in child.cmdline() and address in child.cmdline():
            return child
    pytest.fail(f"no relay process at {address} among this test's children")


@pytest.mark.timeout(120)
def test_what_an_endpoint_says_it_holds_does_not_grow_the_relays_memory(tmp_path):
    """An owner's endpoints say they hold 163,840 made-up task ids (HELLO,
    then HOLDING): the relay tells them to drop them all, and keeps notes of
    at most 65,536 for one owner, forgotten after 300 s (relay/registry.py
    DropNotes); ids of another length are refused (a protocol error). Before,
    each endpoint kept up to 65,536 notes of whatever ids it sent, across
    reconnections, and an owner may register 1,000 endpoints (review s28:
    5-18 MiB of the relay's memory per endpoint)."""
    token = fedexec_cli("relay", "add-user", "mallory", "--data-dir", tmp_path / "relay-data").stdout.strip()
    with running_relay(tmp_path, "--auth", "token") as address:
        relay = _relay_process(address)
        RawClient(address, token).close()   # (the relay warmed up: a session made and gone)
        long_ids = RawEndpoint(address, token, holding=[os.urandom(400)])
        try:
            assert "16-byte ids" in long_ids.expect(P.ERROR).fields["msg"]
        finally:
            long_ids.close()
        before = relay.memory_info().rss
        for _ in range(5):
            endpoint = RawEndpoint(address, token, holding=[os.urandom(16) for _ in range(P.MAX_ITEMS)])
            try:
                dropped = len(endpoint.expect(P.CANCEL).fields["tids"])
                for _ in range(31):
                    endpoint.sock.send_multipart(P.encode(P.HOLDING, {"tids": [os.urandom(16)
                                                                               for _ in range(P.MAX_ITEMS)]}))
                while dropped < 32 * P.MAX_ITEMS:
                    dropped += len(endpoint.expect(P.CANCEL).fields["tids"])
            finally:
                endpoint.close()
        grown = (relay.memory_info().rss - before) / 2**20
        print(f"relay grew {grown:.1f} MiB")
        # all 163,840 kept (five endpoints of 32,768) would be ~2.5 times the cap's
        assert grown < 11, f"the relay grew by {grown:.0f} MiB"
