"""What an endpoint trusts and what it does not: function bodies are checked
against their hash (a relay that lies cannot swap the code), a sandboxed task
cannot pose as a worker of its pool, and a data-only endpoint loads no
argument that could run code. Real processes, raw sockets on loopback."""

from __future__ import annotations

import contextlib
import json
import operator
import os
import pickle
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import cloudpickle
import psutil
import pytest
import zmq

from fedexec import (DeserializationError, FederatedExecutor, NotAuthorized, RemoteExecutionError, SerializationError,
                     WorkerLost)
from fedexec import protocol as P
from fedexec.auth import connect_plainly
from fedexec.config import ConfigError, EndpointConfig
from fedexec.relay.query import share_endpoint
from fedexec.serialize import function_hash, serialize_arguments, serialize_function

from test_access import RawClient, fedexec_cli, running_endpoint, wait_connected
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


@contextlib.contextmanager
def shared_sandboxed_endpoint(tmp_path):
    """A token relay; Alice's bwrap-sandboxed endpoint of 2 workers, shared
    with Mallory; yields (address, tokens, endpoint, the one process its pool runs in: the endpoint's own,
    the local provider's default, or a pool process)."""
    data = tmp_path / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "mallory")}
    with running_relay(tmp_path, "--auth", "token") as address:
        with running_endpoint(tmp_path, "shared-sandboxed", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address,
                              sandbox="bwrap", max_workers=2, heartbeat_period=0.5) as ep:
            wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
            share_endpoint(address, ep.id, add_users=["mallory"], token=tokens["alice"])
            pools = [p for p in psutil.Process(ep.proc.pid).children() if "fedexec.pool" in p.cmdline()] or [
                psutil.Process(ep.proc.pid)]
            assert len(pools) == 1, pools
            yield address, tokens, ep, pools[0]


@pytest.mark.timeout(180)
def test_a_sandboxed_task_cannot_pose_as_a_worker_of_its_pool(bwrap, tmp_path):
    """Mallory, who may use Alice's shared, sandboxed endpoint, runs a task
    that dials its pool's worker channels under guessed, random and its own
    worker's ids, while another of her tasks kills its worker to force a
    replacement: no task reaches her dialler, and Alice's tasks, run by the
    replacement meanwhile, all come back right."""
    with shared_sandboxed_endpoint(tmp_path) as (address, tokens, ep, pool):
        pool_pid = pool.pid
        for proc in pool.children(recursive=True):   # no worker id on any command line
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


def spoil_marker_then(how, value=b""):
    """Truncate this worker's marker file (its path is on the worker's
    command line), write ``value`` into it, then return or kill the worker."""
    path = sys.argv[sys.argv.index("--marker") + 1]
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(value)
    if how == "exit":
        os._exit(5)
    return "returned"


def square_after(seconds, x):
    time.sleep(seconds)
    return x * x


@pytest.mark.timeout(180)
def test_a_task_that_spoils_its_marker_file_harms_no_one_else(bwrap, tmp_path):
    """Mallory's sandboxed tasks truncate their worker's marker file (then
    return, or kill the worker), or write the id of Alice's running task into
    it and kill the worker: the pool, which reads markers, survives; Mallory's
    tasks fail with WorkerLost; Alice's tasks, running beside them, all come
    back right, run once."""
    with shared_sandboxed_endpoint(tmp_path) as (address, tokens, ep, pool):
        with FederatedExecutor(ep.id, relay=address, token=tokens["mallory"]) as mallory, \
                FederatedExecutor(ep.id, relay=address, token=tokens["alice"]) as alice:
            assert alice.submit(square, 3).result(DEADLINE) == 9
            for how in ("return", "exit"):
                running = alice.submit(square_after, 1.0, 7)
                with pytest.raises(WorkerLost):
                    mallory.submit(spoil_marker_then, how).result(DEADLINE)
                assert running.result(DEADLINE) == 49
                assert pool.is_running(), tail(ep.log)
            # Alice's task is running when Mallory's names it in her marker and dies
            running = alice.submit(square_after, 3.0, 5)
            deadline = time.monotonic() + DEADLINE
            while not running.running() and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(WorkerLost):
                mallory.submit(spoil_marker_then, "exit", running._task_bytes).result(DEADLINE)
            assert running.result(DEADLINE) == 25
            victims = [alice.submit(square, n) for n in range(20)]
            assert [f.result(DEADLINE) for f in victims] == [n * n for n in range(20)]
            assert pool.is_running(), tail(ep.log)
        log = ep.log.read_text()
    assert "SIGBUS" in log and log.count("running it again") >= 6, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


