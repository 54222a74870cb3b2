"""The fedexec benchmark suite (issues 3 and 17): every comparison, side by side, in one run.

The full run of issue 17's table (about an hour on 2 cores; fedexec from this
checkout, the peers from a venv that has them)::

    PYTHONPATH=$PWD/src /work/main/.venv/bin/python benchmarks/run_all.py --runs 3 --million

    python benchmarks/run_all.py [--quick] [--runs 3] [--only JOB,...] [--out DIR] [--million]
                                 [--previous DIR|raw.json]

``--million`` adds the 1M-task rows (their own jobs, each a fresh process, so
the client's peak RSS is the map's own): ``list(map(noop, range(1_000_000)))``
with default settings for fedexec (embedded and CLI), ProcessPoolExecutor and
loky (client peak RSS and tasks/s), and the same map with
``max_in_flight=None``, so that nearly all of the million tasks wait at the
relay while the workers drain them (tasks/s with 1M queued). ``--previous``
names the results to compare with (default: the newest other
``results/<date>/raw.json``): the report's "what changed" table.

Needs the ``bench`` extra (``pip install -e ".[bench]"``: Parsl, Dask
distributed, matplotlib). Writes ``benchmarks/results/<date>.md`` (medians of
``--runs`` runs, ratios fedexec / peer) and PNG plots under
``benchmarks/results/<date>/``. ``--quick`` is a smoke run with small sizes and
one run by default; it writes ``<date>-quick.md`` and ``<date>-quick/``.

Peers: ``ProcessPoolExecutor(2)``; loky's reusable executor (2 workers; the
``loky`` package, else the copy joblib bundles); Ray (``ray.init(num_cpus=2)``
on 127.0.0.1, ``@ray.remote`` calls and ``ray.get``); Parsl's HighThroughputExecutor
(LocalProvider, one block, 2 workers) through ``python_app`` calls and through
the executor's own ``submit``; Dask ``LocalCluster(n_workers=2,
threads_per_worker=1, processes=True)`` through ``client.get_executor()`` and
``client.map``. fedexec runs its embedded default (private relay + local
endpoint, 2 workers) and, as ``fedexec-cli``, a relay and an endpoint started
from the command line (``python -m fedexec.relay`` with its durable record in
its own data dir, ``python -m fedexec.endpoint --max-workers 2``) on a
tcp://127.0.0.1 port, and, as ``fedexec-inside``, that relay with the
endpoint configured and run inside its process (``--endpoint``).

How it runs: each (run, job) pair is a child process (``--child JOB``) with a
time limit; the child sets up one system, runs its measurements and appends
JSON records to a file. Every process a child starts carries a token in its
environment, so when the child has ended, anything it left behind (a Parsl
worker pool, a Dask worker, a fedexec relay) is found, killed by pid and
reported in the results. Everything listens on loopback (fedexec's embedded
default uses ipc:// sockets).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import wait as cf_wait
from pathlib import Path
from typing import Any, Callable, Iterable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_tasks import identity, memo_task, noop, sleep_task  # noqa: E402

TOKEN_VAR = "FEDEXEC_BENCH_TOKEN"
RESULT_TIMEOUT = 120.0  # no single wait in a child lasts longer than this
MB = 1_000_000

SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "latency_calls": 1000,
        "warm_calls": 50,
        "tput_tasks": 100_000,
        "tput_fallback": 10_000,
        "cap_seconds": 180.0,  # a path that would take longer runs tput_fallback (sleep_fallback) tasks
        "sleep_tasks": 20_000,
        "sleep_fallback": 2_000,
        "hol_long": 5.0,   # head of line: one task this long, then hol_tiny no-ops beside it
        "hol_tiny": 200,
        "payload_sizes": [1 * MB, 10 * MB],
        "payload_calls": 10,
        "batching_tasks": 10_000,
        "prefetch_values": [0, 1, 2, 4, 8, 16],
        "prefetch_cells": [(0.0, 400), (0.001, 400), (0.010, 100), (0.100, 20)],
        "memo_tasks": 2000,
        "memo_shares": [0, 25, 50, 75, 100],
        "breakdown_calls": 1000,
        "million_tasks": 1_000_000,
        "million_job_timeout": 900.0,
        "peer_job_timeout": 1200.0,
        "fedexec_job_timeout": 600.0,
    },
    "quick": {
        "latency_calls": 200,
        "warm_calls": 20,
        "tput_tasks": 5_000,
        "tput_fallback": 1_000,
        "cap_seconds": 20.0,
        "sleep_tasks": 2_000,
        "sleep_fallback": 400,
        "hol_long": 2.0,
        "hol_tiny": 200,
        "payload_sizes": [1 * MB, 10 * MB],
        "payload_calls": 3,
        "batching_tasks": 1_000,
        "prefetch_values": [0, 1, 2, 4, 8, 16],
        "prefetch_cells": [(0.0, 100), (0.001, 100), (0.010, 20), (0.100, 4)],
        "memo_tasks": 400,
        "memo_shares": [0, 25, 50, 75, 100],
        "breakdown_calls": 200,
        "million_tasks": 20_000,
        "million_job_timeout": 300.0,
        "peer_job_timeout": 300.0,
        "fedexec_job_timeout": 240.0,
    },
}

# the order of a run: the four systems side by side, then fedexec's own experiments
JOBS = ["fedexec", "fedexec-cli", "fedexec-inside", "procpool", "loky", "ray", "parsl", "dask",
        "fedexec-batching", "fedexec-prefetch", "fedexec-memo", "fedexec-breakdown"]
SYSTEM_NAMES = {"fedexec": "fedexec (embedded)", "fedexec-cli": "fedexec (CLI relay + endpoint)",
                "fedexec-inside": "fedexec (CLI relay --endpoint)",
                "procpool": "ProcessPoolExecutor(2)", "loky": "loky(2)", "ray": "Ray (num_cpus=2)",
                "parsl": "Parsl HTEX", "dask": "Dask LocalCluster"}
# --million: one fresh process per row (the client's peak RSS is the map's own)
MILLION_JOBS = {"fedexec-1m": ("fedexec", {}), "fedexec-cli-1m": ("fedexec-cli", {}),
                "procpool-1m": ("procpool", {}), "loky-1m": ("loky", {}),
                "fedexec-1m-queued": ("fedexec", {"max_in_flight": None}),
                "fedexec-cli-1m-queued": ("fedexec-cli", {"max_in_flight": None}),
                "fedexec-inside-1m-queued": ("fedexec-inside", {"max_in_flight": None})}


# =============================================================================
# The child side: one system, its measurements, JSON records out
# =============================================================================

class Recorder:
    """Appends one JSON record per measured row to the child's output file."""

    def __init__(self, path: str, job: str) -> None:
        self.path = path
        self.job = job

    def add(self, measure: str, label: str, values: dict[str, Any], **extra: Any) -> None:
        record = {"job": self.job, "measure": measure, "label": label, "values": values, **extra}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        shown = ", ".join(f"{k}={v:,.4g}" if isinstance(v, (int, float)) else f"{k}={v}"
                          for k, v in values.items())
        print(f"    [{self.job}] {measure} | {label}: {shown}", flush=True)

    def error(self, measure: str, label: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"job": self.job, "measure": measure, "label": label, "error": msg}) + "\n")
        print(f"    [{self.job}] {measure} | {label}: FAILED {msg}", flush=True)
        traceback.print_exc()


def _wait_all(futures: list[Any], timeout: float) -> list[Any]:
    """Results of concurrent.futures futures, bounded in time; raises the first error."""
    done, not_done = cf_wait(futures, timeout=timeout)
    if not_done:
        raise TimeoutError(f"{len(not_done)} of {len(futures)} tasks not done within {timeout:g} s")
    return [f.result() for f in futures]


class System:
    """One system under test: how to make one synchronous call and how to run
    a function over many arguments, by each of the paths it offers."""

    name = ""
    #: label -> a function doing one synchronous no-op call
    roundtrip: dict[str, Callable[[], Any]]
    #: label -> (kind, run(fn, args) -> results); kind pairs it with fedexec's path of the same kind
    bulk: dict[str, tuple[str, Callable[[Callable[..., Any], list[Any]], list[Any]]]]
    #: the bulk path used for the sleep(1 ms) run
    sleep_path = ""
    #: one synchronous call of fn(arg): used for payloads
    call: Callable[[Callable[..., Any], Any], Any]
    #: submit(fn, arg) -> a concurrent.futures-like future: used for the head-of-line case
    submit: Callable[[Callable[..., Any], Any], Any]

    def __enter__(self) -> "System":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _executor_bulk(ex: Any, chunk: bool) -> dict[str, tuple[str, Callable]]:
    def submit_loop(fn: Callable, args: list[Any]) -> list[Any]:
        return _wait_all([ex.submit(fn, a) for a in args], RESULT_TIMEOUT * 5)

    def mapped(fn: Callable, args: list[Any]) -> list[Any]:
        return list(ex.map(fn, args, timeout=RESULT_TIMEOUT * 5))

    def chunked(fn: Callable, args: list[Any]) -> list[Any]:
        return list(ex.map(fn, args, timeout=RESULT_TIMEOUT * 5, chunksize=256))

    paths = {"submit loop": ("submit", submit_loop), "map": ("map", mapped)}
    if chunk:
        paths["map(chunksize=256)"] = ("chunk", chunked)
    return paths


