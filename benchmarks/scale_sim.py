"""Scale by simulation (issue 6, item 5): one relay and one endpoint fed by
simulated pool managers advertising up to 200,000 workers; weak scaling with
10 no-op tasks per worker (the funcX paper's shape), up to 2,000,000 tasks.
Prints tables and saves them as benchmarks/results/scale_sim.txt (every run's
record: scale_sim.json).

    python benchmarks/scale_sim.py            # full, about 8 min on 2 cores: 1k, 10k, 100k workers
                                              #   (3 runs each), 200k (1 run), 1,000 and 2,000 pools
    python benchmarks/scale_sim.py --quick    # smoke run, about 1 min: 1k, 10k, 30k workers, 1 run
    python benchmarks/scale_sim.py --workers 1000,100000x5 --pool-sweep none

What runs (all on loopback; every process is stopped by pid, also on Ctrl-C):

- a relay (``python -m fedexec.relay``, with its durable SQLite record as in
  production) on a tcp://127.0.0.1 port;
- one endpoint (``python -m fedexec.endpoint --name sim``, provider
  ``manual``: its pools are started by others, as with ``fedexec pool``);
- ``--procs`` simulator processes (this file with ``--simulate``), each
  holding many simulated pools: one zmq DEALER per pool speaking the
  agent<->pool protocol (HELLO with the pool secret and the pool's worker
  count, a heartbeat each heartbeat period, and for every task a RESULTS row
  ``[task, OK, pickle(None)]`` sent at once, at most 256 rows a message as a
  real pool flushes them). A simulated pool does no work: what is measured is
  the cost of moving tasks, not of running them;
- the client, a ``FederatedExecutor`` in a child process, running
  ``list(ex.map(noop, range(n)))`` with the default ``chunksize=1``, so each
  call is one task all the way (relay record, endpoint, pool).

A simulated pool reports no average task time, so the endpoint treats the
tasks as slow: one per worker plus ``prefetch`` (1) waiting, 2 per worker in
all. With 10 tasks per worker, each worker's slots turn over about 5 times,
as in a weak-scaling run with real workers. The weak-scaling table keeps the
pools at ``--pool-workers`` (1,000) workers, so pools grow with workers (100
for 100k); the second table puts as many workers in more, smaller pools
(``--pool-sweep``), which shows the endpoint's per-pool costs.

Each (size, run) is a child process with a fresh relay, endpoint, simulators
and client (so peak RSS is per run) and a time limit; the runs of all sizes are
interleaved, so that drift on a noisy machine hits every size alike. Tables
give medians over the runs.

Dispatch overhead: wall time per task, and CPU time per task of each process
(client, relay, endpoint agent, simulators), from psutil before and after the
measured map (after a 1,000-task warm-up, not counted); and the endpoint's CPU
while the pools sit connected with no tasks (its fixed per-pool cost). Every
result is checked (n results, all None) and the simulators count the task
rows they received (a task lost or run twice shows there); a run with any
problem is reported as FAILED, in the table and in the exit status.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from processes import free_port

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TASKS_PER_WORKER = 10
POOL_WORKERS = 1000
PROCS = 4
WARMUP_TASKS = 1000
# worker counts of the weak-scaling table ("x1": that size runs once), runs, and the pool sweep
FULL = {"workers": "1000,10000,100000,200000x1", "runs": 3, "sweep": "100000:100,100000:50"}
QUICK = {"workers": "1000,10000,30000", "runs": 1, "sweep": "30000:30"}
SECRET_ENV = "FEDEXEC_POOL_SECRET"
FLUSH_BATCH = 256   # most result rows a real pool sends in one RESULTS (fedexec.outbox.FLUSH_BATCH)



def peak_rss(pid: int) -> int:
    """Peak resident set size (VmHWM) of a live process, bytes; 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# =============================================================================
# The simulator: many pools in one process
# =============================================================================

