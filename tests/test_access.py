"""Who may run what, where: token mode, endpoint ownership and sharing,
function allow-lists, per-user tasks, and CURVE encryption, attacked with
real processes and raw sockets on loopback."""

from __future__ import annotations

import contextlib
import operator
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import zmq

from fedexec import AuthenticationFailed, FederatedExecutor, NotAuthorized, RelayUnavailable
from fedexec import protocol as P
from fedexec.auth import connect_plainly
from fedexec.config import EndpointConfig
from fedexec.relay.query import lookup_endpoint, share_endpoint
from fedexec.serialize import function_hash, serialize_arguments, serialize_data_arguments, serialize_function

from test_faults import free_port, running_relay, stop_process, tail

DEADLINE = 30


def fedexec_cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "fedexec.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, **(env or {})})
    if check:
        assert out.returncode == 0, out.stderr
    return out


def slow_value(seconds, value):
    time.sleep(seconds)
    return value


def wait_connected(address: str, endpoint_id: str, token: str, proc: subprocess.Popen, log: Path,
                   relay_key: str | None = None, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the endpoint exited with code {proc.returncode}:\n{tail(log)}")
        try:
            view = lookup_endpoint(address, endpoint_id, timeout=1.0, token=token, relay_key=relay_key)
            if view and view["status"] == "connected":
                return view
        except TimeoutError:
            pass
        time.sleep(0.1)
    pytest.fail(f"endpoint {endpoint_id} did not connect within {timeout} s:\n{tail(log)}")


@contextlib.contextmanager
def running_endpoint(directory: Path, name: str, env: dict[str, str], **config):
    """A configured endpoint (own fedexec home) run as ``python -m fedexec.endpoint``."""
    home = directory / f"home-{name}"
    env = {**os.environ, "FEDEXEC_HOME": str(home), "PYTHONPATH": str(Path(__file__).parent), **env}
    with pytest.MonkeyPatch.context() as patch:   # saved in the endpoint's own home
        patch.setenv("FEDEXEC_HOME", str(home))
        cfg = EndpointConfig(name=name, **{"max_workers": 1, **config})
        cfg.save()
    log = directory / f"endpoint-{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedexec.endpoint", "--name", name], env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield SimpleNamespace(id=cfg.endpoint_id, proc=proc, log=log, home=home, name=name)
    finally:
        stop_process(proc)


class RawClient:
    """A client socket that speaks the wire protocol directly (an attacker's)."""

    def __init__(self, address: str, token: str | None, relay_key: str | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, b"C" + uuid.uuid4().bytes)
        self.outcomes: dict[bytes, tuple] = {}
        connect_plainly(self.sock, address, token, relay_key)
        self.send(P.HELLO, {"role": "client", "py": P.PYTHON_VERSION})
        assert self.expect(P.WELCOME)

    def send(self, kind: str, fields: dict, frames=()) -> None:
        self.sock.send_multipart(P.encode(kind, fields, list(frames)))

    def expect(self, kind: str, timeout: float = 10.0) -> P.Message | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                msg = P.decode(self.sock.recv_multipart())
                if msg.type == kind:
                    return msg
        return None

    def submit(self, endpoint_id: str, fn, *args) -> bytes:
        fn_hash, body = serialize_function(fn)
        blobs = P.Blobs()
        task_id = uuid.uuid4().bytes
        args_blob = serialize_arguments(fn, args, {})
        row = [task_id, fn_hash, blobs.ref(args_blob), blobs.ref(body), P.TASK_CALL, P.PYTHON_VERSION]
        self.send(P.SUBMIT, {"ep": endpoint_id, "tasks": [row]}, blobs.frames)
        return task_id

    def failure_of(self, task_id: bytes, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while task_id not in self.outcomes and time.monotonic() < deadline:
            msg = self.expect(P.RESULTS, max(0.1, deadline - time.monotonic()))
            for row in msg.fields["rows"] if msg else ():
                self.outcomes[row[0]] = (row[1], P.blob(msg.blobs, row[2]))
        if task_id in self.outcomes:
            status, blob = self.outcomes.pop(task_id)
            assert status == P.FAILED, (status, blob)
            return P.unpack_failure(blob)
        pytest.fail(f"no answer for task {task_id.hex()}")

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


# -- token mode ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def token_relay(tmp_path_factory):
    """A token-mode relay with users alice, bob and carol (added with the CLI,
    as its admin would), and alice's endpoint."""
    directory = tmp_path_factory.mktemp("token-relay")
    data = directory / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "bob", "carol")}
    assert tokens["alice"].startswith("alice:")
    with running_relay(directory, "--auth", "token") as address:
        with running_endpoint(directory, "alice-ep", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address) as ep:
            wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
            yield SimpleNamespace(address=address, data=data, tokens=tokens, endpoint=ep, dir=directory,
                                  log=directory / "relay.log")