# -- item 4: data-only endpoints ------------------------------------------------------------

class LeavesAFile:
    """An argument whose *unpickling* creates a file (code riding in the data)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def identity(value):
    return value


def raise_value_error(message):
    raise ValueError(message)


def return_an_object():
    return object()


def same(a, b) -> bool:
    """Equal, and of the same types all the way down (numpy arrays: dtype, shape and bytes)."""
    import numpy
    if type(a) is not type(b):
        return False
    if isinstance(a, numpy.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


@pytest.fixture(scope="module")
def data_relay(tmp_path_factory):
    """A token-mode relay with users alice and mallory, and three of alice's
    endpoints: data-only, with an allow-list (data-only by default), and plain."""
    directory = tmp_path_factory.mktemp("data-only")
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", directory / "relay-data").stdout.strip()
              for name in ("alice", "mallory")}
    env = {"FEDEXEC_TOKEN": tokens["alice"]}
    with running_relay(directory, "--auth", "token") as address, \
            running_endpoint(directory, "data-only", env, relay=address, data_only=True) as data_ep, \
            running_endpoint(directory, "allow-list", env, relay=address,
                             allowed_functions=[function_hash(operator.add)]) as listed_ep, \
            running_endpoint(directory, "plain", env, relay=address) as plain_ep:
        views = {ep.name: wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
                 for ep in (data_ep, listed_ep, plain_ep)}
        yield SimpleNamespace(address=address, tokens=tokens, dir=directory, views=views,
                              data=data_ep, listed=listed_ep, plain=plain_ep)


@pytest.mark.timeout(90)
def test_a_data_only_endpoint_refuses_pickled_arguments_before_loading_them(data_relay, tmp_path):
    r = data_relay
    assert r.views["data-only"]["data_only"] is True and r.views["allow-list"]["data_only"] is True
    assert r.views["plain"]["data_only"] is False
    client = RawClient(r.address, r.tokens["alice"])
    try:
        for endpoint, fn in ((r.data, identity), (r.listed, operator.add)):
            mark = tmp_path / f"unpickled-on-{endpoint.name}"
            task_id = client.submit(endpoint.id, fn, LeavesAFile(str(mark)), 1)
            failure = client.failure_of(task_id, DEADLINE)
            assert failure["kind"] == P.NOT_ALLOWED and "data-only format" in failure["msg"], failure
            time.sleep(0.3)
            assert not mark.exists(), f"an argument was unpickled on {endpoint.name}"
    finally:
        client.close()


ROUND_TRIP = [
    0, -1, 2 ** 63 - 1, -(2 ** 100), 3.25, float("inf"), float("nan"), 1e-300, "text", "", "ünïcode", b"\x00bytes",
    b"", True, False, None, 1 + 2j, [1, "a", b"b", [2.5]], (1, (2, 3), ()), {"k": [1, 2], "n": {"deep": (1, b"x")}},
    {1: "int key", (1, 2): "tuple key"}, {1, 2, 3}, frozenset({"a"}),
]


@pytest.mark.timeout(120)
def test_plain_data_round_trips_exactly_through_a_data_only_endpoint(data_relay):
    import numpy   # a test dependency (pyproject.toml's test extra)
    arrays = [numpy.arange(12, dtype=numpy.int32).reshape(3, 4), numpy.linspace(0, 1, 7),
              numpy.array([[1 + 1j]], dtype=numpy.complex64), numpy.zeros((0, 5), dtype=">f8"),
              numpy.arange(10)[::3], numpy.array(["ab", "c"]), numpy.array([True, False]),
              numpy.float32(2.5), numpy.int64(-7), numpy.arange(6, dtype=numpy.uint8)[numpy.newaxis]]
    r = data_relay
    with FederatedExecutor(r.data.id, relay=r.address, token=r.tokens["alice"]) as ex:
        assert ex.data_only
        values = ROUND_TRIP + arrays
        for value, back in zip(values, [ex.submit(identity, v).result(DEADLINE) for v in values]):
            assert same(value, back), (value, back)
        assert same(list(ex.map(identity, values[:12], chunksize=3)), values[:12])
        assert ex.submit(lambda a, b=0: (a, b), (1,), b={"x": 2}).result(DEADLINE) == ((1,), {"x": 2})
        with pytest.raises(SerializationError, match=r"data-only endpoint.*builtins\.object"):
            ex.submit(identity, [1, object()]).result(DEADLINE)
        with pytest.raises(SerializationError, match="dtype object"):
            ex.submit(identity, numpy.array([1, "a"], dtype=object)).result(DEADLINE)
        with pytest.raises(RemoteExecutionError, match="boom") as raised:
            ex.submit(raise_value_error, "boom").result(DEADLINE)
        assert raised.value.type_name == "builtins.ValueError" and "raise_value_error" in raised.value.remote_traceback
        with pytest.raises(SerializationError, match="not plain data"):
            ex.submit(return_an_object).result(DEADLINE)


@pytest.mark.timeout(90)
def test_an_allow_list_endpoint_is_data_only_by_default_and_a_plain_one_is_not(data_relay):
    r = data_relay
    with FederatedExecutor(r.listed.id, relay=r.address, token=r.tokens["alice"]) as ex:
        assert ex.data_only and ex.submit(operator.add, (1, 2), (3,)).result(DEADLINE) == (1, 2, 3)
        with pytest.raises(SerializationError, match="data-only"):
            ex.submit(operator.add, LeavesAFile("/nonexistent/x"), 1).result(DEADLINE)
    with FederatedExecutor(r.plain.id, relay=r.address, token=r.tokens["alice"]) as ex:   # as before: pickles
        assert not ex.data_only
        mark = r.dir / "plain-endpoint-unpickled"
        assert ex.submit(lambda f: type(f).__name__, LeavesAFile(str(mark))).result(DEADLINE) == "TextIOWrapper"
        assert mark.exists()   # a pickle runs code as it loads: what data_only is for
        assert ex.submit(lambda: ValueError("a pickled value")).result(DEADLINE).args == ("a pickled value",)


def set_up_nothing() -> None:
    """An initializer (module level, so it pickles by reference)."""


@pytest.mark.timeout(90)
def test_an_executor_with_an_initializer_is_told_why_an_allow_list_refuses_its_functions(data_relay):
    """With an initializer each function travels wrapped in a wrapper made
    for that executor, so no allow-list can name it: the error says so
    instead of naming only a hash the user never saw."""
    r = data_relay
    with FederatedExecutor(r.listed.id, relay=r.address, token=r.tokens["alice"],
                           initializer=set_up_nothing) as ex:
        with pytest.raises(NotAuthorized) as refused:
            ex.submit(operator.add, 1, 2).result(DEADLINE)
        assert "allow-list" in str(refused.value) and "initializer, set_up_nothing()" in str(refused.value)
    with FederatedExecutor(r.listed.id, relay=r.address, token=r.tokens["alice"]) as ex:   # without: allowed
        assert ex.submit(operator.add, 1, 2).result(DEADLINE) == 3


@pytest.mark.timeout(90)
def test_a_client_never_unpickles_what_a_data_only_endpoint_returns(data_relay, tmp_path):
    """Mallory's endpoint says it is data-only and is shared with Alice, then
    answers Alice's task with a pickle that would create a file as it loads:
    Alice's executor does not load it."""
    r = data_relay
    mark = tmp_path / "unpickled-by-the-client"
    ctx = zmq.Context()
    fake = ctx.socket(zmq.DEALER)
    fake.setsockopt(zmq.LINGER, 0)
    fake.setsockopt(zmq.IDENTITY, P.new_endpoint_routing_id())
    endpoint_id = str(uuid.uuid4())
    try:
        connect_plainly(fake, r.address, r.tokens["mallory"])
        fake.send_multipart(P.encode(P.HELLO, {
            "role": "endpoint", "id": endpoint_id, "name": "mallorys", "py": P.PYTHON_VERSION, "workers": 1,
            "capacity": 10, "holding": [], "data_only": True}))
        assert fake.poll(10000) and P.decode(fake.recv_multipart()).type == P.WELCOME
        share_endpoint(r.address, endpoint_id, add_users=["alice"], token=r.tokens["mallory"])
        with FederatedExecutor(endpoint_id, relay=r.address, token=r.tokens["alice"]) as ex:
            assert ex.data_only
            futures = [ex.submit(identity, n) for n in range(2)]
            answered = 0
            deadline = time.monotonic() + DEADLINE
            while answered < 2 and time.monotonic() < deadline:
                if not fake.poll(200):
                    continue
                msg = P.decode(fake.recv_multipart())
                if msg.type != P.TASKS:
                    continue
                blobs = P.Blobs()
                rows = []
                for row in msg.fields["tasks"]:
                    status = P.OK if answered == 0 else P.EXCEPTION
                    rows.append(blobs.result_row(row[0], status, pickle.dumps(LeavesAFile(str(mark)))))
                    answered += 1
                fake.send_multipart(P.encode(P.RESULTS, {"rows": rows}, blobs.frames))
            with pytest.raises(DeserializationError, match="data-only"):
                futures[0].result(DEADLINE)
            with pytest.raises(DeserializationError):
                futures[1].result(DEADLINE)
        assert not mark.exists(), "the client unpickled a data-only endpoint's result"
    finally:
        fake.close(linger=0)
        ctx.term()


