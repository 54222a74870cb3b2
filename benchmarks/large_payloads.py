"""Round trip of a large numpy array through ``submit``: fedexec (embedded
default) against ``ProcessPoolExecutor(2)``.

The task returns its argument plus one (an array as large as the argument),
so both directions carry ``--mb`` megabytes. Reported: the median of
``--runs`` round trips (after one warm-up) and, for fedexec, the peak RSS of
its relay and endpoint agent sampled every 20 ms.

    python benchmarks/large_payloads.py [--mb 100] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import psutil

from fedexec import FederatedExecutor


def plus_one(array):
    return array + 1


def timed_round_trips(executor, array, runs: int) -> list[float]:
    executor.submit(plus_one, array[:10]).result()   # workers started
    executor.submit(plus_one, array).result()        # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        out = executor.submit(plus_one, array).result()
        times.append(time.perf_counter() - started)
        assert out.shape == array.shape and out[0] == array[0] + 1
    return times


def peak_rss(pids: list[int], stop: threading.Event, peaks: dict[int, int]) -> None:
    procs = {pid: psutil.Process(pid) for pid in pids}
    while not stop.is_set():
        for pid, proc in procs.items():
            try:
                peaks[pid] = max(peaks.get(pid, 0), proc.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="megabytes of the array (default 100)")
    parser.add_argument("--runs", type=int, default=5)
    ns = parser.parse_args()
    array = np.arange(ns.mb * 1_000_000 // 8, dtype=np.float64)
    rows = []
    with ProcessPoolExecutor(2) as pool:
        rows.append(("ProcessPoolExecutor(2)", timed_round_trips(pool, array, ns.runs), ""))
    with FederatedExecutor(max_workers=2) as ex:
        services = ex._dispatcher.services
        pids = [p.pid for p in services.processes]
        stop, peaks = threading.Event(), {}
        sampler = threading.Thread(target=peak_rss, args=(pids, stop, peaks), daemon=True)
        sampler.start()
        times = timed_round_trips(ex, array, ns.runs)
        stop.set()
        sampler.join()
        rows.append(("fedexec (embedded)", times, f"relay {peaks.get(pids[0], 0) / 1e6:.0f} MB, "
                                                   f"agent {peaks.get(pids[1], 0) / 1e6:.0f} MB"))
    base = statistics.median(rows[0][1])
    print(f"round trip of a {ns.mb} MB float64 array (argument and result), median of {ns.runs}")
    print(f"{'executor':<26}{'median s':>10}{'vs pool':>9}  peak RSS")
    for name, times, rss in rows:
        median = statistics.median(times)
        print(f"{name:<26}{median:>10.3f}{median / base:>8.2f}x  {rss}")


if __name__ == "__main__":
    main()
