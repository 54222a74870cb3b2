"""One user of a shared relay cannot reach another's results, tasks or files:
memoization scoped per user and endpoint, task ids owned by their user,
private files, a second relay on a busy address, malformed credentials.
Attacked as a user with an account of their own would, with real
processes and raw sockets on loopback."""

from __future__ import annotations

import operator
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedexec import AuthenticationFailed, FederatedExecutor
from fedexec import protocol as P
from fedexec.relay.query import lookup_endpoint, share_endpoint
from fedexec.serialize import content_hash, serialize_arguments, serialize_function

from test_access import RawClient, fedexec_cli, running_endpoint, wait_connected
from test_faults import free_port, running_relay, stop_process, tail

DEADLINE = 30


def counted(path: str, x: int) -> tuple[int, str]:
    """Appends one line per run (so a test counts runs) and says which
    endpoint ran it (each test endpoint has its own fedexec home)."""
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return 2 * x, os.environ.get("FEDEXEC_HOME", "")


def runs(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


class Planted:
    """A result whose unpickling writes a file (what a hostile endpoint would return)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def plant(marker: str, path: str, x: int) -> Planted:
    return Planted(marker)


@pytest.fixture(scope="module")
def two_users(tmp_path_factory):
    """A token-mode relay with users alice and bob, each with an endpoint of
    their own (set up with the CLI, as its admin and users would)."""
    directory = tmp_path_factory.mktemp("isolation")
    data = directory / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "bob")}
    with running_relay(directory, "--auth", "token") as address:
        with running_endpoint(directory, "alice-ep", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address) as a_ep, \
                running_endpoint(directory, "bob-ep", {"FEDEXEC_TOKEN": tokens["bob"]}, relay=address) as b_ep:
            wait_connected(address, a_ep.id, tokens["alice"], a_ep.proc, a_ep.log)
            wait_connected(address, b_ep.id, tokens["bob"], b_ep.proc, b_ep.log)
            yield SimpleNamespace(address=address, data=data, tokens=tokens, alice_ep=a_ep, bob_ep=b_ep,
                                  dir=directory, log=directory / "relay.log")


def memoized_call(r, user: str, endpoint, *args, data_only: bool | None = None):
    """``counted(*args)`` memoized, from a fresh executor of ``user`` (so
    only the relay can answer it from memory)."""
    with FederatedExecutor(endpoint.id, relay=r.address, token=r.tokens[user], memoize=True,
                           data_only=data_only) as ex:
        return ex.submit(counted, *args).result(DEADLINE)


# -- memoization ------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_memoized_results_stay_with_their_user_and_endpoint(two_users, tmp_path):
    r = two_users
    log = str(tmp_path / "runs")
    alice_home, bob_home = str(r.alice_ep.home), str(r.bob_ep.home)
    assert memoized_call(r, "alice", r.alice_ep, log, 21) == (42, alice_home)
    assert memoized_call(r, "alice", r.alice_ep, log, 21) == (42, alice_home)   # her own hit
    assert runs(Path(log)) == [21]
    # bob, the same call on his own endpoint: computed there, not alice's result
    assert memoized_call(r, "bob", r.bob_ep, log, 21) == (42, bob_home)
    assert runs(Path(log)) == [21, 21]
    # bob on alice's endpoint, shared with him but not its memoized results: computed again
    share_endpoint(r.address, r.alice_ep.id, add_users=["bob"], token=r.tokens["alice"])
    try:
        assert memoized_call(r, "bob", r.alice_ep, log, 21) == (42, alice_home)
        assert runs(Path(log)) == [21, 21, 21]
        # ...and his result there does not replace alice's, nor reach her
        assert memoized_call(r, "alice", r.alice_ep, log, 21) == (42, alice_home)
        assert runs(Path(log)) == [21, 21, 21]
    finally:
        share_endpoint(r.address, r.alice_ep.id, remove_users=["bob"], token=r.tokens["alice"])


@pytest.mark.timeout(180)
def test_another_users_endpoint_cannot_plant_a_memoized_result(two_users, tmp_path):
    """Bob's endpoint returns, for a call that claims the memo key of
    alice's ``counted(log, 7)``, a result whose unpickling writes a file;
    alice's memoized ``counted(log, 7)`` must not receive it."""
    r = two_users
    log, marker = str(tmp_path / "runs"), tmp_path / "planted"
    fn_hash, _ = serialize_function(counted)
    payload = serialize_arguments(counted, (log, 7), {})
    alice_key = content_hash(fn_hash + bytes([P.TASK_CALL]) + payload)   # what alice's executor sends
    share_endpoint(r.address, r.bob_ep.id, public=True, share_memo=True, token=r.tokens["bob"])
    bob = RawClient(r.address, r.tokens["bob"])
    try:
        evil_hash, evil_body = serialize_function(plant)
        for endpoint in (r.bob_ep.id, r.alice_ep.id):   # his own endpoint; alice's (not shared: refused)
            blobs = P.Blobs()
            task_id = os.urandom(16)
            row = [task_id, evil_hash, blobs.ref(serialize_arguments(plant, (str(marker), log, 7), {})),
                   blobs.ref(evil_body), P.TASK_CALL, P.PYTHON_VERSION, {"m": alice_key}]
            bob.send(P.SUBMIT, {"ep": endpoint, "tasks": [row]}, blobs.frames)
            deadline = time.monotonic() + DEADLINE
            while task_id not in bob.outcomes and time.monotonic() < deadline:
                msg = bob.expect(P.RESULTS, 1.0)
                for got in msg.fields["rows"] if msg else ():
                    bob.outcomes[got[0]] = (got[1], P.as_bytes(P.blob(msg.blobs, got[2])))
            status, blob = bob.outcomes[task_id]
            if endpoint == r.bob_ep.id:
                assert status == P.OK and b"Planted" not in blob and b"open" in blob   # stored by the relay
            else:
                assert status == P.FAILED and P.unpack_failure(blob)["kind"] == P.NOT_ALLOWED
        assert not marker.exists()   # nothing unpickled it yet
        # alice, on her endpoint and on bob's (public, memoized results shared): the real result
        assert memoized_call(r, "alice", r.alice_ep, log, 7) == (14, str(r.alice_ep.home))
        # (taking pickles from bob's endpoint, so the relay alone keeps his planted result from her)
        assert memoized_call(r, "alice", r.bob_ep, log, 7, data_only=False) == (14, str(r.bob_ep.home))
        assert not marker.exists()
        assert runs(Path(log)) == [7, 7]
    finally:
        bob.close()
        share_endpoint(r.address, r.bob_ep.id, public=False, share_memo=False, token=r.tokens["bob"])


@pytest.mark.timeout(180)
def test_the_owner_may_share_memoized_results_with_every_user_of_an_endpoint(two_users, tmp_path):
    r = two_users
    log = str(tmp_path / "runs")
    alice_env = {"FEDEXEC_HOME": str(r.alice_ep.home), "FEDEXEC_TOKEN": r.tokens["alice"]}
    bob_env = {"FEDEXEC_HOME": str(r.alice_ep.home), "FEDEXEC_TOKEN": r.tokens["bob"]}
    assert memoized_call(r, "alice", r.alice_ep, log, 5) == (10, str(r.alice_ep.home))   # before the opt-in
    refused = fedexec_cli("endpoint", "share", r.alice_ep.name, "--share-memo", env=bob_env, check=False)
    assert refused.returncode == 1 and "only its owner may share it" in refused.stderr
    out = fedexec_cli("endpoint", "share", r.alice_ep.name, "--user", "bob", "--share-memo", env=alice_env).stdout
    assert "user bob" in out and "memoized results: shared among its users" in out
    try:
        assert lookup_endpoint(r.address, r.alice_ep.id, token=r.tokens["bob"])["share_memo"] is True
        assert memoized_call(r, "alice", r.alice_ep, log, 6) == (12, str(r.alice_ep.home))
        # alice's result; bob takes pickles from her endpoint, as she does (by default he would send
        # plain data, another call than hers)
        assert memoized_call(r, "bob", r.alice_ep, log, 6, data_only=False) == (12, str(r.alice_ep.home))
        assert runs(Path(log)) == [5, 6]
        # results memoized before the opt-in stay their user's
        assert memoized_call(r, "bob", r.alice_ep, log, 5, data_only=False) == (10, str(r.alice_ep.home))
        assert runs(Path(log)) == [5, 6, 5]
    finally:
        out = fedexec_cli("endpoint", "share", r.alice_ep.name, "--remove-user", "bob", "--no-share-memo",
                          env=alice_env).stdout
    assert "memoized results: each user's own" in out
    assert memoized_call(r, "alice", r.alice_ep, log, 6) == (12, str(r.alice_ep.home))   # her own again: runs
    assert runs(Path(log)) == [5, 6, 5, 6]


def loud_double(secret: str, x: int) -> int:
    """Prints something only its caller should see."""
    print(f"{secret} computed {x}")
    return 2 * x


@pytest.mark.timeout(180)
def test_a_memoized_hit_carries_no_output_of_the_run_that_made_it(two_users):
    """The output a task printed reaches the call that ran it, never a
    memoized hit: not another user's through a shared memoized result (nor,
    so, what a thread an earlier task left running printed into it), and
    not a hit of the same user's (at the relay, in the client, or a twin
    waiting for the same call)."""
    r = two_users
    secret = f"alice-secret-{uuid.uuid4().hex[:8]}"
    share_endpoint(r.address, r.alice_ep.id, add_users=["bob"], share_memo=True, token=r.tokens["alice"])
    try:
        with FederatedExecutor(r.alice_ep.id, relay=r.address, token=r.tokens["alice"], memoize=True) as ex:
            ran, twin = ex.submit(loud_double, secret, 8), ex.submit(loud_double, secret, 8)
            assert (ran.result(DEADLINE), twin.result(DEADLINE)) == (16, 16)
            assert ran.stdout == f"{secret} computed 8\n" and twin.stdout == ""
            again = ex.submit(loud_double, secret, 8)   # this client's own memo
            assert again.result(DEADLINE) == 16 and again.stdout == ""
        for user in ("alice", "bob"):   # fresh clients: the relay's memoized result
            with FederatedExecutor(r.alice_ep.id, relay=r.address, token=r.tokens[user], memoize=True,
                                   data_only=False) as ex:
                hit = ex.submit(loud_double, secret, 8)
                assert hit.result(DEADLINE) == 16
                assert (hit.stdout, hit.stderr) == ("", ""), (user, hit.stdout)
    finally:
        share_endpoint(r.address, r.alice_ep.id, remove_users=["bob"], share_memo=False, token=r.tokens["alice"])


# -- malformed credentials ----------------------------------------------------------

MALFORMED = {
    "alice:": "the secret after 'alice:' is empty",
    ":s3cr3t-value": "the user name before ':' is empty",
    "al ice:s3cr3t-value": "is not one a relay accepts",
    "alice/../x:s3cr3t-value": "is not one a relay accepts",
    "alice:s3cr3t\x00value": "control characters",
    "alice:s3cr3t\nvalue": "control characters",
    "alice:" + "s3cr3t" * 1000: "over the 4,096 a token may have",
    "alice:" + "s3cr3t" * 50: "over the 255 an unencrypted connection carries",
    "": None,   # no token given: not malformed (the relay refuses the missing credentials instead)
}


@pytest.mark.timeout(120)
def test_malformed_credentials_fail_at_once(two_users, monkeypatch):
    r = two_users
    monkeypatch.delenv("FEDEXEC_TOKEN", raising=False)
    for token, problem in MALFORMED.items():
        if problem is None:
            continue
        for how in ("token=", "$FEDEXEC_TOKEN"):
            if how == "token=":
                kwargs = {"token": token}
            elif "\x00" in token:
                continue   # no environment variable holds one
            else:
                kwargs = {}
                monkeypatch.setenv("FEDEXEC_TOKEN", token)
            started = time.monotonic()
            with pytest.raises(AuthenticationFailed) as err:
                FederatedExecutor(r.alice_ep.id, relay=r.address, connect_timeout=20, **kwargs)
            assert time.monotonic() - started < 1.0, (token[:20], how)
            assert problem in str(err.value) and "s3cr3t" not in str(err.value), str(err.value)
            assert ("$FEDEXEC_TOKEN" in str(err.value)) == (how != "token="), str(err.value)
            monkeypatch.delenv("FEDEXEC_TOKEN", raising=False)
    # the CLI and an endpoint say so cleanly, and exit
    env = {"FEDEXEC_HOME": str(r.alice_ep.home), "FEDEXEC_TOKEN": "alice:"}
    out = fedexec_cli("endpoint", "share", r.alice_ep.name, "--public", env=env, check=False)
    assert out.returncode == 1 and "the secret after 'alice:' is empty" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "fedexec.endpoint", "--name", "bad", "--relay", r.address,
                          "--max-workers", "1"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "FEDEXEC_TOKEN": "bob:x\x1by"})
    assert out.returncode == 2 and "control characters" in out.stderr and "Traceback" not in out.stderr, out.stderr
    # and alice's endpoint was not made public by the refused command
    assert lookup_endpoint(r.address, r.alice_ep.id, token=r.tokens["alice"])["public"] is False