@pytest.mark.timeout(120)
def test_token_mode_refuses_missing_wrong_expired_and_revoked_tokens(token_relay, monkeypatch):
    r = token_relay
    monkeypatch.delenv("FEDEXEC_TOKEN", raising=False)
    expired = fedexec_cli("token", "create", "carol", "--expires", "0.5", "--data-dir", r.data).stdout.strip()
    revoked = fedexec_cli("token", "create", "carol", "--data-dir", r.data).stdout.strip()
    fedexec_cli("token", "revoke", revoked, "--data-dir", r.data)
    time.sleep(0.6)
    token_id, secret = r.tokens["alice"].split(":")[1].split(".")
    bad = {
        "none": None,
        "wrong secret": f"alice:{token_id}.{secret[::-1]}",
        "another user's token under alice's name": "alice:" + r.tokens["bob"].split(":")[1],
        "a local-mode secret": secret,
        "expired": expired,
        "revoked": revoked,
    }
    with FederatedExecutor(r.endpoint.id, relay=r.address, token=r.tokens["alice"]) as alice:
        before = alice.submit(operator.add, 1, 2)
        for what, token in bad.items():
            with pytest.raises(AuthenticationFailed) as err:
                FederatedExecutor(r.endpoint.id, relay=r.address, token=token, connect_timeout=10)
            assert "refused" in str(err.value) or "none were found" in str(err.value), what
            # nothing else affected: alice's session works throughout
            assert alice.submit(operator.mul, 6, 7).result(DEADLINE) == 42, what
        assert before.result(DEADLINE) == 3
    log = tail(r.log, 100_000)
    assert "wrong token for user 'alice'" in log
    assert "expired" in log and "was revoked" in log
    listing = fedexec_cli("token", "list", "--data-dir", r.data).stdout
    assert "alice" in listing and "bob" in listing and secret not in listing
    assert (r.data / "access.sqlite3").stat().st_mode & 0o077 == 0
    assert secret.encode() not in (r.data / "access.sqlite3").read_bytes()   # only hashes are kept


@pytest.mark.timeout(120)
def test_revoking_a_token_ends_its_live_session(token_relay):
    r = token_relay
    dave_token = fedexec_cli("token", "create", "carol", "--data-dir", r.data).stdout.strip()
    share_endpoint(r.address, r.endpoint.id, add_users=["carol"], token=r.tokens["alice"])
    try:
        ex = FederatedExecutor(r.endpoint.id, relay=r.address, token=dave_token)
        assert ex.submit(operator.add, 2, 2).result(DEADLINE) == 4
        running = ex.submit(slow_value, 12, "late")
        started = time.monotonic()
        fedexec_cli("token", "revoke", dave_token.split(":")[1].split(".")[0], "--data-dir", r.data)
        with pytest.raises(AuthenticationFailed, match="revoked"):
            running.result(DEADLINE)
        assert time.monotonic() - started < 8.0   # ended at the next message, not when the task finished (12 s)
        ex.shutdown(wait=False)
        with pytest.raises(AuthenticationFailed):
            FederatedExecutor(r.endpoint.id, relay=r.address, token=dave_token, connect_timeout=10)
        # carol's other token is not affected
        with FederatedExecutor(r.endpoint.id, relay=r.address, token=r.tokens["carol"]) as carol:
            assert carol.submit(operator.add, 1, 1).result(DEADLINE) == 2
    finally:
        share_endpoint(r.address, r.endpoint.id, remove_users=["carol"], token=r.tokens["alice"])


