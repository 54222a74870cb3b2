"""Interoperability: Dask uses the executor as its scheduler, and the embedded
default leaves no process behind however its program ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Iterable

import cloudpickle
import dask
import dask.bag as db
import psutil
import pytest

from conftest import child_processes, wait_no_children
from fedexec import FederatedExecutor

# tests/ is not importable on the workers: send this module's functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x):
    return x * x


def is_even(x):
    return x % 2 == 0


def add(a, b):
    return a + b


def worker_pid(_):
    return os.getpid()


@pytest.fixture
def ex():
    """A fresh embedded executor per test, so that no executor outlives the
    test that made it (the process tests below count children)."""
    executor = FederatedExecutor(max_workers=2)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def fedexec_roles(procs: list[psutil.Process]) -> list[str]:
    roles = []
    for proc in procs:
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        for role in ("fedexec.relay", "fedexec.endpoint", "fedexec.colocated", "fedexec.worker"):
            if f"-m {role}" in cmdline:
                roles.append(role)
    return sorted(roles)


def still_running(records: list[tuple[int, float]]) -> list[int]:
    """Pids (recorded with their start time) that still run. A zombie counts
    as gone: it has exited, and PID 1 here does not reap orphans."""
    alive = []
    for pid, started in records:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - started) > 0.01:
                continue  # the pid was reused by another process
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            continue
    return alive


def wait_gone(records: list[tuple[int, float]], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = still_running(records)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid}: {' '.join(psutil.Process(pid).cmdline())}")
        except psutil.Error:
            out.append(f"{pid}: <gone>")
    return "; ".join(out)


# -- Dask ------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_dask_delayed_graph_with_executor_as_scheduler(ex):
    items = [dask.delayed(square)(i) for i in range(20)]
    total = dask.delayed(sum)(items)
    pairs = [dask.delayed(add)(items[i], items[i + 1]) for i in range(0, 20, 2)]
    (result, pair_sums) = dask.compute(total, pairs, scheduler=ex)
    assert result == sum(i * i for i in range(20)) == 2470
    assert pair_sums == [i * i + (i + 1) ** 2 for i in range(0, 20, 2)]

    # the tasks really ran on the endpoint's workers, not in this process
    pids = dask.compute([dask.delayed(worker_pid)(i) for i in range(10)], scheduler=ex)[0]
    workers = {p.pid for p in child_processes() if "fedexec.worker" in " ".join(p.cmdline())}
    assert os.getpid() not in pids
    assert set(pids) <= workers, f"dask tasks ran outside the workers: {set(pids) - workers}"


@pytest.mark.timeout(120)
def test_dask_bag_with_executor_as_scheduler(ex):
    bag = db.from_sequence(range(100), npartitions=5)
    result = bag.map(square).filter(is_even).sum().compute(scheduler=ex)
    assert result == sum(i * i for i in range(100) if i % 2 == 0)
    counts = db.from_sequence("the quick brown fox jumps over the lazy dog the end".split(),
                              npartitions=3).frequencies().compute(scheduler=ex)
    assert dict(counts) == {"the": 3, "quick": 1, "brown": 1, "fox": 1, "jumps": 1,
                            "over": 1, "lazy": 1, "dog": 1, "end": 1}


@pytest.mark.timeout(120)
def test_dask_config_set_scheduler(ex):
    total = dask.delayed(sum)([dask.delayed(square)(i) for i in range(20)])
    with dask.config.set(scheduler=ex):
        assert total.compute() == 2470
        assert db.from_sequence(range(10), npartitions=2).map(square).sum().compute() == 285
        pids = dask.compute(*[dask.delayed(worker_pid)(i) for i in range(4)])
    assert os.getpid() not in pids
    # the executor is still usable directly afterwards
    assert ex.submit(square, 11).result(timeout=30) == 121


# -- no process outlives the embedded default ------------------------------------------------

@pytest.mark.timeout(60)
def test_shutdown_leaves_no_child_process():
    before = {p.pid for p in child_processes()}
    ex = FederatedExecutor(max_workers=2)
    try:
        assert ex.submit(square, 7).result(timeout=30) == 49
        procs = [p for p in child_processes() if p.pid not in before]
        roles = fedexec_roles(procs)
        # (the embedded relay and endpoint are one process: fedexec.colocated)
        assert len(procs) >= 3, f"expected relay+endpoint and 2 workers, found {describe([p.pid for p in procs])}"
        assert roles == ["fedexec.colocated", "fedexec.worker", "fedexec.worker"], roles
        records = [(p.pid, p.create_time()) for p in procs]
    finally:
        ex.shutdown(wait=True)
    alive = wait_gone(records, 10.0)
    assert not alive, f"still running 10 s after shutdown(): {describe(alive)}"
    leftover = [p.pid for p in wait_no_children(10.0) if p.pid not in before]
    assert not leftover, f"child processes left after shutdown(): {describe(leftover)}"


SCRIPT = textwrap.dedent("""
    import os, sys, time
    import psutil
    from fedexec import FederatedExecutor

    def square(x):
        return x * x

    ex = FederatedExecutor(max_workers=2)
    print("RESULT", ex.submit(square, 12).result(timeout=60), flush=True)
    kids = psutil.Process().children(recursive=True)
    print("PIDS", " ".join(f"{p.pid}:{p.create_time()!r}" for p in kids), flush=True)
    if sys.argv[1] == "exit":
        sys.exit(0)          # interpreter exit without shutdown()
    print("READY", flush=True)
    time.sleep(600)          # hold the executor until killed
