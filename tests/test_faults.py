"""Faults: each one gives a clear error on its own future, and nothing else is lost.

Everything here runs real processes: the embedded default (relay, endpoint and
worker processes on ipc sockets), or a relay started as a subprocess on
127.0.0.1, and an endpoint running under another Python version from a
virtualenv made for it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import cloudpickle
import psutil
import pytest
import zmq

from fedexec import (
    FederatedExecutor,
    RelayUnavailable,
    SerializationError,
    UnknownEndpoint,
    VersionMismatch,
    WorkerLost,
)
from fedexec import protocol as P
from fedexec.auth import connect_plainly, find_credentials

# This module is not importable on the workers (tests/ is not on their path),
# so its functions must travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROJECT_ROOT = Path(__file__).resolve().parents[1]
THIS_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


# -- functions run on the workers ------------------------------------------------

def square(x):
    return x * x


def slow_square(x):
    time.sleep(0.05)
    return x * x


def identity(x):
    return x


def pid_after(delay):
    time.sleep(delay)
    return os.getpid()


def return_lock():
    return threading.Lock()


def return_generator():
    return (i for i in range(3))


def exit_with(code):
    sys.exit(code)


def die_exit_1():
    os._exit(1)


def die_sigkill():
    os.kill(os.getpid(), signal.SIGKILL)


def die_segfault():
    import ctypes

    ctypes.string_at(0)


# -- helpers -------------------------------------------------------------------------

def current_worker_pids(ex: FederatedExecutor, n: int = 2, timeout: float = 20.0) -> set[int]:
    """The pids of the ``n`` workers now serving ``ex``: ``n`` tasks that each
    hold a worker for a moment run on ``n`` distinct processes. Retried while a
    replacement worker is still starting."""
    deadline = time.monotonic() + timeout
    seen: list[set[int]] = []
    while True:
        futures = [ex.submit(pid_after, 0.4) for _ in range(n)]
        pids = {f.result(timeout=30) for f in futures}
        if len(pids) == n:
            return pids
        seen.append(pids)
        if time.monotonic() > deadline:
            raise AssertionError(f"{n} concurrent tasks never ran on {n} distinct workers: {seen}")


def assert_ordinary_results(futures: list, values: list[int]) -> None:
    results = [f.result(timeout=60) for f in futures]
    assert results == [v * v for v in values], "an ordinary task around the faulty one was lost or wrong"


def submit_around(ex: FederatedExecutor, submit_faulty, fn=square):
    """Ordinary tasks before and after the faulty one; returns (faulty, others, values)."""
    before = [ex.submit(fn, i) for i in range(6)]
    faulty = submit_faulty()
    after = [ex.submit(fn, i) for i in range(6, 12)]
    return faulty, before + after, list(range(12))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a process we started (and then whatever it left behind), by pid."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:  # workers of a killed endpoint: by pid, never by name
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


@contextlib.contextmanager
def running_relay(directory: Path, *options: str, env: dict[str, str] | None = None):
    """A relay subprocess on a free loopback port (with more command-line
    ``options``); yields its address."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    log = directory / "relay.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedexec.relay", "--address", address,
             "--data-dir", str(directory / "relay-data"), "--parent-pid", str(os.getpid()), *options],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=directory, env=env)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the relay exited with code {proc.returncode}:\n{tail(log)}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                # listening; its files (secret, keys) are written once it is, then relay.json
                if (directory / "relay-data" / "relay.json").exists():
                    break
                raise OSError("relay.json not written yet")
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the relay did not listen on {address} within 20 s:\n{tail(log)}")
                time.sleep(0.05)
        yield address
    finally:
        stop_process(proc)


