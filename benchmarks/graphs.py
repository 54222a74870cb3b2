"""Task graphs (issue 13): futures passed as arguments, timed side by side.

    python benchmarks/graphs.py [--chain 1000] [--fan 10000] [--runs 3] [--only fedexec,dask,parsl]

Two graphs of no-op tasks: a chain (each task takes the previous one's
future) and a fan-out/fan-in (``fan - 1`` tasks each take one root task's
future, then one task takes all of them). fedexec runs its embedded default
(2 workers); Parsl its HighThroughputExecutor (one local block of 2 workers,
as in run_all.py) through ``python_app`` calls, which resolve futures passed
as arguments the same way; Dask distributed a LocalCluster of 2 worker
processes with 1 thread each, through ``client.submit`` (which also takes
futures as arguments; ``pure=False`` so that equal calls are not merged).
Prints the median seconds per graph and system.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# workers import bench_tasks by reference; Parsl's scripts are found on PATH
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

from bench_tasks import gather, identity  # noqa: E402

RESULT_TIMEOUT = 600.0


def chain(submit: Callable[..., Any], length: int) -> float:
    started = time.perf_counter()
    future = submit(identity, 0)
    for _ in range(length - 1):
        future = submit(identity, future)
    assert future.result(RESULT_TIMEOUT) == 0
    return time.perf_counter() - started


def fan(submit: Callable[..., Any], size: int) -> float:
    started = time.perf_counter()
    root = submit(identity, 0)
    leaves = [submit(identity, root) for _ in range(size - 2)]
    assert submit(gather, *leaves).result(RESULT_TIMEOUT) == size - 2
    return time.perf_counter() - started


def run_fedexec(args: argparse.Namespace) -> dict[str, list[float]]:
    from fedexec import FederatedExecutor

    times: dict[str, list[float]] = {"chain": [], "fan": []}
    with FederatedExecutor(max_workers=2) as ex:
        ex.submit(identity, 0).result(RESULT_TIMEOUT)   # warm
        for _ in range(args.runs):
            times["chain"].append(chain(ex.submit, args.chain))
            times["fan"].append(fan(ex.submit, args.fan))
    return times


def run_parsl(args: argparse.Namespace) -> dict[str, list[float]]:
    from run_all import ParslSystem

    times: dict[str, list[float]] = {"chain": [], "fan": []}
    system = ParslSystem()
    try:
        import parsl

        apps = {fn: parsl.python_app(fn, executors=["htex"]) for fn in (identity, gather)}
        submit = lambda fn, *a: apps[fn](*a)   # noqa: E731
        for _ in range(args.runs):
            times["chain"].append(chain(submit, args.chain))
            times["fan"].append(fan(submit, args.fan))
    finally:
        system.__exit__(None, None, None)
    return times


def run_dask(args: argparse.Namespace) -> dict[str, list[float]]:
    from dask.distributed import Client, LocalCluster

    times: dict[str, list[float]] = {"chain": [], "fan": []}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        submit = lambda fn, *a: client.submit(fn, *a, pure=False)   # noqa: E731
        submit(identity, 0).result(RESULT_TIMEOUT)   # warm
        for _ in range(args.runs):
            times["chain"].append(chain(submit, args.chain))
            times["fan"].append(fan(submit, args.fan))
    return times


SYSTEMS = {"fedexec": run_fedexec, "dask": run_dask, "parsl": run_parsl}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chain", type=int, default=1000)
    parser.add_argument("--fan", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=",".join(SYSTEMS))
    args = parser.parse_args()
    print(f"chain of {args.chain:,} dependent no-op tasks; fan-out/fan-in of {args.fan:,}; median of {args.runs}")
    print(f"{'system':10} {'chain s':>9} {'tasks/s':>9} {'fan s':>9} {'tasks/s':>9}")
    for name in args.only.split(","):
        try:
            times = SYSTEMS[name](args)
        except Exception as exc:   # one system failing does not hide the others
            print(f"{name:10} failed: {type(exc).__name__}: {exc}")
            continue
        c, f = statistics.median(times["chain"]), statistics.median(times["fan"])
        print(f"{name:10} {c:9.2f} {args.chain / c:9.0f} {f:9.2f} {args.fan / f:9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
