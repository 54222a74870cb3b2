"""Authentication under abuse (issue 12, item 7): nothing of an
unauthenticated client is buffered before its credentials are checked, and
a slow Globus Auth delays only the connection being checked.

Real relays, endpoints and executors (separate processes, loopback sockets);
attackers are raw ZeroMQ sockets; the relay's memory is read with psutil.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from fedexec import AuthenticationFailed, FederatedExecutor
from fedexec import protocol as P
from fedexec.auth import connect_plainly
from fedexec.relay.access import GLOBUS_CHECKS_PER_PEER, OLD_TOKEN_OVER_CURVE, PENDING_CONNECTIONS, TokenBook
from fedexec.relay.query import lookup_endpoint

from test_access import RawClient, fedexec_cli, running_endpoint, wait_connected
from test_faults import running_relay, stop_process, tail

DEADLINE = 30
BIG = 20 * 1024 * 1024          # each of the intruder's messages
INTRUDER_MESSAGES = 5


def connect_from(sock: zmq.Socket, address: str, token: str, source: str, relay_key: str | None = None) -> None:
    """connect_plainly, from the loopback address ``source`` (127.0.0.x):
    as a client on another machine would, for per-address limits."""
    from fedexec.auth import find_credentials, secure

    key = secure(sock, address, relay_key)
    find_credentials(address, token).apply(sock, key)
    sock.connect(f"tcp://{source}:0;{address.split('://', 1)[1]}")


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
    listing = fedexec_cli("token", "list", "--data-dir", r.data).stdout
    row = next(line for line in listing.splitlines() if line.startswith(token.split(":")[1].split(".")[0]))
    assert "plain only, create a new token" in row, listing
    assert "plain only" not in next(line for line in listing.splitlines()
                                    if line.startswith(r.tokens["alice"].split(":")[1].split(".")[0]))


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


# -- B. a slow Globus Auth delays only the connection being checked --------------------

HANG = 10.0   # seconds the fake Globus Auth takes to introspect a slow token


@contextlib.contextmanager
def globus_relay(directory: Path, curve: bool):
    """A fake Globus Auth, a globus-mode relay (CURVE or plain) and alice's
    endpoint, started with alice's token (so the relay has it cached)."""
    from fake_globus import FakeGlobusAuth
    from test_globus_mode import ALICE, RELAY_ID, RELAY_SECRET, SCOPE, clean_env, start_endpoint

    fake = FakeGlobusAuth()
    mp = pytest.MonkeyPatch()
    try:
        for k, v in fake.env().items():
            mp.setenv(k, v)
        for var in ("FEDEXEC_TOKEN", "FEDEXEC_RELAY_KEY"):
            mp.delenv(var, raising=False)
        fake.add_client(RELAY_ID, RELAY_SECRET)
        fake.add_user(ALICE)
        fake.add_user("mallory@example.org")
        alice = "globus:" + fake.issue_token(ALICE, scope=SCOPE)
        relay_env = clean_env(fake, directory / "home-relay", FEDEXEC_RELAY_GLOBUS_CLIENT_SECRET=RELAY_SECRET)
        with running_relay(directory, "--auth", "globus", "--globus-client-id", RELAY_ID, "--globus-scope", SCOPE,
                           "--curve" if curve else "--no-curve", env=relay_env) as address:
            key = (directory / "relay-data" / "relay.curve").read_text().split()[0] if curve else None
            extra = {"FEDEXEC_TOKEN": alice, **({"FEDEXEC_RELAY_KEY": key} if key else {})}
            endpoint = start_endpoint(directory, "alice-ep", address, clean_env(fake, directory / "home-ep", **extra))
            try:
                wait_connected(address, endpoint.id, alice, endpoint.proc, endpoint.log, relay_key=key)
                yield SimpleNamespace(fake=fake, address=address, key=key, endpoint=endpoint, alice=alice,
                                      scope=SCOPE, log=directory / "relay.log")
            finally:
                stop_process(endpoint.proc)
    finally:
        fake.close()
        mp.undo()


