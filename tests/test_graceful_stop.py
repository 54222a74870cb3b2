"""A stop throws away no result of a task running at that moment: the
embedded default's process, an endpoint (its pools in its process, or pool
processes) and a pool process, each sent SIGTERM while a 1 s task runs,
let the task finish and deliver its result, and the task runs once
(stopgrace.py, endpoint/leaving.py, pool/leaving.py). A task longer than
the grace does not hold the stop up."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from fedexec import FederatedExecutor
from fedexec.stopgrace import LEAVE_MARGIN, STOP_GRACE
from test_faults import lookup_endpoint, running_relay, stop_process, tail
from test_providers import configured_endpoint, wait_for

DEADLINE = 60
HERE = Path(__file__).parent


def record_run(runs_dir: str, seconds: float, value: int) -> int:
    """A task that leaves one file per run (named by its worker's pid and the
    time), then runs ``seconds``."""
    path = os.path.join(runs_dir, f"{os.getpid()}-{time.monotonic_ns()}")
    with open(path, "w") as f:
        f.write(str(value))
    time.sleep(seconds)
    return value


def runs(runs_dir: Path) -> list[str]:
    return sorted(os.listdir(runs_dir))


def wait_started(runs_dir: Path, log: Path | None = None) -> None:
    wait_for(lambda: runs(runs_dir), 30, "the task did not start", log)


def cmdlines_below(pid: int) -> list[tuple[int, str]]:
    found = []
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            found.append((proc.pid, " ".join(proc.cmdline())))
        except psutil.Error:
            pass
    return found


@contextlib.contextmanager
def embedded_with_one_worker(tmp_path: Path) -> Iterator[tuple[FederatedExecutor, psutil.Process, Path]]:
    """An embedded default with one worker, warmed; its colocated process; a directory the tasks record runs in."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    ex = FederatedExecutor(max_workers=1)
    try:
        assert ex.submit(abs, -1).result(DEADLINE) == 1
        (colocated,) = ex._dispatcher.services.processes
        yield ex, psutil.Process(colocated.pid), runs_dir
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


# -- the embedded default ---------------------------------------------------------------
@pytest.mark.timeout(90)
def test_sigterm_of_the_embedded_process_lets_the_running_task_deliver_its_result(tmp_path):
    with embedded_with_one_worker(tmp_path) as (ex, host, runs_dir):
        future = ex.submit(record_run, str(runs_dir), 1.0, 7)
        wait_started(runs_dir)
        time.sleep(0.3)
        host.send_signal(signal.SIGTERM)
        assert future.result(15) == 7   # before: BrokenExecutor, its outcome lost with the process
        assert host.wait(15) == 0
        assert len(runs(runs_dir)) == 1, runs(runs_dir)


@pytest.mark.timeout(90)
def test_a_task_longer_than_the_grace_does_not_hold_up_the_embedded_stop(tmp_path):
    with embedded_with_one_worker(tmp_path) as (ex, host, runs_dir):
        workers = host.children(recursive=True)
        future = ex.submit(record_run, str(runs_dir), 60.0, 1)
        wait_started(runs_dir)
        began = time.monotonic()
        host.send_signal(signal.SIGTERM)
        assert host.wait(30) == 0
        took = time.monotonic() - began
        # the grace, the agent's margin, and the short wait for a worker still busy after it
        assert STOP_GRACE <= took < STOP_GRACE + LEAVE_MARGIN + 4, took
        _gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, [p.pid for p in alive]
        with pytest.raises(Exception, match="outcome is lost|stopped before"):
            future.result(15)


@pytest.mark.timeout(90)
def test_a_second_sigterm_stops_the_embedded_process_at_once(tmp_path):
    with embedded_with_one_worker(tmp_path) as (ex, host, runs_dir):
        ex.submit(record_run, str(runs_dir), 60.0, 1)
        wait_started(runs_dir)
        began = time.monotonic()
        host.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        host.send_signal(signal.SIGTERM)
        host.wait(30)
        assert time.monotonic() - began < STOP_GRACE, time.monotonic() - began


