"""A worker's control channel: a second thread that answers its pool while
the worker's main thread is busy running a task.

The main thread runs the tasks its pool sent, in order, and reads new
messages only between them; a task that runs for seconds would hold up
everything queued behind it. This thread owns a second connection to the
pool (routing id: the worker's id + :data:`SUFFIX`) and answers at once:

- ``RECALL`` (``tids``: pairs of a task id and the number of the TASKS
  message it came in): give back those not started, even those still
  unread in the main connection (work stealing: its pool runs them on a
  worker that is idle); with ``c``, to cancel them.

It answers ``RECALLED`` with the ids given back (they will never run here)
and those it had taken to run already ("absent": running, or done, their
results going back the usual way). The main thread takes a task out of the
queue under the same lock (``TaskQueue.next``) and drops the unread ones
given back when it reads them, so each task either runs here or goes back,
never both and never neither: ``cancel()`` stays truthful (cancelled only
if it will never run here), and nothing is lost.

It also sends the results the main thread holds in its batch while it runs
a long task (``outgoing.py``), once they have waited ``HELD_LIMIT``.

Tasks sent on to run after a task they depend on (option ``"d"``,
``chain.py``) stay with the main thread: their bookkeeping is not shared.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import zmq

from .. import protocol as P
from .outgoing import HELD_LIMIT, OutgoingResults

SUFFIX = b"c"   # the control connection's routing id: the worker's + this


def control_id(worker_id: bytes) -> bytes:
    """The routing id of ``worker_id``'s control connection."""
    return worker_id + SUFFIX


def _chained(task: Any) -> bool:
    return len(task.row) == 7 and "d" in task.row[6]


class TaskQueue:
    """A worker's queue of tasks not started, shared by its main thread and
    its control thread; every change to it is made under ``lock``.

    ``read`` is the number of the last TASKS message the main thread has
    read (its pool numbers them, per worker, option ``q``): a task of a later
    one is still in the socket, unread, and the control thread can give it
    back all the same by naming it in ``revoked`` with that message's
    number: the main thread drops it when it reads it (only there: the same
    task may come again, in a later message, once its pool has it back)."""

    __slots__ = ("tasks", "lock", "read", "revoked")

    def __init__(self) -> None:
        self.tasks: deque[Any] = deque()
        self.lock = threading.Lock()
        self.read = 0
        self.revoked: set[tuple[bytes, int]] = set()   # (task id, number of the message it comes in)

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Any:
        return iter(self.tasks)

    def next(self) -> Any:
        """The next task to run, taken out (None if there is none): from
        here on it runs on this worker."""
        with self.lock:
            tasks = self.tasks
            return tasks.popleft() if tasks else None

    def add(self, tasks: list[Any], number: Any) -> None:
        """The tasks of TASKS message ``number``, read: queued, but for
        those given back before they were read."""
        with self.lock:
            revoked = self.revoked
            if revoked:
                kept = [task for task in tasks if (task.row[0], number) not in revoked]
                revoked.difference_update((task.row[0], number) for task in tasks)
                tasks = kept
            self.tasks.extend(tasks)
            if type(number) is int and number > self.read:
                self.read = number

    def remove_where(self, doomed: Any, chained: bool) -> list[Any]:
        """Take out the queued tasks whose ids are in ``doomed``, chained
        ones only with ``chained``; them, in order."""
        with self.lock:
            return self._take(doomed, chained)

    def give_back(self, asked: list[tuple[bytes, int]]) -> tuple[list[bytes], list[bytes]]:
        """Of the tasks ``asked`` (id, number of the message it came in),
        those that will not run here: queued (taken out), or not read yet
        (revoked); and those taken to run already (or not here at all).
        Chained tasks are never taken out."""
        with self.lock:
            unread = [task_id for task_id, number in asked if number > self.read]
            self.revoked.update((task_id, number) for task_id, number in asked if number > self.read)
            taken = self._take({task_id for task_id, number in asked if number <= self.read}, chained=False)
            given = unread + [task.row[0] for task in taken]
            handed = set(given)
            return given, [task_id for task_id, _ in asked if task_id not in handed]

    def _take(self, doomed: Any, chained: bool) -> list[Any]:
        taken, kept = [], deque()
        for task in self.tasks:
            if task.row[0] in doomed and (chained or not _chained(task)):
                taken.append(task)
            else:
                kept.append(task)
        if taken:
            self.tasks = kept
        return taken


class ControlThread(threading.Thread):
    """Serves the control connection of a worker whose queue is ``queue``."""

    def __init__(self, ctx: zmq.Context, address: str, worker_id: bytes, queue: TaskQueue,
                 outgoing: OutgoingResults | None = None) -> None:
        super().__init__(name="fedexec-worker-control", daemon=True)
        self.queue = queue
        self.outgoing = outgoing   # results the main thread holds while it runs a long task (outgoing.py)
        self.sock = P.limit_frames(ctx.socket(zmq.DEALER))
        # (not 0: results this thread sent for the main thread must not be dropped as the worker stops)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.IDENTITY, control_id(worker_id))
        self.sock.connect(address)
        # the main thread wakes this one to stop (close(): its socket closed before the context ends)
        self._wake_address = f"inproc://fedexec-control-{id(self)}"
        self._wake = ctx.socket(zmq.PULL)
        self._wake.setsockopt(zmq.LINGER, 0)
        self._wake.bind(self._wake_address)
        self._ctx = ctx

    def run(self) -> None:
        sock = self.sock
        try:
            sock.send_multipart(P.encode(P.READY, {"ctl": 1}))
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(self._wake, zmq.POLLIN)
            outgoing = self.outgoing
            while True:
                events = dict(poller.poll(outgoing.wait_ms() if outgoing is not None else None))
                if self._wake in events:
                    return
                if sock in events:
                    self._answer(sock.recv_multipart(copy=False))
                if outgoing is not None:
                    held = outgoing.take(older_than=HELD_LIMIT)
                    if held is not None:
                        sock.send_multipart(held, copy=False)
        except zmq.ZMQError:
            return   # the context is ending
        finally:
            sock.close()
            self._wake.close(linger=0)

    def _answer(self, frames: list[Any]) -> None:
        try:
            msg = P.decode(frames)
        except P.ProtocolError:
            return   # only the pool can send here; ignore what it cannot have meant
        asked = _asked(msg.fields.get("tids"))
        if msg.type == P.RECALL and asked:
            given, absent = self.queue.give_back(asked)
            self._reply(given, absent, bool(msg.fields.get("c")))

    def _reply(self, given: list[bytes], absent: list[bytes], cancel: bool) -> None:
        """RECALLED: what was asked is either given back or absent (taken to
        run, or done); for a cancel, "c"."""
        self.sock.send_multipart(P.encode(P.RECALLED, {"given": given, "absent": absent, "c": cancel}))

    def close(self) -> None:
        """Stop the thread and wait for it (its socket closes in it)."""
        if self.is_alive():
            wake = self._ctx.socket(zmq.PUSH)
            wake.setsockopt(zmq.LINGER, 0)
            wake.connect(self._wake_address)
            wake.send(b"")
            self.join(5.0)
            wake.close(linger=0)


def _asked(value: Any) -> list[tuple[bytes, int]]:
    """The ``[task id, message number]`` pairs of a RECALL (malformed ones left out)."""
    if not isinstance(value, list):
        return []
    return [(item[0], item[1]) for item in value[:P.MAX_ITEMS]
            if isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes) and type(item[1]) is int]