def slow_lookups(g, tokens: list[str]) -> list[dict]:
    """Look up an unknown endpoint with each token, each on a thread of its
    own; each outcome (and how long it took) lands in the returned dicts."""
    outcomes: list[dict] = []

    def look(token: str) -> None:
        outcome = {"token": token, "start": time.monotonic()}
        outcomes.append(outcome)
        try:
            outcome["answer"] = lookup_endpoint(g.address, str(uuid.uuid4()), timeout=HANG + 20, token=token,
                                                relay_key=g.key)
        except Exception as exc:  # noqa: BLE001 - the outcome is what is checked
            outcome["error"] = exc
        outcome["took"] = time.monotonic() - outcome["start"]

    for token in tokens:
        threading.Thread(target=look, args=(token,), daemon=True).start()
    return outcomes


@pytest.mark.timeout(120)
@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_a_hung_globus_introspection_delays_only_its_connection(tmp_path, curve):
    with globus_relay(tmp_path, curve) as g:
        # as many slow tokens as one address may have checked at once (GLOBUS_CHECKS_PER_PEER, half
        # the check threads; see test_one_address_cannot_take_every_globus_check for more)
        slow = [g.fake.issue_token("mallory@example.org", scope=g.scope) for _ in range(GLOBUS_CHECKS_PER_PEER)]
        for token in slow:
            g.fake.slow(token, HANG)
        with FederatedExecutor(g.endpoint.id, relay=g.address, token=g.alice, relay_public_key=g.key) as ex:
            assert ex.submit(operator.add, 1, 1).result(DEADLINE) == 2
            started = time.monotonic()
            waiting = slow_lookups(g, ["globus:" + token for token in slow])
            time.sleep(0.5)   # their handshakes (plain) or first messages (CURVE) are in
            round_trips, new_connections = [], []
            while time.monotonic() - started < HANG * 0.6:
                t = time.monotonic()
                assert ex.submit(operator.mul, 2, 21).result(DEADLINE) == 42
                round_trips.append(time.monotonic() - t)
                if len(round_trips) % 10 == 1:   # a new connection with a cached token is answered at once
                    t = time.monotonic()
                    assert lookup_endpoint(g.address, g.endpoint.id, timeout=HANG, token=g.alice,
                                           relay_key=g.key)["status"] == "connected"
                    new_connections.append(time.monotonic() - t)
            assert not any("took" in outcome for outcome in waiting), "the slow checks ended early: no test"
            round_trips.sort()
            assert round_trips[-1] < 2.0, f"a round trip took {round_trips[-1]:.2f} s while Globus Auth hung"
            assert max(new_connections) < 3.0, f"connecting took {max(new_connections):.2f} s"
            # the hung checks end, and their connections are answered then (what they sent was held)
            deadline = time.monotonic() + HANG + 15
            while not all("took" in outcome for outcome in waiting) and time.monotonic() < deadline:
                time.sleep(0.1)
        for outcome in waiting:
            assert "error" not in outcome and outcome.get("answer", "missing") is None, outcome
            assert outcome["took"] >= HANG * 0.8, outcome
        print(f"\n{'curve' if curve else 'plain'}: {len(round_trips)} round trips while Globus Auth hung: "
              f"p50 {round_trips[len(round_trips) // 2] * 1000:.1f} ms, max {round_trips[-1] * 1000:.1f} ms; "
              f"new connections max {max(new_connections) * 1000:.0f} ms")