@pytest.mark.timeout(120)
def test_a_user_cannot_use_read_cancel_or_forget_anothers_endpoint_and_tasks(token_relay, tmp_path):
    r = token_relay
    with pytest.raises(NotAuthorized, match="not shared with user 'bob'"):
        FederatedExecutor(r.endpoint.id, relay=r.address, token=r.tokens["bob"], connect_timeout=10)
    bob = RawClient(r.address, r.tokens["bob"])
    try:
        # submit to alice's endpoint
        failure = bob.failure_of(bob.submit(r.endpoint.id, operator.add, 1, 2))
        assert failure["kind"] == P.NOT_ALLOWED and "not shared" in failure["msg"]
        # alice's tasks: one finished while nobody fetched it, one running
        program = tmp_path / "alice.py"
        program.write_text(f"""
import os, time
from fedexec import FederatedExecutor
from test_access import slow_value
ex = FederatedExecutor({r.endpoint.id!r}, relay={r.address!r}, token={r.tokens['alice']!r})
done = ex.submit(slow_value, 1.0, "alice's secret result")
running = ex.submit(slow_value, 4, "alice's later result")
time.sleep(0.3)
print(done.task_id, running.task_id, flush=True)
os._exit(0)
""")
        out = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
        assert out.returncode == 0, out.stderr
        done_id, running_id = out.stdout.split()
        done, running = uuid.UUID(done_id).bytes, uuid.UUID(running_id).bytes
        time.sleep(2.0)   # the first one finishes and is stored, unfetched
        for task_id in (done, running):
            bob.send(P.RESUME, {"tids": [task_id]})                       # read
            failure = bob.failure_of(task_id)
            assert failure["kind"] == P.NOT_ALLOWED and "another user" in failure["msg"]
            assert b"alice's" not in repr(failure).encode()
        bob.send(P.CANCEL, {"tids": [running]})                           # cancel
        bob.send(P.ACK, {"tids": [done]})                                 # make the relay forget it
        resent = bob.submit(r.endpoint.id, operator.add, 0, 0)            # ...and try a resubmission of
        time.sleep(1.0)                                                   # alice's id (below)
        blobs = P.Blobs()
        fn_hash, body = serialize_function(operator.add)
        row = [done, fn_hash, blobs.ref(serialize_arguments(operator.add, (1, 1), {})), blobs.ref(body), P.TASK_CALL,
               P.PYTHON_VERSION]
        bob.send(P.SUBMIT, {"ep": r.endpoint.id, "tasks": [row], "resend": True}, blobs.frames)
        assert bob.failure_of(done)["kind"] == P.NOT_ALLOWED
        assert bob.failure_of(resent)["kind"] == P.NOT_ALLOWED
    finally:
        bob.close()
    with FederatedExecutor(r.endpoint.id, relay=r.address, token=r.tokens["alice"]) as alice:
        got_done, got_running = alice.reattach([done_id, running_id])
        assert got_done.result(DEADLINE) == "alice's secret result"
        assert got_running.result(DEADLINE) == "alice's later result"   # bob's cancel did nothing
    log = tail(r.log, 200_000)
    for action in ("submit 1 task(s) to endpoint", "reattach to task", "cancel task"):
        assert f"refused user 'bob': {action}" in log, action
    # the finished task is refused as a read of its stored result, or (while the relay still holds it in
    # memory, as on a loaded machine) as a reattach like the running one
    reattaches = sum(int(n) for n in re.findall(r"refused user 'bob': reattach to task\(s\) of another user: (\d+)", log))
    assert "refused user 'bob': read the result of task" in log or reattaches >= 2, log[-3000:]



@pytest.mark.timeout(120)
def test_sharing_is_the_owners_and_takes_effect_at_once(token_relay):
    r = token_relay
    alice_env = {"FEDEXEC_HOME": str(r.endpoint.home), "FEDEXEC_TOKEN": r.tokens["alice"]}
    bob_env = {"FEDEXEC_HOME": str(r.endpoint.home), "FEDEXEC_TOKEN": r.tokens["bob"]}
    refused = fedexec_cli("endpoint", "share", r.endpoint.name, "--user", "bob", env=bob_env, check=False)
    assert refused.returncode == 1 and "only its owner may share it" in refused.stderr
    shared = fedexec_cli("endpoint", "share", r.endpoint.name, "--user", "bob", env=alice_env)
    assert "owner alice" in shared.stdout and "user bob" in shared.stdout
    try:
        with FederatedExecutor(r.endpoint.id, relay=r.address, token=r.tokens["bob"]) as bob:
            assert bob.submit(operator.add, 20, 22).result(DEADLINE) == 42
            fedexec_cli("endpoint", "share", r.endpoint.name, "--remove-user", "bob", env=alice_env)
            with pytest.raises(NotAuthorized, match="not shared"):
                bob.submit(operator.add, 1, 1).result(DEADLINE)
        with pytest.raises(NotAuthorized):   # carol never had it
            FederatedExecutor(r.endpoint.id, relay=r.address, token=r.tokens["carol"], connect_timeout=10)
        fedexec_cli("endpoint", "share", r.endpoint.name, "--public", env=alice_env)
        with FederatedExecutor(r.endpoint.id, relay=r.address, token=r.tokens["carol"]) as carol:
            assert carol.submit(operator.add, 1, 1).result(DEADLINE) == 2
    finally:
        fedexec_cli("endpoint", "share", r.endpoint.name, "--private", "--remove-user", "bob", env=alice_env)