def test_data_only_is_an_endpoint_setting_saved_validated_and_set_by_the_cli(tmp_path):
    env = {"FEDEXEC_HOME": str(tmp_path / "home")}
    add = function_hash(operator.add)
    fedexec_cli("endpoint", "configure", "listed", "--allow-function", add, env=env)
    fedexec_cli("endpoint", "configure", "anything", env=env)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDEXEC_HOME", env["FEDEXEC_HOME"])
        assert EndpointConfig.load("listed").data_only is None and EndpointConfig.load("listed").takes_data_only()
        assert not EndpointConfig.load("anything").takes_data_only()
        fedexec_cli("endpoint", "configure", "listed", "--no-data-only", env=env)
        fedexec_cli("endpoint", "configure", "anything", "--data-only", env=env)
        assert EndpointConfig.load("listed").data_only is False and not EndpointConfig.load("listed").takes_data_only()
        assert EndpointConfig.load("anything").takes_data_only()
        path = EndpointConfig.load("anything").path
        path.write_text(path.read_text().replace("data_only = true", 'data_only = "yes"'))
        with pytest.raises(ConfigError, match="data_only must be true or false"):
            EndpointConfig.load("anything")


def poison_the_worker(tag):
    """Leaves something behind in its worker process, for the next task there to find."""
    import sys
    import types
    sys.modules["left_by_another_user"] = types.ModuleType(tag)
    return os.getpid()


