"""A CLI relay + endpoint with its pool in the endpoint's process or in a
process of its own, side by side: warm round trip p50/p99, map of no-op
tasks, sleep(1 ms) efficiency, and the resident memory of the endpoint and
its pool processes, for a few worker counts.

Why: whether the local provider should run its pools in-process by
default (benchmarks/results/cliproc-s26-2026-12-01.md). Runs alternate the
two modes; medians over ``--runs``.

    python benchmarks/cli_pool_mode.py --workers 2,8 --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_tasks import noop, sleep_task  # noqa: E402
from head_of_line import CliFederation  # noqa: E402

TIMEOUT = 120.0
MODES = {"in-process": ("--pools-in-process",), "pool process": ("--no-pools-in-process",)}


def _rss_kib(pid: int) -> int:
    """Resident memory of one process and its descendants except workers
    (the endpoint, and its pool process if it has one), in KiB."""
    total = 0
    for proc in _tree(pid):
        cmdline = Path(f"/proc/{proc}/cmdline").read_bytes()
        if b"fedexec.worker" in cmdline:
            continue
        for line in Path(f"/proc/{proc}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def _tree(pid: int) -> list[int]:
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():   # (children are listed by the thread that started them)
        for child in (task / "children").read_text().split():
            found.extend(_tree(int(child)))
    return found


def run_one(mode: str, workers: int, round_trips: int, tasks: int, sleeps: int) -> dict[str, float]:
    from fedexec import FederatedExecutor

    with tempfile.TemporaryDirectory(prefix="fedexec-poolmode-") as tmp:
        fed = CliFederation(Path(tmp), (*MODES[mode], "--max-workers", str(workers)))
        try:
            with FederatedExecutor(fed.endpoint_id, relay=fed.address) as ex:
                for _ in range(300):
                    ex.submit(noop, 0).result(TIMEOUT)
                list(ex.map(noop, range(2000), timeout=TIMEOUT))
                times = []
                for _ in range(round_trips):
                    t = time.perf_counter()
                    ex.submit(noop, 0).result(TIMEOUT)
                    times.append(time.perf_counter() - t)
                times.sort()
                t = time.perf_counter()
                assert len(list(ex.map(noop, range(tasks), timeout=TIMEOUT))) == tasks
                map_rate = tasks / (time.perf_counter() - t)
                t = time.perf_counter()
                assert len(list(ex.map(sleep_task, [0.001] * sleeps, timeout=TIMEOUT))) == sleeps
                efficiency = sleeps * 0.001 / workers / (time.perf_counter() - t)
                rss = _rss_kib(fed.procs[1].pid) / 1024
            return {"p50_ms": times[len(times) // 2] * 1e3, "p99_ms": times[int(len(times) * 0.99)] * 1e3,
                    "map_per_s": map_rate, "sleep_eff": efficiency, "rss_mib": rss}
        finally:
            fed.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", default="2,8")
    parser.add_argument("--round-trips", type=int, default=1500)
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--sleeps", type=int, default=4000)
    ns = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    rows: dict[tuple[int, str], list[dict[str, float]]] = {}
    for workers in (int(w) for w in ns.workers.split(",")):
        for run in range(ns.runs):
            modes = list(MODES) if run % 2 == 0 else list(reversed(MODES))
            for mode in modes:
                row = run_one(mode, workers, ns.round_trips, ns.tasks, ns.sleeps)
                rows.setdefault((workers, mode), []).append(row)
                print(f"workers {workers} run {run + 1} {mode}: load {os.getloadavg()[0]:.1f}, "
                      + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    print("\n| workers | pools | p50 ms | p99 ms | map tasks/s | sleep(1 ms) efficiency | endpoint+pool RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for (workers, mode), runs in rows.items():
        med: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {workers} | {mode} | {med['p50_ms']:.2f} | {med['p99_ms']:.2f} | {med['map_per_s']:,.0f} | "
              f"{med['sleep_eff']:.3f} | {med['rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
