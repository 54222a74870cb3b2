"""Same-host links (samehost.py): a relay started from the CLI in local mode
also listens on a Unix socket beside its secret, and its owner's executors
and endpoints on its host talk to it there instead of over ZeroMQ; only its
own uid gets in, a link must introduce itself with a routing id of its own,
and a program goes on over ZeroMQ when its link ends (and takes a new one
from a restarted relay)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import psutil
import pytest

from fedexec import FederatedExecutor
from fedexec import protocol as P
from fedexec import samehost
from fedexec.relay.locallink import INTRO_TIMEOUT, MAX_SAME_HOST_LINKS
from fedexec.samehost import INTRO, reachable_path, socket_path

from test_durability import DEADLINE, Endpoint, Relay
from test_faults import tail

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def double(x):
    return 2 * x


@contextlib.contextmanager
def started_federation(directory: Path):
    """A relay and an endpoint started after it serves (its socket is there),
    as 'fedexec relay start --daemon' returns once it serves: an endpoint
    that comes first finds no link and keeps to ZeroMQ."""
    relay = Relay(directory)
    relay.start()
    endpoint = Endpoint(directory, relay)
    try:
        deadline = time.monotonic() + DEADLINE
        while not socket_path(relay.address).is_socket():
            assert time.monotonic() < deadline and relay.proc.poll() is None, tail(relay.log)
            time.sleep(0.02)
        endpoint.start()
        yield relay, endpoint
    finally:
        endpoint.stop()
        relay.stop()


def _links(pid: int, path: Path) -> int:
    """Connections the process has on the socket at ``path`` (not its listening one)."""
    # (a Unix socket's accepted connections have the name it was bound by too, one of them is the
    # listener; a long path is bound through /proc/self/fd/N/, samehost.reachable_path)
    conns = [c for c in psutil.Process(pid).net_connections(kind="unix") if c.laddr.endswith("/" + path.name)]
    return len(conns) - 1


def _wait_links(pid: int, path: Path, count: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := _links(pid, path)) != count and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


def _frame(frames: list[bytes]) -> bytes:
    """A message in framelink.py's framing."""
    return struct.pack(f"<{len(frames) + 1}I", len(frames), *map(len, frames)) + b"".join(frames)


def _raw_link(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name, dir_fd = reachable_path(path)
    try:
        sock.connect(name)
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    sock.settimeout(5)
    return sock


def _closed_by_relay(sock: socket.socket) -> bool:
    """Whether the relay closed the link (end of file) rather than answer."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


@pytest.mark.timeout(120)
def test_the_owners_executor_and_endpoint_use_the_relays_unix_socket(tmp_path):
    with started_federation(tmp_path) as (relay, endpoint):
        path = socket_path(relay.address)
        assert path.is_socket(), tail(relay.log)
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
        # the endpoint has its link (it connected at its HELLO)
        assert _wait_links(relay.proc.pid, path, 1) == 1, tail(endpoint.log)
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            assert list(ex.map(double, range(200))) == [2 * i for i in range(200)]
            assert _links(relay.proc.pid, path) == 2
            assert ex._dispatcher.link is not None and not ex._dispatcher.link.closed
        assert _wait_links(relay.proc.pid, path, 1) == 1   # the executor's closed with it
        # and with FEDEXEC_SAME_HOST_LINK=0 an executor keeps to ZeroMQ
        os.environ["FEDEXEC_SAME_HOST_LINK"] = "0"
        try:
            with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
                assert ex.submit(double, 21).result(DEADLINE) == 42
                assert ex._dispatcher.link is None
                assert _links(relay.proc.pid, path) == 1
        finally:
            del os.environ["FEDEXEC_SAME_HOST_LINK"]
    assert not path.exists(), "the stopped relay left its socket behind"


@pytest.mark.timeout(120)
def test_after_a_relay_restart_both_go_on_over_a_new_link_or_zeromq_for_good(tmp_path):
    """The relay killed and started again: the executor's and the endpoint's
    links end; each sends nothing until its next heartbeat, whose HELLO takes
    the new relay's link if it is up by then, else ZeroMQ for good (never
    from ZeroMQ back to a link: what ZeroMQ held could overtake it); either
    way every task finishes."""
    with started_federation(tmp_path) as (relay, endpoint):
        path = socket_path(relay.address)
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            futures = [ex.submit(time.sleep, 0.05) for _ in range(40)]
            assert ex.submit(double, 1).result(DEADLINE) == 2
            assert _wait_links(relay.proc.pid, path, 2) == 2
            relay.kill()
            time.sleep(0.3)
            relay.start()
            # the tasks out at the kill finish, and new ones run
            assert [f.result(DEADLINE) for f in futures] == [None] * 40
            assert ex.submit(double, 2).result(DEADLINE) == 4
            dispatcher = ex._dispatcher
            on_link = dispatcher.link is not None and not dispatcher.link.closed
            assert on_link or not dispatcher.same_host, "on ZeroMQ, yet may still move to a link"
            assert _links(relay.proc.pid, path) <= 2
            assert ex.submit(double, 3).result(DEADLINE) == 6
        assert endpoint.proc.poll() is None, tail(endpoint.log)


@pytest.mark.timeout(120)
def test_links_that_do_not_introduce_themselves_or_take_an_id_in_use_are_closed(tmp_path):
    with started_federation(tmp_path) as (relay, endpoint):
        path = socket_path(relay.address)
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            assert ex.submit(double, 1).result(DEADLINE) == 2
            taken = b"C" + ex._dispatcher.client_id
            bad_intros = [
                [b"hello", b"C" + os.urandom(16)],    # not the introduction
                [INTRO, b"X" + os.urandom(16)],     # neither a client's nor an endpoint's
                [INTRO, b"C" + os.urandom(3)],      # too short
                [INTRO, taken],                     # the executor's own, in use
            ]
            for frames in bad_intros:
                with _raw_link(path) as sock:
                    sock.sendall(_frame(frames))
                    assert _closed_by_relay(sock), frames
            # the framing broken: a frame over the limit; before the introduction, over 64 bytes
            # (a header announcing 32 MiB would have the relay set that much aside at once)
            for size in (P.MAX_FRAME + 1, 1 << 20, 65):
                with _raw_link(path) as sock:
                    sock.sendall(struct.pack("<II", 1, size))
                    assert _closed_by_relay(sock), size
            # introduced: the relay answers, and takes messages of any size from then on
            with _raw_link(path) as sock:
                sock.sendall(_frame([INTRO, b"C" + os.urandom(16)]))
                assert sock.recv(4096) == _frame([INTRO])
            # the executor's own link is untouched, its results still come to it alone
            assert ex.submit(double, 5).result(DEADLINE) == 10
            assert ex._dispatcher.link is not None and not ex._dispatcher.link.closed
        log = relay.log.read_text()
        assert "did not introduce itself" in log


_OTHER_UID = r"""
import os, socket, struct, sys
os.setgid(65534); os.setuid(65534)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(5)
sock.connect(sys.argv[1])
frames = [b"fedexec-same-host/1", b"C" + os.urandom(16)]
try:   # (the relay may have closed it before this is sent)
    sock.sendall(struct.pack("<3I", 2, *map(len, frames)) + b"".join(frames))
    print("answered" if sock.recv(4096) else "closed")
