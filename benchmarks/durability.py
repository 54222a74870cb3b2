"""Issue 4's heavy runs: a million tasks with bounded memory, and a soak with
real faults. Prints a table and saves it as benchmarks/results/durability-<date>.md.

    python benchmarks/durability.py [--tasks 1000000] [--soak-tasks 50000] [--faults 12] [--seed N]

1. Backpressure: TASKS no-op tasks through one executor, by ``map`` with
   ``buffersize`` and by a ``submit`` loop that keeps no futures (the
   executor's ``max_in_flight`` throttles it). Every process's RSS is
   sampled every 0.2 s; the table shows the peaks.
2. Soak: SOAK_TASKS 1 ms tasks through a relay and an endpoint started as
   separate processes; FAULTS SIGKILLs (relay, endpoint, a worker, chosen by
   a seeded RNG) at random moments, each restarted. Every task must complete
   exactly once; the table counts tasks lost (must be 0) and re-executed.
Everything runs on loopback; every process started is stopped by pid.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import psutil

from fedexec import FederatedExecutor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_tasks import noop  # noqa: E402
from processes import free_port  # noqa: E402


class PeakRSS:
    """Samples the RSS of a process tree until stopped; peak per role."""

    def __init__(self, root: psutil.Process, roles: dict[int, str] | None = None) -> None:
        self.root = root
        self.roles = roles or {}
        self.peaks: Counter = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def role(self, proc: psutil.Process) -> str:
        if proc.pid in self.roles:
            return self.roles[proc.pid]
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            return "?"
        for role in ("relay", "endpoint", "worker"):
            if f"fedexec.{role}" in cmd:
                return role
        return "client" if proc.pid == self.root.pid else "other"

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            procs = [self.root] + self.root.children(recursive=True)
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                role = self.role(proc)
                self.peaks[role] = max(self.peaks[role], rss)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


def backpressure(tasks: int) -> list[list[str]]:
    rows = []
    for way in ("map(buffersize=100_000)", "submit loop, futures not kept"):
        with FederatedExecutor(max_workers=2) as ex, PeakRSS(psutil.Process()) as rss:
            start = time.perf_counter()
            if way.startswith("map"):
                done = sum(1 for _ in ex.map(noop, range(tasks), buffersize=100_000))
            else:
                finished = Counter()
                lock = threading.Lock()

                def count(fut, finished=finished):
                    with lock:
                        finished["ok" if fut.exception() is None else "failed"] += 1

                for i in range(tasks):
                    ex.submit(noop, i).add_done_callback(count)
                while sum(finished.values()) < tasks:
                    time.sleep(0.05)
                done = finished["ok"]
            seconds = time.perf_counter() - start
        rows.append([way, f"{tasks:,}", f"{done:,}", f"{tasks - done:,}", f"{seconds:.1f} s",
                     f"{tasks / seconds:,.0f}/s", mb(rss.peaks["client"]), mb(rss.peaks["relay"]),
                     mb(rss.peaks["endpoint"]), mb(rss.peaks["worker"])])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def record(log_dir: str, value: int) -> int:
    time.sleep(0.001)
    with open(os.path.join(log_dir, f"{os.getpid()}.log"), "a") as f:
        f.write(f"{value}\n")
    return value



def soak(tasks: int, faults: int, seed: int, work: Path) -> list[list[str]]:
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    rng = random.Random(seed)
    address = f"tcp://127.0.0.1:{free_port()}"
    endpoint_id = str(uuid.uuid4())
    log_dir = work / "runs"
    log_dir.mkdir()
    relay_cmd = [sys.executable, "-m", "fedexec.relay", "--address", address, "--data-dir", str(work / "relay"),
                 "--parent-pid", str(os.getpid()), "--log-level", "WARNING"]
    endpoint_cmd = [sys.executable, "-m", "fedexec.endpoint", "--name", "soak", "--relay", address,
                    "--endpoint-id", endpoint_id, "--max-workers", "2", "--heartbeat-period", "0.2",
                    "--parent-pid", str(os.getpid()), "--log-level", "WARNING"]
    logs = open(work / "services.log", "ab")
    procs = {"relay": subprocess.Popen(relay_cmd, stdout=logs, stderr=logs)}
    time.sleep(0.5)
    procs["endpoint"] = subprocess.Popen(endpoint_cmd, stdout=logs, stderr=logs)
    injected: Counter = Counter()
    try:
        deadline = time.monotonic() + 30
        ex = None
        while ex is None:
            try:
                ex = FederatedExecutor(endpoint_id, relay=address, connect_timeout=2)
            except Exception:
                if time.monotonic() > deadline:
                    raise
        with ex, PeakRSS(psutil.Process()) as rss:
            start = time.perf_counter()
            completions: Counter = Counter()
            lock = threading.Lock()

            def done(fut):
                with lock:
                    completions[fut] += 1

            futures = []
            for i in range(tasks):
                fut = ex.submit(record, str(log_dir), i)
                fut.add_done_callback(done)
                futures.append(fut)
            moments = sorted(rng.uniform(0.02, 0.95) for _ in range(faults))
            for moment in moments:
                while sum(1 for f in futures if f.done()) < moment * tasks:
                    time.sleep(0.02)
                what = rng.choice(["relay", "endpoint", "worker", "worker"])
                if what == "worker":
                    workers = psutil.Process(procs["endpoint"].pid).children()
                    if not workers:
                        continue
                    rng.choice(workers).send_signal(signal.SIGKILL)
                else:
                    procs[what].send_signal(signal.SIGKILL)
                    procs[what].wait(10)
                    time.sleep(rng.uniform(0.05, 0.5))
                    procs[what] = subprocess.Popen(relay_cmd if what == "relay" else endpoint_cmd,
                                                   stdout=logs, stderr=logs)
                injected[what] += 1
            values = [f.result(600) for f in futures]
            time.sleep(0.5)
            seconds = time.perf_counter() - start
        ok = sum(1 for i, v in enumerate(values) if v == i)
        duplicated = sum(1 for n in completions.values() if n > 1)
        runs: Counter = Counter()
        for path in log_dir.glob("*.log"):
            runs.update(int(x) for x in path.read_text().split())
        rerun = sum(n - 1 for n in runs.values())
        row = [f"{sum(injected.values())} ({', '.join(f'{k} {v}' for k, v in sorted(injected.items()))})",
               f"{tasks:,}", f"{ok:,}", f"{tasks - ok:,}", f"{duplicated}", f"{rerun}", f"{seconds:.1f} s",
               mb(rss.peaks["client"]), mb(rss.peaks["relay"]), mb(rss.peaks["endpoint"])]
        print(" | ".join(row), flush=True)
        return [row]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        logs.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--soak-tasks", type=int, default=50_000)
    parser.add_argument("--faults", type=int, default=12)
    parser.add_argument("--seed", type=int, default=None)
    ns = parser.parse_args()
    seed = ns.seed if ns.seed is not None else random.randrange(1 << 30)
    lines = [f"# Durability and backpressure, {datetime.date.today()}", "",
             f"`python benchmarks/durability.py --tasks {ns.tasks} --soak-tasks {ns.soak_tasks} --faults {ns.faults} "
             f"--seed {seed}` on {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}.", "",
             "## Backpressure: no-op tasks through one embedded executor (2 workers); peak RSS per process", "",
             "| how | submitted | completed | lost | time | rate | client | relay | endpoint | each worker |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in backpressure(ns.tasks):
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"## Soak: 1 ms tasks, SIGKILLs at random moments (seed {seed}), each killed process restarted", "",
              "| faults injected | submitted | completed correctly | lost | completed twice | re-executed | time "
              "| client | relay | endpoint |", "|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="fedexec-soak-") as work:
        for row in soak(ns.soak_tasks, ns.faults, seed, Path(work)):
            lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = HERE / "results" / f"durability-{datetime.date.today()}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
