"""No head-of-line blocking at a pool's workers: work stealing, and a second
task queued at each worker for tasks that go one at a time.

A worker runs what its pool sent it in order. Quick tasks go to it in
batches (``PoolManager._assign_batches``), so when one of them turns out
long, those behind it wait, though another worker may be idle. Each worker
has a control thread (``worker/control.py``) that answers while a task
runs; the pool uses it to:

- *recall*: when a worker is idle and another's running task has been
  running for STEAL_AFTER with tasks queued behind it, the pool asks that
  worker for the tasks it has not started; they come back (RECALLED) and go
  to the front of the pool's queue, for the idle worker (if that one
  serves another user, with nothing queued, it retires for a fresh one:
  only behind a task running STEAL_ACROSS_AFTER). The worker stays
  out of the assignment (``WorkerSlot.stuck``) until that long task is done;
- *cancel* at once a task queued at a worker, not started (before, a cancel
  waited for the task running ahead of it);
- hold more tasks: tasks that take SLOW_TASK or more (sent "one at a
  time") and less than DEEP_TASK (dispatch.py) get a second one queued at
  their worker, so that it starts without waiting for the round trip of the
  result to the pool and of the next task back; the shortest of them (the
  sleep(1 ms) case) get about QUEUED_WORK seconds of them queued, and the
  worker holds their results until it is down to LOW_MARK queued (the
  TASKS option "lw"; worker/process.py), so that results and refills go
  several to a message at every hop, not one message per task, while the
  refill still comes before the worker runs dry. Tasks stuck behind a long
  one are recalled as above, and can be cancelled at once.

The worker takes each task to run and the control thread takes those it
gives back out of one queue under one lock, so a task runs at most once,
and a task named CANCELLED never runs. Nothing here costs a message or a
system call per task: the markers are read only while a worker is idle
beside another holding several tasks, at most every STEAL_CHECK.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .. import protocol as P
from ..dispatch import QueuedTask, single_depth
from ..worker.control import SUFFIX, control_id
from ..outbox import ResultOutbox
from .workers import LocalWorkerPool, WorkerSlot

STEAL_AFTER = 0.01    # a running task this old, with tasks queued behind it, while a worker is idle: recall them
STEAL_ACROSS_AFTER = 0.25   # ... this old when the idle worker serves another user (it retires for them: a fresh start)
STEAL_CHECK = 0.002   # how often, at most, the workers' markers are looked at for that
QUEUED_WORK = 0.006   # seconds of short one-at-a-time tasks a worker holds (running and queued), at most ...
MOST_QUEUED = 8       # ... this many
LOW_MARK = 2          # ... and it sends their results once it is down to this many queued (the next come meanwhile)

log = logging.getLogger("fedexec.pool")


class WorkStealing:
    """Mixed into ``PoolManager``: what the pool does over its workers'
    control connections."""

    pool: LocalWorkerPool | None
    queue: deque[QueuedTask]
    at_worker: dict[bytes, WorkerSlot]
    outbox: ResultOutbox
    draining: bool
    task_seconds: float | None

    if TYPE_CHECKING:   # (the pool manager's)
        def _send_worker(self, worker_id: bytes, frames: list[Any]) -> None: ...
        def _result(self, task_id: bytes, status: int, blob: Any, trace: list[float] | None = None) -> None: ...
        def _give_back(self, tasks: list[QueuedTask]) -> None: ...
        def _announce(self, slot: WorkerSlot) -> None: ...
        def _send_batch(self, slot: WorkerSlot, count: int, low_mark: int | None = None,
                        source: deque[QueuedTask] | None = None) -> None: ...
        def _user_for_fresh_worker(self) -> str: ...

    def _init_stealing(self) -> None:
        self._steal_at = 0.0          # time.monotonic() of the next look for a worker to take tasks from
        self._steal_pending = False   # a worker is idle beside one holding several: look again soon
        self._cancel_asked: set[bytes] = set()   # cancels sent to control threads, not answered

    # -- what the rest of the pool asks ---------------------------------------
    def _single_depth(self, slots: list[WorkerSlot]) -> tuple[int, int]:
        """``(limit, hungry_below)`` for tasks that go one at a time: a
        second one queued per worker when they are short and every worker
        has its control thread (so it can be recalled and cancelled)."""
        assert self.pool is not None
        if single_depth(self.task_seconds) > 1 and self.pool.sandbox == "none" \
                and all(slot.control for slot in slots):
            depth = queued_depth(self.task_seconds)
            return depth, min(depth, LOW_MARK + 1)   # (topped up once its results say it is at its low mark)
        return 1, 1

    def _send_in_rounds(self, hungry: list[WorkerSlot], limit: int) -> None:
        """Tasks that go one at a time, up to ``limit`` per worker: a first
        to each worker holding none, then a second to each, and so on, so
        that a task never waits behind another while a worker has none;
        what each worker gets goes in one message (with the low mark, when
        it holds more than that)."""
        planned: dict[bytes, deque[QueuedTask]] = {}
        for depth in range(1, limit + 1):
            for slot in hungry:
                if not self.queue:
                    break
                mine = planned.setdefault(slot.worker_id, deque())
                if len(slot.tasks) + len(mine) < depth:
                    task = self._next_for(slot)
                    if task is not None:
                        mine.append(task)
        low = LOW_MARK if limit > LOW_MARK + 1 else None
        for slot in hungry:
            mine = planned.get(slot.worker_id)
            if mine:
                self._send_batch(slot, len(mine), low, source=mine)

    def _next_for(self, slot: WorkerSlot) -> QueuedTask | None:
        """The first queued task of the user ``slot`` serves (a fresh worker
        takes a user first, as in ``_send_batch``), taken out; None if none."""
        if slot.user is None:
            slot.user, slot.bound_at = self._user_for_fresh_worker(), time.monotonic()
        queue = self.queue
        for position, task in enumerate(queue):
            if (task.option("u") or "") == slot.user:
                del queue[position]
                return task
        return None

    def _ask_cancel(self, slot: WorkerSlot, task_ids: list[bytes]) -> None:
        """Ask ``slot``'s worker to drop these queued tasks: at once through
        its control thread (chained ones, whose bookkeeping the main thread
        keeps, and any sent too long ago to be recalled: between tasks,
        through its main connection)."""
        rest = self._recall(slot, task_ids, cancel=True) if slot.control else task_ids
        for part in P.chunks(rest):
            self._send_worker(slot.worker_id, P.encode(P.CANCEL, {"tids": list(part)}))

    def _recall(self, slot: WorkerSlot, task_ids: Any, cancel: bool) -> list[bytes]:
        """Ask ``slot``'s control thread for these tasks back (to cancel
        them, with ``cancel``); the ones it cannot be asked for (chained, or
        of a batch no longer in ``slot.batches``)."""
        numbers = {row[0]: number for number, rows in slot.batches for row in rows}
        asked, rest = [], []
        for task_id in task_ids:
            number = numbers.get(task_id)
            if number is None or _chained(slot.tasks.get(task_id)):
                rest.append(task_id)
            else:
                asked.append([task_id, number])
        if cancel and len(self._cancel_asked) > P.MAX_ITEMS:   # (those of workers that died before answering)
            self._cancel_asked.intersection_update(self.at_worker)
        slot.recalling.update((task_id, cancel) for task_id, _ in asked)
        for part in P.chunks(asked):
            if cancel:
                self._cancel_asked.update(task_id for task_id, _ in part)
            self._send_worker(control_id(slot.worker_id), P.encode(P.RECALL, {"tids": list(part), "c": cancel}))
        return rest

    def _steal_wait_ms(self, default: int) -> int:
        """How long the pool's poll may wait, for the next look (_steal_for_idle)."""
        if not self._steal_pending:
            return default
        return max(1, min(default, int((self._steal_at - time.monotonic()) * 1000) + 1))

    def _steal_for_idle(self) -> None:
        """With the pool's queue empty: if a worker is idle while another's
        task has been running STEAL_AFTER with tasks queued behind it, recall
        those (for the idle worker, of the same user or fresh)."""
        now = time.monotonic()
        if now < self._steal_at:
            return
        self._steal_pending = False
        pool = self.pool
        assert pool is not None
        if pool.sandbox != "none":   # (arguments are placed in a sandboxed worker's own task root)
            return
        slots = pool.slots.values()
        idle_users = {slot.user for slot in slots if slot.ready and not slot.tasks and not slot.retiring
                      and not slot.yielding}
        if not idle_users:
            return
        for slot in slots:
            if len(slot.tasks) < 2 or not slot.control:
                continue
            if slot.recalled_at:   # not answered yet (a task holding the GIL): never asked twice, as the
                continue           # same task may by then be on its way to this worker again
            running = slot.marker.read()
            if running is not None and running == slot.unrecallable:
                continue   # (nothing behind it can be asked back: not looked at again every STEAL_CHECK)
            self._steal_pending = True
            # An idle worker of this user, or a fresh one, takes the recalled tasks at once. One of
            # another user, who has nothing queued here (the queue is empty), retires for them
            # (_share_workers) and a fresh worker takes them: worth it only behind a longer task.
            # (Before, such a worker was no reason to recall: the tasks waited the long one out.)
            after = STEAL_AFTER if slot.user in idle_users or None in idle_users else STEAL_ACROSS_AFTER
            if running is None or running not in slot.tasks:
                slot.seen_running = None
            elif running != slot.seen_running:
                slot.seen_running, slot.seen_since = running, now
            elif now - slot.seen_since >= after:
                behind = [task_id for task_id in slot.tasks if task_id != running]
                if len(self._recall(slot, behind, cancel=False)) < len(behind):   # asked for some: answered
                    slot.recalled_at = now
                    slot.stuck = running
                else:   # all chained, or sent too long ago to be named: they wait for it
                    slot.unrecallable = running
        self._steal_at = now + STEAL_CHECK

    # -- what the control threads say ---------------------------------------
    def _on_control(self, frames: list[Any]) -> None:
        """A message on a worker's control connection (``frames[0]`` its id)."""
        ident = frames[0].bytes
        slot = None
        if ident.endswith(SUFFIX) and self.pool is not None:
            slot = self.pool.slots.get(ident[:-len(SUFFIX)])
        if slot is None:
            return   # a worker gone already, or no worker of ours
        msg = P.decode(frames[1:])
        if msg.type == P.READY:
            slot.control = True
        elif msg.type == P.RECALLED:
            self._on_recalled(slot, msg.fields)
        elif msg.type == P.RESULTS:   # results its main thread held while it ran a long task (worker/outgoing.py)
            self._on_worker_results(slot, msg)

    def _on_recalled(self, slot: WorkerSlot, fields: dict[str, Any]) -> None:
        """Tasks a worker gave back (they will never run there), and those
        it had taken to run already (``absent``): for a cancel, the first
        are cancelled and the others announced as running; for a recall,
        the first go to the front of the queue."""
        given, absent = _ids(fields.get("given")), _ids(fields.get("absent"))
        cancel = fields.get("c") is True
        if not cancel:
            slot.recalled_at = 0.0
        back: list[QueuedTask] = []
        for task_id in absent:
            slot.recalling.pop(task_id, None)
        for task_id in given:
            # only what was asked back and is not the task its marker shows running: a task in the
            # worker could forge an answer (it shares the process), which must not make a running
            # task look cancelled, nor send it to run a second time
            if slot.recalling.pop(task_id, None) is None or task_id == slot.seen_running:
                log.warning("worker %s gave back task %s, which it was not asked for or is running: ignored",
                            slot.worker_id.hex(), task_id.hex())
                continue
            task = slot.tasks.pop(task_id, None)   # only tasks it holds: none of another worker's
            if task is None:
                continue
            self.at_worker.pop(task_id, None)
            if cancel or task_id in self._cancel_asked:   # (a cancel that crossed the recall: it never ran)
                self._cancel_asked.discard(task_id)
                self._result(task_id, P.CANCELLED, b"")
            else:
                back.append(task)
        if back:
            if self.draining:
                self._give_back(back)
            else:
                self.queue.extendleft(reversed(back))
        if cancel:
            for task_id in absent:
                self._cancel_asked.discard(task_id)
                if task_id in slot.tasks:   # taken to run: its result follows
                    if task_id == slot.head():
                        slot.announced = task_id   # (not announced again below)
                    self.outbox.start(task_id, answer=True)
        if slot.stuck not in slot.tasks:
            slot.stuck = None
        self._announce(slot)


def queued_depth(task_seconds: float | None) -> int:
    """Tasks a worker holds at once (running and queued) when they go one at
    a time and it may hold more than one: QUEUED_WORK seconds of them, at
    least 2, at most MOST_QUEUED."""
    if not task_seconds or task_seconds <= 0:
        return 2
    return max(2, min(MOST_QUEUED, math.ceil(QUEUED_WORK / task_seconds)))


def _chained(task: QueuedTask | None) -> bool:
    return task is not None and len(task.row) == 7 and "d" in task.row[6]


def _ids(value: Any) -> list[bytes]:
    """Task ids from a control thread's answer (anything else: none)."""
    if not isinstance(value, list):
        return []
    return [item for item in value[:P.MAX_ITEMS] if isinstance(item, bytes)]
