"""The relay's web dashboard, /api/ and /metrics (``fedexec relay start
--http``): a token-mode relay started from the CLI, two users each with an
endpoint, tasks running; the page loaded in a real headless Chromium
(Debian's, driven by Playwright), /metrics parsed by prometheus_client,
wrong credentials and another user's data refused."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest

from fedexec import FederatedExecutor

from slurm_cluster import ensure_programs
from test_access import fedexec_cli, running_endpoint, wait_connected
from test_faults import free_port, stop_process, tail

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]


def boom(x):
    raise ValueError(f"dashboard boom {x}")


def nap(seconds):
    time.sleep(seconds)
    return seconds


@contextlib.contextmanager
def cli_relay(directory: Path, *options: str):
    """``fedexec relay start ... --http 0`` in the foreground, as a subprocess;
    yields (relay address, dashboard URL, data dir)."""
    port = free_port()
    data = directory / "relay-data"
    log = directory / "relay-cli.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedexec.cli", "relay", "start", "--port", str(port),
                                 "--data-dir", str(data), "--http", "0", *options],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=directory)
    try:
        deadline = time.monotonic() + 30
        record: dict = {}
        while "http" not in record:
            if proc.poll() is not None:
                pytest.fail(f"the relay exited with code {proc.returncode}:\n{tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"the relay wrote no relay.json with its dashboard in 30 s:\n{tail(log)}")
            time.sleep(0.05)
            with contextlib.suppress(OSError, ValueError):
                record = json.loads((data / "relay.json").read_text())
        yield f"tcp://127.0.0.1:{port}", record["http"], data
    finally:
        stop_process(proc)


def get(url: str, path: str, token: str | None = None, headers: dict | None = None,
        method: str = "GET") -> tuple[int, dict, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        conn.request(method, path, headers=sent)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def api(url: str, token: str, part: str = "snapshot") -> dict:
    status, _, body = get(url, f"/api/{part}", token)
    assert status == 200, body
    return json.loads(body)


def successes(url: str, token: str, at_least: int) -> dict | None:
    """The user's snapshot once it counts ``at_least`` successes."""
    view = api(url, token)
    return view if view["tasks"]["counts"]["success"] >= at_least else None


def wait_for(what: str, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout:.0f} s (last: {last!r})")


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """A token-mode relay from the CLI with --http; alice and bob, each with an endpoint."""
    directory = tmp_path_factory.mktemp("dashboard")
    data = directory / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "bob")}
    with cli_relay(directory, "--auth", "token") as (address, url, _):
        with running_endpoint(directory, "alice-ep", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address,
                              max_workers=2) as alice_ep, \
                running_endpoint(directory, "bob-ep", {"FEDEXEC_TOKEN": tokens["bob"]}, relay=address) as bob_ep:
            wait_connected(address, alice_ep.id, tokens["alice"], alice_ep.proc, alice_ep.log)
            wait_connected(address, bob_ep.id, tokens["bob"], bob_ep.proc, bob_ep.log)
            yield SimpleNamespace(address=address, url=url, tokens=tokens, alice_ep=alice_ep, bob_ep=bob_ep,
                                  dir=directory)


def run_tasks(r, user: str, endpoint, n: int, seconds: float, failures: int = 0) -> list[str]:
    """``n`` traced tasks of ``seconds`` and ``failures`` failing ones, as ``user``; their task ids."""
    with FederatedExecutor(endpoint.id, relay=r.address, token=r.tokens[user], trace=True) as ex:
        futures = [ex.submit(nap, seconds) for _ in range(n)] + [ex.submit(boom, i) for i in range(failures)]
        for future in futures:
            with contextlib.suppress(ValueError):
                future.result(120)
        return [str(future.task_id) for future in futures]


def launch_chromium(playwright):
    try:
        ensure_programs(("chromium",), ("chromium",), "Chromium")
    except Exception as exc:
        pytest.fail(f"the dashboard's browser test needs Debian's chromium at {CHROMIUM}: {exc}")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