""")


def start_script(tmp_path, mode: str) -> subprocess.Popen:
    script = tmp_path / "hold_executor.py"
    script.write_text(SCRIPT)
    # stderr to a file: the embedded children inherit it, so a pipe would only
    # reach EOF once they are all gone
    # and a TMPDIR of its own, where the embedded default keeps its sockets and files
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    with open(tmp_path / "stderr.log", "wb") as err:
        return subprocess.Popen([sys.executable, str(script), mode], cwd=tmp_path, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)


def wait_tmp_empty(tmp_path, timeout: float) -> list[str]:
    """What the script's processes left in its TMPDIR after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = sorted(str(p.relative_to(tmp_path / "tmp")) for p in (tmp_path / "tmp").rglob("*"))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def script_stderr(tmp_path) -> str:
    return (tmp_path / "stderr.log").read_text(errors="replace")[-3000:]


def read_script(proc: subprocess.Popen, until: str, tmp_path) -> tuple[int, list[tuple[int, float]]]:
    """The task result and the (pid, start time) of each child the script printed."""
    result, records = None, None
    for line in proc.stdout:
        word, _, rest = line.strip().partition(" ")
        if word == "RESULT":
            result = int(rest)
        elif word == "PIDS":
            records = [(int(pid), float(started)) for pid, started in
                       (item.split(":") for item in rest.split())]
        if word == until:
            break
    if records is None:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"the script printed no pids; exit code {proc.returncode}, stderr:\n{script_stderr(tmp_path)}")
    return result, records


def stop_script(proc: subprocess.Popen, records: Iterable[tuple[int, float]] = ()) -> None:
    """Stop the script and, by pid, whatever of its processes a failed run left."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    proc.stdout.close()
    for pid in still_running(records):
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


@pytest.mark.timeout(90)
def test_interpreter_exit_without_shutdown_leaves_no_process(tmp_path):
    proc = start_script(tmp_path, "exit")
    try:
        result, records = read_script(proc, until="PIDS", tmp_path=tmp_path)
        assert result == 144
        assert len(records) >= 3, f"expected relay+endpoint and 2 workers in the script, got {records}"
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("the script did not exit within 30 s of its last task (interpreter exit hangs)")
        assert proc.returncode == 0, script_stderr(tmp_path)
        alive = wait_gone(records, 10.0)
        assert not alive, f"still running 10 s after the script exited: {describe(alive)}"
        left = wait_tmp_empty(tmp_path, 5.0)
        assert not left, f"files left in the script's TMPDIR after it exited: {left}"
    finally:
        stop_script(proc)


@pytest.mark.timeout(90)
def test_sigkilled_program_leaves_no_process(tmp_path):
    proc = start_script(tmp_path, "hold")
    records: list[tuple[int, float]] = []
    try:
        result, records = read_script(proc, until="READY", tmp_path=tmp_path)
        assert result == 144
        assert len(records) >= 3, f"expected relay+endpoint and 2 workers in the script, got {records}"
        roles = fedexec_roles([psutil.Process(pid) for pid, _ in records])
        assert roles == ["fedexec.colocated", "fedexec.worker", "fedexec.worker"], roles
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        alive = wait_gone(records, 15.0)
        assert not alive, f"still running 15 s after the program was SIGKILLed: {describe(alive)}"
    finally:
        stop_script(proc, records)


@pytest.mark.timeout(90)
def test_sigkilled_program_leaves_no_files(tmp_path):
    """The private relay directory (socket, relay store with the task data)
    must not outlive a SIGKILLed program any more than its processes do."""
    proc = start_script(tmp_path, "hold")
    records: list[tuple[int, float]] = []
    try:
        result, records = read_script(proc, until="READY", tmp_path=tmp_path)
        assert result == 144
        assert any((tmp_path / "tmp").iterdir()), "the embedded default made nothing in TMPDIR?"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        alive = wait_gone(records, 15.0)
        assert not alive, f"still running 15 s after the program was SIGKILLed: {describe(alive)}"
        left = wait_tmp_empty(tmp_path, 5.0)
        assert not left, f"files left in the program's TMPDIR after it was SIGKILLed: {left}"
    finally:
        stop_script(proc, records)


@pytest.mark.timeout(60)
def test_shutdown_without_wait_still_finishes_at_interpreter_exit(tmp_path):
    """As with the standard executors: the program does not exit until the
    futures submitted before shutdown(wait=False) are done."""
    marker = tmp_path / "callback-ran"
    script = tmp_path / "nowait.py"
    script.write_text(
        "import time\n"
        "from fedexec import FederatedExecutor\n"
        "ex = FederatedExecutor(max_workers=1)\n"
        "f = ex.submit(time.sleep, 1.0)\n"
        f"f.add_done_callback(lambda f: open({str(marker)!r}, 'w').write('done'))\n"
        "ex.shutdown(wait=False)\n"
        "print('returned', flush=True)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert "returned" in out.stdout
    assert marker.read_text() == "done"