except (BrokenPipeError, ConnectionResetError):
    print("closed")
"""


@pytest.mark.timeout(120)
def test_another_uid_is_refused_even_where_the_socket_is_open_to_it(tmp_path):
    assert os.geteuid() == 0, "this test needs root, to connect as another uid (it runs as root in CI)"
    with started_federation(tmp_path) as (relay, endpoint):
        path = socket_path(relay.address)
        # the private directory and the socket's mode keep other users out: give the socket a
        # second name they can reach, and open its mode, so that only the relay's own check of
        # the peer's uid stands in the way
        reachable = Path(tempfile.mkdtemp(dir="/tmp", prefix="fedexec-other-uid-"))
        os.chmod(reachable, 0o711)
        os.link(path, reachable / "relay.sock")
        os.chmod(path, 0o666)
        try:
            out = subprocess.run([sys.executable, "-c", _OTHER_UID, str(reachable / "relay.sock")],
                                 capture_output=True, text=True, timeout=30)
        finally:
            shutil.rmtree(reachable)
        assert out.stdout.strip() == "closed", (out.stdout, out.stderr, tail(relay.log))
        assert "refused a same-host link from uid 65534" in relay.log.read_text()
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            assert ex.submit(double, 4).result(DEADLINE) == 8


@pytest.mark.timeout(180)
def test_a_full_relay_and_a_silent_link_leave_programs_on_zeromq_and_free_the_place(tmp_path):
    """Past MAX_SAME_HOST_LINKS the relay closes new links before answering
    them, so a new executor keeps to ZeroMQ and runs its tasks (review s32,
    finding 2: it sent its HELLO into the closed link and never got in); a
    link that does not introduce itself is closed after INTRO_TIMEOUT."""
    with started_federation(tmp_path) as (relay, endpoint):
        path = socket_path(relay.address)
        assert _wait_links(relay.proc.pid, path, 1) == 1, tail(endpoint.log)   # the endpoint's
        held = []
        try:
            for _ in range(MAX_SAME_HOST_LINKS - 1):
                link = samehost.connect(relay.address, b"C" + os.urandom(16))
                assert link is not None, tail(relay.log)
                held.append(link)
            assert samehost.connect(relay.address, b"C" + os.urandom(16)) is None   # no room: refused
            with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
                assert ex.submit(double, 7).result(DEADLINE) == 14
                assert ex._dispatcher.link is None   # on ZeroMQ
        finally:
            for link in held:
                link.close()
        assert _wait_links(relay.proc.pid, path, 1) == 1
        # a link that never says who it is holds a place for INTRO_TIMEOUT, no longer
        with _raw_link(path) as sock:
            sock.settimeout(INTRO_TIMEOUT + 5)
            started = time.monotonic()
            assert _closed_by_relay(sock)
            assert INTRO_TIMEOUT - 0.5 <= time.monotonic() - started <= INTRO_TIMEOUT + 3
        assert "did not introduce itself within" in relay.log.read_text()
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:   # and places are free again
            assert ex.submit(double, 8).result(DEADLINE) == 16
            assert ex._dispatcher.link is not None