def look_for_poison(n):
    import sys
    return "left_by_another_user" in sys.modules, os.getpid()


@pytest.mark.timeout(120)
def test_a_worker_serves_the_tasks_of_one_user_only(tmp_path):
    """Mallory's tasks on Alice's shared endpoint leave a module behind in
    their worker; none of Alice's tasks, interleaved with them, ever runs in
    a process Mallory's tasks ran in."""
    data = tmp_path / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "mallory")}
    with running_relay(tmp_path, "--auth", "token") as address:
        with running_endpoint(tmp_path, "shared", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address,
                              max_workers=2, heartbeat_period=0.5) as ep:
            wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
            share_endpoint(address, ep.id, add_users=["mallory"], token=tokens["alice"])
            with FederatedExecutor(ep.id, relay=address, token=tokens["mallory"]) as mallory, \
                    FederatedExecutor(ep.id, relay=address, token=tokens["alice"]) as alice:
                mine, theirs = [], []
                for round_ in range(6):
                    theirs += [mallory.submit(poison_the_worker, f"round {round_}") for _ in range(3)]
                    mine += [alice.submit(look_for_poison, n) for n in range(3)]
                    time.sleep(0.1)
                poisoned = {f.result(DEADLINE) for f in theirs}
                seen = [f.result(DEADLINE) for f in mine]
    assert not any(found for found, _ in seen), "a task of Alice's ran where Mallory's had"
    assert not poisoned & {pid for _, pid in seen}, "a worker process served both users"


def test_the_relay_names_the_user_of_a_task_to_a_shared_endpoint_and_never_passes_a_clients_own():
    from fedexec.relay.registry import TaskRecord
    spoofed = {"u": "alice", "tr": [1.0]}
    record = TaskRecord(uuid.uuid4().bytes, b"C", str(uuid.uuid4()), b"h" * 32, P.TASK_CALL, P.PYTHON_VERSION,
                        b"", spoofed, user="mallory")
    row = record.row(b"", -1, owner="alice")
    assert row[6]["u"] == "mallory" and len(row[6]["tr"]) == 2 and spoofed == {"u": "alice", "tr": [1.0]}
    record.user = "alice"   # the owner's own tasks carry no user, whatever the client put there
    assert "u" not in record.row(b"", -1, owner="alice")[6]
    assert len(TaskRecord(b"t" * 16, b"C", "", b"h" * 32, P.TASK_CALL, "3.11", b"", None, "alice")
               .row(b"", -1, owner="alice")) == 6
    P.task_row(row)   # endpoints and pools take it