@pytest.mark.timeout(120)
def test_another_user_cannot_take_over_an_endpoint_id(token_relay, tmp_path):
    r = token_relay
    log = tmp_path / "hijack.log"
    with open(log, "wb") as out:
        hijacker = subprocess.Popen(
            [sys.executable, "-m", "fedexec.endpoint", "--name", "hijack", "--relay", r.address,
             "--endpoint-id", r.endpoint.id, "--max-workers", "1"],
            env={**os.environ, "FEDEXEC_TOKEN": r.tokens["bob"]}, stdout=out, stderr=subprocess.STDOUT)
    try:
        with FederatedExecutor(r.endpoint.id, relay=r.address, token=r.tokens["alice"]) as alice:
            futures = [alice.submit(os.getpid) for _ in range(20)]
            pids = {f.result(DEADLINE) for f in futures}
            assert hijacker.wait(30) == 2, tail(log)
            assert "registered to another user" in tail(log)
            # alice's endpoint kept every task: none reached bob's process
            alice_workers = {p.pid for p in __import__("psutil").Process(r.endpoint.proc.pid).children(True)}
            assert pids <= alice_workers
            view = lookup_endpoint(r.address, r.endpoint.id, token=r.tokens["alice"])
            assert view["status"] == "connected" and view["owner"] == "alice"
    finally:
        stop_process(hijacker)
    assert f"refused user 'bob': connect as endpoint {r.endpoint.id}" in tail(r.log, 200_000)


# -- function allow-lists -------------------------------------------------------------

@pytest.mark.timeout(120)
def test_allow_list_is_enforced_at_the_relay(token_relay, tmp_path):
    r = token_relay
    add_hash = fedexec_cli("function", "hash", "operator:add").stdout.strip()
    assert add_hash == function_hash(operator.add)
    with running_endpoint(tmp_path, "strict", {"FEDEXEC_TOKEN": r.tokens["alice"]}, relay=r.address,
                          allowed_functions=[add_hash]) as ep:
        view = wait_connected(r.address, ep.id, r.tokens["alice"], ep.proc, ep.log)
        assert view["owner"] == "alice"
        with FederatedExecutor(ep.id, relay=r.address, token=r.tokens["alice"]) as ex:
            assert ex.submit(operator.add, 2, 3).result(DEADLINE) == 5
            with pytest.raises(NotAuthorized, match="not on the allow-list"):
                ex.submit(operator.mul, 2, 3).result(DEADLINE)
            with pytest.raises(NotAuthorized, match="not on the allow-list"):
                ex.submit(lambda: os.system("echo owned")).result(DEADLINE)
    assert "run function" in tail(r.log, 200_000)


