"""What a client trusts, attacked from the other side: an endpoint owner
who makes its users unpickle, a relay that asks for a function body for
ever, a squatter on the address of a relay that stopped. Real relay and
endpoint processes; the hostile parties are raw sockets on loopback."""

from __future__ import annotations

import os
import pickle
import threading
import time
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

from fedexec import (AuthenticationFailed, DeserializationError, FederatedExecutor, RemoteExecutionError,
                     SerializationError, TaskRejected)
from fedexec import protocol as P
from fedexec.auth import connect_plainly, public_key_path
from fedexec.relay.query import lookup_endpoint, share_endpoint

from test_access import fedexec_cli, running_endpoint, wait_connected
from test_faults import running_relay
from test_isolation import Planted

DEADLINE = 30


def fail(message: str) -> None:
    raise ValueError(message)


class FakeEndpoint(threading.Thread):
    """An endpoint that speaks the wire protocol itself, as a hostile owner's
    could: it claims in its HELLO what it likes (``data_only``) and answers
    every task with ``answer`` (status, blob), whatever the task was (or
    with what ``answer(row)`` gives for the task row, when it is callable;
    a task it gives None for is held, never answered)."""

    def __init__(self, address: str, token: str, answer: Any, data_only: bool = False) -> None:
        super().__init__(daemon=True)
        self.address, self.token, self.answer, self.data_only = address, token, answer, data_only
        self.id = str(uuid.uuid4())
        self.welcomed = threading.Event()
        self.stopping = threading.Event()
        self.tasks = 0

    def run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, b"E" + os.urandom(16))
        try:
            connect_plainly(sock, self.address, self.token)
            sock.send_multipart(P.encode(P.HELLO, {
                "role": "endpoint", "id": self.id, "name": f"fake-{self.id[:8]}", "py": P.PYTHON_VERSION,
                "workers": 1, "capacity": 100, "hb": 60.0, "hbm": 100, "holding": [], "data_only": self.data_only}))
            while not self.stopping.is_set():
                if not sock.poll(100):
                    continue
                msg = P.decode(sock.recv_multipart())
                if msg.type == P.WELCOME:
                    self.welcomed.set()
                elif msg.type == P.TASKS:
                    blobs = P.Blobs()
                    answers = [(row[0], self.answer(row) if callable(self.answer) else self.answer)
                               for row in msg.fields["tasks"]]
                    rows = [blobs.result_row(task_id, *answer) for task_id, answer in answers
                            if answer is not None]   # (None: the task is held, never answered)
                    self.tasks += len(rows)
                    sock.send_multipart(P.encode(P.RESULTS, {"rows": rows, "credit": len(answers)}, blobs.frames))
        finally:
            sock.close(linger=0)
            ctx.term()

    def __enter__(self) -> "FakeEndpoint":
        self.start()
        if not self.welcomed.wait(DEADLINE):
            pytest.fail(f"the relay at {self.address} did not welcome the fake endpoint")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.join(10)


@pytest.fixture(scope="module")
def two_users(tmp_path_factory):
    """A token-mode relay with users alice and bob; alice runs a real
    endpoint (not data-only)."""
    directory = tmp_path_factory.mktemp("client-trust")
    data = directory / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "bob")}
    with running_relay(directory, "--auth", "token") as address:
        with running_endpoint(directory, "alice-ep", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address) as ep:
            wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
            yield SimpleNamespace(address=address, tokens=tokens, alice_ep=ep)


# -- 1. an endpoint's owner does not decide whether its users unpickle -------------