class FedexecSystem(System):
    name = SYSTEM_NAMES["fedexec"]
    sleep_path = "map"

    def __init__(self, **kwargs: Any) -> None:
        from fedexec import FederatedExecutor

        if "endpoint_id" not in kwargs:
            kwargs["max_workers"] = 2   # the embedded default's pool (a CLI endpoint has its own)
        self.ex = FederatedExecutor(**kwargs)
        ex = self.ex
        self.roundtrip = {"submit": lambda: ex.submit(noop).result(RESULT_TIMEOUT)}
        self.bulk = _executor_bulk(ex, chunk=True)
        self.call = lambda fn, arg: ex.submit(fn, arg).result(RESULT_TIMEOUT)
        self.submit = ex.submit

    def __exit__(self, *exc: Any) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)


class FedexecCliSystem(FedexecSystem):
    """A relay (durable record in its own data dir) and an endpoint with 2
    workers, each started from the command line as its own process
    (head_of_line.CliFederation), on a tcp://127.0.0.1 port; the client is a
    FederatedExecutor naming that endpoint."""

    name = SYSTEM_NAMES["fedexec-cli"]

    inside = False

    def __init__(self, **kwargs: Any) -> None:
        from head_of_line import CliFederation

        self.workdir = tempfile.mkdtemp(prefix="fedexec-bench-cli-")
        self.federation = CliFederation(Path(self.workdir), inside=self.inside)
        try:
            super().__init__(endpoint_id=self.federation.endpoint_id, relay=self.federation.address, **kwargs)
        except BaseException:
            self.federation.close()
            raise

    def __exit__(self, *exc: Any) -> None:
        import shutil

        try:
            super().__exit__(*exc)
        finally:
            self.federation.close()
            shutil.rmtree(self.workdir, ignore_errors=True)


class FedexecInsideSystem(FedexecCliSystem):
    """As :class:`FedexecCliSystem`, the endpoint configured and run inside
    the relay's process (``fedexec relay start --endpoint``)."""

    name = SYSTEM_NAMES["fedexec-inside"]
    inside = True


class ProcessPoolSystem(System):
    name = SYSTEM_NAMES["procpool"]
    sleep_path = "map"

    def __init__(self) -> None:
        self.ex = ProcessPoolExecutor(2)
        ex = self.ex
        self.roundtrip = {"submit": lambda: ex.submit(noop).result(RESULT_TIMEOUT)}
        self.bulk = _executor_bulk(ex, chunk=True)
        self.call = lambda fn, arg: ex.submit(fn, arg).result(RESULT_TIMEOUT)
        self.submit = ex.submit

    def __exit__(self, *exc: Any) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)


class LokySystem(ProcessPoolSystem):
    """loky's reusable executor with 2 workers: the ``loky`` package when
    installed, else the copy joblib bundles (joblib.externals.loky)."""

    name = SYSTEM_NAMES["loky"]

    def __init__(self) -> None:
        try:
            from loky import get_reusable_executor
        except ImportError:
            from joblib.externals.loky import get_reusable_executor
        self.ex = get_reusable_executor(max_workers=2, timeout=None)
        ex = self.ex
        self.roundtrip = {"submit": lambda: ex.submit(noop).result(RESULT_TIMEOUT)}
        self.bulk = _executor_bulk(ex, chunk=True)
        self.call = lambda fn, arg: ex.submit(fn, arg).result(RESULT_TIMEOUT)
        self.submit = ex.submit

    def __exit__(self, *exc: Any) -> None:
        self.ex.shutdown(wait=True, kill_workers=True)


class RaySystem(System):
    """Ray on this machine: ``ray.init(num_cpus=2)`` on 127.0.0.1, no
    dashboard; each function a ``ray.remote`` task, results by ``ray.get``.
    Ray has no map: its bulk path is a loop of ``.remote()`` calls and one
    ``ray.get`` of all the references (paired with fedexec's submit loop)."""

    name = SYSTEM_NAMES["ray"]
    sleep_path = "remote calls + ray.get"

    def __init__(self) -> None:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 configure_logging=False)
        self.ray = ray
        remotes = {fn: ray.remote(fn) for fn in (noop, identity, sleep_task)}
        self.roundtrip = {"remote + ray.get": lambda: ray.get(remotes[noop].remote(), timeout=RESULT_TIMEOUT)}

        def calls(fn: Callable, args: list[Any]) -> list[Any]:
            remote = remotes[fn]
            return ray.get([remote.remote(a) for a in args], timeout=RESULT_TIMEOUT * 5)

        self.bulk = {"remote calls + ray.get": ("submit", calls)}
        self.call = lambda fn, arg: ray.get(remotes[fn].remote(arg), timeout=RESULT_TIMEOUT)
        self.submit = lambda fn, arg: remotes[fn].remote(arg).future()
        ray.get([remotes[noop].remote() for _ in range(4)], timeout=RESULT_TIMEOUT)   # both workers up

    def __exit__(self, *exc: Any) -> None:
        self.ray.shutdown()


class ParslSystem(System):
    """Parsl HighThroughputExecutor with a LocalProvider block of 2 workers.

    Loopback only (address and loopback_address 127.0.0.1); the message
    encryption HTEX turns on by default is off, as fedexec's embedded default
    does not encrypt either; no scaling strategy (one block for the whole run).
    Its interchange.py and process_worker_pool.py are found on PATH, which the
    parent sets to start with this interpreter's bin directory.
    """

    name = SYSTEM_NAMES["parsl"]
    sleep_path = "python_app calls"

    def __init__(self) -> None:
        import parsl
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor
        from parsl.providers import LocalProvider

        self.run_dir = tempfile.mkdtemp(prefix="fedexec-bench-parsl-")
        htex = HighThroughputExecutor(
            label="htex",
            address="127.0.0.1",
            loopback_address="127.0.0.1",
            max_workers_per_node=2,
            encrypted=False,
            provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
        )
        config = Config(executors=[htex], run_dir=self.run_dir, strategy="none", usage_tracking=0)
        self.dfk = parsl.load(config)
        self.htex = self.dfk.executors["htex"]
        apps = {fn: parsl.python_app(fn, executors=["htex"]) for fn in (noop, identity, sleep_task)}
        self.apps = apps
        htex_ = self.htex
        self.roundtrip = {
            "python_app": lambda: apps[noop]().result(RESULT_TIMEOUT),
            "executor.submit": lambda: htex_.submit(noop, {}).result(RESULT_TIMEOUT),
        }

        def app_calls(fn: Callable, args: list[Any]) -> list[Any]:
            app = apps[fn]
            return _wait_all([app(a) for a in args], RESULT_TIMEOUT * 5)

        def executor_submit(fn: Callable, args: list[Any]) -> list[Any]:
            return _wait_all([htex_.submit(fn, {}, a) for a in args], RESULT_TIMEOUT * 5)

        self.bulk = {"python_app calls": ("submit", app_calls), "executor.submit loop": ("submit", executor_submit)}
        self.call = lambda fn, arg: apps[fn](arg).result(RESULT_TIMEOUT)
        self.submit = lambda fn, arg: apps[fn](arg)
        # the block's workers take a few seconds to connect: wait for them here
        apps[noop]().result(RESULT_TIMEOUT)

    def __exit__(self, *exc: Any) -> None:
        import shutil

        import parsl

        try:
            self.dfk.cleanup()
        finally:
            parsl.clear()
            shutil.rmtree(self.run_dir, ignore_errors=True)


class DaskSystem(System):
    """Dask distributed LocalCluster: 2 worker processes, 1 thread each, on
    127.0.0.1, no dashboard. Tasks are submitted with pure=False (Dask would
    otherwise run identical no-op calls once)."""

    name = SYSTEM_NAMES["dask"]
    sleep_path = "client.map"

    def __init__(self) -> None:
        import logging
        import warnings

        from dask.distributed import Client, LocalCluster

        warnings.filterwarnings("ignore", message=".*Large object.*")  # the 10 MB payload, on purpose
        warnings.filterwarnings("ignore", message=".*large graph.*")
        self.cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                    dashboard_address=None, silence_logs=logging.ERROR)
        self.client = Client(self.cluster)
        client = self.client
        ex = client.get_executor(pure=False)
        self.ex = ex
        self.roundtrip = {"get_executor().submit": lambda: ex.submit(noop).result(RESULT_TIMEOUT)}

        def submit_loop(fn: Callable, args: list[Any]) -> list[Any]:
            return _wait_all([ex.submit(fn, a) for a in args], RESULT_TIMEOUT * 5)

        def client_map(fn: Callable, args: list[Any]) -> list[Any]:
            futures = client.map(fn, args, pure=False)
            try:
                return client.gather(futures)
            finally:
                client.cancel(futures)
                del futures

        self.bulk = {"get_executor().submit loop": ("submit", submit_loop), "client.map": ("map", client_map)}
        self.call = lambda fn, arg: ex.submit(fn, arg).result(RESULT_TIMEOUT)
        self.submit = ex.submit

    def __exit__(self, *exc: Any) -> None:
        try:
            self.client.close(timeout=30)
        finally:
            self.cluster.close(timeout=30)


