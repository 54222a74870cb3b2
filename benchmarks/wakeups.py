"""Thread wake-ups and CPU time per task, per process, of the embedded default.

Wall-clock latency on a small shared machine moves with its load; what a
change to the round trip's structure buys shows more steadily in what each
process spends per task: its context switches (voluntary ones are mostly
thread wake-ups: a poll, a lock or a condition that had to wait; summed over
every thread, from ``/proc/PID/task/*/status``) and its CPU time.

    python benchmarks/wakeups.py [--trips 1000] [--tasks 20000] [--cli [--pools-in-process]]

Prints, for sequential no-op round trips and for a ``map`` of no-op tasks,
per task: CPU microseconds and voluntary / involuntary context switches of
the client (this process), the embedded relay + endpoint process (with
``--cli``: a relay and an endpoint started from the command line,
head_of_line.CliFederation, and the endpoint's pool process), and each
worker; and the p50 round trip and map rate for reference. Linux only.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import psutil

import fedexec
from fedexec import FederatedExecutor


def noop(_: Any = None) -> None:
    return None


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of every thread of ``pid``."""
    voluntary = involuntary = 0
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        voluntary += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        involuntary += int(line.split()[1])
        except OSError:   # a thread that ended meanwhile
            pass
    return voluntary, involuntary


def snapshot(procs: dict[str, psutil.Process]) -> dict[str, tuple[float, int, int]]:
    out = {}
    for name, proc in procs.items():
        times = proc.cpu_times()
        out[name] = (times.user + times.system, *context_switches(proc.pid))
    return out


def per_task(before: dict, after: dict, count: int) -> dict[str, tuple[float, float, float]]:
    """CPU microseconds, voluntary and involuntary switches per task, per process."""
    return {name: ((after[name][0] - before[name][0]) / count * 1e6,
                   (after[name][1] - before[name][1]) / count,
                   (after[name][2] - before[name][2]) / count) for name in before}


@contextlib.contextmanager
def embedded() -> Iterator[tuple[FederatedExecutor, dict[str, psutil.Process]]]:
    """The embedded default, and its processes by name."""
    with FederatedExecutor(max_workers=2) as ex:
        (colocated,) = ex._dispatcher.services.processes
        service = psutil.Process(colocated.pid)
        procs = {"relay+endpoint": service}
        for i, worker in enumerate(service.children()):
            procs[f"worker {i}"] = worker
        yield ex, procs


@contextlib.contextmanager
def from_the_cli(endpoint_args: tuple[str, ...]) -> Iterator[tuple[FederatedExecutor, dict[str, psutil.Process]]]:
    """A relay and an endpoint started from the command line, and their processes by name."""
    from head_of_line import CliFederation

    with tempfile.TemporaryDirectory(prefix="fedexec-wakeups-") as workdir:
        federation = CliFederation(Path(workdir), endpoint_args)
        try:
            with FederatedExecutor(federation.endpoint_id, relay=federation.address) as ex:
                ex.submit(noop).result()   # (the endpoint's pool and workers are up)
                relay, endpoint = (psutil.Process(p.pid) for p in federation.procs)
                procs = {"relay": relay, "endpoint": endpoint}
                for child in endpoint.children(recursive=True):
                    kind = "pool" if "fedexec.pool" in " ".join(child.cmdline()) else "worker"
                    procs[f"{kind} {child.pid}"] = child
                yield ex, procs
        finally:
            federation.close()


def measure(system: Any, trips: int, tasks: int) -> dict[str, Any]:
    with system as (ex, services):
        for _ in range(100):
            ex.submit(noop).result()
        procs = {"client": psutil.Process(), **services}
        before = snapshot(procs)
        latencies = []
        for _ in range(trips):
            started = time.perf_counter()
            ex.submit(noop).result()
            latencies.append(time.perf_counter() - started)
        round_trip = per_task(before, snapshot(procs), trips)
        before = snapshot(procs)
        started = time.perf_counter()
        list(ex.map(noop, range(tasks)))
        took = time.perf_counter() - started
        mapped = per_task(before, snapshot(procs), tasks)
    return {"p50_ms": statistics.median(latencies) * 1e3, "map_per_s": tasks / took,
            "round_trip": round_trip, "map": mapped}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trips", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--cli", action="store_true", help="a relay and an endpoint started from the command line")
    parser.add_argument("--pools-in-process", action="store_true", help="with --cli: the endpoint's pool in it")
    ns = parser.parse_args()
    system = from_the_cli(("--pools-in-process",) if ns.pools_in_process else ()) if ns.cli else embedded()
    result = measure(system, ns.trips, ns.tasks)
    print(f"{fedexec.__file__} ({'CLI' if ns.cli else 'embedded'}"
          f"{', pools in process' if ns.pools_in_process else ''}): p50 {result['p50_ms']:.2f} ms, "
          f"map {result['map_per_s']:,.0f} tasks/s (load average {psutil.getloadavg()[0]:.1f})")
    print("| process | round trip: CPU us | voluntary switches | involuntary | map: CPU us/task | voluntary/task |")
    print("|---|---|---|---|---|---|")
    for name, (cpu, vol, invol) in result["round_trip"].items():
        mcpu, mvol, _ = result["map"][name]
        print(f"| {name} | {cpu:.0f} | {vol:.2f} | {invol:.2f} | {mcpu:.1f} | {mvol:.3f} |")


if __name__ == "__main__":
    main()
