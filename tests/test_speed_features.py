"""Batching knobs, memoization and tracing: what they promise, with real
processes. (How fast they are is measured in benchmarks/, not here.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import cloudpickle
import pytest

from fedexec import FederatedExecutor, memoized
from fedexec import protocol as P
from fedexec.relay.query import lookup_endpoint
from test_faults import free_port, stop_process

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def logged_double(path: str, x: int) -> int:
    """Appends one line per execution, so tests can count runs."""
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return 2 * x


def runs(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def fail_once(path: str) -> str:
    if not os.path.exists(path):
        open(path, "w").close()
        raise ValueError("first time fails")
    return "ok"


@pytest.mark.timeout(60)
def test_memoize_runs_each_distinct_call_once(tmp_path):
    log = tmp_path / "runs"
    with FederatedExecutor(max_workers=2, memoize=True) as ex:
        first = [ex.submit(logged_double, str(log), i % 5) for i in range(100)]  # many in flight at once
        assert [f.result(timeout=30) for f in first] == [2 * (i % 5) for i in range(100)]
        again = [ex.submit(logged_double, str(log), i) for i in range(5)]
        assert [f.result(timeout=30) for f in again] == [0, 2, 4, 6, 8]
    assert sorted(runs(log)) == [0, 1, 2, 3, 4]


@pytest.mark.timeout(60)
def test_memoized_marks_only_its_calls(tmp_path):
    log = tmp_path / "runs"
    with FederatedExecutor(max_workers=2) as ex:
        m = memoized(logged_double)
        assert [ex.submit(m, str(log), 7).result(timeout=30) for _ in range(3)] == [14, 14, 14]
        assert len(runs(log)) == 1
        assert [ex.submit(logged_double, str(log), 7).result(timeout=30) for _ in range(3)] == [14, 14, 14]
        assert len(runs(log)) == 4  # plain calls always run
    with pytest.raises(TypeError):
        memoized(42)


@pytest.mark.timeout(60)
def test_memoize_does_not_cache_exceptions(tmp_path):
    marker = tmp_path / "seen"
    with FederatedExecutor(max_workers=1, memoize=True) as ex:
        with pytest.raises(ValueError, match="first time"):
            ex.submit(fail_once, str(marker)).result(timeout=30)
        assert ex.submit(fail_once, str(marker)).result(timeout=30) == "ok"


@pytest.mark.timeout(60)
def test_cancelling_a_memo_twin_is_local_and_spares_its_carrier(tmp_path):
    log = tmp_path / "runs"
    with FederatedExecutor(max_workers=1, memoize=True) as ex:
        blocker = ex.submit(time.sleep, 1.0)
        carrier = ex.submit(logged_double, str(log), 3)
        twin = ex.submit(logged_double, str(log), 3)
        deadline = time.monotonic() + 10
        while not carrier._sent and time.monotonic() < deadline:  # the dispatcher has seen both
            time.sleep(0.01)
        time.sleep(0.05)
        assert not twin.done()
        started = time.monotonic()
        assert twin.cancel() is True and twin.cancelled()
        assert time.monotonic() - started < 1.0  # no network wait for a call that never left
        blocker.result(timeout=30)
        assert carrier.result(timeout=30) == 6
    assert runs(log) == [3]


@pytest.mark.timeout(90)
def test_memo_results_are_shared_through_the_relay(tmp_path):
    """A second client of the same relay gets the first client's memoized
    result from the relay's store, without running the function again."""
    address = f"tcp://127.0.0.1:{free_port()}"
    endpoint_id = str(uuid.uuid4())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    relay = subprocess.Popen([sys.executable, "-m", "fedexec.relay", "--address", address,
                              "--data-dir", str(tmp_path / "relay"), "--log-level", "WARNING"])
    endpoint = subprocess.Popen([sys.executable, "-m", "fedexec.endpoint", "--name", "memo", "--relay", address,
                                 "--endpoint-id", endpoint_id, "--max-workers", "1", "--log-level", "WARNING"],
                                env=env)
    log = tmp_path / "runs"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                view = lookup_endpoint(address, endpoint_id, timeout=0.5)
                if view and view["status"] == "connected":
                    break
            except TimeoutError:
                pass
            assert time.monotonic() < deadline, "endpoint did not connect"
        with FederatedExecutor(endpoint_id, relay=address, memoize=True) as first:
            assert first.submit(logged_double, str(log), 21).result(timeout=30) == 42
        with FederatedExecutor(endpoint_id, relay=address, memoize=True) as second:
            assert second.submit(logged_double, str(log), 21).result(timeout=30) == 42
            assert second.submit(logged_double, str(log), 22).result(timeout=30) == 44
        assert runs(log) == [21, 22]
    finally:
        for proc in (endpoint, relay):
            stop_process(proc)


@pytest.mark.timeout(60)
def test_trace_gives_every_stage_in_order():
    with FederatedExecutor(max_workers=2, trace=True) as ex:
        futures = [ex.submit(pow, 2, i) for i in range(50)]
        for f in futures:
            f.result(timeout=30)
            timings = f.fedexec_timings
            assert list(timings) == list(P.TRACE_STAGES)
            stamps = list(timings.values())
            assert stamps == sorted(stamps), timings  # one machine, one clock
            assert stamps[-1] - stamps[0] < 30


@pytest.mark.timeout(60)
def test_batch_window_does_not_delay_a_lone_task():
    with FederatedExecutor(max_workers=2, batch_window=0.5, batch_size=100) as ex:
        ex.submit(int).result(timeout=30)
        started = time.monotonic()
        assert ex.submit(pow, 3, 3).result(timeout=30) == 27
        assert time.monotonic() - started < 0.3  # idle executor: sent at once
        assert list(ex.map(abs, range(-500, 500))) == [abs(i) for i in range(-500, 500)]


@pytest.mark.timeout(60)
def test_batching_off_and_no_prefetch_still_correct():
    with FederatedExecutor(max_workers=2, batch_size=1, worker_batch=1, prefetch=0) as ex:
        assert list(ex.map(abs, range(-300, 300))) == [abs(i) for i in range(-300, 300)]


def test_knobs_are_checked():
    for kwargs in ({"batch_size": 0}, {"batch_window": -1}, {"batch_window": 5}, {"prefetch": -1},
                   {"worker_batch": 0}):
        with pytest.raises(ValueError):
            FederatedExecutor(**kwargs)
    with pytest.raises(ValueError, match="embedded default"):
        FederatedExecutor(str(uuid.uuid4()), relay="tcp://127.0.0.1:1", prefetch=2)
