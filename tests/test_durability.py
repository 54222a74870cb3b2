"""Nothing accepted is lost: the relay, endpoints and workers are killed with
real signals while tasks stream through, and every result arrives exactly
once."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import cloudpickle
import psutil
import pytest

import fedexec
from fedexec import FederatedExecutor

from conftest import workers_of
from test_faults import free_port, lookup_endpoint, stop_process, tail

cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEADLINE = 60.0


def record_and_return(log_dir, value, delay):
    """Leaves a mark per execution (to count re-runs), then returns value."""
    time.sleep(delay)
    with open(os.path.join(log_dir, f"{os.getpid()}.log"), "a") as f:
        f.write(f"{value}\n")
    return value * 2


def executions(log_dir: Path) -> Counter:
    counts: Counter = Counter()
    for path in log_dir.glob("*.log"):
        counts.update(int(line) for line in path.read_text().split())
    return counts


class Relay:
    """A relay subprocess on a fixed loopback port and data dir, so that it
    can be killed and started again as the same relay."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.extra = list(extra)
        self.directory = directory
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.log = directory / "relay.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedexec.relay", "--address", self.address,
                 "--data-dir", str(self.directory / "relay-data"), "--parent-pid", str(os.getpid()), *self.extra],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.directory)

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, tail(self.log)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class Endpoint:
    def __init__(self, directory: Path, relay: Relay, workers: int = 2) -> None:
        self.directory = directory
        self.relay = relay
        self.workers = workers
        self.endpoint_id = str(uuid.uuid4())
        self.log = directory / "endpoint.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedexec.endpoint", "--name", "durable", "--relay", self.relay.address,
                 "--endpoint-id", self.endpoint_id, "--max-workers", str(self.workers),
                 "--heartbeat-period", "0.2", "--parent-pid", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.directory)
        lookup_endpoint(self.relay.address, self.endpoint_id, self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


@contextlib.contextmanager
def started_federation(directory: Path, *relay_args: str, workers: int = 2):
    """A relay (with extra command-line arguments) and an endpoint, stopped after."""
    relay = Relay(directory, *relay_args)
    relay.start()
    endpoint = Endpoint(directory, relay, workers)
    try:
        endpoint.start()
        yield relay, endpoint
    finally:
        endpoint.stop()
        relay.stop()


@pytest.fixture
def federation(tmp_path):
    with started_federation(tmp_path) as (relay, endpoint):
        yield relay, endpoint


def submit_stream(ex, log_dir, count, delay):
    done_calls: Counter = Counter()
    lock = threading.Lock()

    def on_done(fut):
        with lock:
            done_calls[fut] += 1

    futures = []
    for i in range(count):
        fut = ex.submit(record_and_return, str(log_dir), i, delay)
        fut.add_done_callback(on_done)
        futures.append(fut)
    return futures, done_calls


def assert_exactly_once(futures, done_calls, count):
    values = [f.result(DEADLINE) for f in futures]
    assert values == [2 * i for i in range(count)]
    time.sleep(0.5)  # a duplicate completion would show up here
    assert len(done_calls) == count and set(done_calls.values()) == {1}


@pytest.mark.timeout(120)
def test_relay_killed_and_restarted_loses_nothing(federation, tmp_path):
    relay, endpoint = federation
    log_dir = tmp_path / "runs"
    log_dir.mkdir()
    count = 400
    with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
        futures, done_calls = submit_stream(ex, log_dir, count, 0.005)
        waiter_result = []
        waiter = threading.Thread(target=lambda: waiter_result.append(futures[-1].result(DEADLINE)))
        waiter.start()  # a caller blocked in result() across the outage
        deadline = time.monotonic() + 20
        while sum(f.done() for f in futures) < count // 4:
            assert time.monotonic() < deadline, "tasks did not start finishing"
            time.sleep(0.01)
        relay.kill()          # tasks queued, running and finished-but-not-delivered
        assert any(not f.done() for f in futures)
        time.sleep(0.5)
        relay.start()         # same address, same data dir
        assert_exactly_once(futures, done_calls, count)
        waiter.join(DEADLINE)
        assert waiter_result == [2 * (count - 1)]
        # and the restarted relay keeps serving new work
        assert ex.submit(record_and_return, str(log_dir), 10_000, 0).result(DEADLINE) == 20_000
    runs = executions(log_dir)
    assert set(runs) == set(range(count)) | {10_000}
    print(f"re-executed after the relay restart: {sum(n - 1 for n in runs.values())} task(s)")
    assert endpoint.proc.poll() is None, tail(endpoint.log)


# -- retries and walltimes -------------------------------------------------------

def sleep_then(delay, value):
    time.sleep(delay)
    return value


def fail_until(counter_path, failures):
    """Raises the first ``failures`` times it runs (counted in a file)."""
    with open(counter_path, "a+") as f:
        f.seek(0)
        runs = len(f.read())
        f.write("x")
    if runs < failures:
        raise ValueError(f"run {runs + 1} fails")
    return runs + 1


def kill_own_worker_once(marker_path):
    """SIGKILLs its own worker the first time it runs; returns its pid after."""
    if not os.path.exists(marker_path):
        open(marker_path, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


@pytest.mark.timeout(60)
def test_task_timeout_stops_only_that_task(executor):
    slow = executor.submit(fedexec.with_options(sleep_then, timeout=0.5), 30, "never")
    others = [executor.submit(sleep_then, 0.05, i) for i in range(6)]
    # timed from the moment the task runs: on a loaded machine the worker may take seconds to start
    deadline = time.monotonic() + DEADLINE
    while not (slow.running() or slow.done()) and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.monotonic()
    with pytest.raises(fedexec.TaskTimeout, match=r"timeout of 0\.5 s") as raised:
        slow.result(DEADLINE)
    assert time.monotonic() - start < 5.0
    assert raised.value.timeout == 0.5 and raised.value.endpoint == executor.endpoint_name
    assert [f.result(DEADLINE) for f in others] == list(range(6))
    assert executor.submit(sleep_then, 0, "after").result(DEADLINE) == "after"


@pytest.mark.timeout(60)
def test_executor_task_timeout_applies_to_every_call():
    with FederatedExecutor(max_workers=1, task_timeout=0.4) as ex:
        with pytest.raises(fedexec.TaskTimeout):
            ex.submit(sleep_then, 30, None).result(DEADLINE)
        assert ex.submit(sleep_then, 0.01, "quick").result(DEADLINE) == "quick"
        # a per-function option overrides the executor's
        assert ex.submit(fedexec.with_options(sleep_then, timeout=5), 0.6, "ok").result(DEADLINE) == "ok"


@pytest.mark.timeout(60)
def test_max_retries_runs_a_raising_task_again(executor, tmp_path):
    ok = executor.submit(fedexec.with_options(fail_until, max_retries=2), str(tmp_path / "a"), 2)
    assert ok.result(DEADLINE) == 3  # failed twice, the third run returned
    failing = executor.submit(fedexec.with_options(fail_until, max_retries=1), str(tmp_path / "b"), 5)
    with pytest.raises(ValueError, match="run 2 fails"):
        failing.result(DEADLINE)
    plain = executor.submit(fail_until, str(tmp_path / "c"), 1)  # default: no retries
    with pytest.raises(ValueError, match="run 1 fails"):
        plain.result(DEADLINE)


@pytest.mark.timeout(60)
def test_a_task_whose_worker_dies_once_runs_again_and_succeeds(executor, tmp_path):
    fut = executor.submit(kill_own_worker_once, str(tmp_path / "killed"))
    pid = fut.result(DEADLINE)
    assert (tmp_path / "killed").exists() and pid != 0


@pytest.mark.parametrize("bad, words", [
    ({"timeout": 0}, "timeout"), ({"timeout": -1}, "timeout"), ({"timeout": "5"}, "timeout"),
    ({"max_retries": -1}, "max_retries"), ({"max_retries": 1.5}, "max_retries"),
    ({"max_retries": 10_000}, "max_retries"),
])
def test_bad_task_options_are_refused_with_their_name(bad, words):
    with pytest.raises(ValueError, match=words):
        fedexec.with_options(sleep_then, **bad)


# -- faults at random points ----------------------------------------------------

@pytest.mark.timeout(240)
def test_random_kills_of_relay_endpoint_and_workers_lose_nothing(federation, tmp_path):
    """A bounded stream of tasks; the relay, the endpoint and workers are
    killed with SIGKILL at random moments (seeded); every result arrives,
    exactly once."""
    relay, endpoint = federation
    seed = int(os.environ.get("FEDEXEC_FAULT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    log_dir = tmp_path / "runs"
    log_dir.mkdir()
    count = 1500
    faults: list[str] = []
    orphans: list[psutil.Process] = []   # workers of killed endpoints: they must stop by themselves
    with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
        futures, done_calls = submit_stream(ex, log_dir, count, 0.002)
        plan = ["relay", "worker", "endpoint", "relay", "worker"]
        rng.shuffle(plan)
        for what in plan:
            target = rng.uniform(0.05, 0.9) * count
            deadline = time.monotonic() + 60
            while sum(f.done() for f in futures) < min(target, count - 1) and time.monotonic() < deadline:
                time.sleep(0.005)
            if all(f.done() for f in futures):
                break
            if what == "relay":
                relay.kill()
                time.sleep(rng.uniform(0.05, 0.5))
                relay.start()
            elif what == "endpoint":
                orphans += psutil.Process(endpoint.proc.pid).children(recursive=True)
                endpoint.proc.send_signal(signal.SIGKILL)
                endpoint.proc.wait(10)
                time.sleep(rng.uniform(0.05, 0.5))
                endpoint.start()
            else:
                workers = workers_of(endpoint.proc.pid)
                if not workers:
                    continue
                rng.choice(workers).send_signal(signal.SIGKILL)
            faults.append(what)
        try:
            assert_exactly_once(futures, done_calls, count)
        except BaseException:
            print(f"seed {seed}, faults {faults}\nrelay log:\n{tail(relay.log)}\nendpoint log:\n{tail(endpoint.log)}")
            raise
    runs = executions(log_dir)
    assert set(runs) == set(range(count)), f"seed {seed}"
    gone, alive = psutil.wait_procs(orphans, timeout=10)
    for proc in alive:
        proc.kill()
    assert not alive, f"seed {seed}: workers outlived their killed endpoint: {[p.pid for p in alive]}"
    print(f"seed {seed}: faults {faults}; {count} tasks, {count} results, 0 lost, "
          f"{sum(n - 1 for n in runs.values())} re-executed")


# -- shutdown with the relay gone --------------------------------------------------

@pytest.mark.timeout(90)
def test_interpreter_exit_does_not_hang_when_the_relay_is_gone(federation, tmp_path):
    relay, endpoint = federation
    report = tmp_path / "report.txt"
    program = tmp_path / "prog.py"
    program.write_text(f"""
import time
from fedexec import FederatedExecutor

ex = FederatedExecutor({endpoint.endpoint_id!r}, relay={relay.address!r})
fut = ex.submit(time.sleep, 60)
fut.add_done_callback(lambda f: open({str(report)!r}, "w").write(type(f.exception()).__name__))
print("submitted", flush=True)
""")
    proc = subprocess.Popen([sys.executable, str(program)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == "submitted"
        time.sleep(0.5)
        relay.kill()
        start = time.monotonic()
        proc.wait(40)  # interpreter exit waits for the task only while the relay answers
        assert proc.returncode == 0, proc.stderr.read()
        assert time.monotonic() - start < 30
        assert report.read_text() == "RelayUnavailable"
    finally:
        stop_process(proc)


# -- reattach ---------------------------------------------------------------------

@pytest.mark.timeout(90)
@pytest.mark.parametrize("keep", [True, False], ids=["keep-results", "no-keep-results"])
def test_a_new_process_reattaches_to_tasks_of_one_that_died(tmp_path, keep):
    with started_federation(tmp_path, *([] if keep else ["--no-keep-results"])) as federation:
        reattach_to_tasks_of_one_that_died(federation, tmp_path, keep)


def reattach_to_tasks_of_one_that_died(federation, tmp_path, keep):
    relay, endpoint = federation
    program = tmp_path / "submitter.py"
    program.write_text(f"""
import os, time
from fedexec import FederatedExecutor

ex = FederatedExecutor({endpoint.endpoint_id!r}, relay={relay.address!r})
futures = [ex.submit(time.sleep, 0.3 * i) for i in range(6)]
futures.append(ex.submit(divmod, 7, 0))
while not futures[0].done():
    time.sleep(0.01)
time.sleep(0.2)
print(" ".join(f.task_id for f in futures), flush=True)
os._exit(0)  # dies without shutdown: nobody waits for the rest
""")
    out = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    task_ids = out.stdout.split()
    assert len(task_ids) == 7
    time.sleep(1.0)  # some finish while nobody is connected to fetch them
    with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
        futures = ex.reattach(task_ids)
        assert [f.task_id for f in futures] == task_ids
        assert [f.result(DEADLINE) for f in futures[1:6]] == [None] * 5
        with pytest.raises(ZeroDivisionError):
            futures[6].result(DEADLINE)
        time.sleep(0.5)  # the acknowledgements reach the store
        again = ex.reattach(task_ids[:2])
        if keep:   # (a relay started from the CLI) results stay readable after they were received, however often
            assert [f.result(DEADLINE) for f in again] == [None, None]
        else:
            # the first one was fetched and acknowledged by the submitter, the second by this executor:
            # a relay that does not keep received results forgot them
            for future in again:
                with pytest.raises(fedexec.TaskLost, match="no record"):
                    future.result(DEADLINE)
        with pytest.raises(ValueError, match="not a task id"):
            ex.reattach(["not-a-uuid"])


# -- limits -------------------------------------------------------------------------

def make_bytes(n):
    return b"x" * n


@pytest.mark.timeout(90)
def test_payload_limit_refuses_large_arguments_and_results_with_size_and_limit(tmp_path):
    with started_federation(tmp_path, "--max-payload", "100000", workers=1) as (relay, endpoint):
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            # arguments: refused in the caller, before anything is sent
            fut = ex.submit(len, b"y" * 200_000)
            with pytest.raises(fedexec.PayloadTooLarge, match=r"200,0\d\d bytes.*100,000 bytes") as raised:
                fut.result(0)
            assert raised.value.limit == 100_000 and raised.value.size > 200_000
            # the relay refuses them too, for a client that does not check
            ex._dispatcher.max_payload = None
            with pytest.raises(fedexec.PayloadTooLarge, match="100,000 bytes"):
                ex.submit(len, b"y" * 200_000).result(DEADLINE)
            # results: refused on the endpoint, the task fails, the worker lives on
            with pytest.raises(fedexec.PayloadTooLarge, match=r"result is 200,0\d\d bytes.*100,000"):
                ex.submit(make_bytes, 200_000).result(DEADLINE)
            assert ex.submit(make_bytes, 1000).result(DEADLINE) == b"x" * 1000
            results = ex.map(len, [b"a" * 10, b"b" * 300_000])
            assert next(results) == 10
            with pytest.raises(fedexec.PayloadTooLarge):
                next(results)


# -- backpressure -----------------------------------------------------------------

@pytest.mark.timeout(120)
def test_submit_blocks_while_max_in_flight_tasks_are_out(tmp_path):
    gate = tmp_path / "gate"
    with FederatedExecutor(max_workers=1, max_in_flight=5) as ex:
        first = [ex.submit(wait_for_file, str(gate)) for _ in range(5)]
        blocked = threading.Event()
        sixth: list = []

        def submit_sixth():
            blocked.set()
            sixth.append(ex.submit(abs, -6))

        thread = threading.Thread(target=submit_sixth)
        thread.start()
        assert blocked.wait(5)
        time.sleep(0.5)
        assert not sixth, "submit did not wait for room"
        gate.touch()
        thread.join(DEADLINE)
        assert sixth and sixth[0].result(DEADLINE) == 6
        assert all(f.result(DEADLINE) for f in first)
        # a map larger than the limit goes through in turns
        assert list(ex.map(abs, range(-50, 0))) == list(range(50, 0, -1))
    with pytest.raises(ValueError, match="max_in_flight"):
        FederatedExecutor(max_in_flight=0)


def wait_for_file(path, limit=30.0):
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return True


@pytest.mark.timeout(60)
def test_map_buffersize_reads_lazily_and_keeps_order(executor):
    consumed = []

    def numbers():
        for i in range(1000):
            consumed.append(i)
            yield i

    results = executor.map(abs, numbers(), buffersize=10)
    assert len(consumed) == 10  # only the first buffer was read
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    assert len(consumed) < 30
    assert list(results) == list(range(3, 1000))
    infinite = executor.map(abs, itertools.count(), buffersize=4, chunksize=3)
    assert [next(infinite) for _ in range(20)] == list(range(20))
    infinite.close()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="buffersize"):
            executor.map(abs, [1], buffersize=bad)


# -- endpoint silence, and Ctrl-C ---------------------------------------------------

@pytest.mark.timeout(90)
def test_a_stalled_endpoint_is_marked_disconnected_and_comes_back(federation, tmp_path):
    """SIGSTOP the endpoint (as when its network goes): the relay marks it
    disconnected after its heartbeats stop; SIGCONT: its late heartbeat is
    answered with 'who are you', it says hello again, and every task runs."""
    from fedexec.relay.query import lookup_endpoint as ask

    relay, endpoint = federation
    log_dir = tmp_path / "runs"
    log_dir.mkdir()
    with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
        futures, done_calls = submit_stream(ex, log_dir, 200, 0.01)
        time.sleep(0.3)
        endpoint.proc.send_signal(signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 10
            while ask(relay.address, endpoint.endpoint_id)["status"] != "disconnected":
                assert time.monotonic() < deadline, "the relay did not notice the silent endpoint"
                time.sleep(0.1)
        finally:
            endpoint.proc.send_signal(signal.SIGCONT)
        assert_exactly_once(futures, done_calls, 200)
        assert ask(relay.address, endpoint.endpoint_id)["status"] == "connected"
    assert endpoint.proc.poll() is None, tail(endpoint.log)


@pytest.mark.timeout(60)
def test_ctrl_c_stops_an_endpoint_and_its_workers(federation):
    relay, endpoint = federation
    with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
        assert ex.submit(abs, -1).result(DEADLINE) == 1
    workers = workers_of(endpoint.proc.pid)
    assert len(workers) == 2
    endpoint.proc.send_signal(signal.SIGINT)
    assert endpoint.proc.wait(10) == 0, tail(endpoint.log)
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
    relay.proc.send_signal(signal.SIGINT)
    assert relay.proc.wait(10) == 0, tail(relay.log)


@pytest.mark.timeout(90)
def test_results_nobody_fetches_expire_after_the_ttl(tmp_path):
    with started_federation(tmp_path, "--result-ttl", "3", workers=1) as (relay, endpoint):
        program = tmp_path / "leave.py"
        program.write_text(f"""
import os
import time
from fedexec import FederatedExecutor

def sleep_then(delay, value):
    time.sleep(delay)
    return value

ex = FederatedExecutor({endpoint.endpoint_id!r}, relay={relay.address!r})
a, b = ex.submit(sleep_then, 0.5, 32), ex.submit(sleep_then, 0.5, 64)
print(a.task_id, b.task_id, flush=True)
import time; time.sleep(0.2)
os._exit(0)  # gone before the results: nobody receives or acknowledges them
""")
        out = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=60)
        first, second = out.stdout.split()
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            time.sleep(0.8)
            assert ex.reattach([first])[0].result(DEADLINE) == 32   # within the TTL: still there
            # past it (the second finished within ~0.5 s of the first; expiry looks every ttl/2): dropped
            time.sleep(7.5)
            with pytest.raises(fedexec.TaskLost):
                ex.reattach([second])[0].result(DEADLINE)


@pytest.mark.timeout(120)
def test_an_endpoint_paused_a_moment_keeps_its_own_pool_and_the_task_it_runs(tmp_path):
    """The endpoint process is stopped (SIGSTOP) for 1.2 s while its pool,
    which runs in its own process (in_process, the default), has a task
    running: less than the relay's patience, more than is left of the pool's
    heartbeat window. The endpoint must not take the pool for gone (before,
    it did: "sent nothing for 1.6 s", its running task taken back and counted
    lost); the task runs once and its result arrives."""
    marks = tmp_path / "marks"
    marks.mkdir()
    with started_federation(tmp_path, workers=1) as (relay, endpoint):
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            assert ex.submit(record_and_return, str(marks), 0, 0).result(DEADLINE) == 0
            running = ex.submit(record_and_return, str(marks), 1, 4.0)
            deadline = time.monotonic() + DEADLINE
            while not running.running() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert running.running(), tail(endpoint.log)
            endpoint.proc.send_signal(signal.SIGSTOP)
            try:
                time.sleep(1.2)
            finally:
                endpoint.proc.send_signal(signal.SIGCONT)
            assert running.result(DEADLINE) == 2
            time.sleep(1.0)   # (a second run would leave its mark meanwhile)
    assert executions(marks) == Counter({0: 1, 1: 1}), tail(endpoint.log)
    assert "sent nothing for" not in endpoint.log.read_text(), tail(endpoint.log)