@pytest.mark.timeout(60)
def test_allow_list_is_enforced_again_at_the_endpoint(tmp_path):
    """A relay that forwards a function the endpoint does not allow (a
    compromised or older relay) gets a refusal, and the function never runs."""
    ctx = zmq.Context()
    relay = ctx.socket(zmq.ROUTER)
    relay.setsockopt(zmq.LINGER, 0)
    port = relay.bind_to_random_port("tcp://127.0.0.1")
    mark = tmp_path / "ran"
    try:
        with running_endpoint(tmp_path, "strict", {}, relay=f"tcp://127.0.0.1:{port}",
                              allowed_functions=[function_hash(operator.add)]) as ep:
            assert relay.poll(20000), tail(ep.log)
            peer, *frames = relay.recv_multipart()
            hello = P.decode(frames)
            assert hello.type == P.HELLO and hello.fields["functions"] == [bytes.fromhex(function_hash(operator.add))]
            relay.send_multipart([peer, *P.encode(P.WELCOME, {"role": "endpoint"})])
            blobs = P.Blobs()
            rows = []
            for fn, args in ((operator.add, (1, 2)), (open, (str(mark), "w"))):
                fn_hash, body = serialize_function(fn)
                # plain-data arguments: an endpoint with an allow-list is data-only by default
                rows.append([uuid.uuid4().bytes, fn_hash, blobs.ref(serialize_data_arguments(fn, args, {})),
                             blobs.ref(body), P.TASK_CALL, P.PYTHON_VERSION])
            relay.send_multipart([peer, *P.encode(P.TASKS, {"tasks": rows}, blobs.frames)])
            outcomes = {}
            deadline = time.monotonic() + 20
            while len(outcomes) < 2 and time.monotonic() < deadline:
                if relay.poll(200):
                    _, *frames = relay.recv_multipart()
                    msg = P.decode(frames)
                    if msg.type == P.RESULTS:
                        for row in msg.fields["rows"]:
                            outcomes[row[0]] = (row[1], P.blob(msg.blobs, row[2]))
            assert outcomes[rows[0][0]][0] == P.OK
            status, blob = outcomes[rows[1][0]]
            assert status == P.FAILED and P.unpack_failure(blob)["kind"] == P.NOT_ALLOWED
            assert not mark.exists()
    finally:
        relay.close(linger=0)
        ctx.term()


# -- CURVE ----------------------------------------------------------------------------