@pytest.mark.timeout(120)
def test_connections_waiting_for_their_check_are_bounded(tmp_path):
    """Over CURVE: PENDING_CONNECTIONS connections may wait for their token's
    check at once; the next is refused at once, saying why; alice is served."""
    with globus_relay(tmp_path, curve=True) as g:
        slow = ["globus:" + g.fake.issue_token("mallory@example.org", scope=g.scope)
                for _ in range(PENDING_CONNECTIONS + 1)]
        for token in slow:
            g.fake.slow(token.partition(":")[2], HANG)
        clients = []
        try:
            for i, token in enumerate(slow[:-1]):   # from several addresses: each has GLOBUS_CHECKS_PER_PEER
                ctx = zmq.Context.instance()
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                connect_from(sock, g.address, token, f"127.0.0.{2 + i // GLOBUS_CHECKS_PER_PEER}", g.key)
                sock.send_multipart(P.encode(P.HELLO, {"role": "client", "py": P.PYTHON_VERSION}))
                clients.append(sock)
            time.sleep(1.0)   # all of them are held
            # one of them goes on sending large messages meanwhile: none is kept, each is answered at once
            relay = relay_process(tmp_path / "relay-data")
            rss_before = relay.memory_info().rss
            flooder = clients[0]
            for _ in range(INTRUDER_MESSAGES):
                flooder.send_multipart(P.encode(P.SUBMIT, {"ep": str(uuid.uuid4()), "tasks": []}, [b"\0" * BIG]))
            dropped = []
            deadline = time.monotonic() + 10
            while len(dropped) < INTRUDER_MESSAGES and time.monotonic() < deadline:
                if flooder.poll(100):
                    dropped.append(P.decode(flooder.recv_multipart()))
            assert [m.type for m in dropped] == [P.ERROR] * INTRUDER_MESSAGES, dropped
            assert all(m.fields.get("unchecked") and not m.fields.get("auth") for m in dropped), dropped
            assert "still being checked" in dropped[0].fields["msg"]
            # each was read, none kept: what one message in flight takes (over CURVE, its ciphertext
            # and its plaintext at once) the allocator may keep, not more (kept: 5 x BIG)
            growth = relay.memory_info().rss - rss_before
            assert growth < BIG * 2.5, f"the relay grew by {growth / 2**20:.1f} MiB after {INTRUDER_MESSAGES} x " \
                                       f"{BIG / 2**20:.0f} MiB"
            t = time.monotonic()
            with pytest.raises(AuthenticationFailed, match="too many connections"):
                lookup_endpoint(g.address, str(uuid.uuid4()), timeout=5, token=slow[-1], relay_key=g.key)
            assert time.monotonic() - t < 3.0
            with FederatedExecutor(g.endpoint.id, relay=g.address, token=g.alice, relay_public_key=g.key) as ex:
                assert ex.submit(operator.add, 2, 2).result(DEADLINE) == 4
            # once Globus Auth answers, the HELLO each held connection sent first is answered
            g.fake.release()
            for sock in clients[:3]:
                assert sock.poll(15_000), "a held HELLO was never answered"
                assert P.decode(sock.recv_multipart()).type == P.WELCOME
        finally:
            for sock in clients:
                sock.close(linger=0)


@pytest.mark.timeout(120)
def test_a_large_first_message_is_not_held_while_its_check_runs(tmp_path):
    """Over CURVE (globus mode) a first message over PENDING_BYTES_EACH is
    refused at once, not held; its check still runs, and once it answers
    the connection is served."""
    from fedexec.relay.access import PENDING_BYTES_EACH

    with globus_relay(tmp_path, curve=True) as g:
        token = "globus:" + g.fake.issue_token("mallory@example.org", scope=g.scope)
        g.fake.slow(token.partition(":")[2], HANG)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        try:
            connect_plainly(sock, g.address, token, g.key)
            started = time.monotonic()
            sock.send_multipart(P.encode(P.SUBMIT, {"ep": str(uuid.uuid4()), "tasks": []},
                                         [b"\0" * (PENDING_BYTES_EACH + 1)]))
            assert sock.poll(5000), "a large first message got no answer while its check ran"
            reply = P.decode(sock.recv_multipart())
            assert time.monotonic() - started < HANG / 2
            assert reply.type == P.ERROR and reply.fields.get("unchecked") and not reply.fields.get("auth"), reply
            assert f"at most {PENDING_BYTES_EACH} bytes" in reply.fields["msg"]
            g.fake.release()
            deadline = time.monotonic() + HANG + 15
            welcome = None
            while welcome is None and time.monotonic() < deadline:   # the check ends; then it is served
                sock.send_multipart(P.encode(P.HELLO, {"role": "client", "py": P.PYTHON_VERSION}))
                if sock.poll(1000):
                    msg = P.decode(sock.recv_multipart())
                    welcome = msg if msg.type == P.WELCOME else None
            assert welcome is not None, "the connection was not served after its check"
        finally:
            sock.close(linger=0)


