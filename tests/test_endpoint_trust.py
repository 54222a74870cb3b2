"""What an endpoint trusts and what it does not: function bodies are checked
against their hash (a relay that lies cannot swap the code), a sandboxed task
cannot pose as a worker of its pool, and a data-only endpoint loads no
argument that could run code. Real processes, raw sockets on loopback."""

from __future__ import annotations

import contextlib
import json
import operator
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import cloudpickle
import psutil
import pytest
import zmq

from fedexec import FederatedExecutor, WorkerLost
from fedexec import protocol as P
from fedexec.relay.query import share_endpoint
from fedexec.serialize import serialize_arguments, serialize_function

from test_access import fedexec_cli, running_endpoint, wait_connected
from test_faults import running_relay, tail
from test_sandbox import bwrap  # noqa: F401  (the fixture: bubblewrap, installed if missing)

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


# -- item 2: a sandboxed task cannot pose as a worker of its pool ---------------------------

def pose_as_worker(pool_pid, endpoint_pool_socket, listen_seconds):
    """An attacker's task, run in a sandboxed worker: dials every worker
    channel it can find under guessed ids (the old scheme's ``w<pool pid>-<n>``,
    random ones, and its own worker's), says READY again and again so that a
    replacement worker's slot would take it, and answers any task it receives
    with a forged result. Returns what it saw and how many tasks reached it."""
    import gc
    import glob
    import os
    import secrets
    import sys
    import time

    import zmq

    from fedexec import protocol as P

    own = [o for o in gc.get_objects() if type(o).__name__ == "WorkerProcess"]
    own_id = own[0].worker_id if own else b""
    address = sys.argv[sys.argv.index("--address") + 1]
    directory = os.path.dirname(address[len("ipc://"):])
    seen = sorted(os.listdir(directory))
    paths = {address[len("ipc://"):], *glob.glob(os.path.join(directory, "*"))}
    paths |= {os.path.join(directory, name) for name in ["workers", *(f"w{n}.sock" for n in range(1, 20))]}
    ids = [f"w{pool_pid}-{n}".encode() for n in range(1, 20)] + [secrets.token_bytes(16) for _ in range(10)]
    ids.append(own_id)
    ctx = zmq.Context()
    socks = []
    for path in sorted(paths):
        if path.endswith(".task"):
            continue
        for identity in ids:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IDENTITY, identity)
            sock.connect(f"ipc://{path}")
            socks.append(sock)
    received = forged = 0
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    deadline = time.monotonic() + listen_seconds
    next_ready = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_ready:
            next_ready = time.monotonic() + 0.2
            for sock in socks:
                sock.send_multipart(P.encode(P.READY, {"pid": os.getpid(), "py": P.PYTHON_VERSION}), zmq.NOBLOCK)
        for sock, _ in poller.poll(100):
            msg = P.decode(sock.recv_multipart())
            if msg.type == P.TASKS:
                received += len(msg.fields["tasks"])
                blobs = P.Blobs()
                rows = [blobs.result_row(row[0], P.OK, b"\x80\x05K\x00.") for row in msg.fields["tasks"]]
                sock.send_multipart(P.encode(P.RESULTS, {"rows": rows}, blobs.frames))
                forged += len(rows)
    for sock in socks:
        sock.close(linger=0)
    ctx.term()
    return {
        "received": received, "forged": forged, "dialled": len(socks), "own_id": len(own_id), "seen": seen,
        "argv": sys.argv, "env_secret": "FEDEXEC_POOL_SECRET" in os.environ,
        "pool_socket_visible": os.path.exists(endpoint_pool_socket), "procs": sorted(
            name for name in os.listdir("/proc") if name.isdigit()),
    }


def die_now():
    os._exit(3)


def square(x):
    return x * x


@pytest.mark.timeout(180)
def test_a_sandboxed_task_cannot_pose_as_a_worker_of_its_pool(bwrap, tmp_path):
    """Mallory, who may use Alice's shared, sandboxed endpoint, runs a task
    that dials its pool's worker channels under guessed, random and its own
    worker's ids, while another of her tasks kills its worker to force a
    replacement: no task reaches her dialler, and Alice's tasks, run by the
    replacement meanwhile, all come back right."""
    data = tmp_path / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "mallory")}
    with running_relay(tmp_path, "--auth", "token") as address:
        with running_endpoint(tmp_path, "shared-sandboxed", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address,
                              sandbox="bwrap", max_workers=2, heartbeat_period=0.5) as ep:
            wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
            share_endpoint(address, ep.id, add_users=["mallory"], token=tokens["alice"])
            pools = [p for p in psutil.Process(ep.proc.pid).children() if "fedexec.pool" in p.cmdline()]
            assert len(pools) == 1, pools
            pool_pid = pools[0].pid
            for proc in pools[0].children(recursive=True):   # no worker id on any command line
                with contextlib.suppress(psutil.Error):
                    assert "--worker-id" not in proc.cmdline(), proc.cmdline()
            status = json.loads((ep.home / "endpoints" / ep.name / "status.json").read_text()) \
                if (ep.home / "endpoints" / ep.name / "status.json").exists() else {}
            pool_socket = status.get("pool_address", "ipc:///nonexistent")[len("ipc://"):]
            with FederatedExecutor(ep.id, relay=address, token=tokens["mallory"]) as mallory, \
                    FederatedExecutor(ep.id, relay=address, token=tokens["alice"]) as alice:
                assert alice.submit(square, 3).result(DEADLINE) == 9   # both workers warm and ready
                dialler = mallory.submit(pose_as_worker, pool_pid, pool_socket, 12.0)
                deadline = time.monotonic() + DEADLINE
                while not dialler.running() and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert dialler.running(), "the attacker's task did not start"
                time.sleep(1.0)   # its sockets are up
                with pytest.raises(WorkerLost):
                    mallory.submit(die_now).result(DEADLINE)   # on the other worker: replaced
                victims = [alice.submit(square, n) for n in range(40)]
                assert [f.result(DEADLINE) for f in victims] == [n * n for n in range(40)]
                seen = dialler.result(DEADLINE)
    assert seen["dialled"] > 30 and seen["own_id"] == 16, seen
    assert seen["received"] == 0 and seen["forged"] == 0, seen
    assert not seen["env_secret"] and not seen["pool_socket_visible"], seen
    assert not any(arg == "--worker-id" for arg in seen["argv"]), seen["argv"]
    assert [name for name in seen["seen"] if name.endswith(".sock")] == [
        os.path.basename(seen["argv"][seen["argv"].index("--address") + 1])], seen["seen"]
    assert len(seen["procs"]) <= 3, f"the sandbox sees other processes: {seen['procs']}"