def simulate(address: str, pools: int, workers: int, report: Path, parent_pid: int, send_avg: float | None) -> None:
    """Run ``pools`` simulated pools of ``workers`` workers each until SIGTERM;
    then say BYE for each and write counts to ``report``."""
    import zmq

    from fedexec import protocol as P
    from fedexec.serialize import serialize_value

    secret = os.environ.pop(SECRET_ENV, "")
    endpoint_key = os.environ.pop("FEDEXEC_SIM_ENDPOINT_KEY", "")
    none_blob = serialize_value(None)
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ctx = zmq.Context()
    ctx.setsockopt(zmq.MAX_SOCKETS, max(1024, pools + 16))
    socks: list[Any] = []
    hello_fields: dict[bytes, dict[str, Any]] = {}
    for _ in range(pools):
        sock = ctx.socket(zmq.DEALER)
        pool_id = b"P" + os.urandom(8).hex().encode()
        sock.setsockopt(zmq.IDENTITY, pool_id)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 2000)
        if endpoint_key:   # the endpoint's pool socket speaks CURVE over TCP
            public, secret_key = zmq.curve_keypair()
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = endpoint_key.encode(), public, secret_key
        sock.connect(address)
        socks.append(sock)
        hello_fields[pool_id] = {
            "role": "pool", "secret": secret, "block": "", "host": "sim", "pid": os.getpid(),
            "py": P.PYTHON_VERSION, "workers": workers, "cores": workers, "mem": 0, "gpus": 0,
            "ends": None, "holding": []}
    ids = {sock: sock.getsockopt(zmq.IDENTITY) for sock in socks}
    for sock in socks:
        sock.send_multipart(P.encode(P.HELLO, hello_fields[ids[sock]]))
    # epoll on the sockets' (edge-triggered) zmq.FD: a turn costs what the
    # ready sockets cost, not a scan of all of them as zmq.Poller's does
    # (0.3 ms a call for 500 sockets, which would dominate the simulator)
    epoll = select.epoll()
    by_fd = {}
    for sock in socks:
        fd = sock.getsockopt(zmq.FD)
        by_fd[fd] = sock
        epoll.register(fd, select.EPOLLIN)
    pending: set[Any] = set(socks)   # sockets that may have messages waiting
    welcomed: set[Any] = set()
    hb = 2.0
    counts = {"rows": 0, "tasks_msgs": 0, "results_msgs": 0, "max_rows_per_msg": 0, "errors": [],
              "stopped_by_endpoint": 0, "rehello": 0}
    per_pool: dict[Any, int] = {sock: 0 for sock in socks}
    beat = {"idle": workers, "held": 0, "draining": False}
    extra = {"avg": send_avg} if send_avg is not None else {}
    next_beat = time.monotonic()
    next_parent_check = time.monotonic()

    def serve(sock: Any) -> bool:
        """Answer what waits on one pool's socket; True if more may wait."""
        nonlocal hb
        for _ in range(100):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            msg = P.decode(frames)
            t = msg.type
            if t == P.TASKS:
                rows = msg.fields["tasks"]
                n = len(rows)
                counts["rows"] += n
                counts["tasks_msgs"] += 1
                per_pool[sock] += n
                if n > counts["max_rows_per_msg"]:
                    counts["max_rows_per_msg"] = n
                for start in range(0, n, FLUSH_BATCH):
                    out = [[row[0], P.OK, none_blob] for row in rows[start:start + FLUSH_BATCH]]
                    sock.send_multipart(P.encode(P.RESULTS, {"rows": out, **extra}))
                    counts["results_msgs"] += 1
            elif t == P.WELCOME:
                welcomed.add(sock)
                settings = msg.fields.get("settings") or {}
                if isinstance(settings.get("hb"), (int, float)):
                    hb = float(settings["hb"])
            elif t == P.HEARTBEAT:
                if msg.fields.get("unknown"):
                    counts["rehello"] += 1
                    sock.send_multipart(P.encode(P.HELLO, hello_fields[ids[sock]]))
            elif t == P.STOP:
                counts["stopped_by_endpoint"] += 1
            elif t == P.ERROR:
                counts["errors"].append(str(msg.fields.get("msg")))
            # CANCEL: nothing is held here (every task is answered at once)
        return True

    try:
        while not stopping:
            for fd, _ in epoll.poll(0 if pending else 0.1):
                pending.add(by_fd[fd])
            turn, pending = pending, set()
            for sock in turn:
                if serve(sock):
                    pending.add(sock)
            now = time.monotonic()
            if now >= next_beat:   # as a real pool: once a heartbeat period
                next_beat = now + hb
                frames = P.encode(P.HEARTBEAT, beat)
                for sock in socks:
                    sock.send_multipart(frames)
                pending.update(socks)   # a send may have taken the edge of a message's arrival
            if now >= next_parent_check:
                next_parent_check = now + 0.5
                if os.getppid() != parent_pid:
                    break
                if len(welcomed) == len(socks) and not report.with_suffix(".ready").exists():
                    report.with_suffix(".ready").write_text("ready")
    finally:
        bye = P.encode(P.BYE)
        for sock in socks:
            try:
                sock.send_multipart(bye, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        loads = sorted(per_pool.values())
        counts.update(pools=len(socks), welcomed=len(welcomed),
                      min_tasks_per_pool=loads[0] if loads else 0, max_tasks_per_pool=loads[-1] if loads else 0)
        report.write_text(json.dumps(counts))
        for sock in socks:
            sock.close(linger=1000)
        ctx.term()


# =============================================================================
# One measurement: relay, endpoint, simulators, client (a child process)
# =============================================================================

class Processes:
    """The processes one run started; stopped by pid, in reverse order. Their
    pids (with start times) go to a file the parent reads, so it can stop any
    this child could not."""

    def __init__(self, pid_file: Path) -> None:
        self.pid_file = pid_file
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs.append((name, proc))
        import psutil
        records = []
        for n, p in self.procs:
            try:
                records.append({"name": n, "pid": p.pid, "created": psutil.Process(p.pid).create_time()})
            except psutil.Error:
                pass
        self.pid_file.write_text(json.dumps(records))
        return proc

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"the {name} process exited early with code {proc.returncode}")

    def stop(self, names: tuple[str, ...] | None = None, timeout: float = 15.0) -> None:
        chosen = [(n, p) for n, p in self.procs if names is None or n.split("-")[0] in names]
        for _, proc in reversed(chosen):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in reversed(chosen):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