SYSTEMS: dict[str, Callable[..., System]] = {
    "fedexec": FedexecSystem, "fedexec-cli": FedexecCliSystem, "fedexec-inside": FedexecInsideSystem,
    "procpool": ProcessPoolSystem,
    "loky": LokySystem, "ray": RaySystem, "parsl": ParslSystem, "dask": DaskSystem,
}


# -- measurements on any system -----------------------------------------------

def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def measure_latency(system: System, rec: Recorder, sizes: dict[str, Any]) -> None:
    """Warm round trip of a no-op: p50/p90/p99 over sequential calls."""
    for path, call in system.roundtrip.items():
        label = f"{system.name} {path}"
        try:
            for _ in range(sizes["warm_calls"]):
                call()
            lat = []
            for _ in range(sizes["latency_calls"]):
                t = time.perf_counter()
                call()
                lat.append(time.perf_counter() - t)
            lat.sort()
            rec.add("latency", label, {"p50_ms": _percentile(lat, 0.5) * 1e3, "p90_ms": _percentile(lat, 0.9) * 1e3,
                                       "p99_ms": _percentile(lat, 0.99) * 1e3, "calls": len(lat)},
                    system=system.name)
        except Exception as exc:
            rec.error("latency", label, exc)


def _timed_bulk(run: Callable, fn: Callable, args: list[Any]) -> float:
    t = time.perf_counter()
    results = run(fn, args)
    elapsed = time.perf_counter() - t
    if len(results) != len(args):
        raise RuntimeError(f"{len(results)} results for {len(args)} tasks")
    return elapsed


