"""Authentication under abuse (issue 12, item 7): nothing of an
unauthenticated client is buffered before its credentials are checked, and
a slow Globus Auth delays only the connection being checked.

Real relays, endpoints and executors (separate processes, loopback sockets);
attackers are raw ZeroMQ sockets; the relay's memory is read with psutil.
"""

from __future__ import annotations

import json
import operator
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from fedexec import AuthenticationFailed, FederatedExecutor
from fedexec import protocol as P
from fedexec.relay.access import OLD_TOKEN_OVER_CURVE, TokenBook

from test_access import RawClient, fedexec_cli, running_endpoint, wait_connected
from test_faults import running_relay, stop_process, tail

DEADLINE = 30
BIG = 20 * 1024 * 1024          # each of the intruder's messages
INTRUDER_MESSAGES = 3


def relay_process(data: Path) -> psutil.Process:
    """The relay serving ``data`` (its pid is in relay.json)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            return psutil.Process(json.loads((data / "relay.json").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    pytest.fail(f"no relay.json in {data}")


class CurveIntruder:
    """A raw client that holds the relay's public key and nothing else (a
    key pair of its own, made-up credentials in the metadata) and sends
    large messages at once, without waiting for the handshake."""

    def __init__(self, address: str, relay_key: str, user: str = "alice") -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.curve_serverkey = relay_key.encode()
        self.sock.curve_publickey, self.sock.curve_secretkey = zmq.curve_keypair()
        self.sock.setsockopt(zmq.METADATA, f"X-Fedexec-Auth:{user}:made-up".encode())
        self.monitor = self.sock.get_monitor_socket()
        self.sock.connect(address)

    def flood(self, count: int, size: int) -> int:
        """Queue ``count`` messages of ``size`` bytes; how many could be
        (none once the relay refused the handshake: no connection is left)."""
        blob = b"\x00" * size
        for sent in range(count):
            try:
                self.sock.send_multipart(P.encode(P.SUBMIT, {"ep": str(uuid.uuid4()), "tasks": []}, [blob]),
                                         zmq.NOBLOCK)
            except zmq.Again:
                return sent
        return count

    def events(self, seconds: float) -> set[int]:
        """The handshake events of the next ``seconds``."""
        seen: set[int] = set()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.monitor.poll(50):
                seen.add(recv_monitor_message(self.monitor)["event"])
        return seen

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self.ctx.term()


def intrude_while_working(address: str, relay_key: str, relay: psutil.Process, ex: FederatedExecutor) -> None:
    """An intruder floods the relay with large messages while a legitimate
    user runs tasks: its handshake is refused, none of its bytes stay in the
    relay, and the user's tasks run meanwhile."""
    assert ex.submit(operator.add, 1, 1).result(DEADLINE) == 2   # warm: the relay's memory settles
    rss_before = relay.memory_info().rss
    peak = rss_before
    intruder = CurveIntruder(address, relay_key)
    try:
        intruder.flood(INTRUDER_MESSAGES, BIG)
        events = set()
        deadline = time.monotonic() + 3
        i = 0
        while time.monotonic() < deadline:
            events |= intruder.events(0.2)
            peak = max(peak, relay.memory_info().rss)
            i += 1
            assert ex.submit(operator.mul, i, 3).result(DEADLINE) == 3 * i   # served meanwhile
    finally:
        intruder.close()
    assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in events, events
    assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events, events
    growth = peak - rss_before
    assert growth < BIG // 2, f"the relay grew by {growth / 2**20:.1f} MiB while the intruder sent " \
                              f"{INTRUDER_MESSAGES} x {BIG / 2**20:.0f} MiB"


@pytest.mark.timeout(120)
def test_curve_local_mode_refuses_a_key_holder_in_the_handshake(tmp_path):
    with running_relay(tmp_path, "--curve") as address:
        data = tmp_path / "relay-data"
        key = (data / "relay.curve").read_text().split()[0]
        endpoint_id = str(uuid.uuid4())
        log = tmp_path / "endpoint.log"
        with open(log, "wb") as out:   # finds the published key and secret, as this machine's user
            endpoint = subprocess.Popen([sys.executable, "-m", "fedexec.endpoint", "--name", "ep", "--relay",
                                         address, "--endpoint-id", endpoint_id, "--max-workers", "1"],
                                        stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_connected(address, endpoint_id, (data / "relay.secret").read_text(), endpoint, log)
            with FederatedExecutor(endpoint_id, relay=address) as ex:
                intrude_while_working(address, key, relay_process(data), ex)
                assert ex.submit(operator.add, 2, 3).result(DEADLINE) == 5
        finally:
            stop_process(endpoint)
        relay_log = tail(tmp_path / "relay.log", 100_000)
        assert "refused a CURVE connection" in relay_log
        assert "unauthenticated connection" not in relay_log   # no message of its was ever read


@pytest.fixture(scope="module")
def curve_token_relay(tmp_path_factory):
    """A token-mode CURVE relay with users alice and bob, and alice's endpoint
    (connected over CURVE with her token)."""
    from types import SimpleNamespace

    directory = tmp_path_factory.mktemp("curve-token-relay")
    data = directory / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "bob")}
    with running_relay(directory, "--auth", "token", "--curve") as address:
        key = (data / "relay.curve").read_text().split()[0]
        with running_endpoint(directory, "alice-ep", {"FEDEXEC_TOKEN": tokens["alice"], "FEDEXEC_RELAY_KEY": key},
                              relay=address) as ep:
            wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log, relay_key=key)
            yield SimpleNamespace(address=address, data=data, tokens=tokens, key=key, endpoint=ep,
                                  log=directory / "relay.log")


