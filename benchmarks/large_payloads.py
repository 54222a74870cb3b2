"""Round trip of a large numpy array through ``submit``, side by side:
fedexec (embedded default, 2 workers), ``ProcessPoolExecutor(2)``, Dask
distributed (``LocalCluster`` of 2 worker processes) and Ray
(``ray.init(num_cpus=2)``, a remote function).

The task returns ``array + 1``, a new array as large as its argument, so both
directions carry ``--mb`` megabytes and the client checks what came back.
Each system runs in a process of its own (so one's memory does not count for
another), with ``--runs`` timed round trips after a warm-up; reported: the
median and every run, the ratio to ProcessPoolExecutor's median, and the peak
RSS of each process of that system (the client, and every process it
started, sampled every 20 ms), by role.

    python benchmarks/large_payloads.py [--mb 100 1000] [--runs 5]
        [--systems ppe fedexec dask ray fedexec-base fedexec-chunks] [--base-src OLD/src] [--rounds 2] [--out results.md]

Every system's run is bounded (``--timeout`` seconds); one that fails or
times out is reported as such, the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable

SYSTEMS = ("ppe", "fedexec", "dask", "ray")
NAMES = {"ppe": "ProcessPoolExecutor(2)", "fedexec": "fedexec (embedded)", "dask": "Dask LocalCluster(2)",
         "ray": "Ray (num_cpus=2)", "fedexec-base": "fedexec, --base-src checkout",
         "fedexec-chunks": "fedexec, chunks only (FEDEXEC_CHUNKS_ONLY)"}


def plus_one(array):
    return array + 1


# -- memory ------------------------------------------------------------------------
def role(proc: Any) -> str:
    """A short name for a process of a system, from its command line."""
    try:
        cmd = " ".join(proc.cmdline())
        name = proc.name()
    except Exception:
        return "?"
    if proc.pid == os.getpid():
        return "client"
    if proc.cmdline() == psutil_self_cmdline():
        return "worker"   # forked from the client (ProcessPoolExecutor)
    for needle, label in (("resource_tracker", "resource tracker"), ("fedexec.endpoint", "agent"),
                          ("fedexec.relay", "relay"), ("dask worker", "worker"),
                          ("fedexec.pool", "pool"), ("pool.manager", "pool"), ("fedexec.worker", "worker"),
                          ("worker.process", "worker"), ("gcs_server", "ray gcs"), ("raylet", "raylet"),
                          ("dashboard", "ray dashboard"), ("log_monitor", "ray log monitor"),
                          ("monitor.py", "ray monitor"), ("default_worker", "ray worker"),
                          ("runtime_env", "ray runtime env agent"), ("ray::", "ray worker"),
                          ("spawn_main", "worker"), ("forkserver", "forkserver"),
                          ("multiprocessing", "worker")):
        if needle in cmd or needle in name:
            return label
    return name


def psutil_self_cmdline() -> list[str]:
    import psutil
    return psutil.Process().cmdline()


class PeakRSS:
    """Peak RSS of this process and all its descendants (sampled every 20
    ms in a thread), by role: the largest of the processes of each role."""

    def __init__(self) -> None:
        import psutil
        self.me = psutil.Process()
        self.peaks: dict[int, int] = {}
        self.roles: dict[int, str] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakRSS":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                procs = [self.me] + self.me.children(recursive=True)
            except Exception:
                procs = [self.me]
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                except Exception:
                    continue
                if proc.pid not in self.roles:
                    self.roles[proc.pid] = role(proc)
                self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)
            time.sleep(0.02)

    def by_role(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for pid, peak in self.peaks.items():
            out.setdefault(self.roles.get(pid, "?"), []).append(peak)
        return {r: sorted(v, reverse=True) for r, v in out.items()}


# -- one system ----------------------------------------------------------------------
def cpu_times() -> dict[int, tuple[str, float, float]]:
    """``{pid: (role, user s, system s)}`` of this process and all its descendants now."""
    import psutil
    me = psutil.Process()
    out = {}
    for proc in [me] + me.children(recursive=True):
        try:
            t = proc.cpu_times()
            out[proc.pid] = (role(proc), t.user, t.system)
        except Exception:
            continue
    return out


def cpu_by_role(before: dict[int, tuple[str, float, float]], after: dict[int, tuple[str, float, float]],
                runs: int) -> dict[str, list[float]]:
    """CPU seconds per round trip between two :func:`cpu_times`, ``{role: [user, system]}``
    summed over the processes of each role (a process that started meanwhile counts whole)."""
    out: dict[str, list[float]] = {}
    for pid, (name, user, system) in after.items():
        _, user0, system0 = before.get(pid, (name, 0.0, 0.0))
        acc = out.setdefault(name, [0.0, 0.0])
        acc[0] += (user - user0) / runs
        acc[1] += (system - system0) / runs
    return {name: v for name, v in out.items() if v[0] + v[1] >= 0.005}


CPU: dict[str, list[float]] = {}
WRITTEN: list[float] = []   # MB the kernel wrote back to disk per trip (machine-wide: /proc/vmstat nr_written)


def pages_written() -> int:
    """Pages the kernel has written to disk since boot (0 where there is no /proc/vmstat)."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("nr_written "):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed(submit: Callable[[Any], Any], array: Any, runs: int) -> list[float]:
    submit(array[:10])   # workers started
    submit(array)        # warm-up
    times = []
    before = cpu_times()
    written = pages_written()
    for _ in range(runs):
        started = time.perf_counter()
        out = submit(array)
        times.append(time.perf_counter() - started)
        assert out.shape == array.shape and out[0] == array[0] + 1 and out[-1] == array[-1] + 1
        del out
    CPU.update(cpu_by_role(before, cpu_times(), runs))
    WRITTEN.append((pages_written() - written) * 4096 / 1e6 / runs)
    return times