class LoopbackCapture:
    """Every TCP payload on the loopback interface to or from ``port``
    (a raw AF_PACKET socket: needs root)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.data = bytearray()
        self.packets = 0
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(65535)
            except socket.timeout:
                continue
            if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":   # IPv4 only
                continue
            ip = frame[14:]
            ihl = (ip[0] & 0x0F) * 4
            if ip[9] != 6:
                continue
            tcp = ip[ihl:]
            src, dst = struct.unpack("!HH", tcp[:4])
            if self.port not in (src, dst):
                continue
            offset = (tcp[12] >> 4) * 4
            self.data += tcp[offset:]
            self.packets += 1

    def stop(self) -> bytes:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()
        return bytes(self.data)


MARKER = "plaintext-marker-7f3a9c"


def echo_marker(value):
    return value + "-and-back"


def run_captured(tmp_path: Path, curve: bool) -> tuple[bytes, int]:
    directory = tmp_path / ("curve" if curve else "plain")
    directory.mkdir()
    with running_relay(directory, "--curve" if curve else "--no-curve") as address:
        port = int(address.rsplit(":", 1)[1])
        relay_key = None
        if curve:
            relay_key = (directory / "relay-data" / "relay.curve").read_text().split()[0]
        capture = LoopbackCapture(port)
        try:
            log = directory / "endpoint.log"
            endpoint_id = str(uuid.uuid4())
            secret = directory / "relay-data" / "relay.secret"
            args = [sys.executable, "-m", "fedexec.endpoint", "--name", "ep", "--relay", address, "--endpoint-id",
                    endpoint_id, "--max-workers", "1", "--secret-file", str(secret)]
            if relay_key:
                args += [f"--relay-key={relay_key}"]   # (a Z85 key may start with "-")
            # its own home: the endpoint finds no published key, it uses the pinned one
            with open(log, "wb") as out:
                endpoint = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, "FEDEXEC_HOME": str(directory / "ep-home"),
                                                 "PYTHONPATH": str(Path(__file__).parent)})
            try:
                wait_connected(address, endpoint_id, secret.read_text(), endpoint, log, relay_key)
                with FederatedExecutor(endpoint_id, relay=address, relay_public_key=relay_key) as ex:
                    assert ex.submit(echo_marker, MARKER).result(DEADLINE) == MARKER + "-and-back"
            finally:
                stop_process(endpoint)
        finally:
            data = capture.stop()
    return data, capture.packets


@pytest.mark.timeout(120)
def test_curve_traffic_is_unreadable_on_the_wire(tmp_path):
    assert os.geteuid() == 0, "capturing loopback traffic needs root (an AF_PACKET socket); run the suite as root"
    plain, plain_packets = run_captured(tmp_path, curve=False)
    # the control: without CURVE the capture sees the payload, so it would see a leak
    assert MARKER.encode() in plain and b"echo_marker" in plain and plain_packets > 0
    encrypted, packets = run_captured(tmp_path, curve=True)
    assert packets > 10
    assert MARKER.encode() not in encrypted
    assert b"echo_marker" not in encrypted and b"-and-back" not in encrypted
    assert b"X-Fedexec-Auth" not in encrypted and b"PLAIN" not in encrypted   # credentials too
    assert b"CURVE" in encrypted   # it was the CURVE handshake (the mechanism name is in the clear)


@pytest.mark.timeout(120)
def test_curve_relay_refuses_clients_without_its_key_or_with_wrong_credentials(tmp_path):
    with running_relay(tmp_path, "--curve") as address:
        key = (tmp_path / "relay-data" / "relay.curve").read_text().split()[0]
        # a client of this machine's user finds the published key and secret
        endpoint_id = str(uuid.uuid4())
        log = tmp_path / "endpoint.log"
        with open(log, "wb") as out:
            endpoint = subprocess.Popen([sys.executable, "-m", "fedexec.endpoint", "--name", "ep", "--relay",
                                         address, "--endpoint-id", endpoint_id, "--max-workers", "1"],
                                        stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_connected(address, endpoint_id, (tmp_path / "relay-data" / "relay.secret").read_text(), endpoint,
                           log)
            with FederatedExecutor(endpoint_id, relay=address) as ex:
                assert ex.submit(operator.add, 1, 2).result(DEADLINE) == 3
                secret = (tmp_path / "relay-data" / "relay.secret").read_text()
                with pytest.MonkeyPatch.context() as patch:   # another home: nothing published there
                    patch.setenv("FEDEXEC_HOME", str(tmp_path / "elsewhere"))
                    with pytest.raises(AuthenticationFailed, match="encryption"):   # no key: plain handshake
                        FederatedExecutor(endpoint_id, relay=address, token=secret, connect_timeout=10)
                    wrong_key = zmq.curve_keypair()[0].decode()
                    with pytest.raises((AuthenticationFailed, RelayUnavailable)):
                        FederatedExecutor(endpoint_id, relay=address, token=secret, relay_public_key=wrong_key,
                                          connect_timeout=5)
                    with pytest.raises(AuthenticationFailed, match="wrong credentials"):
                        FederatedExecutor(endpoint_id, relay=address, token="local:guess", relay_public_key=key,
                                          connect_timeout=10)
                    with pytest.raises(AuthenticationFailed, match="none were found"):   # refused in the handshake
                        FederatedExecutor(endpoint_id, relay=address, relay_public_key=key, connect_timeout=10)
                    with FederatedExecutor(endpoint_id, relay=address, token=secret, relay_public_key=key) as other:
                        assert other.submit(operator.add, 2, 2).result(DEADLINE) == 4
                assert ex.submit(operator.add, 3, 3).result(DEADLINE) == 6   # unaffected
        finally:
            stop_process(endpoint)


def test_curve_is_on_by_default_off_loopback(tmp_path):
    """A relay listening on every interface encrypts without being asked
    (the test connects through loopback only)."""
    port = free_port()
    data = tmp_path / "relay-data"
    log = tmp_path / "relay.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedexec.relay", "--address", f"tcp://0.0.0.0:{port}",
                                 "--data-dir", str(data)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not (data / "relay.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        record = __import__("json").loads((data / "relay.json").read_text())
        assert len(record["public_key"]) == 40, tail(log)
        assert subprocess.run([sys.executable, "-m", "fedexec.cli", "relay", "key", "--data-dir", str(data)],
                              capture_output=True, text=True).stdout.strip() == record["public_key"]
        with pytest.raises(AuthenticationFailed, match="encryption"):
            lookup_endpoint(f"tcp://127.0.0.1:{port}", str(uuid.uuid4()), timeout=3,
                            token=(data / "relay.secret").read_text())
        assert lookup_endpoint(f"tcp://127.0.0.1:{port}", str(uuid.uuid4()), timeout=5,
                               token=(data / "relay.secret").read_text(), relay_key=record["public_key"]) is None
    finally:
        stop_process(proc)