def lookup_endpoint(address: str, endpoint_id: str, proc: subprocess.Popen, log: Path,
                    timeout: float = 60.0) -> dict:
    """Ask the relay (over the wire protocol) until it reports ``endpoint_id``
    connected; fails if the endpoint process exits first."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"C" + uuid.uuid4().bytes)
    deadline = time.monotonic() + timeout
    try:
        while find_credentials(address) is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the relay writes its secret as it starts
        connect_plainly(sock, address)
        sock.send_multipart(P.encode(P.HELLO, {"role": "client", "id": uuid.uuid4().bytes,
                                               "py": P.PYTHON_VERSION}))
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the endpoint exited with code {proc.returncode}:\n{tail(log)}")
            sock.send_multipart(P.encode(P.LOOKUP, {"ep": endpoint_id}))
            if sock.poll(500):
                while sock.poll(0):
                    msg = P.decode(sock.recv_multipart())
                    if (msg.type == P.LOOKUP_REPLY and msg.fields.get("found")
                            and msg.fields["endpoint"].get("status") == "connected"):
                        return msg.fields["endpoint"]
            time.sleep(0.1)
        pytest.fail(f"the relay did not report endpoint {endpoint_id} connected within {timeout} s:\n{tail(log)}")
    finally:
        sock.close(linger=0)
        ctx.term()


def dispatcher_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "fedexec-dispatcher" and t.is_alive())


# -- serialization faults ---------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("make_arg, type_word", [
    (threading.Lock, "lock"),
    (lambda: (i for i in range(3)), "generator"),
], ids=["lock", "generator"])
def test_unpicklable_argument_fails_only_its_future(executor, make_arg, type_word):
    bad_arg = make_arg()
    faulty, others, values = submit_around(executor, lambda: executor.submit(identity, bad_arg))

    exc = faulty.exception(timeout=30)
    assert isinstance(exc, SerializationError), f"expected SerializationError, got {exc!r}"
    assert isinstance(exc, pickle.PicklingError)
    assert type_word in str(exc).lower(), f"the message does not name the type: {exc}"
    with pytest.raises(SerializationError):
        faulty.result(timeout=1)
    assert_ordinary_results(others, values)
    # the executor keeps working afterwards
    assert executor.submit(square, 12).result(timeout=30) == 144
    assert list(executor.map(square, range(10))) == [i * i for i in range(10)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make_closed_over, type_word", [
    (threading.Lock, "lock"),
    (lambda: (i for i in range(3)), "generator"),
], ids=["lock", "generator"])
def test_unpicklable_function_fails_only_its_future(executor, make_closed_over, type_word):
    held = make_closed_over()
    bad_fn = lambda: held is not None  # noqa: E731 - a closure over something unpicklable
    faulty, others, values = submit_around(executor, lambda: executor.submit(bad_fn))

    exc = faulty.exception(timeout=30)
    assert isinstance(exc, SerializationError), f"expected SerializationError, got {exc!r}"
    assert isinstance(exc, pickle.PicklingError)
    assert type_word in str(exc).lower(), f"the message does not name the type: {exc}"
    assert_ordinary_results(others, values)
    # the same executor still takes new functions, closures included
    offset = 5
    assert executor.submit(lambda x: x + offset, 1).result(timeout=30) == 6
    # and submitting the bad function again fails again, cleanly
    again = executor.submit(bad_fn)
    assert isinstance(again.exception(timeout=30), SerializationError)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fn, type_word", [
    (return_lock, "lock"),
    (return_generator, "generator"),
], ids=["lock", "generator"])
def test_unserializable_result_fails_only_its_future(executor, fn, type_word):
    faulty, others, values = submit_around(executor, lambda: executor.submit(fn))

    exc = faulty.exception(timeout=30)
    assert isinstance(exc, SerializationError), f"expected SerializationError, got {exc!r}"
    assert isinstance(exc, pickle.PicklingError)
    assert type_word in str(exc).lower(), f"the message does not name the type: {exc}"
    assert_ordinary_results(others, values)
    assert executor.submit(square, 9).result(timeout=30) == 81


# -- the function exits ---------------------------------------------------------------

@pytest.mark.timeout(60)
def test_sys_exit_raises_systemexit_with_its_code(executor):
    faulty, others, values = submit_around(executor, lambda: executor.submit(exit_with, 3))
    with pytest.raises(SystemExit) as info:
        faulty.result(timeout=30)
    assert info.value.code == 3, f"SystemExit arrived with code {info.value.code!r}, not 3"
    assert_ordinary_results(others, values)
    with pytest.raises(SystemExit) as info:
        executor.submit(exit_with, "bye").result(timeout=30)
    assert info.value.code == "bye"


@pytest.mark.timeout(90)
def test_sys_exit_does_not_cost_a_worker(executor):
    workers_before = current_worker_pids(executor)

    faulty, others, values = submit_around(executor, lambda: executor.submit(exit_with, 3))
    assert isinstance(faulty.exception(timeout=30), SystemExit)
    assert_ordinary_results(others, values)

    # several more exits, then the same two workers are still the ones serving
    exits = [executor.submit(exit_with, 3) for _ in range(4)]
    for f in exits:
        assert isinstance(f.exception(timeout=30), SystemExit)
    pids_seen = {f.result(timeout=30) for f in [executor.submit(pid_after, 0.01) for _ in range(20)]}
    assert pids_seen <= workers_before, f"tasks ran on new workers {pids_seen - workers_before}"
    assert current_worker_pids(executor) == workers_before, "sys.exit() in a task cost a worker"


# -- the worker dies ----------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("fn, exitcode, words", [
    (die_exit_1, 1, ["exit"]),
    (die_sigkill, -signal.SIGKILL, ["SIGKILL"]),
    (die_segfault, -signal.SIGSEGV, ["SIGSEGV"]),
], ids=["os._exit(1)", "SIGKILL", "segfault"])
def test_dead_worker_fails_only_its_future_and_is_replaced(executor, fn, exitcode, words):
    """A task that kills its worker every time is run 1 + worker_lost_retries
    (default 2) times, each on a fresh worker, then fails with WorkerLost."""
    workers_before = current_worker_pids(executor)

    faulty, others, values = submit_around(executor, lambda: executor.submit(fn), fn=slow_square)
    exc = faulty.exception(timeout=60)
    assert isinstance(exc, WorkerLost), f"expected WorkerLost, got {exc!r}"
    message = str(exc)
    assert exc.exitcode == exitcode, message
    assert "run 3 times" in message, message
    assert exc.pid > 0 and exc.pid not in current_worker_pids(executor), message
    assert exc.endpoint == executor.endpoint_name, message
    assert executor.endpoint_name and executor.endpoint_name in message, f"the endpoint is not named: {message}"
    assert str(exc.pid) in message, message
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    if exitcode > 0:  # the exit code itself is in the message
        assert re.search(rf"(?<!\d){exitcode}(?!\d)", message.replace(str(exc.pid), "")), message
    with pytest.raises(WorkerLost):
        faulty.result(timeout=1)
    assert_ordinary_results(others, values)

    # the dead worker is gone, the other one still serves, and a replacement joined it
    assert not psutil.pid_exists(exc.pid) or psutil.Process(exc.pid).status() == psutil.STATUS_ZOMBIE
    workers_after = current_worker_pids(executor)
    assert len(workers_after) == 2
    assert exc.pid not in workers_after
    assert len(workers_before - workers_after) <= 3, "more workers died than the task killed"
    many = [executor.submit(square, i) for i in range(50)]
    assert [f.result(timeout=60) for f in many] == [i * i for i in range(50)]


# -- endpoint and relay problems at construction -----------------------------------------

@pytest.mark.timeout(60)
def test_unknown_endpoint_raises_unknown_endpoint(tmp_path):
    threads_before = dispatcher_threads()
    with running_relay(tmp_path) as address:
        endpoint_id = str(uuid.uuid4())
        with pytest.raises(UnknownEndpoint) as info:
            FederatedExecutor(endpoint_id, relay=address, connect_timeout=10.0)
        assert endpoint_id in str(info.value)
        assert isinstance(info.value, LookupError)
        # the relay is fine afterwards: it still answers, and again says unknown
        with pytest.raises(UnknownEndpoint):
            FederatedExecutor(str(uuid.uuid4()), relay=address, connect_timeout=10.0)
    assert dispatcher_threads() == threads_before, "a failed construction left its dispatcher thread running"


@pytest.mark.timeout(30)
def test_non_uuid_endpoint_id_raises_unknown_endpoint_or_value_error():
    """A string that is not a UUID is a name (of a group or of an endpoint
    configured here): one nothing goes by is an UnknownEndpoint naming it;
    one that cannot be a name at all is a ValueError (first_contact.py)."""
    threads_before = dispatcher_threads()
    for bad in ["not-a-uuid", "1234", "my-endpoint"]:
        with pytest.raises(UnknownEndpoint) as info:
            FederatedExecutor(bad, relay=f"tcp://127.0.0.1:{free_port()}", connect_timeout=1.0)
        assert repr(bad) in str(info.value)
    for bad in ["", "no spaces please", ["not-a-uuid"]]:
        with pytest.raises(ValueError):
            FederatedExecutor(bad, relay=f"tcp://127.0.0.1:{free_port()}", connect_timeout=1.0)
    assert dispatcher_threads() == threads_before


@pytest.mark.timeout(30)
def test_unreachable_relay_raises_relay_unavailable_in_time():
    threads_before = dispatcher_threads()
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(RelayUnavailable) as info:
        FederatedExecutor(str(uuid.uuid4()), relay=address, connect_timeout=1.0)
    elapsed = time.monotonic() - start
    assert elapsed < 3.0, f"RelayUnavailable took {elapsed:.2f} s with connect_timeout=1.0"
    assert address in str(info.value)
    assert dispatcher_threads() == threads_before, "a failed construction left its dispatcher thread running"


# -- Python version mismatch ----------------------------------------------------------------

def _pick_other_python() -> tuple[str, str]:
    """An interpreter of another minor version that fedexec supports (>= 3.10),
    the nearest to this one (newer on a tie)."""
    found: dict[tuple[int, int], str] = {}
    for exe in sorted(glob.glob("/root/.pyenv/versions/*/bin/python")):
        m = re.fullmatch(r"(\d+)\.(\d+)\.\d+", Path(exe).parents[1].name)
        if not m:
            continue
        version = (int(m.group(1)), int(m.group(2)))
        if version >= (3, 10) and version != sys.version_info[:2] and os.access(exe, os.X_OK):
            found.setdefault(version, exe)
    if not found:
        pytest.fail("no Python of another minor version (>= 3.10) under /root/.pyenv/versions; "
                    "the version-mismatch test needs one")
    here = sys.version_info[0] * 100 + sys.version_info[1]
    version = min(found, key=lambda v: (abs(v[0] * 100 + v[1] - here), -v[1]))
    return found[version], f"{version[0]}.{version[1]}"


@pytest.fixture(scope="module")
def other_python(tmp_path_factory):
    """A virtualenv of another Python minor version with fedexec installed
    (from a copy of the source, so the work tree gets no build files)."""
    base_python, version = _pick_other_python()
    root = tmp_path_factory.mktemp("other-python")
    source = root / "src-copy"
    shutil.copytree(PROJECT_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "tests", ".venv", "venv", ".pytest_cache"))
    venv = root / "venv"
    log = root / "install.log"
    deadline = time.monotonic() + 300
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    with open(log, "wb") as out:
        for cmd in ([base_python, "-m", "venv", str(venv)],
                    [str(venv / "bin" / "python"), "-m", "pip", "install", str(source)]):
            try:
                done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      env=env, cwd=root, timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"making the Python {version} virtualenv took over 300 s: {cmd}\n{tail(log)}")
            if done.returncode != 0:
                pytest.fail(f"{cmd} failed with code {done.returncode}:\n{tail(log)}")
    python = str(venv / "bin" / "python")
    check = subprocess.run([python, "-c", "import sys, fedexec; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                           capture_output=True, text=True, env=env, cwd=root, timeout=60)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == version
    return python, version, env


@pytest.mark.timeout(400)
def test_endpoint_on_other_python_raises_version_mismatch(other_python, tmp_path):
    python, other_version, env = other_python
    env = {**env, "FEDEXEC_HOME": os.environ["FEDEXEC_HOME"]}  # where this test's relay left its secret
    assert other_version != THIS_PYTHON
    with running_relay(tmp_path) as address:
        endpoint_id = str(uuid.uuid4())
        log = tmp_path / "endpoint.log"
        with open(log, "wb") as out:
            endpoint = subprocess.Popen(
                [python, "-m", "fedexec.endpoint", "--name", "old", "--relay", address,
                 "--endpoint-id", endpoint_id, "--max-workers", "1", "--parent-pid", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            info = lookup_endpoint(address, endpoint_id, endpoint, log)
            assert info.get("py") == other_version, info

            threads_before = dispatcher_threads()
            start = time.monotonic()
            with pytest.raises(VersionMismatch) as raised:
                FederatedExecutor(endpoint_id, relay=address, connect_timeout=10.0)
            assert time.monotonic() - start < 10.0
            message = str(raised.value)
            assert other_version in message and THIS_PYTHON in message, message
            assert "old" in message, f"the endpoint is not named: {message}"
            assert dispatcher_threads() == threads_before
            assert endpoint.poll() is None, f"the endpoint died:\n{tail(log)}"
        finally:
            stop_process(endpoint)


class _StrFails(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")


def _raise_str_fails():
    raise _StrFails("boom")


@pytest.mark.timeout(60)
def test_exception_whose_str_fails_comes_back_as_itself(executor):
    fut = executor.submit(_raise_str_fails)
    exc = fut.exception(timeout=30)
    assert type(exc).__name__ == "_StrFails" and not isinstance(exc, WorkerLost)
    assert executor.submit(square, 4).result(timeout=30) == 16


def _exit_three():
    time.sleep(1.0)   # done after the test adds its callback, so the callback runs on fedexec's thread
    sys.exit(3)


@pytest.mark.timeout(60)
def test_done_callback_raising_systemexit_does_not_break_the_executor(executor):
    """result() of a task that called sys.exit raises SystemExit; a callback
    doing that runs on fedexec's thread, which must survive it."""
    seen = []

    def callback(f):
        seen.append(True)
        f.result()  # raises SystemExit(3)

    fut = executor.submit(_exit_three)
    fut.add_done_callback(callback)
    with pytest.raises(SystemExit):
        fut.result(timeout=30)
    assert seen == [True]
    assert [f.result(timeout=30) for f in [executor.submit(square, i) for i in range(10)]] == [i * i for i in range(10)]


def _die_hard():
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.timeout(90)
def test_worker_killed_inside_a_batch_loses_nothing_else():
    """Fast tasks travel to workers in batches. A worker killed mid-batch
    fails only the task it was running (named by its marker); the others in
    its batch are re-queued and every one completes exactly once."""
    with FederatedExecutor(max_workers=2) as ex:
        list(ex.map(square, range(2000)))  # warm: the endpoint learns the tasks are fast
        futures = [ex.submit(square, i) for i in range(3000)]
        killer = ex.submit(_die_hard)
        futures += [ex.submit(square, i) for i in range(3000, 6000)]
        with pytest.raises(WorkerLost) as info:
            killer.result(timeout=60)
        assert info.value.exitcode == -signal.SIGKILL
        assert [f.result(timeout=60) for f in futures] == [i * i for i in range(6000)]
        assert sum(1 for f in futures if f.exception() is not None) == 0
