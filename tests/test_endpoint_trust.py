"""What an endpoint trusts and what it does not: function bodies are checked
against their hash (a relay that lies cannot swap the code), a sandboxed task
cannot pose as a worker of its pool, and a data-only endpoint loads no
argument that could run code. Real processes, raw sockets on loopback."""

from __future__ import annotations

import contextlib
import operator
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import cloudpickle
import pytest
import zmq

from fedexec import protocol as P
from fedexec.serialize import serialize_arguments, serialize_function

from test_access import running_endpoint
from test_faults import tail

cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEADLINE = 30.0


def write_marker(path):
    """Leaves a file behind: the proof that it ran."""
    with open(path, "w") as f:
        f.write("ran")
    return "ran"


class FakeRelay:
    """A raw ROUTER socket on loopback speaking the relay's side of the
    protocol to one real endpoint process: WELCOMEs it, sends it TASKS, and
    collects the RESULTS it sends back (a relay that lies, when the test
    makes it)."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.peer = b""
        self.hello: dict[str, Any] = {}
        self.outcomes: dict[bytes, tuple[int, bytes]] = {}

    def welcome(self, log: Path) -> dict[str, Any]:
        """Wait for the endpoint's HELLO and welcome it; its HELLO fields."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if self.sock.poll(200):
                peer, *frames = self.sock.recv_multipart()
                msg = P.decode(frames)
                if msg.type == P.HELLO:
                    self.peer, self.hello = peer, msg.fields
                    self.sock.send_multipart([peer, *P.encode(P.WELCOME, {"role": "endpoint"})])
                    return msg.fields
        pytest.fail(f"the endpoint did not say HELLO within {DEADLINE} s:\n{tail(log)}")

    def send_tasks(self, rows: list[list[Any]], frames: list[Any]) -> None:
        self.sock.send_multipart([self.peer, *P.encode(P.TASKS, {"tasks": rows}, frames)])

    def outcomes_of(self, task_ids: list[bytes], log: Path) -> dict[bytes, tuple[int, bytes]]:
        deadline = time.monotonic() + DEADLINE
        while not all(t in self.outcomes for t in task_ids) and time.monotonic() < deadline:
            if self.sock.poll(200):
                _, *frames = self.sock.recv_multipart()
                msg = P.decode(frames)
                if msg.type == P.RESULTS:
                    for row in msg.fields["rows"]:
                        self.outcomes[row[0]] = (row[1], bytes(P.blob(msg.blobs, row[2])))
                    if msg.fields["rows"]:
                        self.sock.send_multipart([self.peer, *P.encode(
                            P.ACK, {"tids": [row[0] for row in msg.fields["rows"]]})])
        missing = [t.hex() for t in task_ids if t not in self.outcomes]
        assert not missing, f"no outcome for tasks {missing} within {DEADLINE} s:\n{tail(log)}"
        return {t: self.outcomes[t] for t in task_ids}

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@contextlib.contextmanager
def fake_relay_with_endpoint(directory: Path, name: str, **config: Any) -> Iterator[tuple[FakeRelay, Any]]:
    """A fake relay and a real endpoint process (configured with ``config``) it has welcomed."""
    relay = FakeRelay()
    try:
        with running_endpoint(directory, name, {}, relay=relay.address, **config) as ep:
            relay.welcome(ep.log)
            yield relay, ep
    finally:
        relay.close()


def task_row(blobs: P.Blobs, fn_hash: bytes, body: bytes | None, args_blob: bytes) -> list[Any]:
    return [uuid.uuid4().bytes, fn_hash, blobs.ref(args_blob), -1 if body is None else blobs.ref(body),
            P.TASK_CALL, P.PYTHON_VERSION]


# -- item 5: function bodies are checked against their hash -------------------------------

@pytest.mark.timeout(90)
def test_a_body_that_does_not_match_its_hash_is_refused_and_never_runs(tmp_path):
    mark = tmp_path / "swapped-body-ran"
    honest_hash, honest_body = serialize_function(operator.add)
    _, evil_body = serialize_function(write_marker)
    with fake_relay_with_endpoint(tmp_path, "hash-check") as (relay, ep):
        blobs = P.Blobs()
        # the relay claims the harmless add's hash, but sends a body that writes a file
        lying = task_row(blobs, honest_hash, evil_body, serialize_arguments(write_marker, (str(mark),), {}))
        relay.send_tasks([lying], blobs.frames)
        (status, blob), = relay.outcomes_of([lying[0]], ep.log).values()
        assert status == P.FAILED, (status, blob)
        failure = P.unpack_failure(blob)
        assert failure["kind"] == P.REJECTED
        assert "does not match" in failure["msg"] and honest_hash.hex() in failure["msg"], failure
        # the lying body was not kept: a later task of that hash without a body is not given it
        blobs = P.Blobs()
        bodiless = task_row(blobs, honest_hash, None, serialize_arguments(operator.add, (1, 2), {}))
        relay.send_tasks([bodiless], blobs.frames)
        (status, blob), = relay.outcomes_of([bodiless[0]], ep.log).values()
        assert status == P.FAILED and "not given this task's function" in P.unpack_failure(blob)["msg"]
        # a correct body still runs
        blobs = P.Blobs()
        honest = task_row(blobs, honest_hash, honest_body, serialize_arguments(operator.add, (2, 3), {}))
        relay.send_tasks([honest], blobs.frames)
        (status, blob), = relay.outcomes_of([honest[0]], ep.log).values()
        assert status == P.OK and cloudpickle.loads(blob) == 5
        time.sleep(0.5)   # anything that ran would have written by now
        assert not mark.exists(), "the swapped function body ran"