@pytest.mark.timeout(60)
def test_a_worker_checks_a_body_against_its_hash_before_loading_it(tmp_path):
    """Defence in depth: a worker process (started as a pool starts it, its
    id on stdin) that is handed a body not matching its hash fails the task
    and never runs it; a matching body runs."""
    mark = tmp_path / "worker-ran-swapped-body"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"ipc://{tmp_path}/w1.sock")
    worker_id = os.urandom(16)
    proc = subprocess.Popen([sys.executable, "-m", "fedexec.worker", "--address", f"ipc://{tmp_path}/w1.sock",
                             "--parent-pid", str(os.getpid())], stdin=subprocess.PIPE)
    try:
        proc.stdin.write(worker_id.hex().encode() + b"\n")
        proc.stdin.close()
        def from_worker(timeout_ms: int) -> list:
            """The next message of the worker's main channel (its control
            thread connects too, as worker id + b"c": worker/control.py)."""
            deadline = time.monotonic() + timeout_ms / 1000
            while sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                peer, *frames = sock.recv_multipart()
                if peer == worker_id:
                    return frames
                assert peer == worker_id + b"c", peer
            raise AssertionError(f"nothing from the worker within {timeout_ms} ms")

        assert P.decode(from_worker(20000)).type == P.READY
        honest_hash, honest_body = serialize_function(operator.add)
        _, evil_body = serialize_function(write_marker)
        blobs = P.Blobs()
        rows = [task_row(blobs, honest_hash, evil_body, serialize_arguments(write_marker, (str(mark),), {})),
                task_row(blobs, honest_hash, None, serialize_arguments(operator.add, (1, 2), {}))]
        sock.send_multipart([worker_id, *P.encode(P.TASKS, {"tasks": rows}, blobs.frames)])
        outcomes = {}
        deadline = time.monotonic() + DEADLINE
        while len(outcomes) < 2 and time.monotonic() < deadline:
            if sock.poll(200):
                msg = P.decode(from_worker(1000))
                for row in msg.fields.get("rows", []):
                    outcomes[row[0]] = (row[1], bytes(P.blob(msg.blobs, row[2])))
        for row in rows:   # the second task names the same hash: the swapped body is not loaded for it either
            status, blob = outcomes[row[0]]
            assert status == P.FAILED and "does not match" in P.unpack_failure(blob)["msg"], (status, blob)
        assert not mark.exists()
        other_hash, other_body = serialize_function(operator.mul)
        blobs = P.Blobs()
        honest = task_row(blobs, other_hash, other_body, serialize_arguments(operator.mul, (6, 7), {}))
        sock.send_multipart([worker_id, *P.encode(P.TASKS, {"tasks": [honest]}, blobs.frames)])
        msg = P.decode(from_worker(DEADLINE * 1000))
        assert msg.fields["rows"][0][1] == P.OK and pickle.loads(P.blob(msg.blobs, msg.fields["rows"][0][2])) == 42
    finally:
        sock.send_multipart([worker_id, *P.encode(P.STOP)])
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        sock.close(linger=0)
        ctx.term()


def test_the_data_only_decoder_refuses_forged_and_truncated_input():
    """What a hostile endpoint or client could send instead of plain data:
    an object dtype, sizes that do not add up, truncation, unknown
    extensions, a pickle. Each is NotData, and nothing is loaded."""
    import struct

    import msgpack

    from fedexec.serialize import DATA_MARKER, NotData, decode_data, encode_data

    def forged(ext_code: int, fields: Any, tail: bytes = b"") -> bytes:
        head = msgpack.packb(msgpack.ExtType(ext_code, msgpack.packb(fields)))
        return DATA_MARKER + struct.pack("<I", len(head)) + head + tail

    cases = {
        "object dtype": forged(6, ["|O", [1], 0, 8], b"\0" * 8),
        "record dtype": forged(6, ["|V8", [1], 0, 8], b"\0" * 8),
        "size mismatch": forged(6, ["<f8", [1000], 0, 8], b"\0" * 8),
        "bytes past the end": forged(6, ["<f8", [1], 4, 8], b"\0" * 8),
        "negative shape": forged(6, ["<f8", [-1], 0, 0]),
        "unknown extension": forged(42, []),
        "tuple not a list": forged(1, 5),
        "truncated": encode_data([1, 2, 3])[:-1],
        "a pickle": pickle.dumps(LeavesAFile("/nonexistent/never")),
        "nothing": b"",
    }
    for name, blob in cases.items():
        with pytest.raises(NotData):
            decode_data(blob)
            pytest.fail(f"{name} was accepted")
