"""1,000 tasks reading the same large numpy array: ``ex.put`` once against
passing the array to every task, side by side in one run (the embedded
default: a private relay and endpoint on this machine, 2 workers).

- put: ``ref = ex.put(array)`` then ``--tasks`` tasks ``summed(ref)``; the
  time includes the put, and the endpoint fetches the array once.
- each: ``summed(array)`` for each task: the array is pickled, uploaded to
  the relay in chunks, fetched by the endpoint, and loaded by the worker,
  every time. That side takes about a second per task here, so it runs
  ``--each-tasks`` tasks (default 20) and its time is scaled to ``--tasks``
  linearly (each task repeats the same transfer); the table says so.

Each run measures both sides, alternately first; reported: the median over
``--runs`` runs of each, and their ratio.

    python benchmarks/put.py [--mb 100] [--tasks 1000] [--each-tasks 20] [--runs 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from fedexec import FederatedExecutor


def summed(array):
    return float(array.sum())


def run_put(ex: FederatedExecutor, array: np.ndarray, tasks: int, expected: float) -> float:
    started = time.perf_counter()
    ref = ex.put(array, ttl=3600)
    futures = [ex.submit(summed, ref) for _ in range(tasks)]
    assert all(f.result() == expected for f in futures)
    seconds = time.perf_counter() - started
    fetches = sum(ref.info()["fetches"].values())
    assert fetches == 1, f"the endpoint fetched the ref {fetches} times"
    ref.delete()
    return seconds


def run_each(ex: FederatedExecutor, array: np.ndarray, tasks: int, expected: float) -> float:
    started = time.perf_counter()
    futures = [ex.submit(summed, array) for _ in range(tasks)]
    assert all(f.result() == expected for f in futures)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="megabytes of the array (default 100)")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--each-tasks", type=int, default=20,
                        help="tasks measured when passing the array each time (scaled to --tasks)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", help="also write the markdown table here")
    ns = parser.parse_args()
    array = np.arange(ns.mb * 1_000_000 // 8, dtype=np.float64)
    expected = float(array.sum())
    put_times: list[float] = []
    each_times: list[float] = []
    with FederatedExecutor(max_workers=2) as ex:
        assert ex.submit(summed, array[:10]).result() == float(array[:10].sum())   # workers up
        run_each(ex, array, 1, expected)                                           # warm-up
        for run in range(ns.runs):
            sides = [("put", lambda: run_put(ex, array, ns.tasks, expected)),
                     ("each", lambda: run_each(ex, array, ns.each_tasks, expected))]
            for name, side in (sides if run % 2 == 0 else sides[::-1]):
                seconds = side()
                (put_times if name == "put" else each_times).append(seconds)
                print(f"run {run + 1}: {name}: {seconds:.2f} s", flush=True)
    put_median = statistics.median(put_times)
    each_median = statistics.median(each_times)
    each_scaled = each_median * ns.tasks / ns.each_tasks
    lines = [
        f"{ns.tasks:,} tasks each reading the same {ns.mb} MB numpy array (float64; the task returns its sum); "
        f"embedded default, 2 workers; medians of {ns.runs} runs, both sides in each run, alternately first.",
        "",
        "| way | tasks measured | median time (s) | per task (ms) | time for "
        f"{ns.tasks:,} tasks (s) |",
        "|---|---|---|---|---|",
        f"| `ref = ex.put(array)` once, then `submit(f, ref)` | {ns.tasks:,} | {put_median:.2f} | "
        f"{1000 * put_median / ns.tasks:.1f} | {put_median:.2f} (measured) |",
        f"| `submit(f, array)` each time | {ns.each_tasks:,} | {each_median:.2f} | "
        f"{1000 * each_median / ns.each_tasks:.1f} | {each_scaled:.1f} (**scaled** from {ns.each_tasks} tasks) |",
        "",
        f"**put is {each_scaled / put_median:.1f}× faster** (target ≥ 10×). Runs: put "
        + ", ".join(f"{t:.2f}" for t in put_times) + " s; each time ("
        + f"{ns.each_tasks} tasks) " + ", ".join(f"{t:.2f}" for t in each_times) + " s.",
    ]
    table = "\n".join(lines)
    print()
    print(table)
    if ns.out:
        with open(ns.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
