"""Short one-at-a-time tasks (issue 17's sleep(1 ms) efficiency): a worker
holds a few milliseconds of them and sends their results several to a
message, at the low mark its pool names (TASKS option "lw",
worker/process.py, pool/stealing.py), instead of one message per task; the
pool tops it up in one message. What must stay true: every task runs once,
a cancel() that says True means the task never ran, and a long task among
them does not hold up those queued behind it while the other worker is
free (they are recalled)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import zmq

from fedexec import FederatedExecutor
from fedexec import protocol as P
from fedexec.serialize import serialize_arguments, serialize_function

from test_stealing import long_until_gate, mark_once_then_sleep

# tests/ is not on the workers' path: these functions travel by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEADLINE = 60.0


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


class WorkerUnderTest:
    """A real worker process (started as its pool starts it, its id on
    stdin), and this test as its pool: a ROUTER on its channel."""

    def __init__(self, tmp_path: Path) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        address = f"ipc://{tmp_path}/w.sock"
        self.sock.bind(address)
        self.worker_id = os.urandom(16)
        self.proc = subprocess.Popen([sys.executable, "-m", "fedexec.worker", "--address", address,
                                      "--parent-pid", str(os.getpid())], stdin=subprocess.PIPE)
        assert self.proc.stdin is not None
        self.proc.stdin.write(self.worker_id.hex().encode() + b"\n")
        self.proc.stdin.close()
        self.fn_hash, self.body = serialize_function(nap)
        self.body_sent = False
        assert self.next_message(20.0).type == P.READY

    def next_message(self, timeout: float) -> P.Message:
        """The next message on the worker's main channel, or RESULTS its
        control thread sent (results held past HELD_LIMIT while a task ran,
        as on a loaded machine: a pool takes them from either, outgoing.py);
        the control thread's other messages are skipped."""
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            peer, *frames = self.sock.recv_multipart()
            if peer == self.worker_id:
                return P.decode(frames)
            assert peer == self.worker_id + b"c", peer
            msg = P.decode(frames)
            if msg.type == P.RESULTS:
                return msg
        raise AssertionError(f"nothing from the worker within {timeout} s")

    def send_naps(self, count: int, seconds: float, fields: dict[str, Any]) -> list[bytes]:
        blobs = P.Blobs()
        rows = []
        for _ in range(count):
            body = -1 if self.body_sent else blobs.ref(self.body)
            self.body_sent = True
            rows.append([uuid.uuid4().bytes, self.fn_hash, blobs.ref(serialize_arguments(nap, (seconds,), {})),
                         body, P.TASK_CALL, P.PYTHON_VERSION])
        self.sock.send_multipart([self.worker_id, *P.encode(P.TASKS, {"tasks": rows, **fields}, blobs.frames)])
        return [row[0] for row in rows]

    def results(self, ids: list[bytes]) -> list[int]:
        """Rows per RESULTS message until every one of ``ids`` is answered (each OK, once)."""
        seen: list[bytes] = []
        sizes = []
        while len(seen) < len(ids):
            msg = self.next_message(DEADLINE)
            assert msg.type == P.RESULTS, msg.type
            sizes.append(len(msg.fields["rows"]))
            for row in msg.fields["rows"]:
                assert row[1] == P.OK, row
                seen.append(row[0])
        assert sorted(seen) == sorted(ids), "a task answered twice, or one not sent"
        return sizes

    def close(self) -> None:
        self.sock.send_multipart([self.worker_id, *P.encode(P.STOP)])
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.mark.timeout(120)
def test_a_worker_sends_results_of_short_tasks_at_the_low_mark_its_pool_names(tmp_path):
    worker = WorkerUnderTest(tmp_path)
    try:
        # without a low mark: a task of a millisecond goes back alone, at once (as before)
        ids = worker.send_naps(6, 0.001, {"q": 1})
        assert worker.results(ids) == [1] * 6
        # with one: held until two are left queued (then until none is: no refill came), so a
        # message per several tasks; a slow machine may split a batch at SLOW_HOLD, never into six
        ids = worker.send_naps(6, 0.001, {"q": 2, "lw": 2})
        sizes = worker.results(ids)
        assert len(sizes) <= 3 and sizes[0] >= 2, sizes
        # a refill that comes while the last two run (as its pool sends one at the low mark):
        # held again, until the worker is down to its low mark once more
        first = worker.send_naps(6, 0.001, {"q": 3, "lw": 2})
        msg = worker.next_message(DEADLINE)
        assert msg.type == P.RESULTS and len(msg.fields["rows"]) >= 2, msg.fields
        refill = worker.send_naps(4, 0.001, {"q": 4, "lw": 2})
        answered = {row[0] for row in msg.fields["rows"]}
        sizes = worker.results([i for i in first + refill if i not in answered])
        assert len(sizes) <= 4, sizes
        # a malformed low mark is no low mark
        ids = worker.send_naps(4, 0.001, {"q": 5, "lw": "two"})
        assert worker.results(ids) == [1] * 4
    finally:
        worker.close()