@pytest.mark.timeout(120)
def test_another_users_endpoint_cannot_make_a_client_unpickle(two_users, tmp_path):
    """Bob's endpoint, shared with alice, says it takes pickles and answers
    every task with a pickle whose loading writes a file. Alice's executor
    (default setting) takes only plain data from another user's endpoint:
    the task fails clearly and the file is never written, for a result and
    for an exception. With data_only=False (her documented opt-in to trust
    bob) it is unpickled."""
    r = two_users
    marker = tmp_path / "planted"
    planted = pickle.dumps(Planted(str(marker)))
    with FakeEndpoint(r.address, r.tokens["bob"], (P.OK, planted)) as evil:
        share_endpoint(r.address, evil.id, add_users=["alice"], token=r.tokens["bob"])
        with FederatedExecutor(evil.id, relay=r.address, token=r.tokens["alice"], connect_timeout=10) as ex:
            assert ex.data_only is True
            with pytest.raises(DeserializationError, match="not plain data.*belongs to another user .'bob'.*"
                                                           "data_only=False"):
                ex.submit(divmod, 7, 2).result(DEADLINE)
            evil.answer = (P.EXCEPTION, planted)
            with pytest.raises(DeserializationError, match="exception is not plain data.*another user"):
                ex.submit(divmod, 7, 2).result(DEADLINE)
            # and her arguments went as plain data: a pickle-only argument is refused here
            with pytest.raises(SerializationError, match="data-only"):
                ex.submit(divmod, object(), 2).result(DEADLINE)
        assert evil.tasks == 2
        assert not marker.exists()
        # bob, on his own endpoint, takes pickles by default (it is his)
        with FederatedExecutor(evil.id, relay=r.address, token=r.tokens["bob"], connect_timeout=10) as ex:
            assert ex.data_only is False
        # alice trusts bob explicitly: his pickle is loaded, and runs its code here
        evil.answer = (P.OK, planted)
        with FederatedExecutor(evil.id, relay=r.address, token=r.tokens["alice"], data_only=False,
                               connect_timeout=10) as ex:
            assert ex.data_only is False
            ex.submit(divmod, 7, 2).result(DEADLINE).close()
        assert marker.exists()


@pytest.mark.timeout(120)
def test_data_only_false_is_refused_for_a_data_only_endpoint(two_users):
    r = two_users
    with FakeEndpoint(r.address, r.tokens["bob"], (P.OK, b""), data_only=True) as ep:
        with pytest.raises(ValueError, match=f"{ep.id}.* is data-only.*data_only=False cannot be used"):
            FederatedExecutor(ep.id, relay=r.address, token=r.tokens["bob"], data_only=False, connect_timeout=10)
        with FederatedExecutor(ep.id, relay=r.address, token=r.tokens["bob"], connect_timeout=10) as ex:
            assert ex.data_only is True   # what the endpoint says holds for its owner too
    with pytest.raises(ValueError, match="data_only must be None, True or False"):
        FederatedExecutor(r.alice_ep.id, relay=r.address, token=r.tokens["alice"], data_only="yes")


@pytest.mark.timeout(120)
def test_data_only_on_an_endpoint_that_takes_pickles(two_users):
    """data_only=True on alice's own endpoint, which takes pickles: its
    workers answer in the format the arguments came in, results and
    exceptions alike; without it her own endpoint gets pickles."""
    r = two_users
    with FederatedExecutor(r.alice_ep.id, relay=r.address, token=r.tokens["alice"], data_only=True) as ex:
        assert ex.data_only is True
        assert ex.submit(divmod, 7, 2).result(DEADLINE) == (3, 1)
        with pytest.raises(RemoteExecutionError, match="ValueError: no luck"):
            ex.submit(fail, "no luck").result(DEADLINE)
        with pytest.raises(SerializationError, match="must be plain data too"):
            ex.submit(object).result(DEADLINE)
    with FederatedExecutor(r.alice_ep.id, relay=r.address, token=r.tokens["alice"]) as ex:
        assert ex.data_only is False
        with pytest.raises(ValueError, match="no luck"):
            ex.submit(fail, "no luck").result(DEADLINE)


# -- 2. a relay that keeps asking for a function body ------------------------------