def _choose_count(run: Callable, fn: Callable, arg: Any, wanted: int, fallback: int, cap: float) -> tuple[int, str]:
    """Run a pilot (which also warms the path); fall back to fewer tasks when
    the wanted count would take longer than cap seconds."""
    pilot = max(200, min(1000, wanted // 10))
    elapsed = _timed_bulk(run, fn, [arg] * pilot)
    estimate = wanted * elapsed / pilot
    if estimate > cap:
        return fallback, f"{fallback:,} tasks: {wanted:,} would take ~{estimate:,.0f} s"
    return wanted, ""


def measure_throughput(system: System, rec: Recorder, sizes: dict[str, Any]) -> None:
    """No-op tasks per second through each bulk path."""
    for path, (kind, run) in system.bulk.items():
        label = f"{system.name} {path}"
        try:
            n, note = _choose_count(run, noop, 0, sizes["tput_tasks"], sizes["tput_fallback"], sizes["cap_seconds"])
            elapsed = _timed_bulk(run, noop, list(range(n)))
            rec.add("throughput", label, {"tasks_per_s": n / elapsed, "tasks": n, "seconds": elapsed},
                    system=system.name, kind=kind, note=note)
        except Exception as exc:
            rec.error("throughput", label, exc)


def measure_sleep(system: System, rec: Recorder, sizes: dict[str, Any]) -> None:
    """time.sleep(1 ms) tasks through the system's bulk path; ideal = n * 1 ms / 2 workers."""
    path = system.sleep_path
    kind, run = system.bulk[path]
    label = f"{system.name} {path}"
    try:
        n, note = _choose_count(run, sleep_task, 0.001, sizes["sleep_tasks"], sizes["sleep_fallback"],
                                sizes["cap_seconds"])
        elapsed = _timed_bulk(run, sleep_task, [0.001] * n)
        ideal = n * 0.001 / 2
        rec.add("sleep", label, {"tasks_per_s": n / elapsed, "tasks": n, "seconds": elapsed,
                                 "efficiency": ideal / elapsed}, system=system.name, kind=kind, note=note)
    except Exception as exc:
        rec.error("sleep", label, exc)


def measure_head_of_line(system: System, rec: Recorder, sizes: dict[str, Any]) -> None:
    """One long task, then (once it runs) tiny no-ops beside it, 2 workers:
    when is the last tiny one done (issue 17: < 0.5 s; they must not wait
    behind the long one while the other worker is free)."""
    from head_of_line import head_of_line

    label = f"{system.name} submit"
    try:
        values = head_of_line(system.submit, sizes["hol_long"], sizes["hol_tiny"])
        rec.add("hol", label, values, system=system.name)
    except Exception as exc:
        rec.error("hol", label, exc)


def measure_payload(system: System, rec: Recorder, sizes: dict[str, Any]) -> None:
    """A bytes argument returned by an identity function: median time of sequential calls."""
    for size in sizes["payload_sizes"]:
        label = f"{system.name} {size // MB} MB"
        try:
            data = os.urandom(size)
            back = system.call(identity, data)  # warm, and check it came back whole
            if back != data:
                raise RuntimeError("the payload came back different")
            del back
            times = []
            for _ in range(sizes["payload_calls"]):
                t = time.perf_counter()
                system.call(identity, data)
                times.append(time.perf_counter() - t)
            rec.add("payload", label, {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
                                       "calls": len(times)}, system=system.name, size_mb=size // MB)
        except Exception as exc:
            rec.error("payload", label, exc)


class _RssSampler:
    """Peak RSS of this process, and of everything it started (summed), sampled
    every 0.1 s on a thread until stopped."""

    def __init__(self) -> None:
        import psutil
        import threading

        self._me = psutil.Process()
        self.before = self._me.memory_info().rss
        self.peak = self.before
        self.children_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self._me.memory_info().rss)
            total = 0
            for child in self._me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.children_peak = max(self.children_peak, total)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._me.memory_info().rss)


def measure_million(system: System, rec: Recorder, sizes: dict[str, Any], queued: bool) -> None:
    """``for r in ex.map(noop, range(N))`` (N = 1M in full runs): tasks/s and
    the client's peak RSS (issue 17: <= 0.6 GB and not above
    ProcessPoolExecutor's). ``queued``: the executor has max_in_flight=None,
    so map() hands every task over at once and nearly all of them wait at the
    relay while the 2 workers drain them (issue 17: tasks/s with 1M queued)."""
    n = sizes["million_tasks"]
    label = (f"{system.name} map, max_in_flight=None (all queued at the relay)" if queued
             else f"{system.name} map, defaults")
    try:
        ex = system.ex  # type: ignore[attr-defined]
        list(ex.map(noop, range(1000)))   # warm
        sampler = _RssSampler()
        t = time.perf_counter()
        results = ex.map(noop, range(n), timeout=sizes["million_job_timeout"])
        returned = time.perf_counter() - t
        count = wrong = 0
        for value in results:
            count += 1
            wrong += value is not None
        elapsed = time.perf_counter() - t
        sampler.stop()
        if count != n or wrong:
            raise RuntimeError(f"{count} results for {n} tasks, {wrong} of them wrong")
        rec.add("million", label, {"tasks_per_s": n / elapsed, "tasks": n, "seconds": elapsed,
                                   "map_returned_s": returned, "client_peak_rss_mb": sampler.peak / 2**20,
                                   "client_rss_before_mb": sampler.before / 2**20,
                                   "children_peak_rss_mb": sampler.children_peak / 2**20},
                system=system.name, variant="queued" if queued else "defaults")
    except Exception as exc:
        rec.error("million", label, exc)


def run_million(job: str, rec: Recorder, sizes: dict[str, Any]) -> None:
    system_job, kwargs = MILLION_JOBS[job]
    try:
        system = SYSTEMS[system_job](**kwargs)
    except Exception as exc:
        rec.error("setup", job, exc)
        return
    with system:
        measure_million(system, rec, sizes, queued="max_in_flight" in kwargs)


PEER_MEASURES = [measure_latency, measure_throughput, measure_sleep, measure_head_of_line, measure_payload]


def run_system(job: str, rec: Recorder, sizes: dict[str, Any]) -> None:
    t = time.perf_counter()
    try:
        system = SYSTEMS[job]()
    except Exception as exc:
        rec.error("setup", SYSTEM_NAMES[job], exc)
        return
    rec.add("setup", SYSTEM_NAMES[job], {"start_s": time.perf_counter() - t})
    with system:
        for measure in PEER_MEASURES:
            measure(system, rec, sizes)


# -- fedexec's own experiments ------------------------------------------------

def _fedexec(**kwargs: Any) -> Any:
    from fedexec import FederatedExecutor

    return FederatedExecutor(max_workers=2, **kwargs)


def _warm(ex: Any, n: int) -> None:
    for _ in range(n):
        ex.submit(noop).result(RESULT_TIMEOUT)


def _complete(ex: Any, fn: Callable, args: Iterable[Any], check: bool = False) -> float:
    """Completion time of a submit loop over args; with check, each result
    must equal its argument (fn is an identity, e.g. memo_task)."""
    args = list(args)
    t = time.perf_counter()
    futures = [ex.submit(fn, a) for a in args]
    results = _wait_all(futures, RESULT_TIMEOUT * 5)
    elapsed = time.perf_counter() - t
    if check:
        wrong = sum(1 for a, r in zip(args, results) if tuple(r) != tuple(a))
        if wrong:
            raise RuntimeError(f"{wrong} of {len(args)} results differ from what the call should return")
    return elapsed


def measure_batching(rec: Recorder, sizes: dict[str, Any]) -> None:
    """No-op completion time with the defaults vs batching off everywhere."""
    n = sizes["batching_tasks"]
    for label, kwargs in [("batching on (defaults)", {}),
                          ("batching off (batch_size=1, worker_batch=1)", {"batch_size": 1, "worker_batch": 1})]:
        try:
            with _fedexec(**kwargs) as ex:
                _warm(ex, sizes["warm_calls"])
                elapsed = _complete(ex, noop, range(n))
            rec.add("batching", label, {"seconds": elapsed, "tasks_per_s": n / elapsed, "tasks": n})
        except Exception as exc:
            rec.error("batching", label, exc)


def measure_prefetch(rec: Recorder, sizes: dict[str, Any]) -> None:
    """Completion time per prefetch count and task duration."""
    for prefetch in sizes["prefetch_values"]:
        try:
            ex = _fedexec(prefetch=prefetch)
        except Exception as exc:
            rec.error("prefetch", f"prefetch={prefetch}", exc)
            continue
        with ex:
            _warm(ex, sizes["warm_calls"])
            for duration, n in sizes["prefetch_cells"]:
                label = f"prefetch={prefetch} task={duration * 1e3:g}ms"
                try:
                    elapsed = _complete(ex, sleep_task, [duration] * n)
                    rec.add("prefetch", label, {"seconds": elapsed, "tasks": n, "ideal_s": n * duration / 2},
                            prefetch=prefetch, task_ms=duration * 1e3)
                except Exception as exc:
                    rec.error("prefetch", label, exc)


def _memo_args(n: int, share: int, seed: int) -> list[Any]:
    """n calls of which share % repeat an earlier call's arguments, in a seeded
    random order (a repeat may be submitted before its original has run)."""
    rng = random.Random(seed)
    salt = uuid.uuid4().hex
    unique = max(1, n - round(n * share / 100))
    keys = list(range(unique)) + [rng.randrange(unique) for _ in range(n - unique)]
    rng.shuffle(keys)
    return [(salt, k) for k in keys]


def measure_memo(rec: Recorder, sizes: dict[str, Any]) -> None:
    """Completion time of n calls of a 1 ms function with 0..100 % repeated calls."""
    n = sizes["memo_tasks"]
    for share in sizes["memo_shares"]:
        label = f"memoize=True, {share}% repeated"
        try:
            args = _memo_args(n, share, seed=share)
            with _fedexec(memoize=True) as ex:
                _warm(ex, sizes["warm_calls"])
                elapsed = _complete(ex, memo_task, args, check=True)
            rec.add("memo", label, {"seconds": elapsed, "tasks": n, "unique": len(set(args))}, share=share,
                    variant="executor")
        except Exception as exc:
            rec.error("memo", label, exc)
    # the per-function way: fedexec.memoized(fn) on an executor without memoize
    for share in (0, 100):
        label = f"memoized(fn), {share}% repeated"
        try:
            import fedexec

            fn = fedexec.memoized(memo_task)
            args = _memo_args(n, share, seed=share)
            with _fedexec() as ex:
                _warm(ex, sizes["warm_calls"])
                elapsed = _complete(ex, fn, args, check=True)
            rec.add("memo", label, {"seconds": elapsed, "tasks": n, "unique": len(set(args))}, share=share,
                    variant="decorator")
        except Exception as exc:
            rec.error("memo", label, exc)


STAGES = [  # (name, from key, to key), as in the funcX paper's breakdown
    ("client->relay", "submit", "relay_in"),
    ("relay", "relay_in", "relay_out"),
    ("relay->endpoint", "relay_out", "endpoint_in"),
    ("endpoint queue", "endpoint_in", "worker_in"),
    ("endpoint->worker", "worker_in", "start"),
    ("execution", "start", "end"),
    ("return", "end", "done"),
]
RETURN_SUBSTAGES = [  # where the return leg goes, when the keys are there
    ("  worker->endpoint", "end", "endpoint_out"),
    ("  endpoint->relay", "endpoint_out", "relay_result"),
    ("  relay->client", "relay_result", "done"),
]


def measure_breakdown(rec: Recorder, sizes: dict[str, Any]) -> None:
    """Median time per stage of sequential no-ops, from fut.fedexec_timings (trace=True)."""
    label = "trace=True"
    try:
        with _fedexec(trace=True) as ex:
            _warm(ex, sizes["warm_calls"])
            rows: list[dict[str, float]] = []
            rtts = []
            for _ in range(sizes["breakdown_calls"]):
                t = time.perf_counter()
                fut = ex.submit(noop)
                fut.result(RESULT_TIMEOUT)
                rtts.append(time.perf_counter() - t)
                rows.append(dict(getattr(fut, "fedexec_timings")))
    except Exception as exc:
        rec.error("breakdown", label, exc)
        return
    values: dict[str, Any] = {}
    missing = set()
    for name, a, b in STAGES + RETURN_SUBSTAGES + [("total (done - submit)", "submit", "done")]:
        deltas = [(r[b] - r[a]) * 1e3 for r in rows if r.get(a) is not None and r.get(b) is not None]
        if deltas:
            values[name] = statistics.median(deltas)
        else:
            missing.update(k for k in (a, b) if any(r.get(k) is None for r in rows))
    values["round trip (perf_counter)"] = statistics.median(rtts) * 1e3
    rec.add("breakdown", label, values, calls=len(rows), missing=sorted(missing))


FEDEXEC_JOBS: dict[str, Callable[[Recorder, dict[str, Any]], None]] = {
    "fedexec-batching": measure_batching, "fedexec-prefetch": measure_prefetch,
    "fedexec-memo": measure_memo, "fedexec-breakdown": measure_breakdown,
}


def child_main(job: str, out: str, quick: bool) -> int:
    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")  # so the cleanups in finally/with run

    signal.signal(signal.SIGTERM, on_term)
    sizes = dict(SIZES["quick" if quick else "full"])
    if os.environ.get("FEDEXEC_BENCH_MILLION_TASKS"):
        sizes["million_tasks"] = int(os.environ["FEDEXEC_BENCH_MILLION_TASKS"])
    rec = Recorder(out, job)
    if job in SYSTEMS:
        run_system(job, rec, sizes)
    elif job in MILLION_JOBS:
        run_million(job, rec, sizes)
    else:
        FEDEXEC_JOBS[job](rec, sizes)
    return 0


# =============================================================================
# The parent side: runs the children, then writes the tables and plots
# =============================================================================

def _token_processes(token: str) -> list[Any]:
    import psutil

    found = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(TOKEN_VAR) == token:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _reap_leftovers(token: str, grace: float = 5.0) -> list[str]:
    """Kill (by pid) whatever the child's job left running; say what it was."""
    import psutil

    deadline = time.monotonic() + grace
    while True:
        procs = _token_processes(token)
        if not procs or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    described = []
    for proc in procs:
        try:
            described.append(f"pid {proc.pid}: {' '.join(proc.cmdline())[:120]}")
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return described


def run_job(job: str, run: int, quick: bool, workdir: Path, timeout: float | None = None) -> list[dict[str, Any]]:
    sizes = SIZES["quick" if quick else "full"]
    timeout = timeout or (sizes["peer_job_timeout"] if job in SYSTEMS else
                          sizes["million_job_timeout"] + 120 if job in MILLION_JOBS else sizes["fedexec_job_timeout"])
    out = workdir / f"run{run}-{job}.jsonl"
    token = uuid.uuid4().hex
    env = dict(os.environ)
    env[TOKEN_VAR] = token
    # Parsl starts interchange.py and process_worker_pool.py by name: this venv's bin first
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", job, "--child-out", str(out)]
    if quick:
        cmd.append("--quick")
    print(f"  run {run + 1}: {job} (limit {timeout:.0f} s)", flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
    problem = ""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        problem = f"timed out after {timeout:.0f} s"
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        _reap_leftovers(token)
        raise
    if proc.returncode and not problem:
        problem = f"exited with code {proc.returncode}"
    leftovers = _reap_leftovers(token)
    records = []
    if out.exists():
        records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    for r in records:
        r["run"] = run
    meta = {"job": job, "run": run, "measure": "_job", "seconds": time.perf_counter() - t,
            "problem": problem, "leftovers": leftovers}
    print(f"  run {run + 1}: {job} took {meta['seconds']:.1f} s" + (f" -- {problem}" if problem else "") +
          (f" -- killed {len(leftovers)} leftover processes" if leftovers else ""), flush=True)
    return records + [meta]


# -- aggregation --------------------------------------------------------------

def _median_rows(records: list[dict[str, Any]], measure: str) -> dict[str, dict[str, Any]]:
    """label -> {values: medians, runs: per-run values, notes, errors, extra fields}"""
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("measure") != measure:
            continue
        row = rows.setdefault(r["label"], {"per_run": [], "notes": [], "errors": [], "extra": {}})
        if "error" in r:
            row["errors"].append(r["error"])
            continue
        row["per_run"].append(r["values"])
        if r.get("note"):
            row["notes"].append(r["note"])
        for k, v in r.items():
            if k not in ("job", "measure", "label", "values", "note", "run", "error"):
                row["extra"][k] = v
    for row in rows.values():
        keys = {k for v in row["per_run"] for k, x in v.items() if isinstance(x, (int, float))}
        row["values"] = {k: statistics.median(v[k] for v in row["per_run"] if k in v) for k in keys}
    return rows


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}" if digits < 2 else f"{x:.1f}"
    return f"{x:.{digits}f}"


def _cell(row: dict[str, Any] | None, key: str, digits: int = 2) -> str:
    if row is None:
        return "–"
    if key in row.get("values", {}):
        return _fmt(row["values"][key], digits)
    if row.get("errors"):
        return "error"
    return "–"


def _runs_note(row: dict[str, Any]) -> str:
    parts = []
    if row["errors"]:
        parts.append(f"{len(row['errors'])} run(s) failed: {row['errors'][0]}")
    if row["notes"]:
        parts.append(sorted(set(row["notes"]))[0])
    return "; ".join(parts)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "–"
    if a is b:
        return "(ref)"
    r = a / b
    return f"{r:.3g}"


def _get(rows: dict[str, dict[str, Any]], label: str, key: str) -> float | None:
    row = rows.get(label)
    return None if row is None else row.get("values", {}).get(key)


def build_report(records: list[dict[str, Any]], ns: argparse.Namespace, started: datetime.datetime,
                 wall: float, plot_dir: Path, md_path: Path) -> tuple[str, dict[str, Any]]:
    sizes = dict(SIZES["quick" if ns.quick else "full"])
    if ns.million_tasks:
        sizes["million_tasks"] = ns.million_tasks
    F = SYSTEM_NAMES["fedexec"]
    out: list[str] = []
    add = out.append
    title = "fedexec benchmark suite" + (" (quick smoke run: small sizes, not for the record)" if ns.quick else "")
    add(f"# {title}, {started.date()}")
    add("")
    add(f"`python benchmarks/run_all.py{' --quick' if ns.quick else ''} --runs {ns.runs}"
        f"{' --million' if ns.million else ''}"
        f"{f' --million-tasks {ns.million_tasks}' if ns.million_tasks else ''}"
        f"{' --only ' + ns.only if ns.only else ''}` — started "
        f"{started:%Y-%m-%d %H:%M}, took {wall / 60:.1f} min. Every number is the **median of {ns.runs} run(s)**; "
        "in each run the systems are measured one after the other, each in a fresh process with a fresh "
        "executor/cluster.")
    add("")
    add(_environment())
    add("")
    add("Ratios are fedexec / peer: for times and latencies **below 1 means fedexec is faster**, for tasks/s "
        "**above 1 means fedexec is faster**. Plots: " +
        ", ".join(f"[{p.name}]({plot_dir.name}/{p.name})" for p in sorted(plot_dir.glob("*.png"))) + ".")
    add("")
    summary: dict[str, Any] = {}
    measured = {r.get("measure") for r in records}
    sections: list[tuple[int, str]] = []  # (line index, measure): a section without records is left out

    def section(measure: str) -> None:
        sections.append((len(out), measure))

    # latency
    section("latency")
    lat = _median_rows(records, "latency")
    f_p50 = _get(lat, f"{F} submit", "p50_ms")
    add(f"## Warm round trip of a no-op ({sizes['latency_calls']:,} sequential calls after "
        f"{sizes['warm_calls']} warm-up calls)")
    add("")
    add("| system, path | p50 ms | p90 ms | p99 ms | fedexec p50 / this p50 | notes |")
    add("|---|---|---|---|---|---|")
    for label, row in lat.items():
        add(f"| {label} | {_cell(row, 'p50_ms', 3)} | {_cell(row, 'p90_ms', 3)} | {_cell(row, 'p99_ms', 3)} | "
            f"{_ratio(f_p50, row['values'].get('p50_ms'))} | {_runs_note(row)} |")
    add("")
    summary["latency"] = lat

    # throughput
    section("throughput")
    tput = _median_rows(records, "throughput")
    fed_kind = {row["extra"].get("kind"): row["values"].get("tasks_per_s")
                for label, row in tput.items() if label.startswith(F)}
    add(f"## Throughput: no-op tasks ({sizes['tput_tasks']:,} per path; a path that would take more than "
        f"{sizes['cap_seconds']:.0f} s runs {sizes['tput_fallback']:,}, see notes)")
    add("")
    add("Each path is first warmed by a pilot of up to 1,000 tasks. The ratio pairs each path with fedexec's "
        "path of the same kind (submit loop / app calls with fedexec's submit loop, `map`/`client.map` with "
        "fedexec's `map`, chunksize with chunksize).")
    add("")
    add("| system, path | tasks | tasks/s | seconds | fedexec / this (tasks/s) | notes |")
    add("|---|---|---|---|---|---|")
    for label, row in tput.items():
        kind = row["extra"].get("kind")
        add(f"| {label} | {_cell(row, 'tasks', 0)} | {_cell(row, 'tasks_per_s', 0)} | {_cell(row, 'seconds', 2)} | "
            f"{_ratio(fed_kind.get(kind), row['values'].get('tasks_per_s'))} | {_runs_note(row)} |")
    add("")

    section("sleep")
    sleep = _median_rows(records, "sleep")
    fed_sleep = next((row["values"].get("seconds") for label, row in sleep.items() if label.startswith(F)), None)
    fed_sleep_rate = next((row["values"].get("tasks_per_s") for label, row in sleep.items()
                           if label.startswith(F)), None)
    add(f"## Throughput: `time.sleep(0.001)` tasks ({sizes['sleep_tasks']:,}; ideal with 2 workers = "
        f"{sizes['sleep_tasks'] * 0.001 / 2:g} s)")
    add("")
    add("| system, path | tasks | seconds | tasks/s | efficiency (ideal / actual) | fedexec / this (tasks/s) | notes |")
    add("|---|---|---|---|---|---|---|")
    for label, row in sleep.items():
        add(f"| {label} | {_cell(row, 'tasks', 0)} | {_cell(row, 'seconds')} | {_cell(row, 'tasks_per_s', 0)} | "
            f"{_cell(row, 'efficiency')} | {_ratio(fed_sleep_rate, row['values'].get('tasks_per_s'))} | "
            f"{_runs_note(row)} |")
    add("")
    del fed_sleep

    section("hol")
    hol = _median_rows(records, "hol")
    add(f"## Head of line: one {sizes['hol_long']:g} s task, then {sizes['hol_tiny']} no-ops beside it "
        "(2 workers; seconds from the first no-op's submit)")
    add("")
    add("| system, path | last no-op done (s) | no-ops done after 1 s | notes |")
    add("|---|---|---|---|")
    for label, row in hol.items():
        add(f"| {label} | {_cell(row, 'last_tiny_s', 3)} | {_cell(row, 'tiny_over_1s', 0)} | {_runs_note(row)} |")
    add("")

    # payloads
    section("payload")
    pay = _median_rows(records, "payload")
    add(f"## Payloads: a bytes argument returned by an identity function (median of {sizes['payload_calls']} "
        "sequential calls, after one warm call)")
    add("")
    systems = []
    for label in pay:
        name = label.rsplit(" ", 2)[0]
        if name not in systems:
            systems.append(name)
    size_list = [s // MB for s in sizes["payload_sizes"]]
    add("| system | " + " | ".join(f"{s} MB ms | fedexec / this" for s in size_list) + " | notes |")
    add("|---|" + "---|---|" * len(size_list) + "---|")
    for name in systems:
        cells, notes = [], []
        for s in size_list:
            row = pay.get(f"{name} {s} MB")
            fed = _get(pay, f"{F} {s} MB", "median_ms")
            cells.append(f"{_cell(row, 'median_ms')} | {_ratio(fed, (row or {}).get('values', {}).get('median_ms'))}")
            if row and _runs_note(row):
                notes.append(f"{s} MB: {_runs_note(row)}")
        add(f"| {name} | " + " | ".join(cells) + f" | {'; '.join(notes)} |")
    add("")

    # batching
    section("batching")
    bat = _median_rows(records, "batching")
    on = _get(bat, "batching on (defaults)", "seconds")
    off = _get(bat, "batching off (batch_size=1, worker_batch=1)", "seconds")
    add(f"## fedexec: batching on vs off ({sizes['batching_tasks']:,} no-ops, submit loop, completion time)")
    add("")
    add("| configuration | seconds | tasks/s | notes |")
    add("|---|---|---|---|")
    for label, row in bat.items():
        add(f"| {label} | {_cell(row, 'seconds', 3)} | {_cell(row, 'tasks_per_s', 0)} | {_runs_note(row)} |")
    add(f"| **off / on** | **{_ratio(off, on)}×** | | |")
    add("")

    # prefetch
    section("prefetch")
    pre = _median_rows(records, "prefetch")
    cells = sizes["prefetch_cells"]
    add("## fedexec: prefetch per worker (completion time in seconds; all tasks submitted at once)")
    add("")
    add("| prefetch | " + " | ".join(f"{d * 1e3:g} ms × {n}" for d, n in cells) + " |")
    add("|---|" + "---|" * len(cells))
    add("| *ideal (2 workers)* | " + " | ".join(f"*{n * d / 2:.3g}*" for d, n in cells) + " |")
    for p in sizes["prefetch_values"]:
        add(f"| {p} | " + " | ".join(_cell(pre.get(f"prefetch={p} task={d * 1e3:g}ms"), "seconds", 3)
                                      for d, _ in cells) + " |")
    errs = sorted({e for row in pre.values() for e in row["errors"]})
    if errs:
        add("")
        add(f"Errors: {errs[0]}")
    add("")

    # memoization
    section("memo")
    memo = _median_rows(records, "memo")
    add(f"## fedexec: memoization ({sizes['memo_tasks']:,} calls of a 1 ms function, submitted at once, "
        "completion time)")
    add("")
    add("A repeated call has the same arguments as an earlier one; calls are in a seeded random order, so a "
        "repeat may be submitted before the call it repeats has finished.")
    add("")
    add("| configuration | distinct calls | seconds | time / time at 0 % | notes |")
    add("|---|---|---|---|---|")
    zero = _get(memo, "memoize=True, 0% repeated", "seconds")
    for label, row in memo.items():
        base = zero if row["extra"].get("variant") == "executor" else _get(memo, "memoized(fn), 0% repeated",
                                                                           "seconds")
        add(f"| {label} | {_cell(row, 'unique', 0)} | {_cell(row, 'seconds', 3)} | "
            f"{_ratio(row['values'].get('seconds'), base)} | {_runs_note(row)} |")
    hundred = _get(memo, "memoize=True, 100% repeated", "seconds")
    add(f"| **0 % / 100 % (speed-up)** | | **{_ratio(zero, hundred)}×** | | |")
    add("")

    # breakdown
    section("breakdown")
    brk = _median_rows(records, "breakdown")
    add(f"## fedexec: latency breakdown per stage (trace=True, {sizes['breakdown_calls']:,} sequential no-ops, "
        "median per stage, ms)")
    add("")
    row = brk.get("trace=True")
    if row and row["values"]:
        add("| stage | median ms |")
        add("|---|---|")
        for name, _, _ in STAGES + RETURN_SUBSTAGES + [("total (done - submit)", "", ""),
                                                       ("round trip (perf_counter)", "", "")]:
            if name in row["values"]:
                add(f"| {name.strip() if not name.startswith('  ') else '&nbsp;&nbsp;' + name.strip()} | "
                    f"{row['values'][name]:.3f} |")
        if row["extra"].get("missing"):
            add("")
            add(f"Timestamps missing from `fedexec_timings`: {', '.join(row['extra']['missing'])}.")
        add("")
        add("Stages are differences of `time.time()` stamps taken in different processes on one machine. "
            "The stages sum to the total; the median of each stage is shown, so medians need not add up exactly.")
    else:
        add(f"Not measured: {_runs_note(row) if row else 'no records'}")
    add("")

    # targets
    section("_targets")
    add("## Targets of issue 3")
    add("")
    add("| target | measured | met |")
    add("|---|---|---|")

    def target(what: str, measured: str, ok: bool | None) -> None:
        add(f"| {what} | {measured} | {'–' if ok is None else ('yes' if ok else '**no**')} |")

    target("warm round trip p50 ≤ 1.0 ms", f"{_fmt(f_p50, 3)} ms", None if f_p50 is None else f_p50 <= 1.0)
    fmap, fsub = fed_kind.get("map"), fed_kind.get("submit")
    target("≥ 50,000 no-op tasks/s through `map`", f"{_fmt(fmap, 0)}/s", None if fmap is None else fmap >= 50000)
    target("≥ 20,000 no-op tasks/s through a submit loop", f"{_fmt(fsub, 0)}/s",
           None if fsub is None else fsub >= 20000)
    for peer in (SYSTEM_NAMES["parsl"], SYSTEM_NAMES["dask"]):
        ratios = [fed_kind.get(row["extra"].get("kind"), 0) / row["values"]["tasks_per_s"]
                  for label, row in tput.items() if label.startswith(peer) and row["values"].get("tasks_per_s")
                  and fed_kind.get(row["extra"].get("kind"))]
        worst = min(ratios) if ratios else None
        target(f"≥ 20× the throughput of {peer} (every path, paired by kind)",
               f"{_fmt(worst, 1)}× (worst path)" if worst else "–", None if worst is None else worst >= 20)
        p50s = [row["values"]["p50_ms"] for label, row in lat.items() if label.startswith(peer)
                and "p50_ms" in row["values"]]
        best = min(p50s) if p50s else None
        target(f"lower p50 latency than {peer}", f"{_fmt(f_p50, 3)} vs {_fmt(best, 3)} ms (its best path)",
               None if best is None or f_p50 is None else f_p50 < best)
    for s, limit in ((10, 40.0), (1, 5.0)):
        v = _get(pay, f"{F} {s} MB", "median_ms")
        target(f"{s} MB argument returned in ≤ {limit:g} ms", f"{_fmt(v)} ms", None if v is None else v <= limit)
    br = None if on is None or off is None else off / on
    target("batching ≥ 15× faster than unbatched (10,000 no-ops)", f"{_fmt(br, 1)}×", None if br is None else br >= 15)
    mr = None if zero is None or hundred is None else zero / hundred
    target("memoized 100 %-repeat run ≥ 20× faster than 0 %", f"{_fmt(mr, 1)}×", None if mr is None else mr >= 20)
    add("")

    issue17_sections(records, ns, sizes, add, section)

    # housekeeping
    section("_runs")
    measured |= {"_targets", "_runs", "_ratios", "_targets17", "_changed"}
    kept: list[str] = out[:sections[0][0]] if sections else out
    for i, (start, measure) in enumerate(sections):
        end = sections[i + 1][0] if i + 1 < len(sections) else len(out)
        if measure in measured:
            kept.extend(out[start:end])
    out[:] = kept
    add = out.append
    jobs = [r for r in records if r.get("measure") == "_job"]
    add("## Runs")
    add("")
    add("| job | seconds per run | problems | leftover processes killed after it |")
    add("|---|---|---|---|")
    for job in JOBS + list(MILLION_JOBS):
        js = [r for r in jobs if r["job"] == job]
        if not js:
            continue
        secs = " / ".join(f"{r['seconds']:.0f}" for r in js)
        problems = "; ".join(sorted({r["problem"] for r in js if r["problem"]}))
        left = [x for r in js for x in r["leftovers"]]
        add(f"| {job} | {secs} | {problems or '–'} | {len(left)}{': ' + left[0] if left else ''} |")
    setup = _median_rows(records, "setup")
    if setup:
        add("")
        add("Start-up (constructor until ready, median): " +
            ", ".join(f"{label} {_cell(row, 'start_s')} s" for label, row in setup.items()) + ".")
    add("")
    add(f"Raw records (every run): `{plot_dir.name}/raw.json`.")
    add("")
    return "\n".join(out), summary


# (measure, value key, what it is, True when higher is better) for the ratio and "what changed" tables
KEY_ROWS = [("latency", "p50_ms", "warm round trip p50 (ms)", False),
            ("latency", "p99_ms", "warm round trip p99 (ms)", False),
            ("throughput", "tasks_per_s", "no-op tasks/s", True),
            ("sleep", "efficiency", "sleep(1 ms) efficiency", True),
            ("hol", "last_tiny_s", "head of line: last tiny done (s)", False),
            ("payload", "median_ms", "payload round trip (ms)", False),
            ("million", "tasks_per_s", "--million map tasks/s", True),
            ("million", "client_peak_rss_mb", "--million map client peak RSS (MiB)", False)]


def _system_rows(records: list[dict[str, Any]], measure: str, key: str) -> dict[str, dict[str, float]]:
    """system name -> {label suffix (path) -> median of key}."""
    out: dict[str, dict[str, float]] = {}
    for label, row in _median_rows(records, measure).items():
        system = row["extra"].get("system")
        if system is None or key not in row["values"]:
            continue
        out.setdefault(system, {})[label[len(system):].strip() or "-"] = row["values"][key]
    return out


def _paired(rows: dict[str, float], fed: dict[str, float], kinds: dict[str, str],
            fed_kinds: dict[str, str]) -> list[tuple[str, float, float]]:
    """(path, fedexec value, peer value) pairs: same path name, else same
    kind, else (a measure with one path per system, e.g. the round trip) the
    only path of each."""
    pairs = []
    for path, value in rows.items():
        if path in fed:
            pairs.append((path, fed[path], value))
            continue
        kind = kinds.get(path)
        match = next((p for p, k in fed_kinds.items() if kind is not None and k == kind and p in fed), None)
        if match is None and kind is None and len(fed_kinds) == 1 and path not in fed_kinds:
            match = next(iter(fed))
        if match is not None:
            pairs.append((f"{path} vs {match}", fed[match], value))
    return pairs


def _load_previous(ns: argparse.Namespace, out_dir: Path, stem: str) -> tuple[list[dict[str, Any]], str]:
    """The records of the results to compare with, and where they came from."""
    path: Path | None = Path(ns.previous) if ns.previous else None
    if path is None:
        found = sorted((p for p in out_dir.glob("*/raw.json") if p.parent.name != stem and "quick" not in
                        p.parent.name), key=lambda p: p.parent.name)
        path = found[-1] if found else None
    elif path.is_dir():
        path = path / "raw.json"
    if path is None or not path.exists():
        return [], ""
    note = str(path)
    md = path.parent.parent / f"{path.parent.name}.md"
    if md.exists():
        import re

        commit = re.search(r"fedexec commit (\w+)", md.read_text())
        if commit:
            note += f" (fedexec commit {commit.group(1)})"
    return json.loads(path.read_text()), note


def issue17_sections(records: list[dict[str, Any]], ns: argparse.Namespace, sizes: dict[str, Any],
                     add: Callable[[str], None], section: Callable[[str], None]) -> None:
    """The 1M rows, the ratios of fedexec (embedded and CLI) against every
    peer, issue 17's targets, and what changed since the previous results."""
    F, C, PPE = SYSTEM_NAMES["fedexec"], SYSTEM_NAMES["fedexec-cli"], SYSTEM_NAMES["procpool"]
    I = SYSTEM_NAMES["fedexec-inside"]
    section("million")
    mil = _median_rows(records, "million")
    add(f"## {sizes['million_tasks']:,} no-op tasks through `map` (`--million`; each row a fresh process)")
    add("")
    add("`for r in ex.map(noop, range(N))`. *defaults*: the executor as constructed by default (fedexec: "
        "max_in_flight=100,000). *max_in_flight=None*: every task is handed over at once and waits at the relay "
        "while the workers drain them. Client peak RSS: this process, sampled every 0.1 s; started processes: the "
        "sum over everything the client process started (workers; the relay and endpoint for fedexec).")
    add("")
    add("| system, path | tasks/s | seconds | map() returned after (s) | client peak RSS MiB | client RSS before "
        "MiB | started processes' peak RSS MiB | notes |")
    add("|---|---|---|---|---|---|---|---|")
    for label, row in mil.items():
        add(f"| {label} | {_cell(row, 'tasks_per_s', 0)} | {_cell(row, 'seconds')} | "
            f"{_cell(row, 'map_returned_s')} | {_cell(row, 'client_peak_rss_mb', 0)} | "
            f"{_cell(row, 'client_rss_before_mb', 0)} | {_cell(row, 'children_peak_rss_mb', 0)} | "
            f"{_runs_note(row)} |")
    add("")

    # ratios of fedexec (embedded, CLI) against each peer, paired by path name or kind
    section("_ratios")
    add("## Ratios against each peer (medians; fedexec / peer)")
    add("")
    add("Tasks/s and efficiency: above 1 means fedexec is better. Times, latencies and RSS: below 1 means fedexec "
        "is better. Throughput paths are paired by kind (submit loops with fedexec's submit loop, maps with its "
        "map).")
    add("")
    peers = [n for k, n in SYSTEM_NAMES.items() if not k.startswith("fedexec")]
    add("| measure | path | " + " | ".join(f"embedded / {p} | CLI / {p}" for p in peers) + " |")
    add("|---|---|" + "---|---|" * len(peers))
    for measure, key, what, _higher in KEY_ROWS:
        by_system = _system_rows(records, measure, key)
        kinds = {label: row["extra"].get("kind") for label, row in _median_rows(records, measure).items()}
        fed, cli = by_system.get(F, {}), by_system.get(C, {})
        for path in fed:
            cells = []
            for peer in peers:
                prow = by_system.get(peer, {})
                pk = {p: kinds.get(f"{peer} {p}") for p in prow}
                fk = {p: kinds.get(f"{F} {p}") for p in fed}
                mine = [(pp, fv, v) for pp, fv, v in _paired(prow, {path: fed[path]}, pk, fk)]
                ck = {p: kinds.get(f"{C} {p}") for p in cli}
                theirs = [(pp, cv, v) for pp, cv, v in _paired(prow, {path: cli[path]} if path in cli else {}, pk, ck)]
                cells.append(" ".join(f"{fv / v:.3g}" for _, fv, v in mine if v) or "–")
                cells.append(" ".join(f"{cv / v:.3g}" for _, cv, v in theirs if v) or "–")
            add(f"| {what} | {path} | " + " | ".join(cells) + " |")
    add("")

    # issue 17's targets
    section("_targets17")
    add("## Targets of issue 17 (targets are for the issue's machine; this machine is ~1.7× slower per task, so "
        "the ratio to ProcessPoolExecutor in the same run is shown too)")
    add("")
    add("CLI: the relay and the endpoint as two processes; CLI --endpoint: the endpoint inside the relay's process. "
        "Their ratio to the embedded default: how many times worse (target ≤ 1.3×).")
    add("")
    add("| target | embedded | CLI | CLI / embedded | CLI --endpoint | --endpoint / embedded | "
        "ProcessPoolExecutor(2) | met (embedded, CLI, --endpoint) |")
    add("|---|---|---|---|---|---|---|---|")
    lat = _median_rows(records, "latency")
    tput = _median_rows(records, "throughput")
    sleep = _median_rows(records, "sleep")
    hol = _median_rows(records, "hol")

    def v(rows: dict[str, dict[str, Any]], label: str, key: str) -> float | None:
        return _get(rows, label, key)

    def verdict(x: float | None, ok: Callable[[float], bool]) -> str:
        return "–" if x is None else ("yes" if ok(x) else "**no**")

    def worse(e: float | None, c: float | None, higher: bool) -> str:
        ratio = None if e is None or c is None or not e or not c else (e / c if higher else c / e)
        return "–" if ratio is None else f"{ratio:.2f}× " + ("ok" if ratio <= 1.3 else "**no**")

    def row(what: str, rows: dict[str, dict[str, Any]], label: str, key: str, p: float | None,
            ok: Callable[[float], bool], higher: bool, digits: int = 2) -> None:
        """One target: ``label`` (a path) of the embedded, CLI and --endpoint systems in ``rows``."""
        e, c, i = (v(rows, f"{system} {label}", key) for system in (F, C, I))
        add(f"| {what} | {_fmt(e, digits)} | {_fmt(c, digits)} | {worse(e, c, higher)} | {_fmt(i, digits)} | "
            f"{worse(e, i, higher)} | {_fmt(p, digits)} | {verdict(e, ok)}, {verdict(c, ok)}, {verdict(i, ok)} |")

    row("warm round trip p50 ≤ 0.8 ms", lat, "submit", "p50_ms", v(lat, f"{PPE} submit", "p50_ms"),
        lambda x: x <= 0.8, False, 3)
    row("warm round trip p99 ≤ 1.5 ms", lat, "submit", "p99_ms", v(lat, f"{PPE} submit", "p99_ms"),
        lambda x: x <= 1.5, False, 3)
    row("`map` ≥ 50,000 no-op tasks/s", tput, "map", "tasks_per_s", v(tput, f"{PPE} map", "tasks_per_s"),
        lambda x: x >= 50000, True, 0)
    row("submit loop ≥ 35,000 tasks/s", tput, "submit loop", "tasks_per_s",
        v(tput, f"{PPE} submit loop", "tasks_per_s"), lambda x: x >= 35000, True, 0)
    ppe_eff = v(sleep, f"{PPE} map", "efficiency")
    row("sleep(1 ms) efficiency ≥ 0.85 (ProcessPoolExecutor's)", sleep, "map", "efficiency", ppe_eff,
        lambda x: x >= 0.85, True)
    row("200 tiny tasks beside a long one: last done < 0.5 s", hol, "submit", "last_tiny_s",
        v(hol, f"{PPE} submit", "last_tiny_s"), lambda x: x < 0.5, False, 3)
    ppe_rss = v(mil, f"{PPE} map, defaults", "client_peak_rss_mb")
    row(f"client peak RSS, {sizes['million_tasks']:,}-task `map` ≤ 0.6 GB (572 MiB) and ≤ ProcessPoolExecutor's",
        mil, "map, defaults", "client_peak_rss_mb", ppe_rss,
        lambda x: x <= 572 and (ppe_rss is None or x <= ppe_rss), False, 0)
    row(f"tasks/s with {sizes['million_tasks']:,} queued at the relay ≥ 35,000", mil,
        "map, max_in_flight=None (all queued at the relay)", "tasks_per_s",
        v(mil, f"{PPE} map, defaults", "tasks_per_s"), lambda x: x >= 35000, True, 0)
    add("")

    # what changed since the previous results
    previous, where = _load_previous(ns, Path(ns.out), getattr(ns, "stem", ""))
    section("_changed")
    if not previous:
        return
    add(f"## What changed since the previous results: {where}")
    add("")
    add("Same labels, medians of each file's runs. Absolute figures depend on the machine and its load; the ratio "
        "to ProcessPoolExecutor(2) *in the same run* is the fairer comparison across runs.")
    add("")
    add("| measure | path | previous | now | now / previous | fedexec / PPE previous | fedexec / PPE now |")
    add("|---|---|---|---|---|---|---|")
    for measure, key, what, higher in KEY_ROWS:
        before, now = _system_rows(previous, measure, key), _system_rows(records, measure, key)
        for path, value in now.get(F, {}).items():
            old = before.get(F, {}).get(path)
            if old is None:
                continue
            pp_old, pp_now = before.get(PPE, {}).get(path), now.get(PPE, {}).get(path)
            add(f"| {what} | {path} | {_fmt(old)} | {_fmt(value)} | {_ratio(value, old)} | "
                f"{_ratio(old, pp_old)} | {_ratio(value, pp_now)} |")
    add("")


def _environment() -> str:
    versions = []
    for mod in ("fedexec", "parsl", "distributed", "ray", "loky", "joblib", "zmq"):
        try:
            m = __import__(mod)
            versions.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception:
            versions.append(f"{mod} (not installed)")
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "src"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        commit += " (src/ has uncommitted changes)" if dirty else ""
    except Exception:
        commit = "?"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"Machine: {platform.node()}, {os.cpu_count()} cores ({cpu}), Linux {platform.release()}, "
            f"Python {platform.python_version()}; {', '.join(versions)}; fedexec commit {commit}; "
            f"load average at start {load}.")


# -- plots --------------------------------------------------------------------

def make_plots(records: list[dict[str, Any]], plot_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig: Any, name: str, tight: bool = True) -> None:
        if tight:
            fig.tight_layout()
        fig.savefig(plot_dir / name, dpi=110, bbox_inches="tight")
        plt.close(fig)

    def barh(rows: dict[str, dict[str, Any]], keys: list[tuple[str, str]], xlabel: str, title: str, name: str,
             log: bool = False) -> None:
        labels = [label for label, row in rows.items() if row["values"]]
        if not labels:
            return
        fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * len(labels) * max(1, len(keys) * 0.6)))
        height = 0.8 / len(keys)
        for i, (key, legend) in enumerate(keys):
            vals = [rows[label]["values"].get(key, 0) for label in labels]
            ys = [j + i * height for j in range(len(labels))]
            bars = ax.barh(ys, vals, height=height, label=legend)
            for bar, v in zip(bars, vals):
                ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {_fmt(v)}", va="center", fontsize=7)
        ax.set_yticks([j + height * (len(keys) - 1) / 2 for j in range(len(labels))])
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        top = max((rows[label]["values"].get(k, 0) for label in labels for k, _ in keys), default=0)
        if log:
            ax.set_xscale("log")
            if top > 0:
                ax.set_xlim(right=top * 4)
        elif top > 0:
            ax.set_xlim(0, top * 1.2)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        if len(keys) > 1:
            ax.legend(fontsize=8)
        save(fig, name)

    barh(_median_rows(records, "latency"), [("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99")],
         "ms (log scale)", "Warm round trip of a no-op", "latency.png", log=True)
    barh(_median_rows(records, "throughput"), [("tasks_per_s", "tasks/s")], "no-op tasks/s (log scale)",
         "Throughput: no-op tasks", "throughput.png", log=True)
    barh(_median_rows(records, "sleep"), [("seconds", "seconds")], "seconds (ideal: n × 1 ms / 2)",
         "Completion time: time.sleep(1 ms) tasks", "sleep.png")
    barh(_median_rows(records, "payload"), [("median_ms", "median")], "ms (log scale)",
         "Payload returned (identity)", "payloads.png", log=True)
    barh(_median_rows(records, "million"), [("client_peak_rss_mb", "client peak RSS MiB")], "MiB",
         "1M-task map: client peak RSS", "million-rss.png")
    barh(_median_rows(records, "million"), [("tasks_per_s", "tasks/s")], "no-op tasks/s",
         "1M-task map: tasks/s", "million-tput.png")
    barh(_median_rows(records, "hol"), [("last_tiny_s", "last tiny done (s)")], "seconds (log scale)",
         "Head of line: last of the tiny tasks done", "hol.png", log=True)
    barh(_median_rows(records, "batching"), [("seconds", "seconds")], "seconds", "fedexec: batching on vs off",
         "batching.png")

    pre = _median_rows(records, "prefetch")
    if any(row["values"] for row in pre.values()):
        durations = sorted({row["extra"]["task_ms"] for row in pre.values() if "task_ms" in row["extra"]})
        fig, axes = plt.subplots(1, len(durations), figsize=(3.2 * len(durations), 3.2))
        for ax, d in zip(list(axes) if len(durations) > 1 else [axes], durations):
            pts = sorted((row["extra"]["prefetch"], row["values"]["seconds"]) for row in pre.values()
                         if row["extra"].get("task_ms") == d and "seconds" in row["values"])
            if pts:
                ax.plot([p for p, _ in pts], [s for _, s in pts], marker="o")
                ax.set_xscale("symlog", linthresh=1)
                ax.set_xticks([p for p, _ in pts])
                ax.set_xticklabels([str(p) for p, _ in pts])
            ax.set_title(f"{d:g} ms tasks", fontsize=9)
            ax.set_xlabel("prefetch per worker")
            ax.set_ylim(bottom=0)
        (list(axes) if len(durations) > 1 else [axes])[0].set_ylabel("completion time, s")
        fig.suptitle("fedexec: prefetch")
        save(fig, "prefetch.png")

    memo = _median_rows(records, "memo")
    pts = sorted((row["extra"]["share"], row["values"]["seconds"]) for row in memo.values()
                 if row["extra"].get("variant") == "executor" and "seconds" in row["values"])
    if pts:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([s for s, _ in pts], [t for _, t in pts], marker="o", label="memoize=True")
        dec = sorted((row["extra"]["share"], row["values"]["seconds"]) for row in memo.values()
                     if row["extra"].get("variant") == "decorator" and "seconds" in row["values"])
        if dec:
            ax.plot([s for s, _ in dec], [t for _, t in dec], marker="s", linestyle="none", label="memoized(fn)")
        ax.set_xlabel("repeated calls, %")
        ax.set_ylabel("completion time, s")
        ax.set_ylim(bottom=0)
        ax.set_title("fedexec: memoization")
        ax.legend(fontsize=8)
        save(fig, "memoization.png")

    brk = _median_rows(records, "breakdown").get("trace=True")
    if brk and brk["values"]:
        names = [n for n, _, _ in STAGES if n in brk["values"]]
        fig, ax = plt.subplots(figsize=(9, 1.8))
        left = 0.0
        for n in names:
            v = brk["values"][n]
            ax.barh([0], [v], left=left, label=f"{n} {v:.3f} ms")
            left += v
        ax.set_yticks([])
        ax.set_xlabel("ms (median per stage)")
        ax.set_title("fedexec: where a warm no-op round trip goes")
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.55))
        save(fig, "breakdown.png", tight=False)