def warm_short(ex: FederatedExecutor) -> None:
    """Tasks of about a millisecond first, so the pool queues them deep (pool/stealing.py)."""
    assert list(ex.map(nap, [0.001] * 300)) == [0.001] * 300


@pytest.mark.timeout(180)
def test_short_tasks_run_once_each_and_a_true_cancel_means_never_run(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    with FederatedExecutor(max_workers=2) as ex:
        warm_short(ex)
        n = 1500
        futures = [ex.submit(mark_once_then_sleep, str(marks / str(i)), i, 0.001) for i in range(n)]
        time.sleep(0.3)   # some done, some queued at the workers, most at the relay
        cancelled = {i for i in reversed(range(0, n, 3)) if futures[i].cancel()}
        done, pending = cf.wait(futures, timeout=DEADLINE * 2)
        assert not pending, f"{len(pending)} tasks never finished"
    assert cancelled, "no cancel succeeded: the test did not test anything"
    ran = {int(name) for name in os.listdir(marks)}
    for i, future in enumerate(futures):
        if i in cancelled:
            assert future.cancelled() and i not in ran, f"task {i} was cancelled (True) but ran"
        elif not future.cancelled():
            assert future.result() == i and i in ran
    assert ran <= set(range(n))


@pytest.mark.timeout(120)
def test_short_tasks_queued_behind_a_long_one_are_recalled_for_the_free_worker(tmp_path):
    gate, pids = tmp_path / "gate", tmp_path / "pids"
    with FederatedExecutor(max_workers=2) as ex:
        warm_short(ex)
        try:
            for attempt in range(3):   # where the long task lands, and what is queued behind it, is the pool's choice
                before = list(ex.map(nap, [0.001] * 20))   # both workers hold short tasks again
                assert before == [0.001] * 20
                mixed = [ex.submit(nap, 0.001) for _ in range(5)]
                long = ex.submit(long_until_gate, str(gate), str(pids), 60.0)
                mixed += [ex.submit(nap, 0.001) for _ in range(200)]
                t = time.monotonic()
                done, pending = cf.wait(mixed, timeout=20)
                took = time.monotonic() - t
                assert not pending, f"{len(pending)} short tasks waited behind a long one with a worker free"
                assert not long.done()
                assert took < 10, took
                gate.touch()
                assert long.result(DEADLINE) == "long done"
                gate.unlink()
        finally:
            gate.touch()


@pytest.mark.timeout(120)
def test_few_tasks_go_to_the_free_workers_first_when_they_are_queued_deep():
    """With short tasks queued deep, a handful arriving at once still go
    one to each worker before any worker gets a second (in the order they
    came): the quick one of three lands on the second worker, not behind
    the long first one, and is done long before the other two."""
    with FederatedExecutor(max_workers=2) as ex:
        for _ in range(3):
            warm_short(ex)
            futures = [ex.submit(nap, d) for d in (0.8, 0.0, 0.3)]
            order = [futures.index(f) for f in cf.as_completed(futures, timeout=DEADLINE)]
            assert order == [1, 2, 0], order
