"""The client's memory for long maps and for futures (issue 17: a 1M-task
``map`` held ~2 GB in the client).

- A finished future that no thread waited on holds no deque of waiters (an
  empty deque is 760 bytes, 60 % of a finished future); waiting, timing out
  and waking several waiters still work as with the standard condition.
- A ``map`` (without ``buffersize``) whose submission waits for room
  (``max_in_flight``) replaces the futures of finished calls by their
  outcomes while it goes on submitting: after ``map()`` returns, the client
  holds about ``max_in_flight`` futures, not one per call; the iterator
  gives the same values in order, raises a call's exception where that call
  is, and keeps CPython's timeout.

Everything runs for real: the embedded default (relay, endpoint, workers).
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import threading
import time

import pytest

from fedexec import FederatedExecutor
from fedexec.dispatcher import TaskFuture

from test_executor_contract import wait_for_gate


def inverse(x):
    return 1 / x


def live_task_futures() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is TaskFuture)


@pytest.fixture(scope="module")
def narrow():
    """An embedded executor with little room: max_in_flight=64."""
    ex = FederatedExecutor(max_workers=2, max_in_flight=64)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(120)
def test_a_long_map_holds_outcomes_not_a_future_per_call(narrow):
    n = 3000
    before = live_task_futures()
    results = narrow.map(inverse, range(1, n + 1))   # returns once every call is submitted
    held = live_task_futures() - before
    # the last group handed over (batch_size, 1024 by default), unfinished
    assert held <= 1024, f"the map holds {held} futures for {n} calls"
    assert list(results) == [1 / x for x in range(1, n + 1)]


@pytest.mark.timeout(120)
def test_a_long_map_raises_a_calls_exception_where_that_call_is(narrow):
    values = list(range(-1500, 1500))   # 1 / 0 at position 1500
    it = narrow.map(inverse, values)
    got = []
    with pytest.raises(ZeroDivisionError):
        for value in it:
            got.append(value)
    assert got == [1 / x for x in values[:1500]]


@pytest.mark.timeout(120)
def test_a_long_map_keeps_the_timeout(narrow, tmp_path):
    gate = tmp_path / "gate"   # the last call waits for it; the others find their gate (tmp_path) open
    gates = [str(gate) if i == 2999 else str(tmp_path) for i in range(3000)]
    try:
        it = narrow.map(wait_for_gate, gates, range(3000), timeout=20.0)
        got = []
        with pytest.raises(cf.TimeoutError):
            for value in it:
                got.append(value)
        # every call before the slow one comes back, in order, then the timeout (also those that ran just
        # before it on its worker: the worker's control thread sends what its main thread held, outgoing.py)
        assert got == list(range(2999)), (len(got), got[-3:])
    finally:
        gate.touch()


@pytest.mark.timeout(60)
def test_a_finished_future_nobody_waited_on_holds_no_deque(narrow):
    future = narrow.submit(inverse, 2)
    assert cf.wait([future], timeout=30).done   # (cf.wait waits through the future's own list, not its condition)
    assert future.result(0) == 0.5
    assert type(future._condition._waiters) is tuple and not future._condition._waiters


@pytest.mark.timeout(60)
def test_several_threads_waiting_on_one_future_all_wake(narrow, tmp_path):
    gate = tmp_path / "gate"
    future = narrow.submit(wait_for_gate, str(gate), "done")
    got: list[object] = []
    try:
        with pytest.raises(cf.TimeoutError):
            future.result(timeout=0.2)   # a waiter that times out leaves no trace behind
        threads = [threading.Thread(target=lambda: got.append(future.result(30))) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        assert got == []
        gate.touch()
        for t in threads:
            t.join(30)
        assert got == ["done"] * 4
        assert len(future._condition._waiters) == 0
    finally:
        gate.touch()
