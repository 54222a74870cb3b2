"""Issue 17's two scheduling targets, fedexec (embedded default, and a relay +
endpoint started from the CLI) beside ProcessPoolExecutor(2):

- head of line: one 5 s task, then 200 tiny tasks (2 workers): when is the
  last tiny one done (seconds after the first tiny one was submitted), and
  how many of them took longer than 1 s;
- sleep efficiency: N x sleep(1 ms) through ``map`` on 2 workers; efficiency
  = ideal (N x 1 ms / 2) / wall time.

    python benchmarks/head_of_line.py [--runs 3] [--sleep-tasks 20000] [--only embedded,cli,procpool]

Each system is measured warm (a few hundred no-op calls first, as in
run_all.py, where these rows follow the latency and throughput rows). Prints
medians of ``--runs`` runs, the systems alternating run by run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_tasks import noop, sleep_task  # noqa: E402
from processes import free_port, stop  # noqa: E402

LONG = 5.0
TINY = 200
TIMEOUT = 120.0


def head_of_line(submit: Callable[..., Any], long: float = LONG, tiny: int = TINY) -> dict[str, float]:
    """One ``long`` s task, then (0.1 s later, when it runs) ``tiny`` no-op tasks."""
    first = submit(sleep_task, long)
    time.sleep(0.1)
    done_at: list[float] = []
    t0 = time.perf_counter()
    futures = []
    for _ in range(tiny):
        f = submit(noop, 0)
        f.add_done_callback(lambda _f: done_at.append(time.perf_counter()))
        futures.append(f)
    done, not_done = wait(futures, timeout=TIMEOUT)
    if not_done:
        raise TimeoutError(f"{len(not_done)} tiny tasks not done")
    for f in futures:
        f.result()
    first.result(TIMEOUT)
    waits = [t - t0 for t in done_at]
    return {"last_tiny_s": max(waits), "tiny_over_1s": sum(1 for w in waits if w > 1.0)}


def sleep_efficiency(ex: Any, n: int) -> dict[str, float]:
    t = time.perf_counter()
    results = list(ex.map(sleep_task, [0.001] * n, timeout=TIMEOUT * 5))
    elapsed = time.perf_counter() - t
    assert len(results) == n
    return {"sleep_s": elapsed, "efficiency": n * 0.001 / 2 / elapsed}


def warm(ex: Any) -> None:
    for _ in range(300):
        ex.submit(noop, 0).result(TIMEOUT)
    list(ex.map(noop, range(2000)))


class CliFederation:
    """A relay and an endpoint (2 workers) started from the command line:
    two processes, or (``inside``) the endpoint configured and run inside
    the relay's process (``fedexec relay start --endpoint``)."""

    def __init__(self, workdir: Path, endpoint_args: tuple[str, ...] = (), inside: bool = False) -> None:
        """``endpoint_args``: more options for ``python -m fedexec.endpoint``
        (``--pools-in-process``)."""
        from fedexec.config import EndpointConfig
        from fedexec.relay.query import lookup_endpoint

        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.endpoint_id = str(uuid.uuid4())
        # a fedexec home of its own: the relay publishes its local secret there (relays/<address>.secret)
        # and this process's client reads it from there; the user's real ~/.fedexec is left alone
        self._home_before = os.environ.get("FEDEXEC_HOME")
        os.environ["FEDEXEC_HOME"] = str(workdir / "home")
        hosted: list[str] = []
        if inside:   # as 'fedexec endpoint configure hol --relay ADDRESS --max-workers 2' writes it
            config = EndpointConfig(name="hol", relay=self.address, max_workers=2)
            config.endpoint_id = self.endpoint_id
            config.save()
            hosted = ["--endpoint", "hol"]
        self.log = open(workdir / "processes.log", "ab")
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "fedexec.relay", "--address", self.address, "--data-dir", str(workdir / "relay"),
             "--parent-pid", str(os.getpid()), "--log-level", "WARNING", *hosted],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)]
        # the endpoint once the relay serves (its pid file), as 'fedexec relay start --daemon' returns
        deadline = time.monotonic() + 30
        while not (workdir / "relay" / "relay.json").exists():
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                raise RuntimeError(f"the relay did not start (see {workdir / 'processes.log'})")
            time.sleep(0.02)
        if not inside:
            self._start_endpoint(workdir, endpoint_args)
        deadline = time.monotonic() + 60
        while True:
            try:
                view = lookup_endpoint(self.address, self.endpoint_id, timeout=1.0)
                if view and view["status"] == "connected":
                    break
            except TimeoutError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.close()
                raise RuntimeError(f"the relay and endpoint did not start; see {workdir / 'processes.log'}")
            time.sleep(0.05)

    def _start_endpoint(self, workdir: Path, endpoint_args: tuple[str, ...]) -> None:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "fedexec.endpoint", "--name", "hol", "--relay", self.address, "--endpoint-id",
             self.endpoint_id, "--max-workers", "2", "--parent-pid", str(os.getpid()), "--log-level", "WARNING",
             *endpoint_args],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT))

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        self.log.close()
        if self._home_before is None:
            os.environ.pop("FEDEXEC_HOME", None)
        else:
            os.environ["FEDEXEC_HOME"] = self._home_before


def run_one(system: str, sleep_tasks: int) -> dict[str, float]:
    from fedexec import FederatedExecutor

    with tempfile.TemporaryDirectory(prefix="fedexec-hol-") as tmp:
        fed = CliFederation(Path(tmp)) if system == "cli" else None
        try:
            if system == "procpool":
                ex: Any = ProcessPoolExecutor(2)
            elif fed is not None:
                ex = FederatedExecutor(fed.endpoint_id, relay=fed.address)
            else:
                ex = FederatedExecutor(max_workers=2)
            with ex:
                warm(ex)
                row = head_of_line(ex.submit)
                row.update(sleep_efficiency(ex, sleep_tasks))
            return row
        finally:
            if fed is not None:
                fed.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sleep-tasks", type=int, default=20000)
    parser.add_argument("--only", default="embedded,cli,procpool")
    ns = parser.parse_args()
    # the workers load bench_tasks by reference, as run_all.py's do
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    systems = ns.only.split(",")
    rows: dict[str, list[dict[str, float]]] = {s: [] for s in systems}
    for run in range(ns.runs):
        for system in (systems if run % 2 == 0 else list(reversed(systems))):
            row = run_one(system, ns.sleep_tasks)
            rows[system].append(row)
            print(f"run {run + 1} {system}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    print(f"\n| system | last tiny done (s) | tiny > 1 s | {ns.sleep_tasks} x sleep(1 ms) (s) | efficiency |")
    print("|---|---|---|---|---|")
    for system, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {system} | {med['last_tiny_s']:.3f} | {med['tiny_over_1s']:.0f} | {med['sleep_s']:.2f} | "
              f"{med['efficiency']:.3f} |")


if __name__ == "__main__":
    main()
