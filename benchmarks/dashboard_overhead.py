"""What the relay's dashboard costs: throughput of small no-op tasks through
a relay without --http and one with --http whose page is open in a headless
Chromium (polling /api/snapshot every second) while /metrics is scraped every
second, run alternately, median of ``--runs`` runs each; then how fast the
page and the API answer with 100 endpoints and many tasks queued.

    python benchmarks/dashboard_overhead.py [--runs 5] [--calls 300] [--tasks 5000] [--queued 100000]

Both relays are local-mode relays started as the CLI starts them, each with
an endpoint of 2 workers; the client is FederatedExecutor(endpoint, relay=...)
measured by embedded_baseline.measure (latency of one call, a submit loop,
map). Needs Debian's chromium and the test extra (playwright, prometheus_client).
Writes benchmarks/results/dashboard-s23-<date>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psutil

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from embedded_baseline import measure  # noqa: E402

from fedexec import FederatedExecutor  # noqa: E402
from fedexec import protocol as P  # noqa: E402
from fedexec.auth import connect_plainly  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fedexec(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "fedexec.cli", *args], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"fedexec {' '.join(args)}: {out.stderr}")
    return out.stdout


@contextlib.contextmanager
def relay_with_endpoint(root: Path, name: str, http: bool):
    """A relay (``python -m fedexec.relay``, as the CLI's daemon runs it) and
    an endpoint of 2 workers; yields (address, endpoint id, dashboard URL, secret, the relay's psutil.Process)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    data = root / f"relay-{name}"
    args = [sys.executable, "-m", "fedexec.relay", "--address", address, "--data-dir", str(data)]
    if http:
        args += ["--http", "0"]
    log = open(root / f"relay-{name}.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    endpoint = f"ep-{name}"
    try:
        deadline = time.monotonic() + 30
        while not (data / "relay.json").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"relay {name} did not start: {(root / f'relay-{name}.log').read_text()[-2000:]}")
            time.sleep(0.05)
        record = json.loads((data / "relay.json").read_text())
        fedexec("endpoint", "configure", endpoint, "--relay", address, "--max-workers", "2")
        fedexec("endpoint", "start", endpoint, "--daemon")
        home = Path(os.environ["FEDEXEC_HOME"])
        endpoint_id = json.loads((home / "endpoints" / endpoint / "endpoint.json").read_text())["endpoint_id"]
        yield (address, endpoint_id, record.get("http"), (data / "relay.secret").read_text().strip(),
               psutil.Process(proc.pid))
    finally:
        with contextlib.suppress(Exception):
            fedexec("endpoint", "stop", endpoint)
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class Scraper(threading.Thread):
    """GET /metrics every second, as a (very eager) Prometheus would."""

    def __init__(self, url: str, secret: str) -> None:
        super().__init__(daemon=True)
        self.url, self.secret = url, secret
        self.stopping = threading.Event()
        self.scrapes = 0

    def run(self) -> None:
        while not self.stopping.wait(1.0):
            request = urllib.request.Request(self.url + "metrics", headers={"Authorization": f"Bearer {self.secret}"})
            with urllib.request.urlopen(request, timeout=5) as response:
                response.read()
            self.scrapes += 1


def fake_endpoints(address: str, count: int) -> tuple[list, list[str]]:
    """``count`` endpoints saying hello (raw sockets, no workers, no credit:
    tasks sent to them stay queued at the relay), each with a heartbeat
    report of 2 blocks: rows for the dashboard's table. Their sockets and ids."""
    import zmq

    ctx = zmq.Context.instance()
    socks, ids = [], []
    for i in range(count):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, b"E" + uuid.uuid4().bytes)
        connect_plainly(sock, address)
        ids.append(str(uuid.uuid4()))
        sock.send_multipart(P.encode(P.HELLO, {"role": "endpoint", "id": ids[-1], "name": f"fake-{i}",
                                               "py": P.PYTHON_VERSION, "workers": 8, "capacity": 0, "hb": 60.0}))
        sock.send_multipart(P.encode(P.HEARTBEAT, {"st": {"w": 8, "iw": 3, "q": i, "b": [
            [f"b{i}-1", str(1000 + i), "running"], [f"b{i}-2", str(2000 + i), "pending"]]}}))
        socks.append(sock)
    return socks, ids


def queue_tasks(address: str, endpoint_id: str, n: int, url: str, secret: str) -> tuple[FederatedExecutor, float]:
    """Submit ``n`` no-op tasks to an endpoint that never takes them (they
    stay queued at the relay, in its record) and wait until the relay has
    accepted them all (the dashboard's in-flight count); the executor (to
    shut down) and the seconds it took."""
    from bench_tasks import noop

    t = time.perf_counter()
    ex = FederatedExecutor(endpoint_id, relay=address)
    for _ in range(n):
        ex.submit(noop)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        request = urllib.request.Request(url + "api/tasks", headers={"Authorization": f"Bearer {secret}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            if json.load(response)["tasks"]["in_flight"] >= n:
                break
        time.sleep(0.5)
    return ex, time.perf_counter() - t


def page_load(browser, url: str, secret: str, rows: int, repeats: int = 5) -> list[float]:
    """Seconds from opening the sign-in address to a table of ``rows`` endpoints, ``repeats`` times."""
    times = []
    for _ in range(repeats):
        page = browser.new_page()
        t = time.perf_counter()
        page.goto(f"{url}?token={secret}")
        page.locator("#endpoints tbody tr").nth(rows - 1).wait_for(timeout=30_000)
        times.append(time.perf_counter() - t)
        page.close()
    return times


def api_times(url: str, secret: str, n: int = 50) -> tuple[list[float], int]:
    times, size = [], 0
    for _ in range(n):
        request = urllib.request.Request(url + "api/snapshot", headers={"Authorization": f"Bearer {secret}"})
        t = time.perf_counter()
        with urllib.request.urlopen(request, timeout=10) as response:
            size = len(response.read())
        times.append(time.perf_counter() - t)
    return times, size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--endpoints", type=int, default=100)
    parser.add_argument("--queued", type=int, default=100_000, help="tasks left queued at the relay for the "
                                                                      "page-load measurement")
    ns = parser.parse_args()
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="fedexec-dashboard-bench-"))
    os.environ["FEDEXEC_HOME"] = str(root / "home")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    results: dict[str, list[dict]] = {"without --http": [], "with --http, page open + /metrics every 1 s": []}
    lines = []
    with relay_with_endpoint(root, "plain", http=False) as plain, \
            relay_with_endpoint(root, "dash", http=True) as dash, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page()
        page.goto(f"{dash[2]}?token={dash[3]}")
        page.locator("#endpoints tbody tr").first.wait_for(timeout=30_000)
        scraper = Scraper(dash[2], dash[3])
        scraper.start()
        contenders = list(zip(results, (plain, dash)))
        idle = {}
        for label, (_, _, _, _, relay) in contenders:   # the relay's CPU while nothing runs (the page open)
            before = relay.cpu_times()
            time.sleep(10)
            after = relay.cpu_times()
            idle[label] = max(0.0, (after.user + after.system - before.user - before.system) / 10 * 100)
        for run in range(ns.runs):
            for label, (address, endpoint_id, _, _, relay) in (contenders if run % 2 == 0 else contenders[::-1]):
                before = relay.cpu_times()
                result = measure(lambda: FederatedExecutor(endpoint_id, relay=address), ns.calls, ns.tasks)
                after = relay.cpu_times()
                result["relay CPU s"] = after.user + after.system - before.user - before.system
                results[label].append(result)
                print(f"run {run + 1} {label}: " + ", ".join(f"{k} {v:,.1f}" for k, v in result.items()), flush=True)
        scraper.stopping.set()
        polls = page.evaluate("performance.getEntriesByType('resource').filter(e => e.name.includes('/api/')).length")
        page.close()
        keys = list(results[contenders[0][0]][0])
        lines += [f"# Dashboard overhead (session 23, {datetime.date.today()})", "",
                  f"{platform.node()}, {os.cpu_count()} cores (shared with other sessions' work: noisy), "
                  f"Python {platform.python_version()}. Two local-mode relays side by side, each with an endpoint "
                  f"of 2 workers; runs alternate between them (order flipped each round); median of {ns.runs} "
                  f"runs each. The --http relay had its page open in headless Chromium the whole time "
                  f"({polls} /api/ polls) and /metrics scraped every second ({scraper.scrapes} scrapes). "
                  f"Each run: {ns.calls} one-at-a-time calls, {ns.tasks:,} tasks in a submit loop, map of "
                  f"{ns.tasks:,} (embedded_baseline.measure).", "",
                  "| measure | " + " | ".join(results) + " | with / without |", "|---|---|---|---|"]
        for key in keys:
            a = statistics.median(r[key] for r in results[contenders[0][0]])
            b = statistics.median(r[key] for r in results[contenders[1][0]])
            lines.append(f"| {key} | {a:,.2f} | {b:,.2f} | {b / a:.3f} |")
        lines += ["", "The relay's CPU while idle (10 s, nothing running): " + ", ".join(
            f"{label} {percent:.2f} %" for label, percent in idle.items()) + ".", "",
            "Relay CPU s: the relay process's user + system CPU seconds over each run's whole workload (the "
            "same work on both sides): less sensitive to the other sessions' load than rates.", "",
            "All runs (without / with):", ""]
        for key in keys:
            lines.append(f"- {key}: " + ", ".join(f"{r[key]:,.1f}" for r in results[contenders[0][0]]) + " / "
                         + ", ".join(f"{r[key]:,.1f}" for r in results[contenders[1][0]]))

        # page load with many endpoints and many tasks queued at the relay
        socks, fake_ids = fake_endpoints(dash[0], ns.endpoints)
        queued, seconds = queue_tasks(dash[0], fake_ids[0], ns.queued, dash[2], dash[3])
        time.sleep(2.5)
        loads = page_load(browser, dash[2], dash[3], ns.endpoints + 1)
        api, size = api_times(dash[2], dash[3])
        lines += ["", f"## Page load with {ns.endpoints + 1} endpoints and {ns.queued:,} tasks queued at the relay",
                  "", f"({ns.queued:,} no-op tasks submitted to an endpoint with no credit, so they stay queued at "
                  f"the relay and in its record: {seconds:.1f} s until all were accepted.) "
                  f"Sign-in address opened in a new tab until the endpoints table has all {ns.endpoints + 1} rows: "
                  f"median {statistics.median(loads) * 1000:.0f} ms of {len(loads)} "
                  f"({', '.join(f'{t * 1000:.0f}' for t in loads)} ms). GET /api/snapshot ({size:,} bytes): "
                  f"median {statistics.median(api) * 1000:.1f} ms, max {max(api) * 1000:.1f} ms of {len(api)}."]
        queued.shutdown(wait=False, cancel_futures=True)
        for sock in socks:
            sock.close()
        browser.close()
    out = HERE / "results" / f"dashboard-s23-{datetime.date.today()}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