class StatusSampler(threading.Thread):
    """Reads the endpoint's status.json (written each second): how many tasks
    it held at once, and what waited at the relay."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.halt = threading.Event()
        self.samples: list[dict[str, Any]] = []

    def run(self) -> None:
        seen = None
        while not self.halt.wait(0.25):
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                continue
            if data.get("time") != seen:
                seen = data.get("time")
                self.samples.append({"held": data.get("held", 0), "queued": data.get("queued", 0),
                                     "at_pools": data.get("at_pools", 0)})


def cpu_seconds(pid: int) -> float:
    import psutil
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def one_run(args: argparse.Namespace) -> dict[str, Any]:

    from fedexec import FederatedExecutor
    from fedexec.config import EndpointConfig, ProviderConfig, endpoint_dir
    from fedexec.relay.query import lookup_endpoint

    from bench_tasks import noop

    workers = args.run
    pool_workers = min(args.pool_workers, workers)
    pools = math.ceil(workers / pool_workers)
    if pools * pool_workers != workers:
        raise SystemExit(f"--pool-workers {pool_workers} does not divide {workers} workers")
    procs = min(args.procs, pools)
    n_tasks = workers * args.tasks_per_worker
    workdir = Path(args.workdir)
    home = workdir / "home"
    env = {**os.environ, "FEDEXEC_HOME": str(home), "PYTHONPATH": os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("FEDEXEC_RELAY", None)
    os.environ.update({"FEDEXEC_HOME": str(home)})
    os.environ.pop("FEDEXEC_RELAY", None)
    me = str(os.getpid())
    log = workdir / "processes.log"
    running = Processes(Path(args.pid_file))
    record: dict[str, Any] = {"workers": workers, "pools": pools, "pool_workers": pool_workers, "procs": procs,
                              "tasks": n_tasks}

    def wait_for(what: str, ready: Any, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            running.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not within {timeout:g} s; see {log}")
            time.sleep(0.05)

    def listening(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    try:
        port = free_port()
        address = f"tcp://127.0.0.1:{port}"
        relay = running.start("relay", [sys.executable, "-m", "fedexec.relay", "--address", address,
                                        "--data-dir", str(workdir / "relay"), "--parent-pid", me,
                                        "--log-level", "WARNING"], log, env)
        wait_for("the relay listening", lambda: listening(port))
        config = EndpointConfig(name="sim", relay=address, provider=ProviderConfig.from_dict(
            {"type": "manual", "address": "127.0.0.1", "init_blocks": 0, "min_blocks": 0, "max_blocks": 0}))
        config.save()
        endpoint = running.start("endpoint", [sys.executable, "-m", "fedexec.endpoint", "--name", "sim",
                                              "--parent-pid", me, "--log-level", "WARNING"], log, env)
        pools_json = endpoint_dir("sim") / "pools.json"
        wait_for("the endpoint's pools.json", pools_json.exists)

        def connected() -> bool:
            try:
                view = lookup_endpoint(address, config.endpoint_id, timeout=1.0)
            except TimeoutError:
                return False
            return bool(view) and view.get("status") == "connected"

        wait_for("the endpoint connected to the relay", connected)
        pool_info = json.loads(pools_json.read_text())
        reports = []
        per_proc = [pools // procs + (i < pools % procs) for i in range(procs)]
        started = time.monotonic()
        for i, count in enumerate(per_proc):
            report = workdir / f"sim{i}.json"
            reports.append(report)
            running.start(f"sim-{i}", [sys.executable, str(Path(__file__).resolve()), "--simulate",
                                       pool_info["address"], "--sim-pools", str(count),
                                       "--sim-workers", str(pool_workers), "--sim-report", str(report),
                                       "--parent-pid", me]
                          + (["--sim-avg", str(args.sim_avg)] if args.sim_avg is not None else []),
                          log, {**env, SECRET_ENV: pool_info["secret"],
                                "FEDEXEC_SIM_ENDPOINT_KEY": pool_info.get("key", "")})
        status_path = endpoint_dir("sim") / "status.json"

        def all_pools_in() -> bool:
            try:
                status = json.loads(status_path.read_text())
            except (OSError, ValueError):
                return False
            return status.get("workers") == workers and len(status.get("pools", ())) == pools

        wait_for("every simulated pool connected", lambda: all(r.with_suffix(".ready").exists() for r in reports))
        wait_for("the endpoint counting every pool", all_pools_in)
        record["connect_seconds"] = time.monotonic() - started

        sims = [p for n, p in running.procs if n.startswith("sim-")]
        watched = {"relay": relay.pid, "endpoint": endpoint.pid}
        # the fixed cost of the pools, with no tasks: heartbeats both ways, status.json, checks
        idle_before = {name: cpu_seconds(pid) for name, pid in watched.items()}
        idle_before["sims"] = sum(cpu_seconds(p.pid) for p in sims)
        t_idle = time.perf_counter()
        time.sleep(args.idle_seconds)
        t_idle = time.perf_counter() - t_idle
        record["idle_cpu"] = {name: (cpu_seconds(pid) - idle_before[name]) / t_idle for name, pid in watched.items()}
        record["idle_cpu"]["sims"] = (sum(cpu_seconds(p.pid) for p in sims) - idle_before["sims"]) / t_idle
        ex = FederatedExecutor(config.endpoint_id, relay=address, max_in_flight=args.max_in_flight or None)
        try:
            warm = list(ex.map(noop, range(WARMUP_TASKS), timeout=120))
            if len(warm) != WARMUP_TASKS or any(v is not None for v in warm):
                raise RuntimeError("the warm-up came back wrong")
            sampler = StatusSampler(status_path)
            sampler.start()
            before = {name: cpu_seconds(pid) for name, pid in watched.items()}
            before["sims"] = sum(cpu_seconds(p.pid) for p in sims)
            before["client"] = cpu_seconds(os.getpid())
            t0 = time.perf_counter()
            error = None
            results: list[Any] = []
            try:
                results = list(ex.map(noop, range(n_tasks), timeout=args.task_timeout))
            except Exception as exc:   # reported, loudly, below
                error = f"{type(exc).__name__}: {exc}"
            wall = time.perf_counter() - t0
            after = {name: cpu_seconds(pid) for name, pid in watched.items()}
            after["sims"] = sum(cpu_seconds(p.pid) for p in sims)
            after["client"] = cpu_seconds(os.getpid())
            sampler.halt.set()
            sampler.join()
            record["peak_rss"] = {name: peak_rss(pid) for name, pid in watched.items()}
            record["peak_rss"]["client"] = peak_rss(os.getpid())
            record["peak_rss"]["sims"] = max(peak_rss(p.pid) for p in sims)
        except BaseException:   # interrupted: do not wait for the tasks still out
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        else:
            ex.shutdown(wait=True)
        record["wall"] = wall
        record["cpu"] = {name: after[name] - before[name] for name in after}
        record["results"] = len(results)
        record["bad_results"] = sum(1 for v in results if v is not None)
        record["held_max"] = max((s["held"] for s in sampler.samples), default=0)
        record["held_median"] = statistics.median([s["held"] for s in sampler.samples]) if sampler.samples else 0
        record["queued_max"] = max((s["queued"] for s in sampler.samples), default=0)
        del results
        running.stop(("sim",))
        sim_counts = [json.loads(r.read_text()) for r in reports]
        record["sim"] = {
            "rows": sum(c["rows"] for c in sim_counts), "tasks_msgs": sum(c["tasks_msgs"] for c in sim_counts),
            "results_msgs": sum(c["results_msgs"] for c in sim_counts),
            "max_rows_per_msg": max(c["max_rows_per_msg"] for c in sim_counts),
            "min_tasks_per_pool": min(c["min_tasks_per_pool"] for c in sim_counts),
            "max_tasks_per_pool": max(c["max_tasks_per_pool"] for c in sim_counts),
            "errors": [e for c in sim_counts for e in c["errors"]],
            "rehello": sum(c["rehello"] for c in sim_counts),
            "stopped_by_endpoint": sum(c["stopped_by_endpoint"] for c in sim_counts),
        }
        problems = []
        if error:
            problems.append(error)
        if record["results"] != n_tasks:
            problems.append(f"{record['results']:,} of {n_tasks:,} results")
        if record["bad_results"]:
            problems.append(f"{record['bad_results']:,} results were not None")
        expected_rows = n_tasks + WARMUP_TASKS
        if record["sim"]["rows"] != expected_rows:
            problems.append(f"the pools received {record['sim']['rows']:,} task rows, expected {expected_rows:,} "
                            f"(lost or duplicated tasks)")
        if record["sim"]["errors"]:
            problems.append(f"pool errors: {record['sim']['errors'][:3]}")
        if record["sim"]["rehello"]:
            problems.append(f"{record['sim']['rehello']} pool(s) were dropped by the endpoint and said hello again")
        record["problems"] = problems
        record["ok"] = not problems
        return record
    finally:
        running.stop()


# =============================================================================
# The parent: runs, medians, the table
# =============================================================================

def kill_leftovers(pid_file: Path) -> list[str]:
    """Stop, by pid, any process a run child started that outlived it."""
    import psutil
    left = []
    try:
        records = json.loads(pid_file.read_text())
    except (OSError, ValueError):
        return left
    for rec in records:
        try:
            proc = psutil.Process(rec["pid"])
            if abs(proc.create_time() - rec["created"]) > 0.01:
                continue   # the pid was reused
            proc.terminate()
            try:
                proc.wait(5)
            except psutil.TimeoutExpired:
                proc.kill()
            left.append(f"{rec['name']} (pid {rec['pid']})")
        except psutil.Error:
            pass
    return left


def run_child(args: argparse.Namespace, workers: int, pool_workers: int, tmp: Path, index: int) -> dict[str, Any]:
    workdir = tmp / f"run{index}-{workers}-{pool_workers}"
    workdir.mkdir()
    out = workdir / "record.json"
    pid_file = workdir / "pids.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--run", str(workers), "--workdir", str(workdir),
            "--out", str(out), "--pid-file", str(pid_file), "--pool-workers", str(pool_workers),
            "--procs", str(args.procs), "--tasks-per-worker", str(args.tasks_per_worker),
            "--max-in-flight", str(args.max_in_flight), "--task-timeout", str(args.task_timeout),
            "--idle-seconds", str(args.idle_seconds)]
    if args.sim_avg is not None:
        argv += ["--sim-avg", str(args.sim_avg)]
    limit = 120 + workers * args.tasks_per_worker / 2000   # generous: 2,000 tasks/s
    child = subprocess.Popen(argv)
    try:
        child.wait(limit)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if child.poll() is None:   # over its time limit, or Ctrl-C, or an error here
            child.terminate()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        left = kill_leftovers(pid_file)
    if out.exists():
        record = json.loads(out.read_text())
    else:
        record = {"workers": workers, "pool_workers": pool_workers, "ok": False,
                  "problems": [f"the run child ended with code {child.returncode} and no record "
                               f"(time limit {limit:.0f} s)"]}
    if left:
        record.setdefault("problems", []).append(f"left behind, stopped by pid: {', '.join(left)}")
        record["ok"] = False
    return record


def fmt_mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def table(records: list[dict[str, Any]], cells: list[tuple[int, int]]) -> list[str]:
    lines = [
        "| workers | pools | tasks | runs | wall s | tasks/s | wall µs/task | client CPU µs/task | "
        "relay CPU µs/task | endpoint CPU µs/task | sims CPU µs/task | endpoint idle CPU % | "
        "relay queue max | peak RSS relay MiB | peak RSS endpoint MiB | peak RSS client MiB |",
        "|" + "---:|" * 16,
    ]
    for workers, pool_workers in cells:
        good = [r for r in records if (r["workers"], r.get("pool_workers")) == (workers, pool_workers) and r.get("ok")]
        pools = math.ceil(workers / pool_workers)
        if not good:
            lines.append(f"| {workers:,} | {pools:,} | FAILED: no complete run |" + " |" * 13)
            continue

        def med(get: Any) -> float:
            return statistics.median(get(r) for r in good)

        def per_task(part: str) -> str:
            return f"{med(lambda r: r['cpu'][part] / r['tasks'] * 1e6):.1f}"

        lines.append(
            f"| {workers:,} | {pools:,} | {good[0]['tasks']:,} | {len(good)} | {med(lambda r: r['wall']):.2f} | "
            f"{med(lambda r: r['tasks'] / r['wall']):,.0f} | {med(lambda r: r['wall'] / r['tasks'] * 1e6):.1f} | "
            f"{per_task('client')} | {per_task('relay')} | {per_task('endpoint')} | {per_task('sims')} | "
            f"{med(lambda r: r['idle_cpu']['endpoint'] * 100):.1f} | {med(lambda r: r['queued_max']):,.0f} | "
            f"{fmt_mib(med(lambda r: r['peak_rss']['relay']))} | {fmt_mib(med(lambda r: r['peak_rss']['endpoint']))} | "
            f"{fmt_mib(med(lambda r: r['peak_rss']['client']))} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1k, 10k, 30k workers and a 1,000-pool point, 1 run each (about 1 min)")
    parser.add_argument("--workers", default=None,
                        help="worker counts of the weak-scaling table, comma-separated; a size written "
                             "NxR runs R times (default 1000,10000,100000,200000x1)")
    parser.add_argument("--runs", type=int, default=None, help="runs of each size (default 3; --quick 1)")
    parser.add_argument("--tasks-per-worker", type=int, default=TASKS_PER_WORKER)
    parser.add_argument("--pool-workers", type=int, default=POOL_WORKERS,
                        help="workers per simulated pool in the weak-scaling table")
    parser.add_argument("--pool-sweep", default=None,
                        help="WORKERS:POOL_WORKERS,... more pools for as many workers (second table); "
                             "default 100000:100,100000:50 (--quick 30000:30); 'none' for none")
    parser.add_argument("--sweep-runs", type=int, default=None, help="runs of each sweep point (default 1)")
    parser.add_argument("--procs", type=int, default=PROCS, help="simulator processes")
    parser.add_argument("--max-in-flight", type=int, default=0,
                        help="the client's max_in_flight (0: no limit; the executor's default is 100,000)")
    parser.add_argument("--sim-avg", type=float, default=None,
                        help="average task seconds the simulated pools report (default: none, tasks "
                             "count as slow: one per worker)")
    parser.add_argument("--idle-seconds", type=float, default=3.0,
                        help="seconds the pools sit connected and idle, measured, before the tasks")
    parser.add_argument("--task-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scale_sim.txt")
    # child modes
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--pid-file", help=argparse.SUPPRESS)
    parser.add_argument("--simulate", help=argparse.SUPPRESS)
    parser.add_argument("--sim-pools", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sim-workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sim-report", help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.simulate:
        simulate(args.simulate, args.sim_pools, args.sim_workers, Path(args.sim_report), args.parent_pid,
                 args.sim_avg)
        return
    def terminated(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)   # stopped: clean up as on Ctrl-C
    if args.run:
        parent = os.getppid()

        def watch_parent() -> None:   # the parent gone: stop (and stop what this run started)
            while os.getppid() == parent:
                time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch_parent, daemon=True).start()
        try:
            record = one_run(args)
        except BaseException as exc:
            traceback.print_exc()
            record = {"workers": args.run, "pool_workers": args.pool_workers, "ok": False,
                      "problems": [f"{type(exc).__name__}: {exc}"]}
            try:   # what the relay, endpoint and simulators said (the work directory goes away)
                record["log_tail"] = (Path(args.workdir) / "processes.log").read_text().splitlines()[-20:]
            except OSError:
                pass
        Path(args.out).write_text(json.dumps(record))
        return

    preset = QUICK if args.quick else FULL
    runs = args.runs or preset["runs"]
    size_runs = {}
    for item in (args.workers or preset["workers"]).split(","):
        size, _, times = item.partition("x")
        size_runs[int(size)] = int(times) if times else runs
    sizes = list(size_runs)
    sweep_spec = args.pool_sweep or preset["sweep"]
    sweep = [] if sweep_spec == "none" else [
        (int(w), int(pw)) for w, pw in (item.split(":") for item in sweep_spec.split(","))]
    sweep_runs = args.sweep_runs or 1
    scaling = [(w, min(args.pool_workers, w)) for w in sizes]
    cell_runs = {**{cell: size_runs[cell[0]] for cell in scaling}, **{cell: sweep_runs for cell in sweep}}
    for workers, pool_workers in scaling + sweep:
        if workers % pool_workers:
            parser.error(f"{pool_workers} workers per pool does not divide {workers:,} workers")
    command = " ".join(["python benchmarks/scale_sim.py", *sys.argv[1:]])
    started = time.monotonic()
    records: list[dict[str, Any]] = []
    # runs of every cell interleaved, so that drift on a noisy machine hits them alike
    plan = [(run, cell) for run in range(max(cell_runs.values()))
            for cell in scaling + sweep if run < cell_runs[cell]]
    with tempfile.TemporaryDirectory(prefix="fedexec-scale-") as tmp:
        for index, (run, (workers, pool_workers)) in enumerate(plan, 1):
            record = run_child(args, workers, pool_workers, Path(tmp), index)
            record["run"] = run + 1
            records.append(record)
            pools = workers // pool_workers
            if record.get("ok"):
                c = record["cpu"]
                n = record["tasks"]
                print(f"run {run + 1} {workers:>7,} workers {pools:>5,} pools {n:>9,} tasks: "
                      f"{record['wall']:6.2f} s {n / record['wall']:8,.0f} tasks/s | CPU µs/task: "
                      f"client {c['client'] / n * 1e6:5.1f} relay {c['relay'] / n * 1e6:5.1f} "
                      f"endpoint {c['endpoint'] / n * 1e6:5.1f} sims {c['sims'] / n * 1e6:5.1f} | "
                      f"endpoint idle {record['idle_cpu']['endpoint']:.1%} | peak RSS MiB: "
                      f"relay {fmt_mib(record['peak_rss']['relay'])} endpoint {fmt_mib(record['peak_rss']['endpoint'])} "
                      f"client {fmt_mib(record['peak_rss']['client'])}", flush=True)
            else:
                print(f"run {run + 1} {workers:>7,} workers {pools:>5,} pools: FAILED: "
                      f"{'; '.join(record.get('problems', []))}", flush=True)
                for line in record.get("log_tail", []):
                    print(f"    | {line}", flush=True)
    elapsed = time.monotonic() - started
    failed = [r for r in records if not r.get("ok")]
    lines = [
        f"# Scale by simulation: weak scaling, {args.tasks_per_worker} no-op tasks per worker, "
        f"{datetime.date.today().isoformat()}",
        "",
        f"`{command}` on {platform.node()}, {os.cpu_count()} cores ({platform.machine()}), "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}; "
        f"total {elapsed:.0f} s.",
        "",
        f"One relay (tcp loopback, its SQLite record) and one endpoint (provider manual). Simulated pools in "
        f"{args.procs} simulator processes say hello with their worker count, heartbeat, and answer every "
        "task at once with a None result (no work is done; at most 2 tasks per worker are out, as for "
        "slow tasks with prefetch 1). Client: `list(ex.map(noop, range(n)))`, chunksize 1 (one task per "
        f"call), max_in_flight {args.max_in_flight or 'None'}, after a {WARMUP_TASKS:,}-task warm-up. "
        f"Medians of the runs. CPU µs/task: each process's user+system CPU over the measured map divided by "
        f"the tasks (all processes share the {os.cpu_count()} cores; CPU times come in 10 ms ticks, so "
        "+-1 µs/task at 10,000 tasks). Endpoint idle CPU: the endpoint agent's CPU with "
        f"every pool connected and no tasks, over {args.idle_seconds:g} s (+-{1 / args.idle_seconds:.1f}%). Relay queue max: the most tasks "
        "waiting at the relay for the endpoint (the endpoint's status, 1 s samples).",
        "",
        f"## Weak scaling: pools of {args.pool_workers:,} workers",
        "",
        *table(records, scaling),
        "",
    ]
    if sweep:
        lines += ["## More, smaller pools for as many workers (the endpoint's per-pool costs)", "",
                  *table(records, sweep), ""]
    if failed:
        lines += ["**FAILED RUNS (tasks lost, wrong, or a run that did not finish):**", ""]
        lines += [f"- {r['workers']:,} workers ({r.get('pool_workers')} per pool), run {r.get('run')}: "
                  f"{'; '.join(r.get('problems', []))}" for r in failed]
        lines.append("")
    else:
        lines.append(f"Every run completed every task: n results, all None; the pools received exactly "
                     f"n + {WARMUP_TASKS:,} task rows (none lost, none run twice).")
        lines.append("")
    text = "\n".join(lines)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
         "cores": os.cpu_count(), "python": platform.python_version(), "elapsed": elapsed,
         "records": records}, indent=1))
    print(f"saved {args.out} and {args.out.with_suffix('.json')}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; every process this benchmark started has been stopped", file=sys.stderr)
        sys.exit(130)
