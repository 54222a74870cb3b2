"""The dashboard with a big record: page load with 100 endpoints once the
relay's record holds ``--tasks`` (default 1,000,000) tasks, and what filling
the record to that many costs.

    python benchmarks/dashboard_record.py [--tasks 1000000] [--endpoints 100] [--repeats 5]

One local-mode relay started as the CLI's daemon starts it, with --http and
--max-kept-per-user set to --tasks (so every received result stays in its
record, as KEPT: relay/retained.py), and an endpoint of 2 workers. A client
runs --tasks no-op tasks through it (map, one task per item, in batches);
then 100 more endpoints say hello (raw sockets, two blocks each, as
dashboard_overhead.py makes them), and the page is opened in headless
Chromium (Debian's) until its endpoints table has every row; /api/snapshot
and a Client.list_tasks page are timed; then the relay is stopped and
started again on the same record (what a restart with that record costs).
Bounded: each stage has a deadline, and everything started is stopped.
Writes benchmarks/results/dashboard-s24-<date>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from bench_tasks import noop  # noqa: E402
from dashboard_overhead import CHROMIUM_ARGS, api_times, fake_endpoints, fedexec, free_port, page_load  # noqa: E402

from fedexec import Client, FederatedExecutor  # noqa: E402

BATCH = 50_000
FILL_DEADLINE = 3600.0   # seconds the filling may take in all


def start_relay(data: Path, address: str, kept: int, log: Path) -> tuple[subprocess.Popen, dict, float]:
    """The relay (``python -m fedexec.relay``) on ``data``; its process,
    relay.json, and the seconds until it wrote relay.json (listening, its
    record recovered)."""
    (data / "relay.json").unlink(missing_ok=True)
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fedexec.relay", "--address", address, "--data-dir", str(data),
                             "--http", "0", "--max-kept-per-user", str(kept)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (data / "relay.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the relay did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    seconds = time.perf_counter() - t
    return proc, json.loads((data / "relay.json").read_text()), seconds


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def record_size(data: Path) -> int:
    return sum(f.stat().st_size for f in data.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--endpoints", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    ns = parser.parse_args()
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="fedexec-dashboard-record-"))
    os.environ["FEDEXEC_HOME"] = str(root / "home")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    data, log = root / "relay", root / "relay.log"
    address = f"tcp://127.0.0.1:{free_port()}"
    lines = [f"# Dashboard with {ns.tasks:,} tasks in the record (session 24, {datetime.date.today()})", "",
             f"{platform.node()}, {os.cpu_count()} cores (shared with other sessions' work: noisy), Python "
             f"{platform.python_version()}. A local-mode relay (`python -m fedexec.relay --http 0 "
             f"--max-kept-per-user {ns.tasks}`: every received result stays in the record, KEPT) and an endpoint "
             f"of 2 workers; benchmarks/dashboard_record.py.", ""]
    proc, record, _ = start_relay(data, address, ns.tasks, log)
    relay = psutil.Process(proc.pid)
    endpoint = "ep-record"
    socks: list = []
    try:
        fedexec("endpoint", "configure", endpoint, "--relay", address, "--max-workers", "2")
        fedexec("endpoint", "start", endpoint, "--daemon")
        home = Path(os.environ["FEDEXEC_HOME"])
        endpoint_id = json.loads((home / "endpoints" / endpoint / "endpoint.json").read_text())["endpoint_id"]
        secret = (data / "relay.secret").read_text().strip()
        # -- filling the record ---------------------------------------------------
        rss_before = relay.memory_info().rss
        cpu_before = relay.cpu_times()
        t0 = time.perf_counter()
        deadline = time.monotonic() + FILL_DEADLINE
        done = 0
        with FederatedExecutor(endpoint_id, relay=address) as ex:
            while done < ns.tasks:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"filling the record took over {FILL_DEADLINE:.0f} s ({done:,} tasks)")
                n = min(BATCH, ns.tasks - done)
                for _ in ex.map(noop, range(n)):
                    pass
                done += n
                print(f"{done:,} tasks run ({done / (time.perf_counter() - t0):,.0f}/s), relay RSS "
                      f"{relay.memory_info().rss / 2**20:,.0f} MiB", flush=True)
        fill_seconds = time.perf_counter() - t0
        time.sleep(2.0)   # the last acknowledgements reach the relay, and its writer commits them
        cpu_after = relay.cpu_times()
        rss_after = relay.memory_info().rss
        size = record_size(data)
        lines += ["## Filling the record", "",
                  f"- {ns.tasks:,} no-op tasks run through the relay (map in batches of {BATCH:,}): "
                  f"{fill_seconds:,.0f} s, {ns.tasks / fill_seconds:,.0f} tasks/s;",
                  f"- the relay's CPU meanwhile: {cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system:,.0f} s;",
                  f"- the relay's RSS: {rss_before / 2**20:,.0f} MiB before, {rss_after / 2**20:,.0f} MiB after "
                  f"(its in-memory index of kept results: owner and age per task);",
                  f"- its data dir (SQLite record with WAL, spool): {size / 2**20:,.0f} MiB, "
                  f"{size / ns.tasks:,.0f} bytes a task.", ""]
        # -- the page, the API, a listing ----------------------------------------
        socks, _ = fake_endpoints(address, ns.endpoints)
        time.sleep(2.5)   # a snapshot with every endpoint
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS, headless=True)
            try:
                loads = page_load(browser, record["http"], secret, ns.endpoints + 1, ns.repeats)
            finally:
                browser.close()
        api, api_size = api_times(record["http"], secret)
        listing = []
        with Client(relay=address) as client:
            for _ in range(10):
                t = time.perf_counter()
                page = client.list_tasks(limit=100)
                listing.append(time.perf_counter() - t)
            assert len(page) == 100
            t = time.perf_counter()
            info = client.get_task(page[-1]["task_id"])
            one = time.perf_counter() - t
            assert info["status"] == "success"
        lines += [f"## Page load with {ns.endpoints + 1} endpoints and {ns.tasks:,} tasks in the record", "",
                  f"- sign-in address opened in a new tab until the endpoints table has all {ns.endpoints + 1} "
                  f"rows: median {statistics.median(loads) * 1000:.0f} ms of {len(loads)} "
                  f"({', '.join(f'{t * 1000:.0f}' for t in loads)} ms);",
                  f"- GET /api/snapshot ({api_size:,} bytes): median {statistics.median(api) * 1000:.1f} ms, "
                  f"max {max(api) * 1000:.1f} ms of {len(api)};",
                  f"- Client.list_tasks(limit=100) (the record's newest 100 of {ns.tasks:,}): median "
                  f"{statistics.median(listing) * 1000:.1f} ms of {len(listing)}; Client.get_task of one: "
                  f"{one * 1000:.1f} ms.", ""]
        for sock in socks:
            sock.close()
        socks = []
        # -- a restart on that record ---------------------------------------------
        stop(proc)
        proc, record, restart = start_relay(data, address, ns.tasks, log)
        relay = psutil.Process(proc.pid)
        time.sleep(1.0)
        lines += ["## A restart on that record", "",
                  f"- stopped and started again: {restart:.1f} s until it listened with its record recovered "
                  f"(every kept result charged to its user and indexed again); RSS then "
                  f"{relay.memory_info().rss / 2**20:,.0f} MiB.", ""]
    finally:
        for sock in socks:
            sock.close()
        with contextlib.suppress(Exception):
            fedexec("endpoint", "stop", endpoint)
        stop(proc)
    out = HERE / "results" / f"dashboard-s24-{datetime.date.today()}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
