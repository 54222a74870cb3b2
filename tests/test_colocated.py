"""The embedded default's relay and endpoint agent in one process and one
loop (fedexec.colocated), linked in memory (relay/locallink.py, memlink.py).
Real executors, processes and sockets on loopback/ipc."""

from __future__ import annotations

import operator
import os
import signal
import time
from concurrent.futures import BrokenExecutor

import psutil
import pytest
import zmq

from fedexec import FederatedExecutor, ShellFunction
from fedexec.errors import AuthenticationFailed
from fedexec.relay.locallink import LocalLink

DEADLINE = 60


def parent_pid() -> int:
    return os.getppid()


def fails(message: str) -> None:
    raise ValueError(message)


def the_one_process(ex: FederatedExecutor) -> psutil.Process:
    (child,) = ex._dispatcher.services.processes
    return psutil.Process(child.pid)


@pytest.mark.timeout(90)
def test_the_embedded_relay_endpoint_and_pool_are_one_process_and_run_everything():
    with FederatedExecutor(max_workers=2) as ex:
        host = the_one_process(ex)
        assert "fedexec.colocated" in host.cmdline(), host.cmdline()
        # the workers are its children: no relay, endpoint or pool process besides it
        assert ex.submit(parent_pid).result(DEADLINE) == host.pid
        assert list(ex.map(abs, range(-500, 0))) == list(range(500, 0, -1))
        assert ex.submit(ShellFunction("echo {word}"), word="one").result(DEADLINE).stdout.strip() == "one"
        with pytest.raises(ValueError, match="as it should"):
            ex.submit(fails, "as it should").result(DEADLINE)
        futures = [ex.submit(operator.mul, i, 2) for i in range(2000)]
        assert [f.result(DEADLINE) for f in futures] == [2 * i for i in range(2000)]


@pytest.mark.timeout(90)
def test_the_embedded_relays_listening_socket_still_checks_credentials():
    with FederatedExecutor(max_workers=1) as ex:
        services = ex._dispatcher.services
        assert ex.submit(operator.add, 1, 2).result(DEADLINE) == 3
        address, endpoint_id = services.relay_address, services.endpoint_id
        with pytest.raises(AuthenticationFailed, match="refused the credentials"):
            FederatedExecutor(endpoint_id, relay=address, token="local:guess", connect_timeout=10)
        with pytest.raises(AuthenticationFailed, match="none were found"):   # a private relay publishes nothing
            FederatedExecutor(endpoint_id, relay=address, connect_timeout=10)
        # with the secret, another client reaches the colocated endpoint through the real socket
        with open(services.secret_file) as f:
            secret = f.read().strip()
        with FederatedExecutor(endpoint_id, relay=address, token=secret) as other:
            assert other.submit(operator.add, 2, 2).result(DEADLINE) == 4
        assert ex.submit(operator.add, 3, 3).result(DEADLINE) == 6   # unaffected


def test_a_local_link_exists_only_on_a_relay_whose_every_session_is_its_owners():
    for mode in ("token", "globus"):
        with pytest.raises(ValueError, match="local authentication mode"):
            LocalLink(mode)
    link = LocalLink("local")
    other = LocalLink("local")
    try:
        assert link.session.user == "local"
        # the agent's end reaches this link only; an endpoint's routing id, random (not guessable)
        link.agent_end.send_multipart([b"hello"])
        assert link.readable() and not other.readable()
        (frames,) = list(link.messages(10))
        assert frames[0].bytes == link.peer and frames[1].bytes == b"hello"
        assert link.peer[:1] == b"E" and len(link.peer) == 17 and link.peer != other.peer
        link.send(link.peer, [b"back"])
        assert [f.bytes for f in link.agent_end.inbox[0]] == [b"back"] and not other.agent_end.inbox
        link.close()
        with pytest.raises(zmq.Again):   # the agent's sends fail once the relay's end is gone
            link.agent_end.send_multipart([b"late"])
    finally:
        link.close()
        other.close()