@pytest.mark.timeout(120)
def test_curve_token_mode_refuses_a_key_holder_in_the_handshake(curve_token_relay):
    r = curve_token_relay
    with FederatedExecutor(r.endpoint.id, relay=r.address, token=r.tokens["alice"], relay_public_key=r.key) as ex:
        intrude_while_working(r.address, r.key, relay_process(r.data), ex)
    log = tail(r.log, 100_000)
    assert "refused a CURVE connection" in log and "unknown CURVE key" in log
    assert "unauthenticated connection" not in log


@pytest.mark.timeout(120)
def test_curve_token_mode_new_tokens_work_and_a_revoked_tokens_session_ends(curve_token_relay):
    r = curve_token_relay
    token = fedexec_cli("token", "create", "bob", "--data-dir", r.data).stdout.strip()
    bob = RawClient(r.address, token, relay_key=r.key)   # over CURVE: HELLO answered with WELCOME
    try:
        bob.send(P.LOOKUP, {"ep": r.endpoint.id})
        assert bob.expect(P.LOOKUP_REPLY) is not None
        fedexec_cli("token", "revoke", token.split(":")[1].split(".")[0], "--data-dir", r.data)
        deadline = time.monotonic() + 5
        ended = None
        while ended is None and time.monotonic() < deadline:
            bob.send(P.HEARTBEAT, {})
            ended = bob.expect(P.ERROR, 0.3)
        assert ended is not None and ended.fields.get("auth") and "revoked" in ended.fields["msg"], ended
    finally:
        bob.close()
    with pytest.raises(AuthenticationFailed, match="refused the credentials of user 'bob'"):
        FederatedExecutor(r.endpoint.id, relay=r.address, token=token, relay_public_key=r.key, connect_timeout=10)
    # bob's first token and alice are unaffected
    with FederatedExecutor(r.endpoint.id, relay=r.address, token=r.tokens["alice"], relay_public_key=r.key) as ex:
        assert ex.submit(operator.add, 20, 22).result(DEADLINE) == 42
    RawClient(r.address, r.tokens["bob"], relay_key=r.key).close()   # (it asserts its WELCOME)


@pytest.mark.timeout(120)
def test_a_token_made_before_curve_keys_is_refused_over_curve_with_advice(curve_token_relay):
    r = curve_token_relay
    token = fedexec_cli("token", "create", "bob", "--data-dir", r.data).stdout.strip()
    with sqlite3.connect(r.data / "access.sqlite3") as db:   # as a token book of an older relay kept it
        db.execute("UPDATE tokens SET curve_key=NULL WHERE id=?", (token.split(":")[1].split(".")[0],))
    with pytest.raises(AuthenticationFailed, match="fedexec token create"):
        FederatedExecutor(r.endpoint.id, relay=r.address, token=token, relay_public_key=r.key, connect_timeout=10)
    assert "a token made before encrypted connections" in tail(r.log, 100_000)


def test_an_older_token_book_is_upgraded_and_its_tokens_still_work_over_plain(tmp_path):
    """A token book from before CURVE keys: opening it adds the column; its
    tokens open PLAIN sessions and get a clear refusal over CURVE."""
    import hashlib

    data = tmp_path / "relay-data"
    data.mkdir()
    with sqlite3.connect(data / "access.sqlite3") as db:
        db.executescript("""
            CREATE TABLE users (name TEXT PRIMARY KEY, created REAL NOT NULL);
            CREATE TABLE tokens (id TEXT PRIMARY KEY, user TEXT NOT NULL REFERENCES users(name),
                                 hash BLOB NOT NULL, created REAL NOT NULL, expires REAL, revoked REAL);""")
        db.execute("INSERT INTO users VALUES ('carol', 0)")
        db.execute("INSERT INTO tokens VALUES ('0123abcd', 'carol', ?, 0, NULL, NULL)",
                   (hashlib.sha256(b"old-secret").digest(),))
    book = TokenBook(data)
    try:
        session = book.check("carol", "0123abcd.old-secret")
        assert not isinstance(session, str) and session.user == "carol"
        from fedexec.relay.access import curve_key_of
        assert book.check_curve_key(curve_key_of("carol", "0123abcd.old-secret")) == OLD_TOKEN_OVER_CURVE
        new = book.create_token("carol")
        user, _, presented = new.partition(":")
        answer = book.check_curve_key(curve_key_of(user, presented))
        assert not isinstance(answer, str) and answer.user == "carol" and answer.token_id == presented[:8]
    finally:
        book.close()
    again = TokenBook(data)   # opened again: nothing changes
    try:
        assert not isinstance(again.check("carol", "0123abcd.old-secret"), str)
    finally:
        again.close()
