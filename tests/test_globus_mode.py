"""A relay in ``globus`` mode, end to end: a real relay, endpoints and
executors (separate processes, loopback sockets) checking Globus Auth
tokens against the fake Globus Auth + Groups service of ``fake_globus.py``
(the real globus-sdk runs unchanged, pointed at it through its
``GLOBUS_SDK_SERVICE_URL_*`` variables). No mocks.

One relay and one endpoint (alice's, started with alice's token) serve the
whole module; each test makes the state it needs (tokens, shares, other
endpoints) and checks deltas of what the fake saw.
"""

from __future__ import annotations

import json
import operator
import os
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import cloudpickle
import pytest
import zmq

from fedexec import AuthenticationFailed, FederatedExecutor, NotAuthorized
from fedexec.auth import REFUSED_GRACE, HandshakeWatch
from fedexec.relay.query import lookup_endpoint, share_endpoint

from fake_globus import CLIENT_DOMAIN, GROUPS_SCOPE, FakeGlobusAuth
from test_access import wait_connected as wait_until_connected
from test_faults import running_relay, stop_process, tail

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not on the workers' path

RELAY_ID, RELAY_SECRET = str(uuid.uuid4()), "relay-app-secret"
SCOPE = f"https://auth.globus.org/scopes/{RELAY_ID}/relay"
NATIVE_ID = str(uuid.uuid4())                                   # the app `fedexec login` uses
EP_APP_ID, EP_APP_SECRET = str(uuid.uuid4()), "endpoint-app-secret"  # an endpoint's own app
OTHER_RS = str(uuid.uuid4())                                    # some other service's audience
GROUP = str(uuid.uuid4())
ALICE, BOB, CAROL, DAVE = (f"{n}@example.org" for n in ("alice", "bob", "carol", "dave"))
INTROSPECT, MY_GROUPS = "/v2/oauth2/token/introspect", "/v2/groups/my_groups"
CREDENTIAL_VARS = ("FEDEXEC_TOKEN", "FEDEXEC_GLOBUS_CLIENT_ID", "FEDEXEC_GLOBUS_CLIENT_SECRET",
                   "FEDEXEC_GLOBUS_SCOPE", "FEDEXEC_GLOBUS_NATIVE_CLIENT_ID", "FEDEXEC_RELAY_KEY")

pytestmark = pytest.mark.timeout(60)


def slow_mul(a, b):
    time.sleep(0.05)
    return a * b


def clean_env(fake: FakeGlobusAuth, home: Path, **extra: str) -> dict[str, str]:
    """An environment for a process of ours: the fake Globus, a private
    fedexec home, no credentials but those given."""
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARS}
    env.update(fake.env(), FEDEXEC_HOME=str(home), PYTHONPATH=str(Path(__file__).parent), **extra)
    env.pop("FEDEXEC_RELAY", None)
    return env


def start_endpoint(directory: Path, name: str, address: str, env: dict[str, str]) -> SimpleNamespace:
    endpoint_id = str(uuid.uuid4())
    log = directory / f"endpoint-{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedexec.endpoint", "--name", name, "--relay", address,
             "--endpoint-id", endpoint_id, "--max-workers", "1", "--parent-pid", str(os.getpid())],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=directory)
    return SimpleNamespace(id=endpoint_id, proc=proc, log=log)


def wait_connected(address: str, endpoint: SimpleNamespace, token: str, timeout: float = 20) -> dict:
    """Ask the relay (as ``token``'s user) until it reports the endpoint connected."""
    return wait_until_connected(address, endpoint.id, token, endpoint.proc, endpoint.log, timeout=timeout)