def hello_from(address: str, token: str, source: str) -> zmq.Socket:
    """A raw PLAIN connection from the loopback address ``source`` that says HELLO."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    connect_from(sock, address, token, source)
    sock.send_multipart(P.encode(P.HELLO, {"role": "client", "py": P.PYTHON_VERSION}))
    return sock


def welcomed(sock: zmq.Socket, timeout: float) -> bool:
    return bool(sock.poll(int(timeout * 1000))) and P.decode(sock.recv_multipart()).type == P.WELCOME


@pytest.mark.timeout(120)
def test_one_address_cannot_take_every_globus_check(tmp_path):
    """Tokens whose check hangs, from one address, as many as the relay
    checks at once in all: that address gets GLOBUS_CHECKS_PER_PEER of the
    places, the rest are refused at once; a new token from another address
    is checked and served meanwhile, and so is a cached one from the same."""
    from fedexec.relay.access import GLOBUS_CHECKS_WAITING

    with globus_relay(tmp_path, curve=False) as g:
        slow = [g.fake.issue_token("mallory@example.org", scope=g.scope) for _ in range(GLOBUS_CHECKS_WAITING)]
        for token in slow:
            g.fake.slow(token, HANG)
        socks = [hello_from(g.address, "globus:" + token, "127.0.0.1") for token in slow]
        try:
            time.sleep(2.0)
            fresh = "globus:" + g.fake.issue_token("mallory@example.org", scope=g.scope)
            started = time.monotonic()
            socks.append(hello_from(g.address, fresh, "127.0.0.2"))
            assert welcomed(socks[-1], HANG / 2), "a new token from another address was not served"
            socks.append(hello_from(g.address, g.alice, "127.0.0.1"))
            assert welcomed(socks[-1], HANG / 2), "a cached token was not served"
            assert time.monotonic() - started < HANG / 2
            log = tail(g.log, 400_000)
            refused = log.count("from this network address at once")   # (a refused client may try again)
            assert refused >= GLOBUS_CHECKS_WAITING - GLOBUS_CHECKS_PER_PEER, refused
            assert "Globus tokens at once" not in log   # the relay's own limit was never reached
            g.fake.release()
            # which of the connections from one address got its places depends on the order of
            # their handshakes: count those served once the checks are answered
            deadline = time.monotonic() + HANG + 10
            served = 0
            waiting = socks[:GLOBUS_CHECKS_WAITING]
            while served < GLOBUS_CHECKS_PER_PEER and waiting and time.monotonic() < deadline:
                waiting = [sock for sock in waiting if not (welcomed(sock, 0.05) and (served := served + 1))]
            assert served >= GLOBUS_CHECKS_PER_PEER, served
        finally:
            for sock in socks:
                sock.close(linger=0)


def test_refused_globus_tokens_never_evict_valid_ones(tmp_path, monkeypatch):
    """Random tokens fill only the (bounded) cache of refused ones; a valid
    token's session stays cached: checked again with Globus Auth hanging,
    it is answered at once."""
    from fake_globus import FakeGlobusAuth
    from fedexec.relay.access import GlobusTokenCheck, Session
    from test_globus_mode import ALICE, RELAY_ID, RELAY_SECRET, SCOPE

    fake = FakeGlobusAuth()
    try:
        for k, v in fake.env().items():
            monkeypatch.setenv(k, v)
        fake.add_client(RELAY_ID, RELAY_SECRET)
        fake.add_user(ALICE)
        check = GlobusTokenCheck(RELAY_ID, RELAY_SECRET, scope=SCOPE, refused_cached=20)
        alice = fake.issue_token(ALICE, scope=SCOPE)
        assert isinstance(check.check(alice), Session)
        junk = [f"junk-{i}" for i in range(60)]
        for token in junk:
            assert "not active" in check.check(token)
        assert check.cached(junk[0]) is None and check.cached(junk[-1]) is not None   # the oldest went
        fake.slow(alice, HANG)
        started = time.monotonic()
        session = check.check(alice)
        assert isinstance(session, Session) and session.user == ALICE
        assert time.monotonic() - started < 1.0, "a valid token's session was forgotten"
    finally:
        fake.release()
        fake.close()
