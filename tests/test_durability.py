"""Nothing accepted is lost: the relay, endpoints and workers are killed with
real signals while tasks stream through, and every result arrives exactly
once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import cloudpickle
import pytest

from fedexec import FederatedExecutor

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

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.log = directory / "relay.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedexec.relay", "--address", self.address,
                 "--data-dir", str(self.directory / "relay-data"), "--parent-pid", str(os.getpid())],
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


@pytest.fixture
def federation(tmp_path):
    relay = Relay(tmp_path)
    relay.start()
    endpoint = Endpoint(tmp_path, relay)
    try:
        endpoint.start()
        yield relay, endpoint
    finally:
        endpoint.stop()
        relay.stop()


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