def wait_for_log(path: Path, text: str, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text(errors="replace")
        if text in content or time.monotonic() > deadline:
            return content
        time.sleep(0.05)


class Fake(FakeGlobusAuth):
    """The fake, with a knob for short-lived client-credentials tokens (the
    tokens its ``/v2/oauth2/token`` hands to a client identity)."""

    client_token_lifetime: int | None = None

    def _token_set(self, username, *args, **kwargs):
        answer = super()._token_set(username, *args, **kwargs)
        if self.client_token_lifetime is not None and username.endswith(CLIENT_DOMAIN):
            for token in answer:
                record = self.tokens[token["access_token"]]
                record["exp"] = record["iat"] + self.client_token_lifetime
                token["expires_in"] = self.client_token_lifetime
        return answer


@pytest.fixture(scope="module")
def globus(tmp_path_factory):
    """The fake Globus, a globus-mode relay, and alice's endpoint (started
    with alice's token, so alice owns it)."""
    directory = tmp_path_factory.mktemp("globus-mode")
    mp = pytest.MonkeyPatch()
    fake = Fake()
    try:
        for k, v in fake.env().items():  # for the globus-sdk calls made in this process
            mp.setenv(k, v)
        fake.add_client(RELAY_ID, RELAY_SECRET)
        fake.add_client(NATIVE_ID)
        fake.add_client(EP_APP_ID, EP_APP_SECRET)
        fake.add_user(ALICE)
        fake.add_user(BOB, groups=[GROUP])
        fake.add_user(CAROL)
        fake.add_user(DAVE)
        alice = "globus:" + fake.issue_token(ALICE, scope=SCOPE)
        relay_env = clean_env(fake, directory / "home-relay", FEDEXEC_RELAY_GLOBUS_CLIENT_SECRET=RELAY_SECRET)
        with running_relay(directory, "--auth", "globus", "--globus-client-id", RELAY_ID,
                           "--globus-scope", SCOPE, env=relay_env) as address:
            endpoint = start_endpoint(directory, "alice-ep", address,
                                      clean_env(fake, directory / "home-alice-ep", FEDEXEC_TOKEN=alice))
            try:
                view = wait_connected(address, endpoint, alice)
                assert view["owner"] == ALICE
                yield SimpleNamespace(fake=fake, address=address, endpoint=endpoint, alice=alice,
                                      dir=directory, relay_log=directory / "relay.log")
            finally:
                stop_process(endpoint.proc)
    finally:
        fake.close()
        mp.undo()


@pytest.fixture
def no_credentials(monkeypatch):
    """This process finds no credentials but those passed explicitly."""
    for var in CREDENTIAL_VARS:
        monkeypatch.delenv(var, raising=False)


def executor(g, token: str | None, endpoint_id: str | None = None, connect_timeout: float = 10):
    return FederatedExecutor(endpoint_id or g.endpoint.id, relay=g.address, token=token,
                             connect_timeout=connect_timeout)


def refused_outcome(g, token: str | None, limit: float = 15) -> BaseException | None:
    """What ``FederatedExecutor(...)`` with ``token`` raises (None if it
    connects), on a daemon thread so that a constructor that never returns
    fails the test instead of hanging it (as some did, once: the dispatcher
    blocked for good in a send on a socket whose handshake was refused, and
    __init__'s cleanup joined it; see test_concurrent_refused_constructions_all_raise)."""
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            executor(g, token).shutdown(wait=True)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the outcome is what is checked
            outcome.append(exc)

    thread = threading.Thread(target=attempt, name="refused-attempt", daemon=True)
    thread.start()
    thread.join(limit)
    if not outcome:
        pytest.fail(f"FederatedExecutor(token={token!r:.30}) did not return within {limit} s (blocked dispatcher)")
    return outcome[0]


# -- 1. a valid user token --------------------------------------------------------

def test_valid_user_token_runs_a_task(globus, no_credentials):
    with executor(globus, globus.alice) as ex:
        assert ex.submit(operator.mul, 6, 7).result(timeout=30) == 42
        assert list(ex.map(slow_mul, range(5), range(5))) == [i * i for i in range(5)]
    view = lookup_endpoint(globus.address, globus.endpoint.id, timeout=5, token=globus.alice)
    assert view["owner"] == ALICE and view["status"] == "connected"


# -- 2. refused tokens --------------------------------------------------------------

def test_bad_tokens_are_refused_and_nothing_else_is_affected(globus, no_credentials):
    fake = globus.fake
    expired = fake.issue_token(ALICE, scope=SCOPE)
    fake.expire(expired)
    revoked = fake.issue_token(ALICE, scope=SCOPE)
    fake.revoke(revoked)
    cases = {
        "no token": None,
        "garbage": "globus:not-a-globus-token",
        "expired": "globus:" + expired,
        "revoked": "globus:" + revoked,
        "other audience": "globus:" + fake.issue_token(ALICE, scope=SCOPE, aud=[OTHER_RS]),
        "lacks the scope": "globus:" + fake.issue_token(ALICE, scope=GROUPS_SCOPE),
    }
    with executor(globus, globus.alice) as alice:
        before = [alice.submit(slow_mul, i, 3) for i in range(20)]

        outcomes = {case: refused_outcome(globus, token) for case, token in cases.items()}
        for case, outcome in outcomes.items():
            assert isinstance(outcome, AuthenticationFailed), f"{case}: {outcome!r}"
        assert "requires credentials" in str(outcomes["no token"])
        assert "refused the credentials of user 'globus'" in str(outcomes["garbage"])
        # the one-shot queries refuse them the same way
        with pytest.raises(AuthenticationFailed):
            lookup_endpoint(globus.address, globus.endpoint.id, timeout=3, token=cases["expired"])
        # alice's executor went on working meanwhile, and still does
        assert [f.result(timeout=30) for f in before] == [3 * i for i in range(20)]
        assert alice.submit(operator.add, 40, 2).result(timeout=30) == 42
    log = wait_for_log(globus.relay_log, "does not carry the relay's scope")
    for why in ("the Globus token is not active", "was not issued for this relay",
                f"does not carry the relay's scope {SCOPE}"):
        assert why in log, f"the relay log does not say {why!r}:\n{log[-3000:]}"
    for token in cases.values():  # refused or not, tokens are never written to the log
        if token:
            assert token.partition(":")[2] not in log
    assert globus.alice.partition(":")[2] not in log


def test_concurrent_refused_constructions_all_raise(globus, no_credentials):
    """Refused at once, none blocks: after a refused handshake libzmq does not
    reconnect, so the dispatcher's sends must never wait for a connection."""
    outcomes: list[BaseException | None] = []
    took: list[float] = []

    def attempt() -> None:
        start = time.monotonic()
        try:
            executor(globus, "globus:not-a-globus-token").shutdown(wait=True)
            outcomes.append(None)
        except BaseException as exc:  # noqa: BLE001 - the outcome is what is checked
            outcomes.append(exc)
        took.append(time.monotonic() - start)

    threads = [threading.Thread(target=attempt, name=f"refused-{i}", daemon=True) for i in range(24)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    blocked = sum(thread.is_alive() for thread in threads)
    assert not blocked, f"{blocked} of 24 refused constructions did not return within 20 s"
    assert all(isinstance(outcome, AuthenticationFailed) for outcome in outcomes), outcomes
    assert max(took) < 10, f"slowest refused construction: {max(took):.1f} s"


def test_handshake_watch_tells_how_long_handshakes_have_been_refused(globus, no_credentials):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    watch = HandshakeWatch(sock, globus.address, "globus:not-a-globus-token")
    try:
        assert watch.refused_for(0.0) is None and watch.failing_since is None
        deadline = time.monotonic() + 10
        while watch.failure is None and time.monotonic() < deadline:
            watch.monitor.poll(100)
            assert watch.read() is False  # the same credentials again: nothing else to try
        assert "refused the credentials of user 'globus'" in str(watch.failure)
        since = watch.failing_since
        assert since is not None and not watch.succeeded
        assert watch.refused_for(3.0, now=since + 2.9) is None          # not for long enough yet
        assert watch.refused_for(3.0, now=since + 3.1) == watch.failure
        assert watch.refused_for(0.0) == watch.failure
        assert watch.refused_for(REFUSED_GRACE) is None                 # it has only just begun
        # libzmq does not retry a refused handshake: no event follows, so the
        # caller must ask (every loop turn), not wait for one
        assert not watch.monitor.poll(500)
        watch.read()
        assert watch.failing_since == since                              # counted from the first refusal
        # no connection is left: sends are refused (a blocking one would wait
        # forever); the first may still go into the connection being dropped
        with pytest.raises(zmq.Again):
            for _ in range(3):
                sock.send(b"x", zmq.NOBLOCK)
                time.sleep(0.1)
    finally:
        watch.close()
        sock.close(linger=0)
        ctx.term()


# -- 3. introspection is cached ------------------------------------------------------

def test_introspection_is_cached_per_token(globus, no_credentials):
    fake = globus.fake
    token = "globus:" + fake.issue_token(ALICE, scope=SCOPE)
    before = fake.calls.copy()
    executors = [executor(globus, token) for _ in range(4)]
    try:
        assert [ex.submit(operator.mul, i, 2).result(timeout=30) for i, ex in enumerate(executors)] == [0, 2, 4, 6]
        for _ in range(3):
            assert lookup_endpoint(globus.address, globus.endpoint.id, timeout=5, token=token)["owner"] == ALICE
    finally:
        for ex in executors:
            ex.shutdown(wait=True)
    assert fake.calls[INTROSPECT] - before[INTROSPECT] == 1, "7 connections with one token: introspected again"
    assert fake.calls[MY_GROUPS] - before[MY_GROUPS] == 1, "the user's groups were read again"
    # and a new token is a new introspection (the count is not stuck)
    other = "globus:" + fake.issue_token(ALICE, scope=SCOPE)
    lookup_endpoint(globus.address, globus.endpoint.id, timeout=5, token=other)
    assert fake.calls[INTROSPECT] - before[INTROSPECT] == 2


# -- 4. sharing with a Globus group --------------------------------------------------

def test_endpoint_shared_with_a_group(globus, no_credentials):
    fake = globus.fake
    bob = "globus:" + fake.issue_token(BOB, scope=SCOPE)
    carol = "globus:" + fake.issue_token(CAROL, scope=SCOPE)
    shared = share_endpoint(globus.address, globus.endpoint.id, add_groups=[GROUP], token=globus.alice)
    assert GROUP in shared["groups"] and shared["owner"] == ALICE
    with executor(globus, bob) as ex:  # bob is in the group
        assert ex.submit(operator.mul, 7, 6).result(timeout=30) == 42
    with pytest.raises(NotAuthorized, match="not shared with user 'carol@example.org'"):
        executor(globus, carol)  # carol is not
    with pytest.raises(NotAuthorized, match="only its owner"):  # nor may bob share it on
        share_endpoint(globus.address, globus.endpoint.id, add_users=[CAROL], token=bob)
    line = f"refused user {CAROL!r}: look up endpoint {globus.endpoint.id}: not shared with them"
    assert line in wait_for_log(globus.relay_log, line), tail(globus.relay_log)


# -- 5. fedexec login ---------------------------------------------------------------

LOGGED_IN_CLIENT = """
import operator, os, sys
from fedexec import FederatedExecutor, NotAuthorized
assert not any(k in os.environ for k in ("FEDEXEC_TOKEN", "FEDEXEC_GLOBUS_CLIENT_ID"))
try:
    ex = FederatedExecutor(sys.argv[1], relay=sys.argv[2], connect_timeout=10)
except NotAuthorized as exc:
    print("refused:", exc)
else:
    with ex:
        print("result:", ex.submit(operator.mul, 6, 7).result(timeout=30))
"""


def test_login_then_executor_without_a_token(globus, tmp_path):
    fake = globus.fake
    home = tmp_path / "home-dave"
    env = clean_env(fake, home)
    login = [sys.executable, "-m", "fedexec.cli", "login", "--client-id", NATIVE_ID, "--scope", SCOPE]
    # a code Globus does not know: refused, nothing saved
    out = subprocess.run(login, input="wrong-code\n", capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 1 and "refused the code" in out.stderr, out
    assert not (home / "globus-tokens.json").exists()
    fake.add_auth_code("dave-code", DAVE, scope=SCOPE, client_id=NATIVE_ID)
    out = subprocess.run(login, input="dave-code\n", capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out
    url = next(line for line in out.stdout.splitlines() if line.startswith("http"))
    assert url.startswith(fake.url + "/v2/oauth2/authorize?") and f"client_id={NATIVE_ID}" in url
    tokens_file = home / "globus-tokens.json"
    assert str(tokens_file) in out.stdout
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    saved = json.loads(tokens_file.read_text())
    assert saved["client_id"] == NATIVE_ID and saved["scope"] == SCOPE and saved["refresh_token"]
    assert fake.active_record(saved["access_token"])["username"] == DAVE

    def run_client() -> str:
        out = subprocess.run([sys.executable, "-c", LOGGED_IN_CLIENT, globus.endpoint.id, globus.address],
                             capture_output=True, text=True, timeout=40, env=env)
        assert out.returncode == 0, out
        return out.stdout.strip()

    # the relay sees dave (the stored token): refused until alice shares with dave ...
    refused = run_client()
    assert refused.startswith("refused:") and f"not shared with user {DAVE!r}" in refused, refused
    share_endpoint(globus.address, globus.endpoint.id, add_users=[DAVE], token=globus.alice)
    # ... then the task runs
    assert run_client() == "result: 42"
    # a stored token about to expire is refreshed (with the refresh token) on use
    stale = saved["access_token"]
    fake.expire(stale)
    tokens_file.write_text(json.dumps({**saved, "expires_at": 0}))
    assert run_client() == "result: 42"
    renewed = json.loads(tokens_file.read_text())
    assert renewed["access_token"] != stale and renewed["expires_at"] > time.time() + 3600
    assert fake.active_record(renewed["access_token"])["username"] == DAVE
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600


# -- 6. an endpoint with its own Globus app (client credentials) -------------------

def test_endpoint_with_client_credentials(globus, no_credentials, tmp_path):
    import globus_sdk

    fake = globus.fake
    owner = EP_APP_ID + CLIENT_DOMAIN
    endpoint = start_endpoint(tmp_path, "app-ep", globus.address, clean_env(
        fake, tmp_path / "home-app-ep", FEDEXEC_GLOBUS_CLIENT_ID=EP_APP_ID,
        FEDEXEC_GLOBUS_CLIENT_SECRET=EP_APP_SECRET, FEDEXEC_GLOBUS_SCOPE=SCOPE))
    try:
        # the same app's client-credentials token, as the endpoint's owner would get it
        app = globus_sdk.ConfidentialAppAuthClient(EP_APP_ID, EP_APP_SECRET)
        app_token = "globus:" + app.oauth2_client_credentials_tokens(
            requested_scopes=SCOPE).by_resource_server[RELAY_ID]["access_token"]
        view = wait_connected(globus.address, endpoint, app_token)
        assert view["owner"] == owner
        with pytest.raises(NotAuthorized):  # not alice's
            executor(globus, globus.alice, endpoint.id)
        shared = share_endpoint(globus.address, endpoint.id, add_users=[ALICE], token=app_token)
        assert shared["owner"] == owner and ALICE in shared["users"]
        with executor(globus, globus.alice, endpoint.id) as ex:
            assert ex.submit(operator.mul, 3, 14).result(timeout=30) == 42
        assert lookup_endpoint(globus.address, endpoint.id, timeout=5, token=globus.alice)["owner"] == owner
    finally:
        stop_process(endpoint.proc)


# -- an endpoint renews its expired Globus token ---------------------------------------

@pytest.mark.timeout(60)
def test_endpoint_renews_an_expired_client_credentials_token(globus, no_credentials, tmp_path):
    fake = globus.fake
    fake.client_token_lifetime = 2
    endpoint = start_endpoint(tmp_path, "short-ep", globus.address, clean_env(
        fake, tmp_path / "home-short-ep", FEDEXEC_GLOBUS_CLIENT_ID=EP_APP_ID,
        FEDEXEC_GLOBUS_CLIENT_SECRET=EP_APP_SECRET, FEDEXEC_GLOBUS_SCOPE=SCOPE))
    try:
        owner = "globus:" + fake.issue_token(EP_APP_ID + CLIENT_DOMAIN, scope=SCOPE, client_id=EP_APP_ID)
        wait_connected(globus.address, endpoint, owner)
        share_endpoint(globus.address, endpoint.id, add_users=[ALICE], token=owner)
        ex = executor(globus, globus.alice, endpoint.id)
        try:
            assert ex.submit(operator.mul, 6, 7).result(timeout=30) == 42
            time.sleep(3)  # the endpoint's token has expired: the relay ends its session
            assert ex.submit(operator.mul, 7, 6).result(timeout=6) == 42, tail(endpoint.log)
        finally:
            ex.shutdown(wait=False, cancel_futures=True)
    finally:
        fake.client_token_lifetime = None
        stop_process(endpoint.proc)


# -- an endpoint whose token is refused stops --------------------------------------

@pytest.mark.timeout(60)
def test_endpoint_with_a_refused_token_exits(globus, tmp_path):
    endpoint = start_endpoint(tmp_path, "refused-ep", globus.address, clean_env(
        globus.fake, tmp_path / "home-refused-ep", FEDEXEC_TOKEN="globus:not-a-globus-token"))
    try:
        try:
            code = endpoint.proc.wait(REFUSED_GRACE + 10)  # the grace, counted from the refusal, and then some
        except subprocess.TimeoutExpired:
            code = None
        assert code == 2, f"exit code {code}:\n{tail(endpoint.log)}"
        assert "refused the credentials of user 'globus'" in tail(endpoint.log)
    finally:
        stop_process(endpoint.proc)