@pytest.mark.timeout(90)
def test_sigterm_stops_the_agent_its_workers_then_the_relay_and_leaves_nothing():
    ex = FederatedExecutor(max_workers=2)
    try:
        assert ex.submit(abs, -1).result(DEADLINE) == 1
        host = the_one_process(ex)
        workers = host.children(recursive=True)
        assert len(workers) >= 2
        directory = ex._dispatcher.services.directory
        host.send_signal(signal.SIGTERM)
        assert host.wait(15) == 0
        _gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, [p.pid for p in alive]
        deadline = time.monotonic() + 5
        while os.path.exists(directory) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(directory), os.listdir(directory)
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


@pytest.mark.timeout(90)
def test_kill_9_of_the_one_process_takes_its_workers_with_it():
    ex = FederatedExecutor(max_workers=2)
    try:
        assert ex.submit(abs, -1).result(DEADLINE) == 1
        host = the_one_process(ex)
        workers = host.children(recursive=True)
        assert len(workers) >= 2
        host.send_signal(signal.SIGKILL)
        _gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, [p.pid for p in alive]
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


@pytest.mark.timeout(90)
def test_calls_in_flight_fail_at_once_when_the_one_process_dies():
    """Its record went with it: the futures fail, naming why, instead of
    waiting for a relay that will never answer."""
    ex = FederatedExecutor(max_workers=2)
    try:
        assert ex.submit(abs, -1).result(DEADLINE) == 1
        futures = [ex.submit(time.sleep, 30) for _ in range(4)]
        time.sleep(0.5)
        the_one_process(ex).send_signal(signal.SIGKILL)
        for future in futures:
            with pytest.raises(BrokenExecutor, match=r"exited with code -9.*outcome is lost"):
                future.result(10)
        with pytest.raises(BrokenExecutor):
            ex.submit(abs, -1)
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


def _socket_inode(pid: int, fd: int) -> str:
    target = os.readlink(f"/proc/{pid}/fd/{fd}")
    assert target.startswith("socket:"), target
    return target


@pytest.mark.timeout(90)
def test_the_program_talks_to_its_relay_over_a_socketpair_nobody_else_holds(monkeypatch):
    monkeypatch.delenv("FEDEXEC_CLIENT_LINK", raising=False)   # (the default: embedded.py)
    with FederatedExecutor(max_workers=2) as ex:
        assert ex.submit(operator.add, 1, 2).result(DEADLINE) == 3
        assert ex._dispatcher.link is not None and not ex._dispatcher.link.closed
        host = the_one_process(ex)
        cmdline = host.cmdline()
        fd = int(cmdline[cmdline.index("--client-fd") + 1])
        theirs = _socket_inode(host.pid, fd)
        ours = _socket_inode(os.getpid(), ex._dispatcher.link.fileno())
        assert theirs != ours   # (the two ends of one pair)
        # the workers (and what tasks start) do not inherit the relay's end
        for worker in host.children(recursive=True):
            held = {os.readlink(f"/proc/{worker.pid}/fd/{n}") for n in os.listdir(f"/proc/{worker.pid}/fd")
                    if os.path.exists(f"/proc/{worker.pid}/fd/{n}")}
            assert theirs not in held and ours not in held, worker.cmdline()
        # everything goes over it: a batch far larger than the socket's buffers, both ways
        big = [b"x" * 100_000 for _ in range(200)]
        assert [len(r) for r in ex.map(bytes, big)] == [100_000] * 200


def test_a_client_link_exists_only_on_a_relay_in_local_mode():
    import socket

    from fedexec.relay.locallink import ClientLink

    a, b = socket.socketpair()
    try:
        for mode in ("token", "globus"):
            with pytest.raises(ValueError, match="local authentication mode"):
                ClientLink(b.fileno(), mode)
    finally:
        a.close()
        b.close()