@pytest.mark.timeout(240)
def test_page_in_chromium_signs_in_and_updates_live(relay, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the dashboard's browser test needs Playwright's Python package: pip install -e '.[test]'")
    r = relay
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems: list[str] = []   # script errors and refusals by the page's CSP
            page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            started = time.monotonic()
            response = page.goto(f"{r.url}?token={r.tokens['alice']}")
            assert response is not None and response.ok
            assert urlsplit(page.url).query == "", page.url   # the token left the address
            assert page.context.cookies() == []   # no cookie: the token is in this tab's sessionStorage
            row = page.locator("#endpoints tbody tr", has_text=r.alice_ep.id)
            row.wait_for(timeout=15_000)
            load_seconds = time.monotonic() - started
            assert "online" in row.inner_text()
            # its style applied (a separate file: the CSP allows nothing inline)
            assert page.locator("header").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(29, 43, 79)"
            assert page.locator("#endpoints tbody tr", has_text=r.bob_ep.id).count() == 0   # bob's: not hers
            # (the page's CSP allows no eval: Playwright's wait_for_function cannot run there, so we poll)
            success = page.locator("#count-success")
            before = int(wait_for("the first counters", lambda: (t := success.inner_text()) != "-" and t))
            # tasks run while the page stays open: its counter and the workers column move without a reload
            done: list[str] = []
            worker = threading.Thread(target=lambda: done.extend(run_tasks(r, "alice", r.alice_ep, 30, 0.2, 2)))
            worker.start()
            try:
                busy = row.locator("td").nth(3)
                wait_for("busy workers shown while tasks run", lambda: busy.inner_text().split(" / ")[0] in "12")
                wait_for("the success counter moving", lambda: int(success.inner_text()) > before)
            finally:
                worker.join(120)
            wait_for("all 30 successes counted", lambda: int(success.inner_text()) >= before + 30)
            page.locator("#failures tbody tr", has_text="dashboard boom").first.wait_for(timeout=15_000)
            assert "ValueError: dashboard boom" in page.locator("#failures").inner_text()
            assert page.locator("#latency tbody tr", has_text="run").count() >= 1
            assert problems == [], problems
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("FEDEXEC_DASHBOARD_SCREENSHOT"):   # docs/dashboard.png is made this way
                page.screenshot(path=os.environ["FEDEXEC_DASHBOARD_SCREENSHOT"], full_page=True)
            print(f"page signed in and showed the endpoint in {load_seconds:.2f} s")
        finally:
            browser.close()


@pytest.mark.timeout(180)
def test_api_and_metrics_show_a_users_own_tasks_and_endpoints(relay):
    from prometheus_client.parser import text_string_to_metric_families

    r = relay
    before = api(r.url, r.tokens["alice"])["tasks"]["counts"]   # (the module's other tests ran hers too)
    alice_ids = run_tasks(r, "alice", r.alice_ep, 12, 0.01, failures=1)
    bob_ids = run_tasks(r, "bob", r.bob_ep, 3, 0.01)
    alice = wait_for("alice's 12 successes and 1 exception in /api/snapshot",
                     lambda: (view := successes(r.url, r.tokens["alice"], before["success"] + 12))
                     and view["tasks"]["counts"]["exception"] > before["exception"] and view)
    assert [e["id"] for e in alice["endpoints"]] == [r.alice_ep.id]
    endpoint = alice["endpoints"][0]
    assert endpoint["status"] == "online" and endpoint["workers"] == 2
    assert endpoint["blocks"] and endpoint["blocks"][0]["job"]   # its local provider's block, with a job id
    assert alice["tasks"]["counts"]["exception"] >= 1
    assert any("dashboard boom" in f["error"] for f in alice["failures"])
    assert alice_ids[-1].replace("-", "") in {f["task"] for f in alice["failures"]}   # the failing one's id
    run = next(stage for stage in alice["latency"] if stage["stage"] == "run")
    assert run["count"] >= 12 and 0.005 < run["p50"] < 5
    assert [e["id"] for e in api(r.url, r.tokens["alice"], "endpoints")["endpoints"]] == [r.alice_ep.id]
    assert set(api(r.url, r.tokens["alice"], "failures")) == {"time", "failures"}

    # bob sees his endpoint and tasks, none of alice's: no endpoint, task id, error or count of hers
    bob = wait_for("bob's 3 successes", lambda: successes(r.url, r.tokens["bob"], 3))
    text = json.dumps(bob)
    assert [e["id"] for e in bob["endpoints"]] == [r.bob_ep.id]
    assert r.alice_ep.id not in text and "dashboard boom" not in text and "alice" not in text
    assert not any(i.replace("-", "") in text for i in alice_ids)
    assert bob["tasks"]["counts"]["exception"] == 0 and bob["failures"] == []
    assert bob["tasks"]["counts"]["success"] == len(bob_ids)   # his own (alice ran more)

    # /metrics, parsed as Prometheus does
    status, headers, body = get(r.url, "/metrics", r.tokens["alice"])
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert families["fedexec_tasks"].type == "counter"
    assert samples[("fedexec_tasks_total", (("state", "success"),))] >= before["success"] + 12
    assert samples[("fedexec_tasks_total", (("state", "exception"),))] >= 1
    assert families["fedexec_task_duration_seconds"].type == "histogram"
    assert samples[("fedexec_task_duration_seconds_count", ())] >= 12
    assert samples[("fedexec_task_duration_seconds_bucket", (("le", "+Inf"),))] >= 12
    key = (("endpoint", r.alice_ep.id), ("name", "alice-ep"))
    assert ("fedexec_queue_depth", key) in samples
    assert samples[("fedexec_workers", (*key, ("state", "idle")))] + \
        samples[("fedexec_workers", (*key, ("state", "busy")))] == 2
    assert samples[("fedexec_endpoint_up", key)] == 1
    assert ("fedexec_relay_store_backlog", ()) in samples
    assert r.bob_ep.id not in body.decode()
    _, _, bob_metrics = get(r.url, "/metrics", r.tokens["bob"])
    assert r.alice_ep.id not in bob_metrics.decode() and r.bob_ep.id in bob_metrics.decode()


@pytest.mark.timeout(120)
def test_wrong_missing_and_forged_credentials_get_401_and_no_data(relay):
    r = relay
    secret_part = r.tokens["alice"].rsplit(".", 1)
    wrong = f"{secret_part[0]}.{'x' * len(secret_part[1])}"
    port = urlsplit(r.url).port
    for path in ("/api/snapshot", "/api/endpoints", "/metrics", "/api/tasks"):
        for token, headers in ((None, None), (wrong, None), ("bob:nope", None), (None, {"Authorization": "Basic YTpi"}),
                               (None, {"Cookie": f"fedexec_session_{port}=forged; fedexec_session_2=x"})):
            status, sent, body = get(r.url, path, token, headers)
            assert status == 401, (path, token, headers, status)
            assert r.alice_ep.id.encode() not in body and b"fedexec_tasks" not in body and b"{" not in body
    # the page, its script and style hold no data: served to anyone on loopback, never with a cookie
    for path in ("/", "/dashboard.js", "/dashboard.css"):
        status, headers, body = get(r.url, path)
        assert status == 200 and "Set-Cookie" not in headers
        assert r.alice_ep.id.encode() not in body and b"alice" not in body
    status, headers, _ = get(r.url, f"/?token={wrong}")
    assert status == 401 and "Set-Cookie" not in headers
    # a sign-in by address changes nothing at the relay: no cookie, no session a later request could ride on
    status, headers, body = get(r.url, f"/?token={r.tokens['alice']}")
    assert status == 200 and "Set-Cookie" not in headers and b"/dashboard.js" in body
    assert get(r.url, "/api/endpoints")[0] == 401
    status, _, body = get(r.url, "/api/endpoints", r.tokens["alice"])
    assert status == 200 and r.alice_ep.id in json.loads(body)["endpoints"][0]["id"]
    # read-only, bounded, and only for loopback host names
    assert get(r.url, "/api/snapshot", r.tokens["alice"], method="POST")[0] == 405
    assert get(r.url, "/api/snapshot", r.tokens["alice"], headers={"Host": "evil.example:80"})[0] == 421
    assert get(r.url, "/api/nothing", r.tokens["alice"])[0] == 404
    status, _, _ = get(r.url, "/api/snapshot", r.tokens["alice"], headers={"X-Pad": "a" * 20_000})
    assert status in (400, 431)


@pytest.mark.timeout(120)
def test_connections_are_bounded(relay):
    """More connections than the dashboard serves at once get 503 at once,
    and the idle ones are closed after the socket timeout; then it serves again."""
    from fedexec.relay.web import MAX_CONNECTIONS

    r = relay
    parts = urlsplit(r.url)
    idle = [socket.create_connection((parts.hostname, parts.port), timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.5)
        extra = socket.create_connection((parts.hostname, parts.port), timeout=5)
        with extra:
            extra.sendall(b"GET /api/snapshot HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert extra.recv(100).startswith(b"HTTP/1.1 503")
    finally:
        for sock in idle:
            sock.close()
    wait_for("the dashboard answers again", lambda: get(r.url, "/api/tasks", r.tokens["alice"])[0] == 200, 20)


@pytest.mark.timeout(120)
def test_local_mode_takes_the_relays_secret_and_refuses_other_hosts(tmp_path):
    with cli_relay(tmp_path) as (address, url, data):
        secret = (data / "relay.secret").read_text().strip()
        status, _, body = get(url, "/api/snapshot", secret)
        assert status == 200 and json.loads(body)["user"] == "local"
        assert get(url, "/metrics", "not-the-secret")[0] == 401
    # not loopback in local mode: refused, saying why, before anything starts
    out = fedexec_cli("relay", "start", "--port", str(free_port()), "--data-dir", tmp_path / "other",
                      "--http", "0", "--http-host", "0.0.0.0", check=False)
    assert out.returncode != 0
    assert "only with real authentication" in out.stderr and "--auth token" in out.stderr
    assert not (tmp_path / "other" / "relay.json").exists()


def test_error_text_is_read_without_unpickling(tmp_path):
    """A failure's text comes from its blob's opcodes: a worker's real
    exception blob gives its type and message; a pickle that would run code
    when loaded runs nothing."""
    import pickle

    from fedexec import protocol as P
    from fedexec.relay.dashboard import error_text
    from fedexec.serialize import serialize_data_exception, serialize_exception

    try:
        raise KeyError("the missing key")
    except KeyError as exc:
        assert error_text(P.EXCEPTION, serialize_exception(exc)) == "builtins.KeyError: 'the missing key'"
        # a data-only endpoint's exception is plain data whose decoder lives with the pickling code, which
        # relay code never imports (tests/test_security.py): the dashboard shows the placeholder
        assert "cannot read" in error_text(P.EXCEPTION, serialize_data_exception(exc))
    assert error_text(P.FAILED, P.pack_failure(P.WORKER_LOST, "the worker died")) == "worker_lost: the worker died"
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = pickle.dumps({"type": Evil(), "msg": "x"}, protocol=5)
    text = error_text(P.EXCEPTION, evil)
    assert not marker.exists() and "cannot read" in text
    assert "cannot read" in error_text(P.EXCEPTION, b"\x80\x05garbage")


@pytest.mark.timeout(120)
def test_heartbeat_reports_are_checked_and_bounded(relay):
    """An endpoint's status in its heartbeats ("st") is checked at the relay:
    too many blocks is refused as malformed, a good one shows on its
    owner's dashboard."""
    import uuid

    import zmq

    from fedexec import protocol as P
    from fedexec.auth import connect_plainly

    r = relay
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"E" + uuid.uuid4().bytes)
    endpoint_id = str(uuid.uuid4())
    try:
        connect_plainly(sock, r.address, r.tokens["bob"])
        sock.send_multipart(P.encode(P.HELLO, {"role": "endpoint", "id": endpoint_id, "name": "bob-raw",
                                               "py": P.PYTHON_VERSION, "workers": 8, "capacity": 0, "hb": 60.0}))

        def answer(kind: str) -> P.Message:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if sock.poll(200):
                    msg = P.decode(sock.recv_multipart())
                    if msg.type == kind:
                        return msg
            pytest.fail(f"no {kind} from the relay")

        answer(P.WELCOME)
        blocks = [[f"b{i}", str(i), "running"] for i in range(65)]
        sock.send_multipart(P.encode(P.HEARTBEAT, {"st": {"w": 8, "iw": 2, "q": 0, "b": blocks}}))
        assert "at most 64" in answer(P.ERROR).fields["msg"]
        sock.send_multipart(P.encode(P.HEARTBEAT, {"st": {"w": 8, "iw": 2, "q": 5, "b": blocks[:2]}}))
        answer(P.HEARTBEAT)

        def shown():
            found = [e for e in api(r.url, r.tokens["bob"], "endpoints")["endpoints"] if e["id"] == endpoint_id]
            return found[0] if found and found[0]["busy_workers"] == 6 else None

        endpoint = wait_for("bob's raw endpoint's report", shown)
        assert endpoint["queued_at_endpoint"] == 5 and [b["job"] for b in endpoint["blocks"]] == ["0", "1"]
        assert endpoint_id not in json.dumps(api(r.url, r.tokens["alice"], "endpoints"))
    finally:
        sock.close(linger=0)
        ctx.term()


@pytest.mark.timeout(120)
def test_slow_headers_odd_hosts_and_odd_requests_are_answered(relay):
    """A client dribbling header lines cannot hold a slot past the request
    deadline; a Host that only starts like a loopback address is refused;
    too many query fields or a non-ASCII cookie name get an answer, not a
    dropped connection; a token in a URL never reaches the log."""
    from fedexec.relay.web import REQUEST_DEADLINE

    r = relay
    parts = urlsplit(r.url)
    slow = socket.create_connection((parts.hostname, parts.port), timeout=REQUEST_DEADLINE + 10)
    with slow:
        started = time.monotonic()
        slow.sendall(b"GET /api/snapshot HTTP/1.1\r\n")
        closed = False
        while time.monotonic() - started < REQUEST_DEADLINE + 8:
            try:
                slow.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed = True
                break
            slow.settimeout(2)
            try:
                if slow.recv(100) == b"":
                    closed = True
                    break
            except socket.timeout:
                pass
        assert closed, "a client sending a header line every 2 s kept its connection past the request deadline"
        assert time.monotonic() - started < REQUEST_DEADLINE + 6
    token = r.tokens["alice"]
    assert get(r.url, "/api/snapshot", token, headers={"Host": "127.attacker.example"})[0] == 421
    assert get(r.url, "/api/snapshot", token, headers={"Host": f"127.0.0.1:{parts.port}"})[0] == 200
    assert get(r.url, "/?" + "&".join(f"f{i}=1" for i in range(12)), token)[0] == 400
    status, _, _ = get(r.url, "/api/snapshot", headers={"Cookie": "séance=1"})
    assert status == 401
    assert get(r.url, f"/?token={token}")[0] == 200
    for log in (r.dir / "relay-cli.log", r.dir / "relay-data" / "relay.log"):
        assert not log.exists() or token.split(".")[-1] not in log.read_text(), log


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Another local web server (another user's, say): records what browsers send it."""

    seen: list[dict] = []

    def do_GET(self) -> None:
        _Recorder.seen.append({"path": self.path, **dict(self.headers)})
        body = b"<!doctype html><title>other</title><p>another server on this host"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.timeout(180)
def test_another_port_on_the_host_never_gets_the_sign_in(relay):
    """Review finding 4: a browser signed in to the dashboard sends nothing of
    it to a web server on another port of 127.0.0.1 (a cookie would go: cookies
    ignore ports), and that server's pages cannot read it; a page that sends
    the browser to /?token=ITS_OWN signs nothing in beyond the tab it opened."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the dashboard's browser test needs Playwright's Python package: pip install -e '.[test]'")
    r = relay
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    other_url = f"http://127.0.0.1:{other.server_address[1]}/"
    secret = r.tokens["alice"].rsplit(".", 1)[1]
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p)
            try:
                context = browser.new_context()
                page = context.new_page()
                page.goto(f"{r.url}?token={r.tokens['alice']}")
                page.locator("#endpoints tbody tr", has_text=r.alice_ep.id).wait_for(timeout=15_000)
                assert "signed in as alice" in page.locator("#user").inner_text()
                assert urlsplit(page.url).query == "" and context.cookies() == []
                # the same tab, then another tab, visit the other server: it gets nothing of the sign-in
                _Recorder.seen.clear()
                page.goto(other_url)
                second = context.new_page()
                second.goto(other_url + "again")
                assert len(_Recorder.seen) >= 2
                for request in _Recorder.seen:
                    assert "Cookie" not in request and "Authorization" not in request, request
                    assert secret not in json.dumps(request), request
                for tab in (page, second):   # its pages read nothing of the dashboard's storage
                    assert tab.locator("p").evaluate("e => JSON.stringify(sessionStorage)") == "{}"
                # a page elsewhere sends a browser to /?token=BOB: only that tab shows bob's own view;
                # a dashboard tab opened afterwards is not signed in as anyone
                forced = context.new_page()
                forced.goto(f"{r.url}?token={r.tokens['bob']}")
                forced.locator("#endpoints tbody tr", has_text=r.bob_ep.id).wait_for(timeout=15_000)
                assert "signed in as bob" in forced.locator("#user").inner_text()
                assert context.cookies() == []
                fresh = context.new_page()
                fresh.goto(r.url)
                wait_for("a fresh tab saying it is not signed in",
                         lambda: "not signed in" in fresh.locator("#updated").inner_text())
                assert fresh.locator("#endpoints tbody tr").count() == 0
            finally:
                browser.close()
    finally:
        other.shutdown()
        other.server_close()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here with the openssl CLI."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"the TLS test needs the openssl command to make a self-signed certificate: {exc}")
    return cert, key


@pytest.mark.timeout(120)
def test_a_dashboard_off_loopback_needs_tls(tmp_path):
    """Review finding 5: a --http-host other than loopback is refused without
    --http-cert/--http-key, saying so, before anything starts; with them the
    dashboard speaks HTTPS only (checked here on 127.0.0.1: the test listens
    on nothing but loopback)."""
    import ssl

    from fedexec.relay.web import check_http_host

    cert, key = self_signed(tmp_path)
    data = tmp_path / "relay-data"
    token = fedexec_cli("relay", "add-user", "alice", "--data-dir", data).stdout.strip()
    for extra, why in (((), "only over TLS"), (("--http-cert", cert), "go together"),
                       (("--http-cert", key, "--http-key", cert), "not a PEM certificate"),
                       (("--http-cert", tmp_path / "none.pem", "--http-key", key), "no such file")):
        out = fedexec_cli("relay", "start", "--auth", "token", "--port", str(free_port()), "--data-dir", data,
                          "--http", "0", "--http-host", "0.0.0.0", *extra, check=False)
        assert out.returncode != 0 and why in out.stderr, (extra, out.stderr)
        assert not (data / "relay.json").exists()
        if not extra:   # the refusal says what to give
            assert "--http-cert CERT.pem" in out.stderr and "--http-key KEY.pem" in out.stderr
    with pytest.raises(ValueError, match="only over TLS"):
        check_http_host("0.0.0.0", "token")
    check_http_host("0.0.0.0", "token", tls=True)   # (allowed, with TLS)
    with cli_relay(tmp_path, "--auth", "token", "--http-cert", str(cert), "--http-key", str(key)) as (_, url, _):
        assert url.startswith("https://127.0.0.1:"), url
        parts = urlsplit(url)
        context = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=10, context=context)
        try:
            conn.request("GET", "/api/tasks", headers={"Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            assert response.status == 200 and "counts" in json.loads(response.read())["tasks"]
        finally:
            conn.close()
        # plain HTTP gets no answer; an unverified peer's handshake fails (its certificate is checked)
        with pytest.raises((http.client.HTTPException, OSError)):
            get(url.replace("https://", "http://"), "/api/tasks", token)
        with pytest.raises(ssl.SSLError):
            strict = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=10,
                                                 context=ssl.create_default_context())
            try:
                strict.request("GET", "/")
            finally:
                strict.close()
        # the dashboard still answers after those
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=10, context=context)
        try:
            conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
            assert conn.getresponse().status == 200
        finally:
            conn.close()
