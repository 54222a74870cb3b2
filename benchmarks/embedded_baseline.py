"""Warm round trip and no-op throughput of the embedded default, beside
ProcessPoolExecutor(2) in the same run. Median of --runs runs.

    python benchmarks/embedded_baseline.py [--runs 3] [--calls 1000] [--tasks 20000]

Prints a table and saves it as benchmarks/results/embedded-baseline-<date>.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from fedexec import FederatedExecutor


CHUNKED_REPEATS = 9


def noop() -> None:
    return None


def measure(make: type, calls: int, tasks: int) -> dict[str, float]:
    with make() as ex:
        for _ in range(50):  # warm: functions registered, workers loaded
            ex.submit(noop).result()
        lat = []
        for _ in range(calls):
            t = time.perf_counter()
            ex.submit(noop).result()
            lat.append(time.perf_counter() - t)
        lat.sort()
        t = time.perf_counter()
        futures = [ex.submit(noop) for _ in range(tasks)]
        for f in futures:
            f.result()
        submit_rate = tasks / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in ex.map(abs, range(tasks)):
            pass
        map_rate = tasks / (time.perf_counter() - t)
        chunk_rates = []   # a chunked map takes tens of milliseconds: the median of several
        for _ in range(CHUNKED_REPEATS):
            t = time.perf_counter()
            for _ in ex.map(abs, range(tasks), chunksize=256):
                pass
            chunk_rates.append(tasks / (time.perf_counter() - t))
        chunk_rate = statistics.median(chunk_rates)
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000
    return {"p50 ms": pick(0.5), "p90 ms": pick(0.9), "p99 ms": pick(0.99),
            "submit loop /s": submit_rate, "map /s": map_rate, "map chunksize=256 /s": chunk_rate}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=20000)
    ns = parser.parse_args()
    contenders: dict[str, type] = {
        "fedexec embedded (2 workers)": lambda: FederatedExecutor(max_workers=2),
        "ProcessPoolExecutor(2)": lambda: ProcessPoolExecutor(2),
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    for run in range(ns.runs):
        for name, make in contenders.items():
            results[name].append(measure(make, ns.calls, ns.tasks))
            print(f"run {run + 1}: {name}: " + ", ".join(f"{k} {v:,.2f}" for k, v in results[name][-1].items()),
                  flush=True)
    metrics = list(next(iter(results.values()))[0])
    medians = {name: {m: statistics.median(r[m] for r in runs) for m in metrics} for name, runs in results.items()}
    floor = medians["ProcessPoolExecutor(2)"]
    lines = [f"# Embedded default vs ProcessPoolExecutor(2), {datetime.date.today()}", "",
             f"{platform.node()}, Python {platform.python_version()}, no-op tasks, median of {ns.runs} runs "
             f"({ns.calls} warm calls for latency, {ns.tasks} tasks for throughput).", "",
             "| metric | " + " | ".join(medians) + " | fedexec / pool |",
             "|---|" + "---|" * (len(medians) + 1)]
    for m in metrics:
        ours = medians["fedexec embedded (2 workers)"][m]
        lines.append(f"| {m} | " + " | ".join(f"{medians[n][m]:,.2f}" for n in medians) +
                     f" | {ours / floor[m]:.2f} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    out = Path(__file__).parent / "results" / f"embedded-baseline-{datetime.date.today()}.md"
    out.write_text(table)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