class FakeRelay(threading.Thread):
    """A relay that speaks just enough protocol to a client (WELCOME, a
    LOOKUP_REPLY for any endpoint, HEARTBEAT) and answers every submitted
    task with FAILED{kind: need_function}; with ``accept`` it first says it
    recorded the task (as an endpoint forging that answer as a result
    would make it look). ``submissions``: task id -> the function reference
    of each time it came (-1: without its body)."""

    def __init__(self, accept: bool = False) -> None:
        super().__init__(daemon=True)
        self.accept = accept
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.submissions: dict[bytes, list] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        sock, inc = self.sock, os.urandom(8)
        try:
            while not self.stopping.is_set():
                if not sock.poll(100):
                    continue
                sender, *frames = sock.recv_multipart()
                msg = P.decode(frames)
                if msg.type == P.HELLO:
                    reply = P.encode(P.WELCOME, {"role": "client", "py": P.PYTHON_VERSION, "inc": inc})
                elif msg.type == P.HEARTBEAT:
                    reply = P.encode(P.HEARTBEAT, {"inc": inc})
                elif msg.type == P.LOOKUP:
                    reply = P.encode(P.LOOKUP_REPLY, {"found": True, "endpoint": {
                        "id": msg.fields["ep"], "name": "fake", "py": P.PYTHON_VERSION, "workers": 1,
                        "status": "connected", "data_only": False, "yours": True}})
                elif msg.type == P.SUBMIT:
                    tids = [row[0] for row in msg.fields["tasks"]]
                    for row in msg.fields["tasks"]:
                        self.submissions.setdefault(row[0], []).append(row[3])
                    if self.accept:
                        sock.send_multipart([sender, *P.encode(P.ACCEPTED, {"tids": tids})])
                    failure = P.pack_failure(P.NEED_FUNCTION, "the relay no longer has this function")
                    reply = P.encode(P.RESULTS, {"rows": [[tid, P.FAILED, failure] for tid in tids]})
                else:
                    continue
                sock.send_multipart([sender, *reply])
        finally:
            self.sock.close(linger=0)
            self.ctx.term()

    def __enter__(self) -> "FakeRelay":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.join(10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("accept", [False, True], ids=["unaccepted", "accepted"])
def test_a_relay_that_keeps_asking_for_the_function_fails_the_task(fedexec_home, accept):
    """Asked for the body of an unaccepted task, the client sends it once
    more, with its body; asked again (or asked at all once the task was
    accepted), the task fails with a clear error instead of going round for
    ever."""
    with FakeRelay(accept) as relay:
        with FederatedExecutor(str(uuid.uuid4()), relay=relay.address, connect_timeout=10) as ex:
            started = time.monotonic()
            future = ex.submit(divmod, 7, 2)
            with pytest.raises(TaskRejected, match="asked for its function body again"):
                future.result(10)
            assert time.monotonic() - started < 5
            # the endpoint is the client's own and says it takes pickles: nothing here is about data_only
            assert ex.data_only is False
        (sent,) = relay.submissions.values()
        if accept:
            assert len(sent) == 1   # an accepted task is not sent again
        else:
            assert len(sent) == 2 and sent[1] != -1   # once more, with its body


# -- 3. a squatter on the address of a relay that stopped --------------------------

@pytest.mark.timeout(120)
def test_a_squatter_on_a_stopped_relays_address_cannot_pass_for_it(tmp_path, fedexec_home):
    """The relay's public key stays published after it stops, so this
    user's clients keep requiring it: a plain listener that took the
    address (NULL or PLAIN, which would read PLAIN credentials) gets no
    handshake through, and the client fails with an error that says so
    instead of connecting plainly."""
    data = tmp_path / "relay-data"
    token = fedexec_cli("relay", "add-user", "alice", "--data-dir", data).stdout.strip()
    with running_relay(tmp_path, "--auth", "token", "--curve") as address:
        pinned = public_key_path(address)
        key = pinned.read_text()
        assert key == (data / "relay.curve").read_text().split()[0]   # the key kept in the data dir
        assert lookup_endpoint(address, str(uuid.uuid4()), token=token, timeout=10) is None   # served, over CURVE
    assert pinned.read_text() == key   # kept after the relay stopped
    for plain in (False, True):
        ctx = zmq.Context()
        squatter = ctx.socket(zmq.ROUTER)
        squatter.setsockopt(zmq.LINGER, 0)
        squatter.plain_server = plain   # no ZAP handler: a PLAIN server takes any credentials
        squatter.bind(address)
        try:
            started = time.monotonic()
            with pytest.raises(AuthenticationFailed, match=f"did not complete an encrypted handshake.*published by the relay in {pinned}"):
                FederatedExecutor(str(uuid.uuid4()), relay=address, token=token, connect_timeout=20)
            assert time.monotonic() - started < 10
            with pytest.raises(AuthenticationFailed, match="did not complete an encrypted handshake"):
                lookup_endpoint(address, str(uuid.uuid4()), token=token, timeout=10)
            assert squatter.poll(200) == 0   # not a message got through
        finally:
            squatter.close(linger=0)
            ctx.term()
