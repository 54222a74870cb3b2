"""No head-of-line blocking (issue 17): tasks queued at a worker behind a
long task are recalled for an idle worker (pool/stealing.py, the worker's
control thread in worker/control.py); a task still runs exactly once, a
cancel() that says True means it never runs, and a worker killed -9 loses
nothing."""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest

from fedexec import FederatedExecutor
from fedexec.worker.control import TaskQueue

# tests/ is not on the workers' path: these functions travel by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEADLINE = 30.0


def mark_once(path: str, value: int) -> int:
    """Record that this task ran; a second run of the same task fails (O_EXCL)."""
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    return value


def mark_once_then_sleep(path: str, value: int, delay: float) -> int:
    mark_once(path, value)
    time.sleep(delay)
    return value


def long_until_gate(gate: str, pids: str, limit: float = 20.0) -> str:
    """Write this worker's pid (a line per run), then wait for ``gate``."""
    with open(pids, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + limit
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError("the gate was never opened")
        time.sleep(0.005)
    return "long done"


def noop(x: int) -> int:
    return x


def warm(ex: FederatedExecutor) -> None:
    """Quick tasks first, so the pool sends them in batches (the case where
    they queue at a worker)."""
    assert list(ex.map(noop, range(500))) == list(range(500))


def wait_for_file(path: Path, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text().strip():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never written")
        time.sleep(0.01)


@pytest.mark.timeout(120)
def test_tiny_tasks_do_not_wait_behind_a_long_one(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    gate, pids = tmp_path / "gate", tmp_path / "pids"
    with FederatedExecutor(max_workers=2) as ex:
        warm(ex)
        try:
            long = ex.submit(long_until_gate, str(gate), str(pids))
            wait_for_file(pids)
            started = time.monotonic()
            tiny = [ex.submit(mark_once, str(marks / str(i)), i) for i in range(200)]
            done, not_done = cf.wait(tiny, timeout=10.0)
            took = time.monotonic() - started
            assert not not_done, f"{len(not_done)} of 200 tiny tasks still waiting after 10 s behind the long one"
            assert not long.done(), "the long task finished early: the test proves nothing"
        finally:
            gate.touch()
        assert [f.result(0) for f in tiny] == list(range(200))
        assert long.result(DEADLINE) == "long done"
    # measured target 0.5 s (benchmarks/head_of_line.py); generous here, for a loaded machine
    assert took < 3.0, f"the 200 tiny tasks took {took:.2f} s beside the long one"
    assert sorted(int(p.name) for p in marks.iterdir()) == list(range(200))
    assert len(pids.read_text().split()) == 1, "the long task ran more than once"


@pytest.mark.timeout(120)
def test_cancel_of_tasks_queued_behind_a_long_one_answers_at_once(tmp_path):
    """Both workers busy with long tasks, quick tasks queued at them: cancel()
    says True at once (the control thread takes them out), and they never run."""
    marks = tmp_path / "marks"
    marks.mkdir()
    gate = tmp_path / "gate"
    with FederatedExecutor(max_workers=2) as ex:
        warm(ex)
        try:
            longs = [ex.submit(long_until_gate, str(gate), str(tmp_path / f"pids-{i}")) for i in range(2)]
            for i in range(2):
                wait_for_file(tmp_path / f"pids-{i}")
            victims = [ex.submit(mark_once, str(marks / str(i)), i) for i in range(40)]
            time.sleep(0.5)   # they reach the workers' queues (and sockets)
            started = time.monotonic()
            answers = [v.cancel() for v in victims]
            took = time.monotonic() - started
            assert not any(f.done() for f in longs)
        finally:
            gate.touch()
        assert [f.result(DEADLINE) for f in longs] == ["long done"] * 2
        after = [ex.submit(mark_once, str(marks / f"after-{i}"), i) for i in range(10)]
        assert [f.result(DEADLINE) for f in after] == list(range(10))
    assert answers == [True] * 40, answers
    assert took < 5.0, f"cancelling 40 queued tasks took {took:.2f} s"
    assert sorted(p.name for p in marks.iterdir()) == sorted(f"after-{i}" for i in range(10)), \
        "a task whose cancel() said True ran"


@pytest.mark.timeout(180)
def test_recalls_and_cancels_under_churn_run_each_task_at_most_once(tmp_path):
    """Tasks of mixed lengths (recalls happen often) while some are cancelled:
    every task not cancelled runs exactly once; none cancelled runs."""
    marks = tmp_path / "marks"
    marks.mkdir()
    rng = random.Random(17)
    delays = [rng.choice([0.0, 0.0, 0.0, 0.03, 0.2]) for _ in range(400)]
    with FederatedExecutor(max_workers=2) as ex:
        warm(ex)
        futures = [ex.submit(mark_once_then_sleep, str(marks / str(i)), i, d) for i, d in enumerate(delays)]
        cancelled = set()
        for i, fut in enumerate(futures):
            if i % 7 == 3:
                time.sleep(0.01)
                if fut.cancel():
                    cancelled.add(i)
        done, not_done = cf.wait(futures, timeout=90)
        assert not not_done, f"{len(not_done)} tasks never finished"
    assert cancelled, "nothing was cancelled: the test proves nothing"
    for i, fut in enumerate(futures):
        if i not in cancelled:
            assert fut.result(0) == i   # a second run would have failed on its mark (O_EXCL)
    ran = {int(p.name) for p in marks.iterdir()}
    assert ran & cancelled == set(), f"cancelled tasks ran: {sorted(ran & cancelled)[:20]}"
    assert ran == set(range(400)) - cancelled


@pytest.mark.timeout(120)
def test_killing_the_worker_of_the_long_task_loses_nothing(tmp_path):
    """The tiny tasks recalled from behind a long task run elsewhere; kill -9
    of the long task's worker then runs the long task again; all once."""
    marks = tmp_path / "marks"
    marks.mkdir()
    gate, pids = tmp_path / "gate", tmp_path / "pids"
    with FederatedExecutor(max_workers=2) as ex:
        warm(ex)
        try:
            long = ex.submit(long_until_gate, str(gate), str(pids))
            wait_for_file(pids)
            tiny = [ex.submit(mark_once, str(marks / str(i)), i) for i in range(100)]
            done, not_done = cf.wait(tiny, timeout=10.0)
            assert not not_done
            os.kill(int(pids.read_text().split()[0]), signal.SIGKILL)
            more = [ex.submit(mark_once, str(marks / f"more-{i}"), i) for i in range(100)]
            assert [f.result(DEADLINE) for f in more] == list(range(100))
            deadline = time.monotonic() + DEADLINE
            while len(pids.read_text().split()) < 2:   # it runs again (worker_lost_retries)
                assert time.monotonic() < deadline, "the long task was not run again"
                time.sleep(0.01)
        finally:
            gate.touch()
        assert long.result(DEADLINE) == "long done"
        assert [f.result(0) for f in tiny] == list(range(100))
    assert len(list(marks.iterdir())) == 200


class _Task:
    def __init__(self, task_id: bytes, chained: bool = False) -> None:
        self.row = [task_id, b"f", 0, -1, 0, "3.11"] + ([{"d": [b"x"]}] if chained else [])


def test_task_queue_gives_back_exactly_what_will_not_run():
    """The worker's queue (control.py): a task is either taken to run or
    given back, never both; unread ones (a later TASKS message) are given
    back and dropped when read; chained ones are never given back."""
    queue = TaskQueue()
    queue.add([_Task(b"a"), _Task(b"b"), _Task(b"c", chained=True)], 1)
    assert queue.next().row[0] == b"a"   # running
    given, absent = queue.give_back([(b"a", 1), (b"b", 1), (b"c", 1), (b"d", 2), (b"e", 2)])
    assert sorted(given) == [b"b", b"d", b"e"] and sorted(absent) == [b"a", b"c"]
    queue.add([_Task(b"d"), _Task(b"e"), _Task(b"f")], 2)   # message 2, read after the recall
    assert [queue.next().row[0] for _ in range(2)] == [b"c", b"f"]
    assert queue.next() is None and not queue.revoked
    queue.give_back([(b"g", 3)])   # revoked in message 3 only: the same task in message 4 runs
    queue.add([_Task(b"g")], 3)
    queue.add([_Task(b"g")], 4)
    assert queue.next().row[0] == b"g" and queue.next() is None


def test_task_queue_under_two_threads_hands_each_task_out_once():
    """The main thread takes tasks while the control thread gives them back:
    every task is handed out exactly once."""
    for _ in range(20):
        queue = TaskQueue()
        ids = [i.to_bytes(4, "big") for i in range(2000)]
        queue.add([_Task(t) for t in ids[:1000]], 1)
        ran: list[bytes] = []
        given: list[bytes] = []

        def run() -> None:
            while True:
                task = queue.next()
                if task is None:
                    if len(ran) + len(given) >= 2000:
                        return
                    time.sleep(0)
                    continue
                ran.append(task.row[0])

        worker = threading.Thread(target=run)
        worker.start()
        got, _ = queue.give_back([(t, 1) for t in ids[:1000]] + [(t, 2) for t in ids[1000:]])
        given.extend(got)
        queue.add([_Task(t) for t in ids[1000:]], 2)
        worker.join(10)
        assert not worker.is_alive()
        assert sorted(ran + given) == ids
        assert set(given) >= set(ids[1000:])