def run_system(system: str, mb: int, runs: int) -> dict[str, Any]:
    import numpy as np
    array = np.arange(mb * 1_000_000 // 8, dtype=np.float64)
    with PeakRSS() as rss:
        if system == "ppe":
            from concurrent.futures import ProcessPoolExecutor
            with ProcessPoolExecutor(2) as pool:
                times = timed(lambda a: pool.submit(plus_one, a).result(), array, runs)
        elif system == "fedexec":
            from fedexec import FederatedExecutor
            with FederatedExecutor(max_workers=2) as ex:
                times = timed(lambda a: ex.submit(plus_one, a).result(), array, runs)
        elif system == "dask":
            from dask.distributed import Client, LocalCluster
            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                    Client(cluster) as client:
                # pure=False: every submit runs (Dask would otherwise reuse the result of the same call)
                times = timed(lambda a: client.submit(plus_one, a, pure=False).result(), array, runs)
        elif system == "ray":
            import ray
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            try:
                remote = ray.remote(plus_one)
                times = timed(lambda a: ray.get(remote.remote(a)), array, runs)
            finally:
                ray.shutdown()
        else:
            raise SystemExit(f"unknown system {system!r}")
    return {"times": times, "rss": rss.by_role(), "cpu": CPU, "written": WRITTEN}


# -- the table -------------------------------------------------------------------------
def child(system: str, mb: int, runs: int, timeout: float, base_src: str = "") -> dict[str, Any]:
    """One system's run in a process of its own, bounded by ``timeout``
    ("fedexec-base": fedexec imported from ``base_src``, an older checkout's
    src directory; "fedexec-chunks": without the same-host path, every
    transfer in chunks as from another machine)."""
    env = None
    if system == "fedexec-base":
        system, env = "fedexec", {**os.environ, "PYTHONPATH": base_src}
    elif system == "fedexec-chunks":
        system, env = "fedexec", {**os.environ, "FEDEXEC_CHUNKS_ONLY": "1"}
    cmd = [sys.executable, __file__, "--one", system, "--mb", str(mb), "--runs", str(runs)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                             env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {out.returncode}: {tail[:200]}"}


def fmt_rss(rss: dict[str, list[int]]) -> str:
    parts = []
    for r, peaks in sorted(rss.items(), key=lambda kv: -kv[1][0]):
        many = f" ×{len(peaks)}" if len(peaks) > 1 else ""
        parts.append(f"{r}{many} {peaks[0] / 1e6:.0f}")
    return ", ".join(parts)


def fmt_cpu(rounds: list[dict[str, list[float]]]) -> str:
    """Mean CPU per round trip over the rounds, by role, and the total."""
    if not rounds:
        return ""
    summed: dict[str, list[float]] = {}
    for cpu in rounds:
        for name, (user, system) in cpu.items():
            acc = summed.setdefault(name, [0.0, 0.0])
            acc[0] += user / len(rounds)
            acc[1] += system / len(rounds)
    total = sum(u + s for u, s in summed.values())
    parts = [f"{name} {u:.2f}/{s:.2f}" for name, (u, s) in sorted(summed.items(), key=lambda kv: -sum(kv[1]))]
    return f"total {total:.2f}: " + ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[100], help="megabytes of the array (default 100)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=[*SYSTEMS, "fedexec-base", "fedexec-chunks"])
    parser.add_argument("--base-src", default="",
                        help="for system fedexec-base: the src directory of an older fedexec checkout")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds over all systems, alternating (the runs of all rounds are pooled)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one system's run may take")
    parser.add_argument("--out", help="also append the table (markdown) to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if "fedexec-base" in ns.systems and not ns.base_src:
        parser.error("system fedexec-base needs --base-src")
    if ns.one:
        print("RESULT " + json.dumps(run_system(ns.one, ns.mb[0], ns.runs)), flush=True)
        return
    lines = []
    for mb in ns.mb:
        results: dict[str, dict[str, Any]] = {s: {"times": [], "rss": {}, "cpu": [], "written": []}
                                              for s in ns.systems}
        for _ in range(ns.rounds):
            for system in ns.systems:
                got = child(system, mb, ns.runs, ns.timeout, ns.base_src)
                if "error" in got:
                    results[system]["error"] = got["error"]
                    continue
                results[system]["times"] += got["times"]
                results[system]["cpu"].append(got.get("cpu", {}))
                results[system]["written"] += got.get("written", [])
                for r, peaks in got["rss"].items():
                    old = results[system]["rss"].get(r, [])
                    results[system]["rss"][r] = peaks if not old or peaks[0] > old[0] else old
        base = statistics.median(results["ppe"]["times"]) if results.get("ppe", {}).get("times") else None
        lines.append(f"\n### {mb} MB float64 array, argument and result (`array + 1`), "
                     f"{ns.rounds} round(s) × {ns.runs} runs\n")
        lines.append("| system | median s | vs PPE | runs (s) | CPU s per trip, user/sys by process | "
                     "disk writeback MB per trip (machine-wide) | peak RSS by process (MB) |")
        lines.append("|---|---|---|---|---|---|---|")
        for system in ns.systems:
            res = results[system]
            if not res["times"]:
                lines.append(f"| {NAMES[system]} | — | — | {res.get('error', 'no result')} | | | |")
                continue
            median = statistics.median(res["times"])
            ratio = f"{median / base:.2f}×" if base else "—"
            runs = " ".join(f"{t:.2f}" for t in res["times"])
            written = " ".join(f"{w:.0f}" for w in res["written"])
            lines.append(f"| {NAMES[system]} | {median:.3f} | {ratio} | {runs} | {fmt_cpu(res['cpu'])} | "
                         f"{written} | {fmt_rss(res['rss'])} |")
        print("\n".join(lines[-(len(ns.systems) + 3):]), flush=True)
    if ns.out:
        with open(ns.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