# -- private files ---------------------------------------------------------------------

def big_len(blob: bytes, seconds: float) -> int:
    time.sleep(seconds)
    return len(blob)


def file_mode(path: str) -> int:
    with open(path, "w") as f:
        f.write("a task's output")
    return os.stat(path).st_mode & 0o777


def loose_modes(*roots: Path) -> list[str]:
    """Every file or directory under ``roots`` that someone else could read:
    a directory not 0700, a file with any group or other bit."""
    found = []
    for root in roots:
        for path in [root, *root.rglob("*")]:
            try:
                mode = path.lstat().st_mode
            except FileNotFoundError:   # gone meanwhile (a temporary file)
                continue
            if path.is_symlink():
                continue
            if (path.is_dir() and mode & 0o777 != 0o700) or (not path.is_dir() and mode & 0o077):
                found.append(f"{oct(mode & 0o777)} {path}")
    return found


@pytest.mark.timeout(180)
def test_everything_written_is_private_whatever_the_umask(tmp_path):
    """A relay, an endpoint and its pool started with the CLI under umask
    000, as a careless user would: every directory they make is 0700, every
    file (database, WAL, SHM, blobs, logs, pidfiles, config, status, secrets,
    sockets, task markers) has no group or other bit; a data dir made
    earlier 0755 is made 0700."""
    home, data, temp = tmp_path / "home", tmp_path / "relay-data", tmp_path / "tmp"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    temp.mkdir()
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(Path(__file__).parent)]))
    env = {**os.environ, "FEDEXEC_HOME": str(home), "TMPDIR": str(temp), "PYTHONPATH": path}
    env.pop("FEDEXEC_TOKEN", None)
    port = free_port()

    def cli(*args: str) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "fedexec.cli", *args], capture_output=True, text=True,
                             timeout=60, env=env, preexec_fn=lambda: os.umask(0))
        assert out.returncode == 0, out.stdout + out.stderr
        return out

    cli("relay", "add-user", "alice", "--data-dir", str(data))   # the token book (unused by a local relay)
    cli("relay", "start", "--port", str(port), "--data-dir", str(data), "--daemon")
    address = f"tcp://127.0.0.1:{port}"
    try:
        cli("endpoint", "configure", "private-ep", "--relay", address, "--max-workers", "1")
        cli("endpoint", "start", "private-ep", "--daemon")
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("FEDEXEC_HOME", str(home))
                endpoint_id = (home / "endpoints" / "private-ep" / "config.toml").read_text()
                endpoint_id = endpoint_id.split("endpoint_id = ")[1].split()[0].strip('"')
                with FederatedExecutor(endpoint_id, relay=address) as ex:
                    assert ex.submit(big_len, b"x" * 100_000, 0).result(DEADLINE) == 100_000
                    running = ex.submit(big_len, b"y" * 200_000, 3)   # its arguments wait in a blob file
                    time.sleep(1.5)
                    blobs = list((data / "blobs").iterdir())
                    assert blobs, "no blob file was written"
                    assert (data / "relay.sqlite3-wal").exists() and (data / "relay.sqlite3-shm").exists()
                    loose = loose_modes(data, home, *temp.iterdir())
                    assert running.result(DEADLINE) == 200_000
                    # the files users' tasks write follow the user's umask (000 here), not fedexec's
                    assert ex.submit(file_mode, str(tmp_path / "task-output")).result(DEADLINE) == 0o666
            assert loose == [], "\n".join(loose)
            assert any(temp.iterdir()), "the endpoint and pool made no temporary directories here"
        finally:
            cli("endpoint", "stop", "private-ep")
    finally:
        cli("relay", "stop", "--data-dir", str(data))
    assert loose_modes(data, home, *temp.iterdir()) == []