# -- an endpoint run from the CLI ---------------------------------------------------------
def start_endpoint_again(tmp_path: Path, relay: str, endpoint_id: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "endpoint-again.log"
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedexec.endpoint", "--name", "ep"], env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    lookup_endpoint(relay, endpoint_id, proc, log)
    return proc, log


def one_worker_endpoint(stack: contextlib.ExitStack, tmp_path: Path, in_process: bool) -> tuple:
    """A durable relay, a CLI endpoint of one worker on it and an executor, all undone by ``stack``:
    (relay address, endpoint config, endpoint process, its log, executor)."""
    relay = stack.enter_context(running_relay(tmp_path))
    config, proc, log = stack.enter_context(configured_endpoint(
        tmp_path, relay, max_workers=1, type="local", in_process=in_process, init_blocks=1, min_blocks=1,
        max_blocks=1))
    ex = FederatedExecutor(config.endpoint_id, relay=relay)
    stack.callback(ex.shutdown, wait=False, cancel_futures=True)
    return relay, config, proc, log, ex


@pytest.mark.timeout(150)
@pytest.mark.parametrize("in_process", [True, False], ids=["pool-in-process", "pool-process"])
def test_sigterm_of_an_endpoint_lets_the_running_task_deliver_its_result_once(tmp_path, in_process):
    """``fedexec endpoint stop`` sends SIGTERM: the task running at its pool
    finishes, its result reaches the client through the (durable) relay,
    and the endpoint started again does not run it a second time."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    with contextlib.ExitStack() as stack:
        relay, config, proc, log, ex = one_worker_endpoint(stack, tmp_path, in_process)
        future = ex.submit(record_run, str(runs_dir), 1.0, 5)
        wait_started(runs_dir, log)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert future.result(15) == 5, tail(log)
        assert proc.wait(15) == 0, tail(log)
        assert "still running" not in tail(log, 20000), tail(log)
        again, again_log = start_endpoint_again(tmp_path, relay, config.endpoint_id)
        try:
            assert ex.submit(abs, -3).result(DEADLINE) == 3, tail(again_log)   # it runs tasks: nothing came back
            assert len(runs(runs_dir)) == 1, (runs(runs_dir), tail(log), tail(again_log))
        finally:
            stop_process(again)


@pytest.mark.timeout(150)
def test_sigterm_of_a_pool_process_lets_its_running_task_finish_there_once(tmp_path):
    """A pool process told to stop by its scheduler (SIGTERM) gives back what
    its workers have not started and lets them finish what they run: the
    running task is not given back while it still runs (it ran twice
    before: once to its end in the stopping pool, unread, once elsewhere)."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    with contextlib.ExitStack() as stack:
        relay, config, proc, log, ex = one_worker_endpoint(stack, tmp_path, False)
        futures = [ex.submit(record_run, str(runs_dir), 1.0, i) for i in range(3)]
        wait_started(runs_dir, log)
        (pool_pid,) = [pid for pid, line in cmdlines_below(proc.pid) if "fedexec.pool" in line]
        time.sleep(0.3)
        os.kill(pool_pid, signal.SIGTERM)
        # the first finishes in the stopping pool; the two it gave back run in the block that replaces it
        assert [f.result(DEADLINE) for f in futures] == [0, 1, 2], tail(log)
        assert len(runs(runs_dir)) == 3, (runs(runs_dir), tail(log))
        assert psutil.Process(proc.pid).is_running()


@pytest.mark.timeout(150)
def test_ctrl_c_of_a_foreground_endpoint_and_its_pool_processes_delivers_the_running_result(tmp_path):
    """Ctrl-C reaches the whole process group: the pool process leaves on
    its SIGINT, and the STOP its endpoint sends it then (with a grace) does
    not cut that short."""
    from fedexec.config import EndpointConfig, ProviderConfig

    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(running_relay(tmp_path))
        config = EndpointConfig(name="ep", relay=relay, max_workers=1, heartbeat_period=0.5,
                                provider=ProviderConfig.from_dict({"type": "local", "in_process": False,
                                                                   "init_blocks": 1, "min_blocks": 1,
                                                                   "max_blocks": 1}))
        config.save()
        log = tmp_path / "endpoint.log"
        with open(log, "wb") as out:   # a process group of its own, as a terminal gives a foreground job
            proc = subprocess.Popen([sys.executable, "-m", "fedexec.endpoint", "--name", "ep"],
                                    env={**os.environ, "PYTHONPATH": str(HERE)}, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        stack.callback(stop_process, proc)
        lookup_endpoint(relay, config.endpoint_id, proc, log)
        ex = FederatedExecutor(config.endpoint_id, relay=relay)
        stack.callback(ex.shutdown, wait=False, cancel_futures=True)
        future = ex.submit(record_run, str(runs_dir), 1.0, 9)
        wait_started(runs_dir, log)
        assert [line for _, line in cmdlines_below(proc.pid) if "fedexec.pool" in line], cmdlines_below(proc.pid)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        assert future.result(15) == 9, tail(log)
        assert proc.wait(15) == 0, tail(log)
        assert len(runs(runs_dir)) == 1, runs(runs_dir)
