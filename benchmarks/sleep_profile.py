"""Where a sleep(1 ms) task's time goes beyond its sleep (issue 17's sleep
efficiency), fedexec (embedded default, or a relay + endpoint from the CLI)
beside ProcessPoolExecutor(2):

- efficiency: N x sleep(1 ms) through ``map`` on 2 workers, ideal (N x 1 ms
  / 2) over the wall time, and the ceiling this machine allows (the median
  of what ``time.sleep(0.001)`` really takes, measured here first);
- CPU per process (and per thread of the embedded default's one process)
  during the map, from /proc, in microseconds per task;
- with ``--gaps``, a second map with ``trace=True``: per worker, the time
  between the end of one task and the start of the next (each task's start
  and end stamped by its worker; tasks assigned to workers by their
  intervals), split by whether the next task had already been sent to the
  worker when the previous one ended (so its queue was not empty) or not
  (the worker waited for its pool).

    python benchmarks/sleep_profile.py [--tasks 20000] [--runs 1] [--only embedded,cli,procpool] [--gaps]

The systems alternate run by run; medians are printed. Tracing costs the
client and the relay a little per task, so the gap run's own efficiency is
printed apart, never mixed with the untraced one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import psutil  # noqa: E402

from bench_tasks import sleep_task  # noqa: E402
from head_of_line import CliFederation, warm  # noqa: E402

TIMEOUT = 600.0
TICK = os.sysconf("SC_CLK_TCK")


def sleep_ceiling(samples: int = 2000) -> float:
    """Median seconds of a real ``time.sleep(0.001)`` here."""
    took = []
    for _ in range(samples):
        t = time.perf_counter()
        time.sleep(0.001)
        took.append(time.perf_counter() - t)
    return statistics.median(took)


def _thread_times(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid``, keyed ``name:tid``."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[f"{name}:{tid}"] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def cpu_snapshot(root: int) -> dict[str, dict[str, float]]:
    """Per process under (and including) ``root``: its threads' CPU seconds."""
    procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    snap = {}
    for proc in procs:
        try:
            label = f"{proc.pid} {' '.join(proc.cmdline()[1:4])[:60]}"
        except psutil.Error:
            continue
        snap[label] = _thread_times(proc.pid)
    return snap


def cpu_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
              n: int) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """(process, µs per task, [(thread, µs per task)]) for each process present at both ends."""
    rows = []
    for label, threads in after.items():
        if label not in before:
            continue
        per = [(t, (s - before[label].get(t, 0.0)) * 1e6 / n) for t, s in threads.items()]
        per = [(t, us) for t, us in per if us >= 0.5]
        rows.append((label, sum(us for _, us in per), sorted(per, key=lambda x: -x[1])))
    return rows


def gaps(futures: list[Any], began: float, ended: float) -> dict[str, float]:
    """Per-worker gaps from traced futures (fedexec_timings), and the time
    from ``began`` (time.time() before the first submit) to the first task's
    start, and from the last task's end to ``ended`` (the last result in)."""
    spans = []
    for f in futures:
        t = f.fedexec_timings
        spans.append((t["start"], t["end"], t["worker_in"]))
    spans.sort()
    workers: list[list[tuple[float, float, float]]] = []
    for span in spans:
        for seq in workers:
            if seq[-1][1] <= span[0] + 1e-6:
                seq.append(span)
                break
        else:
            workers.append([span])
    queued, waited, run = [], [], []
    for seq in workers:
        for prev, nxt in zip(seq, seq[1:]):
            gap = nxt[0] - prev[1]
            (queued if nxt[2] <= prev[1] else waited).append(gap)
        run.extend(e - s for s, e, _ in seq)
    every = queued + waited
    return {
        "lead_s": spans[0][0] - began,
        "tail_s": ended - max(end for _, end, _ in spans),
        "workers": len(workers),
        "run_ms_median": statistics.median(run) * 1e3,
        "run_ms_mean": statistics.fmean(run) * 1e3,
        "gap_ms_median": statistics.median(every) * 1e3,
        "gap_ms_mean": statistics.fmean(every) * 1e3,
        "queued_share": len(queued) / len(every),
        "gap_ms_mean_queued": statistics.fmean(queued) * 1e3 if queued else 0.0,
        "gap_ms_mean_waited": statistics.fmean(waited) * 1e3 if waited else 0.0,
    }


def run_one(system: str, n: int, with_gaps: bool) -> tuple[dict[str, float], list[Any]]:
    from fedexec import FederatedExecutor

    with tempfile.TemporaryDirectory(prefix="fedexec-sleep-") as tmp:
        fed = CliFederation(Path(tmp)) if system == "cli" else None
        try:
            kwargs: dict[str, Any] = {}
            if system == "procpool":
                ex: Any = ProcessPoolExecutor(2)
            elif fed is not None:
                ex = FederatedExecutor(fed.endpoint_id, relay=fed.address)
            else:
                ex = FederatedExecutor(max_workers=2)
            with ex:
                warm(ex)
                list(ex.map(sleep_task, [0.001] * 500))
                before = cpu_snapshot(os.getpid())
                t = time.perf_counter()
                results = list(ex.map(sleep_task, [0.001] * n, timeout=TIMEOUT))
                elapsed = time.perf_counter() - t
                after = cpu_snapshot(os.getpid())
                assert len(results) == n
                row = {"seconds": elapsed, "efficiency": n * 0.001 / 2 / elapsed}
                cpu = cpu_delta(before, after, n)
            if with_gaps and system != "procpool":
                kwargs = {"trace": True}
                with (FederatedExecutor(fed.endpoint_id, relay=fed.address, **kwargs) if fed is not None
                      else FederatedExecutor(max_workers=2, **kwargs)) as traced:
                    warm(traced)
                    list(traced.map(sleep_task, [0.001] * 500))
                    t, began = time.perf_counter(), time.time()
                    futures = [traced.submit(sleep_task, 0.001) for _ in range(n)]
                    for f in futures:
                        f.result(TIMEOUT)
                    row["traced_efficiency"] = n * 0.001 / 2 / (time.perf_counter() - t)
                    row.update(gaps(futures, began, time.time()))
            return row, cpu
        finally:
            if fed is not None:
                fed.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--only", default="embedded,procpool")
    parser.add_argument("--gaps", action="store_true")
    ns = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    import fedexec

    print(f"fedexec from {Path(fedexec.__file__).parent}; load {os.getloadavg()[0]:.2f}")
    ceiling = sleep_ceiling()
    print(f"time.sleep(0.001) median {ceiling * 1e3:.3f} ms: ceiling {0.001 / ceiling:.3f}")
    systems = ns.only.split(",")
    rows: dict[str, list[dict[str, float]]] = {s: [] for s in systems}
    for run in range(ns.runs):
        for system in (systems if run % 2 == 0 else list(reversed(systems))):
            row, cpu = run_one(system, ns.tasks, ns.gaps)
            rows[system].append(row)
            print(f"run {run + 1} {system}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
            print("  CPU per task (µs), by process / thread:")
            for label, total, threads in cpu:
                print(f"    {total:7.1f}  {label}")
                for thread, us in threads[:6]:
                    print(f"             {us:7.1f}  {thread}")
    print(f"\nload {os.getloadavg()[0]:.2f}\n| system | {ns.tasks} x sleep(1 ms) (s) | efficiency | ceiling |")
    print("|---|---|---|---|")
    for system, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {system} | {med['seconds']:.2f} | {med['efficiency']:.3f} | {0.001 / ceiling:.3f} |")


if __name__ == "__main__":
    main()