# -- a second relay on a busy address ----------------------------------------------------

def _published(fedexec_home: Path) -> dict[Path, object]:
    """What relays published for this user: each file's bytes, each socket's inode (one made again differs)."""
    return {path: (path.stat().st_ino if path.is_socket() else path.read_bytes())
            for path in (fedexec_home / "relays").iterdir()}


@pytest.mark.timeout(180)
def test_a_relay_started_on_a_busy_address_fails_without_touching_a_file(tmp_path, fedexec_home):
    from fedexec.auth import public_key_path, secret_path
    from fedexec.samehost import socket_path
    from fedexec.relay.listening import AddressInUse
    from fedexec.relay.server import Relay

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    first = tmp_path / "first"
    fedexec_cli("relay", "start", "--port", port, "--data-dir", first, "--daemon")
    try:
        published = _published(fedexec_home)
        assert secret_path(address) in published
        assert socket_path(address) in published   # the relay's same-host socket (samehost.py)
        log = tmp_path / "endpoint.log"
        with open(log, "wb") as out:
            endpoint = subprocess.Popen([sys.executable, "-m", "fedexec.endpoint", "--name", "busy", "--relay",
                                         address, "--max-workers", "1"], stdout=out, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
        try:
            deadline = time.monotonic() + DEADLINE
            endpoint_id = None
            while endpoint_id is None and time.monotonic() < deadline:
                for line in tail(log).splitlines():
                    if line.startswith("Endpoint busy (") and "connected to relay" in line:
                        endpoint_id = line.split("Endpoint busy (")[1].split(")")[0]
                time.sleep(0.1)
            assert endpoint_id, tail(log)
            with FederatedExecutor(endpoint_id, relay=address) as ex:
                assert ex.submit(operator.add, 1, 2).result(DEADLINE) == 3
                others = []
                for how in (("--daemon",), ()):   # as a daemon, and in the foreground
                    other = tmp_path / f"other{len(others)}"
                    others.append(other)
                    out = fedexec_cli("relay", "start", "--port", port, "--data-dir", other, *how, check=False)
                    assert out.returncode != 0, out.stdout
                    assert f"the address {address} is already in use by the relay at" in out.stderr, out.stderr
                    assert f"data in {first}" in out.stderr and "Traceback" not in out.stderr, out.stderr
                # the relay itself, started directly, and as a library
                other = tmp_path / "other-direct"
                others.append(other)
                out = subprocess.run([sys.executable, "-m", "fedexec.relay", "--address", address, "--data-dir",
                                      str(other)], capture_output=True, text=True, timeout=60)
                assert out.returncode == 1 and f"the address {address} is already in use" in out.stderr
                assert "Traceback" not in out.stderr, out.stderr
                other = tmp_path / "other-library"
                others.append(other)
                with pytest.raises(AddressInUse, match="already in use by the relay at"):
                    Relay(address, other, auth="local")
                with pytest.raises(AddressInUse):
                    Relay(address, other, auth="token")
                for other in others:
                    assert not other.exists(), other
                assert _published(fedexec_home) == published
                assert not public_key_path(address).exists()
                # the first relay's clients are still served, new ones too
                assert ex.submit(operator.mul, 6, 7).result(DEADLINE) == 42
            with FederatedExecutor(endpoint_id, relay=address) as ex:
                assert ex.submit(operator.add, 2, 2).result(DEADLINE) == 4
        finally:
            stop_process(endpoint)
    finally:
        fedexec_cli("relay", "stop", "--data-dir", first)


# -- task ids ---------------------------------------------------------------------------------

def slow_value(seconds: float, value):
    time.sleep(seconds)
    return value


@pytest.mark.timeout(180)
def test_task_ids_are_random_and_another_user_cannot_claim_them(two_users, tmp_path):
    r = two_users
    program = tmp_path / "alice.py"
    big = 100_000   # a result kept in a blob file
    program.write_text(f"""
import os, time
from fedexec import FederatedExecutor
from test_isolation import slow_value
ex = FederatedExecutor({r.alice_ep.id!r}, relay={r.address!r}, token={r.tokens['alice']!r})
done = ex.submit(slow_value, 0.5, "alice's secret result " + "x" * {big})
running = ex.submit(slow_value, 5, "alice's later result")
more = [ex.submit(int, i) for i in range(200)]
print(done.task_id, running.task_id, *[f.task_id for f in more], flush=True)
time.sleep(0.3)
os._exit(0)
""")
    out = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert out.returncode == 0, out.stderr
    ids = [uuid.UUID(text).bytes for text in out.stdout.split()]
    done_id, running_id = out.stdout.split()[:2]
    done, running = ids[:2]
    # each id has 8 random bytes (its last 8: no two share even 4 of them, and
    # consecutive ids do not differ by a constant), after an 8-byte ordered part
    randoms = [int.from_bytes(task_id[8:], "big") for task_id in ids]
    assert len({task_id[8:12] for task_id in ids}) == len(ids)
    assert len({task_id[12:] for task_id in ids}) == len(ids)
    assert len({b - a for a, b in zip(randoms, randoms[1:])}) == len(ids) - 1
    assert [task_id[:8] for task_id in ids] == sorted(task_id[:8] for task_id in ids)
    time.sleep(2.0)   # the first one finished and is stored, unfetched
    bob = RawClient(r.address, r.tokens["bob"])
    try:
        fn_hash, body = serialize_function(slow_value)
        for task_id in (done, running):   # on his own endpoint: the relay holds these ids for alice
            blobs = P.Blobs()
            row = [task_id, fn_hash, blobs.ref(serialize_arguments(slow_value, (0, "bob's forgery"), {})),
                   blobs.ref(body), P.TASK_CALL, P.PYTHON_VERSION]
            bob.send(P.SUBMIT, {"ep": r.bob_ep.id, "tasks": [row]}, blobs.frames)
            failure = bob.failure_of(task_id)
            assert failure["kind"] == P.NOT_ALLOWED and "belongs to another user" in failure["msg"], failure
        bob.send(P.ACK, {"tids": [done]})   # and cannot make the relay forget alice's result
        time.sleep(1.0)
    finally:
        bob.close()
    with FederatedExecutor(r.alice_ep.id, relay=r.address, token=r.tokens["alice"]) as alice:
        got_done, got_running = alice.reattach([done_id, running_id])
        assert got_done.result(DEADLINE) == "alice's secret result " + "x" * big
        assert got_running.result(DEADLINE) == "alice's later result"
    assert "refused user 'bob': resubmit task" in tail(r.log, 400_000)


@pytest.mark.timeout(60)
def test_the_record_binds_a_finished_tasks_id_to_its_user_across_restarts(tmp_path):
    """The relay's record (real SQLite, reopened as after a restart): a
    finished task's id stays its user's until they acknowledge it; another
    user's result or acknowledgement of that id touches nothing; blob files
    are per user."""
    from fedexec.relay.store import FILE_BLOB, RelayStore

    task_id, big = os.urandom(16), b"r" * (FILE_BLOB + 1)
    store = RelayStore(tmp_path)
    store.add_task(task_id, b"C1", "ep", b"f" * 32, P.TASK_CALL, P.PYTHON_VERSION, b"a" * (FILE_BLOB + 1), "alice")
    store.add_result(task_id, P.OK, big, "alice")
    store.close()
    store = RelayStore(tmp_path)
    try:
        assert store.owner_of(task_id) == "alice"
        store.add_result(task_id, P.OK, b"bob's forgery" * 10_000, "bob")   # as if bob's task had that id
        store.acknowledge([task_id], "bob")
        store.close()
        store = RelayStore(tmp_path)
        assert store.owner_of(task_id) == "alice"
        assert store.task_outcome(task_id) == (1, P.OK, big, "alice")
        store.acknowledge([task_id], "alice")
        assert store.owner_of(task_id) is None
        store.close()
        store = RelayStore(tmp_path)
        assert store.task_outcome(task_id) is None and store.owner_of(task_id) is None
        assert list((tmp_path / "blobs").iterdir()) == []
    finally:
        store.close()