# -- main ---------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run (one run by default)")
    parser.add_argument("--runs", type=int, default=None, help="runs to take the median of (default 3; 1 with --quick)")
    parser.add_argument("--only", default="", help=f"comma-separated jobs to run (default all: {','.join(JOBS)})")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for <date>.md and <date>/")
    parser.add_argument("--job-timeout", type=float, default=None,
                        help="seconds each job may take (default: 1200 per peer, 600 per fedexec experiment; "
                             "300/240 with --quick)")
    parser.add_argument("--million", action="store_true",
                        help=f"also the 1M-task rows (jobs {','.join(MILLION_JOBS)}; ~25 min a run on 2 cores)")
    parser.add_argument("--million-tasks", type=int, default=None,
                        help="tasks in the --million rows (default 1,000,000; 20,000 with --quick)")
    parser.add_argument("--previous", default="",
                        help="results to compare with: a results/<date>/ directory or its raw.json (default: the "
                             "newest other one under --out)")
    parser.add_argument("--from-raw", default="",
                        help="write the report and plots again from a raw.json of an earlier run (nothing is run)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.million_tasks:   # (the children read it from the environment the parent passes on)
        os.environ["FEDEXEC_BENCH_MILLION_TASKS"] = str(ns.million_tasks)
    if ns.child:
        return child_main(ns.child, ns.child_out, ns.quick)

    ns.runs = ns.runs or (1 if ns.quick else 3)
    jobs = [j.strip() for j in ns.only.split(",") if j.strip()] or (JOBS + (list(MILLION_JOBS) if ns.million
                                                                          else []))
    unknown = set(jobs) - set(JOBS) - set(MILLION_JOBS)
    if unknown:
        parser.error(f"unknown job(s) {sorted(unknown)}; jobs are {JOBS + list(MILLION_JOBS)}")
    started = datetime.datetime.now()
    stem = started.date().isoformat() + ("-quick" if ns.quick else "")
    ns.stem = stem
    out_dir = Path(ns.out)
    plot_dir = out_dir / stem
    plot_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / f"{stem}.md"
    print(f"fedexec benchmark suite: {ns.runs} run(s) of {', '.join(jobs)}"
          f"{' (quick sizes)' if ns.quick else ''}", flush=True)
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    if ns.from_raw:
        records = json.loads(Path(ns.from_raw).read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="fedexec-bench-") as work:
            for run in range(ns.runs):
                for job in jobs:
                    records.extend(run_job(job, run, ns.quick, Path(work), ns.job_timeout))
    wall = time.perf_counter() - t0
    if not ns.from_raw or Path(ns.from_raw).resolve() != (plot_dir / "raw.json").resolve():
        (plot_dir / "raw.json").write_text(json.dumps(records, indent=1))
    try:
        for old in plot_dir.glob("*.png"):
            old.unlink()
        make_plots(records, plot_dir)
    except Exception:
        traceback.print_exc()
        print("plots failed (the table is still written)", flush=True)
    report, _ = build_report(records, ns, started, wall, plot_dir, md_path)
    md_path.write_text(report)
    print("\n" + report)
    print(f"wrote {md_path} and {plot_dir}/ in {wall / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
