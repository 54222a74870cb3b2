"""FederatedExecutor: a concurrent.futures.Executor whose tasks run on an endpoint.

``submit`` pickles the call in the caller's thread (so a bad argument fails
that future at once, and later mutation of the arguments does not leak into
the task) and hands it to one background thread, the dispatcher, which owns
the ZeroMQ socket to the relay: it sends whatever has queued up as one batch,
registers each function once by content hash, and completes futures as
results arrive.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import struct
import threading
import time
import uuid
import weakref
from collections import deque
from concurrent.futures import BrokenExecutor, CancelledError, Executor, Future, InvalidStateError
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures._base import CANCELLED as _CANCELLED
from concurrent.futures._base import CANCELLED_AND_NOTIFIED as _CANCELLED_AND_NOTIFIED
from concurrent.futures._base import FINISHED as _FINISHED
from concurrent.futures._base import PENDING as _PENDING
from concurrent.futures._base import RUNNING as _RUNNING
from typing import Any, Callable, Iterable, Iterator

import zmq

from . import protocol as P
from .config import DEFAULT_RELAY_ADDRESS, DEFAULT_WORKER_BATCH, endpoint_targets, relay_dir
from .auth import REFUSED_GRACE, HandshakeWatch, check_token
from .dependencies import DependentCall, FuturesFound, arguments_or_futures, dependency_error, rebuild, snapshot
from . import dataref
from .embedded import EmbeddedFederation
from .transfer import BIG_THRESHOLD, LinkPool, TransferError, is_big, parse_big
from .errors import (
    DataRefError,
    AuthenticationFailed,
    DependencyError,
    DeserializationError,
    NotAuthorized,
    PayloadTooLarge,
    QuotaExceeded,
    RelayUnavailable,
    SerializationError,
    TaskLost,
    TaskRejected,
    TaskTimeout,
    UnknownEndpoint,
    VersionMismatch,
    WorkerLost,
)
from .serialize import (
    NotData,
    content_hash,
    decode_data,
    deserialize,
    deserialize_data_exception,
    deserialize_exception,
    serialize_arguments,
    serialize_chunk,
    serialize_data_arguments,
    serialize_data_chunk,
    serialize_function,
)

log = logging.getLogger("fedexec.executor")

_live_executors: "weakref.WeakSet[FederatedExecutor]" = weakref.WeakSet()
_global_shutdown = False


def _python_exit() -> None:
    """At interpreter exit, finish what was submitted and stop embedded services,
    as the standard executors do."""
    global _global_shutdown
    _global_shutdown = True
    for executor in list(_live_executors):
        executor.shutdown(wait=True)


try:  # run before non-daemon threads are joined, like concurrent.futures.thread
    threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover
    import atexit

    atexit.register(_python_exit)


class _FunctionCache:
    """Content hash and pickled body per function object, so a function used
    for many tasks is pickled once. Held weakly, so a function (and whatever
    it captured) is freed with its last user reference; callables that cannot
    be weakly referenced (builtins) are kept in a small bounded table.

    A function object is assumed not to change after its first submission.
    """

    def __init__(self, limit: int = 256) -> None:
        self._weak: "weakref.WeakKeyDictionary[Any, tuple[bytes, bytes]]" = weakref.WeakKeyDictionary()
        self._strong: dict[int, tuple[Any, bytes, bytes]] = {}
        self._limit = limit

    def lookup(self, fn: Callable[..., Any]) -> tuple[bytes, bytes]:
        try:
            entry = self._weak.get(fn)
            weak = True
        except TypeError:  # not weakly referenceable, or unhashable
            strong = self._strong.get(id(fn))
            entry = strong[1:] if strong is not None and strong[0] is fn else None
            weak = False
        if entry is not None:
            return entry
        fn_hash, body = serialize_function(fn)
        if weak:
            self._weak[fn] = (fn_hash, body)
        else:
            if len(self._strong) >= self._limit:
                self._strong.clear()
            self._strong[id(fn)] = (fn, fn_hash, body)
        return fn_hash, body


class _TaskIds:
    """Task ids: 16 bytes each, an 8-byte ordered part and 8 random bytes.

    The random half makes an id unguessable: knowing any number of a user's
    ids says nothing of their next ones (and the relay binds an id to its
    user, first come). The ordered half (the time this executor started, in
    nanoseconds, plus one per id) makes the relay's record add new rows next
    to each other in its index rather than at random places in it, which
    costs SQLite about a third less per task.

    Ids are made ``batch`` at a time (one ``os.urandom`` call) into a list
    that :meth:`next` pops from: ``list.pop`` is atomic, so any thread may
    call it without a lock. Two threads refilling at once each make a
    batch from a block of order numbers of its own, so no id repeats."""

    def __init__(self, batch: int = 1024) -> None:
        self._batch = batch
        self._start = time.time_ns()
        self._blocks = itertools.count()   # next() of a count is atomic too
        self._ids: list[bytes] = []

    def next(self) -> bytes:
        try:
            return self._ids.pop()
        except IndexError:
            pass
        batch = self._batch
        first = self._start + next(self._blocks) * batch
        noise = struct.unpack(f">{batch}Q", os.urandom(8 * batch))
        pack = _ID.pack
        ids = [pack(first + i, noise[i]) for i in range(batch - 1, -1, -1)]
        own = ids.pop()
        self._ids = ids
        return own


_ID = struct.Struct(">QQ")   # a task id: its ordered part, its random part


CANCEL_TIMEOUT = 10.0
HEARTBEAT_PERIOD = 1.0   # seconds between the dispatcher's heartbeats while tasks are out
# After shutdown, remaining tasks are waited for as long as the relay answers;
# once it has been silent this long, they fail instead (so that interpreter
# exit never hangs on a relay that is gone).
SHUTDOWN_SILENCE = 10.0
# A refused handshake fails the constructor once it has lasted this long
# (HandshakeWatch.refused_for; meanwhile the dispatcher looks for other
# credentials once a second). Shorter than auth.REFUSED_GRACE, the endpoint
# agent's: a constructor is a call someone waits on, and giving up costs them
# only an exception they can retry, whereas an endpoint that gives up exits
# for good and must be restarted by hand.
AUTH_GRACE = min(2.0, REFUSED_GRACE)
RESUME_CHUNK = P.MAX_ITEMS   # task ids per RESUME message after a relay restart
MEMO_ENTRIES = 100_000   # memoized results kept per executor


class TaskFuture(Future):
    """The :class:`concurrent.futures.Future` of a task sent to an endpoint.

    ``cancel()`` keeps the standard promise (True only if the call will not
    run) for a task that has already left this process: it asks the relay
    and endpoint to drop the task and returns True once they confirm it, or
    False when the task turns out to be running or done (or no answer comes
    within ``CANCEL_TIMEOUT`` seconds). ``task_id`` is the task's durable id.
    """

    def __init__(self, dispatcher: "_Dispatcher", task_id: bytes) -> None:
        super().__init__()
        self._dispatcher = dispatcher
        self._task_bytes = task_id
        self._sent = False
        self._cancel_answer: threading.Event | None = None  # set when the endpoint has answered

    @property
    def task_id(self) -> str:
        """The task's durable id, as a UUID string."""
        return str(uuid.UUID(bytes=self._task_bytes))

    def cancel(self) -> bool:
        with self._condition:
            if self._state in (_RUNNING, _FINISHED):
                return False
            if self._state in (_CANCELLED, _CANCELLED_AND_NOTIFIED):
                return True
            if not self._sent:  # still here: the dispatcher will skip it
                return super().cancel()
            dispatcher = self._dispatcher
            if dispatcher is threading.current_thread() or not dispatcher.is_alive():
                return False  # cannot wait for the endpoint's answer here
            if self._cancel_answer is None:
                self._cancel_answer = threading.Event()
            answer = self._cancel_answer
        dispatcher.post("cancel", self._task_bytes)
        answer.wait(CANCEL_TIMEOUT)
        with self._condition:
            return self._state in (_CANCELLED, _CANCELLED_AND_NOTIFIED)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # at once, rather than after pickling part of its lock: submit takes
        # this failure as the sign to look for futures in the arguments
        raise TypeError("a TaskFuture cannot be pickled; pass it as an argument of a task of its executor, "
                        "where it stands for its value")

    def _answered(self) -> None:
        """The relay/endpoint said what became of the task (dispatcher thread)."""
        if self._cancel_answer is not None:
            self._cancel_answer.set()


class _WorkItem:
    """One submitted task on its way: the future and what travels for it."""

    __slots__ = ("future", "task_id", "fn_hash", "fn_body", "payload", "kind", "running", "memo_key", "trace",
                 "extra", "body_resent")

    def __init__(self, future: TaskFuture, task_id: bytes, fn_hash: bytes, fn_body: bytes,
                 payload: bytes, kind: int) -> None:
        self.future = future
        self.task_id = task_id
        self.fn_hash = fn_hash
        self.fn_body = fn_body
        self.payload = payload
        self.kind = kind
        self.running = False
        self.memo_key: bytes | None = None     # set for memoized calls
        self.trace: list[float] | None = None  # set when tracing: timestamps so far
        self.extra: dict[str, Any] | None = None  # walltime and retries, when asked for
        self.body_resent = False   # sent again with its function body, as the relay asked (NEED_FUNCTION)


def _failure_exception(blob: Any) -> BaseException:
    info = P.unpack_failure(blob)
    kind, msg = info.get("kind"), str(info.get("msg", "task failed"))
    if kind == P.WORKER_LOST:
        return WorkerLost(msg, endpoint=str(info.get("endpoint", "")), pid=int(info.get("pid", 0)),
                          exitcode=info.get("exitcode"))
    if kind == P.TOO_LARGE:
        return PayloadTooLarge(msg, size=int(info.get("size", 0)), limit=int(info.get("limit", 0)))
    if kind == P.QUOTA:
        return QuotaExceeded(msg, quota=str(info.get("quota", "")), usage=int(info.get("usage", 0)),
                             limit=int(info.get("limit", 0)))
    if kind == P.TIMEOUT:
        return TaskTimeout(msg, timeout=float(info.get("timeout", 0.0)), endpoint=str(info.get("endpoint", "")))
    if kind == P.LOST:
        return TaskLost(msg)
    if kind == P.NOT_ALLOWED:
        return NotAuthorized(msg)
    if kind == P.VERSION:
        return VersionMismatch(msg)
    if kind == P.DEPENDENCY:
        dep = info.get("dep")
        return DependencyError(msg, dependency=str(uuid.UUID(bytes=dep)) if isinstance(dep, bytes) and len(dep) == 16
                               else "")
    if kind == P.REF_MISSING:
        ref = info.get("ref")
        return DataRefError(msg, ref=ref.hex() if isinstance(ref, bytes) else "")
    if kind == P.NEED_FUNCTION:   # not honoured (see _Dispatcher._needs_function): an outcome
        return TaskRejected(f"the task was not run: the relay asked for its function body again after it was "
                            f"sent with it, or after the task was accepted ({msg})")
    if kind == P.SERIALIZATION:
        return DeserializationError(msg) if info.get("remote") else SerializationError(msg)
    return TaskRejected(msg)


class _Dispatcher(threading.Thread):
    """The executor's one network thread: batches out, results in."""

    def __init__(self, relay: str, endpoint_id: str, batch_size: int, batch_window: float,
                 services: EmbeddedFederation | None, token: str | None = None,
                 relay_public_key: str | None = None) -> None:
        super().__init__(name="fedexec-dispatcher", daemon=True)
        self.relay = relay
        self.token = token
        self.relay_public_key = relay_public_key
        self.auth_refused = False     # the relay refused our credentials (or ended our session)
        self.handshake: HandshakeWatch | None = None
        self.endpoint_id = endpoint_id
        self.batch_size = min(batch_size, P.MAX_ITEMS)   # rows per SUBMIT: at most a message's limit
        self.batch_window = batch_window
        self.services = services
        self.client_id = uuid.uuid4().bytes
        self.commands: deque[tuple[str, Any]] = deque()
        self.pending: dict[bytes, _WorkItem] = {}
        # sent, but not yet in the relay's durable record: kept with their
        # arguments, to send again if the relay restarts
        self.unaccepted: dict[bytes, _WorkItem] = {}
        self.watchers: dict[bytes, list[_WorkItem]] = {}   # more futures of a pending task (reattach)
        self.relay_incarnation: bytes | None = None
        self.resending = False   # batches being sent again after a relay restart
        self.registered: set[bytes] = set()
        self.lookups: deque[tuple[str, Future]] = deque()   # LOOKUPs not answered yet, in order
        # something could not be sent (no connection: the relay refused the
        # handshake): everything is sent again once there is one (_send_again)
        self.unsent = False
        self.unsent_acks: list[bytes] = []
        self.out_rows: list[list[Any]] = []        # a batch being gathered (batch_window)
        self.out_blobs = P.Blobs()
        self.out_deadline = 0.0
        self.memo_results: dict[bytes, bytes] = {}               # memo key -> pickled result
        self.memo_waiting: dict[bytes, list[_WorkItem]] = {}     # memo key -> identical calls in flight
        self.stopping = False
        self.cancel_unsent = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._wake_pending = False
        self._post_lock = threading.Lock()
        self.closed = False
        self.failure: str | None = None
        self.relay_silent = False
        self.posted = 0      # futures handed to this thread (user threads, under _post_lock)
        # futures of tasks held in the client until the futures among their
        # arguments are done (under _post_lock): this thread does not stop
        # before they have gone or failed, or were cancelled
        self.held: set[TaskFuture] = set()
        # tasks sent for the relay to hold until their dependencies (same-executor
        # futures) finish: task id -> (those futures, how to hold it here instead)
        self.relayed: dict[bytes, tuple[list[TaskFuture], Callable[[], None]]] = {}
        self.relay_deps = False   # the relay holds tasks for their dependencies (its WELCOME says)
        self.settled = 0     # of those, finished or dropped (this thread)
        self._room = threading.Condition(threading.Lock())
        self._room_waiters = 0
        self.max_payload: int | None = None   # the relay's limit, from its WELCOME
        # large payloads go in chunks on connections of their own (transfer.py)
        self.transfers = LinkPool(relay, token, services.secret_file if services is not None else None,
                                  relay_public_key)
        self.fetching: dict[bytes, tuple[_WorkItem, list[float] | None]] = {}   # large results being fetched
        self.fetcher: ThreadPoolExecutor | None = None   # the thread that fetches them (made when needed)
        # results are decoded as plain data only, never unpickled (the
        # executor's data_only); data_only_why says why, for its errors
        self.data_only = False
        self.data_only_why = ""

    # -- called from user threads --------------------------------------------
    def post(self, command: str, value: Any = None, tasks: int = 0) -> None:
        """Hand a command to the thread; RuntimeError once it has stopped.
        ``tasks``: how many futures it brings (counted until they settle)."""
        with self._post_lock:
            if self.closed:
                raise RuntimeError(self.failure or "cannot schedule new futures after shutdown")
            self.commands.append((command, value))
            self.posted += tasks
            if not self._wake_pending:
                self._wake_pending = True
                os.write(self._wake_w, b"x")

    def wait_for_room(self, limit: int, tasks: int) -> None:
        """Block the caller while ``tasks`` more would put more than ``limit``
        unfinished tasks out (backpressure: the relay's queue stays bounded)."""
        if self.posted - self.settled + tasks <= limit or threading.current_thread() is self:
            return
        with self._room:
            self._room_waiters += 1
            try:
                while not self.closed:
                    out = self.posted - self.settled
                    if out == 0 or out + tasks <= limit:
                        return
                    self._room.wait(0.05)
            finally:
                self._room_waiters -= 1

    # -- the thread ------------------------------------------------------------
    def run(self) -> None:
        ctx = zmq.Context()
        sock = P.limit_frames(ctx.socket(zmq.DEALER))
        sock.setsockopt(zmq.IDENTITY, b"C" + self.client_id)
        sock.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:port as well as IPv4
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, P.RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, P.RECONNECT_IVL_MAX_MS)
        watch = HandshakeWatch(sock, self.relay, self.token,
                               self.services.secret_file if self.services is not None else None,
                               relay_key=self.relay_public_key)
        self.handshake = watch
        self.sock = sock
        self._hello()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(watch.monitor, zmq.POLLIN)
        next_beat = time.monotonic() + HEARTBEAT_PERIOD
        self.last_heard = time.monotonic()
        try:
            while True:
                timeout = int(HEARTBEAT_PERIOD * 1000)
                if self.out_rows:
                    timeout = max(0, math.ceil((self.out_deadline - time.monotonic()) * 1000))
                events = dict(poller.poll(timeout))
                if self._wake_r in events:
                    self._run_commands()
                if sock in events:
                    self._read_results()
                    if self.auth_refused:
                        break
                if watch.monitor in events:
                    if watch.read():  # reconnected with other credentials
                        self._send_again()
                    if watch.failure:
                        log.error("%s", watch.failure)
                now = time.monotonic()
                if self.out_rows and now >= self.out_deadline:
                    self._send_batch()
                if now >= next_beat:
                    next_beat = now + HEARTBEAT_PERIOD
                    # no event follows a refusal: look for other credentials now and then
                    if (watch.failure and watch.read()) or self.unsent:
                        self._send_again()
                    if self.pending or self.held:  # its answer says whether the relay restarted meanwhile
                        self._send(P.encode(P.HEARTBEAT))
                if self.stopping and not self.pending and not self.commands and not self.held and not self.fetching:
                    break
                if self.stopping and now - self.last_heard > SHUTDOWN_SILENCE:
                    self.failure = (f"the executor was shut down and the relay at {self.relay} has not answered "
                                    f"for {SHUTDOWN_SILENCE:g} s; this task's outcome is unknown (its id can be "
                                    "reattached later)")
                    self.relay_silent = True
                    break
        except BaseException as exc:  # a bug or a dead context: fail futures rather than hang them
            log.exception("fedexec dispatcher failed")
            self.failure = f"the fedexec dispatcher thread failed ({type(exc).__name__}: {exc}); see the log"
        finally:
            with self._post_lock:
                self.closed = True
            self._fail_leftovers()
            if self.fetcher is not None:
                self.fetcher.shutdown(wait=False, cancel_futures=True)
            watch.close()
            sock.close(linger=0)
            ctx.term()
            self.transfers.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            if self.services is not None:
                self.services.stop()

    def _fail_leftovers(self) -> None:
        """No future may be left pending once this thread is gone."""
        kind = AuthenticationFailed if self.auth_refused else RelayUnavailable if self.relay_silent \
            else BrokenExecutor
        error = kind(self.failure or "the executor stopped before this task finished")
        leftovers = [item for command, items in self.commands if command in ("submit", "reattach") for item in items]
        leftovers += self.pending.values()
        leftovers += [item for item, _ in self.fetching.values()]
        for more in self.watchers.values():
            leftovers += more
        for twins in self.memo_waiting.values():
            leftovers += twins
        for item in leftovers:
            future = item.future
            try:
                if item.running or future.set_running_or_notify_cancel():
                    future.set_exception(error)
            except (RuntimeError, InvalidStateError):
                pass  # finished or cancelled meanwhile
            future._answered()
        for _, future in self.lookups:
            if not future.done():
                future.set_exception(error)
        self.commands.clear()
        self.pending.clear()
        self.memo_waiting.clear()

    def _run_commands(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._wake_pending = False
        busy = bool(self.pending)  # an idle executor sends at once, whatever the window
        cancels: list[bytes] = []
        commands = self.commands
        while commands:
            command, value = commands.popleft()
            if command == "submit":
                for item in value:
                    self._accept(item)
            elif command == "reattach":
                resume = []
                for item in value:
                    if item.task_id in self.pending:  # already awaited here: answer both
                        self.watchers.setdefault(item.task_id, []).append(item)
                    else:
                        self.pending[item.task_id] = item
                        resume.append(item.task_id)
                self._resume(resume)
            elif command == "fetched":   # a large result, fetched by the fetch thread
                self._fetched(*value)
            elif command == "cancel":
                item = self.pending.get(value)
                if item is not None and not item.running:
                    cancels.append(value)
            elif command == "cancel_many":  # no one waits for these answers
                pending = self.pending
                cancels.extend(tid for tid in value if tid in pending and not pending[tid].running)
            elif command == "lookup":  # not sent: it stays unanswered until _send_again sends it
                self.lookups.append(value)
                if not self._send(P.encode(P.LOOKUP, {"ep": value[0]})):
                    self.unsent = True
            elif command == "cancel_all":  # shutdown(cancel_futures=True)
                cancels.extend(tid for tid, item in self.pending.items() if not item.running)
                with self._post_lock:
                    held = list(self.held)
                for future in held:   # not sent yet: cancelled here (which releases them)
                    future.cancel()
                value.set()
            elif command == "stop":
                self.stopping = True
        if self.out_rows and not (busy and self.batch_window > 0):
            self._send_batch()
        for part in P.chunks(cancels):
            if not self._send(P.encode(P.CANCEL, {"tids": part})):
                # no connection: the tasks stay; cancel() says False once no answer came
                log.warning("could not ask the relay to cancel %d task(s): no connection", len(part))

    def _accept(self, item: _WorkItem) -> None:
        """Take a submitted task: drop it if cancelled meanwhile, serve it
        from the memo, or add it to the outgoing batch."""
        future = item.future
        with future._condition:
            if self.cancel_unsent and future._state == _PENDING:
                Future.cancel(future)  # shutdown(cancel_futures=True)
            leaving = future._state == _PENDING
            future._sent = leaving
        if not leaving:  # cancelled before it left: it never runs
            self.settled += 1
            future.set_running_or_notify_cancel()
            return
        if item.memo_key is not None and self._memoized(item):
            return
        if self.relayed and item.task_id in self.relayed and self._hold_here(item):
            return
        self.pending[item.task_id] = item
        self._add_to_batch(item)

    def _hold_here(self, item: _WorkItem) -> bool:
        """A task meant for the relay to hold until its dependencies finish
        is held here instead when one of them is done in this process
        already (its result may be acknowledged, so gone from the relay, and
        its value is here), or is not out at the relay (held here itself, or
        answered from the memo). Whether it was."""
        futures, hold = self.relayed[item.task_id]
        pending = self.pending
        if not any(future.done() or future._task_bytes not in pending for future in futures):
            return False
        del self.relayed[item.task_id]
        with item.future._condition:
            item.future._sent = False
        self.settled += 1
        hold()
        return True

    def _memoized(self, item: _WorkItem) -> bool:
        """Serve a memoized call from this client's cache, or let it wait for
        an identical call already in flight; False if it must be sent."""
        key = item.memo_key
        blob = self.memo_results.get(key)
        if blob is not None:
            self._finish(item, P.OK, blob, None)
            return True
        waiting = self.memo_waiting.get(key)
        if waiting is not None:
            with item.future._condition:
                item.future._sent = False  # it stays here: cancel() is local
            waiting.append(item)
            return True
        self.memo_waiting[key] = []
        return False

    def _add_to_batch(self, item: _WorkItem) -> None:
        rows, blobs = self.out_rows, self.out_blobs
        if not rows:
            self.out_deadline = time.monotonic() + self.batch_window
        fn_ref: bytes | int = -1
        if item.fn_hash not in self.registered:
            self.registered.add(item.fn_hash)
            fn_ref = blobs.ref(item.fn_body)
        row: list[Any] = [item.task_id, item.fn_hash, blobs.ref(item.payload), fn_ref, item.kind,
                          P.PYTHON_VERSION]
        if item.memo_key is not None or item.trace is not None or item.extra is not None:
            options: dict[str, Any] = dict(item.extra) if item.extra is not None else {}
            if item.memo_key is not None:
                options["m"] = item.memo_key
            if item.trace is not None:
                options["tr"] = list(item.trace)  # "sent" is stamped (on this copy) when the batch leaves
            row.append(options)
        rows.append(row)
        self.unaccepted[item.task_id] = item
        if len(rows) >= self.batch_size:
            self._send_batch()

    def _send(self, frames: list[Any], copy: bool = True) -> bool:
        """Send one message without blocking; False if it could not leave.

        With SNDHWM=0 a send is refused (zmq.Again) only when the socket has
        no connection at all: the relay refused the handshake (bad
        credentials, ZAP failure) and libzmq does not reconnect after that, so
        a blocking send would wait forever. Callers keep what was not sent
        (``unsent``) for :meth:`_send_again`."""
        sock = self.sock
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            try:
                sock.send(frame, zmq.NOBLOCK | (zmq.SNDMORE if i < last else 0), copy=copy)
            except zmq.Again:
                if i:
                    # the connection went mid-message: libzmq dropped its first
                    # frames and now drops the rest of it until its last frame;
                    # hand them over, or it would drop the next message instead
                    for rest in range(i + 1, len(frames)):
                        try:
                            sock.send(frames[rest], zmq.NOBLOCK | (zmq.SNDMORE if rest < last else 0), copy=copy)
                        except zmq.Again:
                            break
                return False
        return True

    def _send_batch(self) -> None:
        rows, blobs = self.out_rows, self.out_blobs
        self.out_rows, self.out_blobs = [], P.Blobs()
        now = time.time()
        for row in rows:
            if len(row) == 7 and "tr" in row[6]:
                row[6]["tr"].append(now)
        fields: dict[str, Any] = {"ep": self.endpoint_id, "tasks": rows}
        if self.resending:
            fields["resend"] = True
        if not self._send(P.encode(P.SUBMIT, fields, blobs.frames), copy=False):
            # No connection. Its tasks stay pending and unaccepted, as when
            # the relay is down: _send_again sends them with the next batch
            # to go out. The functions registered by this batch were not.
            for row in rows:
                if row[3] != -1:
                    self.registered.discard(row[1])
            self.unsent = True

    def _relay_restarted(self) -> None:
        """The relay came back from a restart: introduce this client again,
        send again what it had not recorded, and ask for the results of the
        rest (they come from its record, or when the tasks finish)."""
        log.warning("the relay restarted; sending %d unrecorded task(s) again and resuming %d",
                    len(self.unaccepted), len(self.pending) - len(self.unaccepted))
        self._send_again()

    def _send_again(self) -> None:
        """Introduce this client again, send again the tasks the relay has
        not recorded (marked as a resend: it may have some already), ask for
        the results of the rest, and repeat unanswered lookups and
        acknowledgements. After a relay restart, and once a connection is back
        after messages that could not leave or went with a refused connection
        (the relay refused a handshake and there are other credentials now).
        With still no connection, everything stays as it is for the next try
        (at the next heartbeat)."""
        self.unsent = False
        if not self._hello():
            return
        self.registered.clear()
        # a batch being gathered is in `unaccepted` too: it goes with the others
        self.out_rows, self.out_blobs = [], P.Blobs()
        again = [item for item in self.unaccepted.values() if item.task_id in self.pending]
        self.unaccepted.clear()
        if self.relayed:   # those whose dependencies are done here are held here (see _hold_here)
            kept = []
            for item in again:
                if item.task_id in self.relayed and self._hold_here(item):
                    del self.pending[item.task_id]
                else:
                    kept.append(item)
            again = kept
        self.resending = True
        try:
            for item in again:
                self._add_to_batch(item)
            if self.out_rows:
                self._send_batch()
        finally:
            self.resending = False
        self._resume([tid for tid in self.pending if tid not in self.unaccepted])
        for endpoint_id, _ in self.lookups:
            if not self._send(P.encode(P.LOOKUP, {"ep": endpoint_id})):
                self.unsent = True
                break
        if self.unsent_acks:
            acks, self.unsent_acks = self.unsent_acks, []
            self._ack(acks)

    def _hello(self) -> bool:
        if self._send(P.encode(P.HELLO, {"role": "client", "id": self.client_id, "py": P.PYTHON_VERSION})):
            return True
        self.unsent = True
        return False

    def _resume(self, task_ids: list[bytes]) -> None:
        """Ask the relay for these tasks' results (from its record, or when they finish)."""
        for start in range(0, len(task_ids), RESUME_CHUNK):
            if not self._send(P.encode(P.RESUME, {"tids": task_ids[start:start + RESUME_CHUNK]})):
                self.unsent = True  # _send_again resumes every pending task the relay has recorded
                return

    def _ack(self, task_ids: list[bytes]) -> None:
        """Tell the relay these results arrived (it keeps them until then)."""
        for part in P.chunks(task_ids):
            if not self._send(P.encode(P.ACK, {"tids": part})):
                self.unsent_acks.extend(part)
                self.unsent = True

    def _heard_from(self, incarnation: Any) -> None:
        if not isinstance(incarnation, bytes):
            return
        if self.relay_incarnation is None:
            self.relay_incarnation = incarnation
        elif incarnation != self.relay_incarnation:
            self.relay_incarnation = incarnation
            self._relay_restarted()

    def _read_results(self) -> None:
        sock = self.sock
        acks: list[bytes] = []
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self.last_heard = time.monotonic()
            try:
                msg = P.decode(frames)
            except P.ProtocolError as exc:
                log.warning("ignored a malformed message from the relay: %s", exc)
                continue
            if msg.type == P.RESULTS:
                for task_id in msg.fields.get("started", ()):
                    item = self.pending.get(task_id)
                    if item is not None and not item.running:
                        item.running = True
                        future = item.future
                        future.set_running_or_notify_cancel()
                        future._answered()
                for row in msg.fields["rows"]:
                    task_id, status, index = row[:3]
                    if status == P.FAILED and (self._needs_function(task_id, P.blob(msg.blobs, index))
                                               or self._dependency_done(task_id, P.blob(msg.blobs, index))):
                        continue   # sent again (with its function, or its dependencies' values): not an outcome
                    acks.append(task_id)
                    self.unaccepted.pop(task_id, None)
                    item = self.pending.pop(task_id, None)
                    if item is None:
                        continue
                    if status == P.FAILED and is_big(item.payload):   # refused before it was accepted
                        self._drop_upload(item.payload)
                    trace = row[3] if len(row) == 4 else None
                    blob = P.blob(msg.blobs, index)
                    if status == P.OK and is_big(blob):   # a large result: fetched in chunks, by another thread
                        self._fetch_later(item, blob, trace)
                        continue
                    self._settle(item, status, blob, trace)
            elif msg.type == P.ACCEPTED:
                unaccepted = self.unaccepted
                for task_id in msg.fields["tids"]:
                    item = unaccepted.pop(task_id, None)
                    if item is not None:
                        item.payload = b""  # recorded by the relay: the arguments need not stay here
            elif msg.type in (P.WELCOME, P.HEARTBEAT):
                if msg.type == P.WELCOME:
                    self.relay_deps = msg.fields.get("deps") is True
                limit = msg.fields.get("max_payload")
                if type(limit) is int and limit > 0:
                    self.max_payload = limit
                self._heard_from(msg.fields.get("inc"))
            elif msg.type == P.LOOKUP_REPLY:
                if self.lookups:
                    future = self.lookups.popleft()[1]
                    if not future.done():
                        future.set_result(msg.fields)
            elif msg.type == P.ERROR:
                if msg.fields.get("auth"):  # refused, or our session ended (a token revoked or expired)
                    self.failure = f"the relay at {self.relay} refused this client: {msg.fields.get('msg')}"
                    self.auth_refused = True
                    log.error("%s", self.failure)
                    break
                log.warning("the relay reported an error: %s", msg.fields.get("msg"))
        if acks:
            if self.out_rows:   # a task in them may depend on one acknowledged here: it goes first
                self._send_batch()
            self._ack(acks)
        if self._room_waiters:
            with self._room:
                self._room.notify_all()

    def _settle(self, item: _WorkItem, status: int, blob: Any, trace: list[float] | None) -> None:
        """A task's outcome: its future, and those of its watchers and memoized twins."""
        shared = blob
        if type(blob) is bytearray and (item.task_id in self.watchers or item.memo_key is not None):
            shared = bytes(blob)   # the others' (the item's value may be views of its fetched bytearray)
        self._finish(item, status, blob, trace)
        for watcher in self.watchers.pop(item.task_id, ()):
            self._finish(watcher, status, shared, None)
        if item.memo_key is not None:
            self._settle_twins(item, status, shared)

    def _fetch_later(self, item: _WorkItem, ref: Any, trace: list[float] | None) -> None:
        """Fetch a large result on the fetch thread (its own transfer link),
        so that this thread goes on with other tasks meanwhile; it comes
        back as a "fetched" command, settled then (``_fetched``)."""
        self.fetching[item.task_id] = (item, trace)
        if self.fetcher is None:
            self.fetcher = ThreadPoolExecutor(1, thread_name_prefix="fedexec-fetch")
        ref = P.as_bytes(ref)

        def fetch() -> None:
            outcome = self._fetch_big(ref)
            try:
                self.post("fetched", (item.task_id, *outcome))
            except RuntimeError:   # stopped meanwhile: its future already failed
                pass

        self.fetcher.submit(fetch)

    def _fetched(self, task_id: bytes, status: int, blob: Any) -> None:
        entry = self.fetching.pop(task_id, None)
        if entry is not None:
            self._settle(entry[0], status, blob, entry[1])

    def _drop_upload(self, ref: bytes) -> None:
        """The relay may delete the upload of a task it refused."""
        try:
            self.transfers.get().drop(ref)
        except Exception as exc:   # it expires there by itself
            log.debug("could not drop an upload: %s", exc)

    def _fetch_big(self, ref: Any) -> tuple[int, Any]:
        """A large result's ``(status, blob)``: fetched from the relay (which
        then deletes it), or a failure saying why it could not be."""
        try:
            return P.OK, self.transfers.fetch(P.as_bytes(ref))
        except Exception as exc:
            return P.FAILED, P.pack_failure(P.LOST, f"the task's large result could not be fetched from the "
                                                    f"relay: {type(exc).__name__}: {exc}")

    def _needs_function(self, task_id: bytes, blob: Any) -> bool:
        """A task the relay refused because it came without its function body
        (sent once per connection, see ``registered``) and the relay no longer
        has it (a body goes with the last task using it): it goes again at
        once, with its body. Whether the failure was that, and honoured.

        The relay refuses so only a submission it has not accepted, so it is
        honoured once per task and only while the task is unaccepted; any
        other such answer (asked again after the body went, or sent as a
        task's result, which an endpoint could forge) is the task's outcome,
        a TaskRejected, never a loop of resends."""
        item = self.unaccepted.get(task_id)
        if item is None or item.body_resent or task_id not in self.pending:
            return False
        try:
            if P.unpack_failure(blob).get("kind") != P.NEED_FUNCTION:
                return False
        except Exception:
            return False
        self.registered.discard(item.fn_hash)
        self.unaccepted.pop(task_id, None)
        item.body_resent = True
        self._add_to_batch(item)
        return True

    def _dependency_done(self, task_id: bytes, blob: Any) -> bool:
        """The relay did not take a task to hold for its dependencies because
        one of them has finished (its result is on its way here), or is not
        there (yet: sent again after it, as NEED_FUNCTION asked; they are all
        this executor's own tasks): the task is held here instead, until the
        values are. Whether it was."""
        if task_id not in self.relayed or task_id not in self.unaccepted:
            return False
        try:
            if P.unpack_failure(blob).get("kind") not in (P.DEPENDENCY_DONE, P.NOT_ALLOWED):
                return False
        except Exception:
            return False
        item = self.pending.pop(task_id)
        self.unaccepted.pop(task_id, None)
        _, hold = self.relayed.pop(task_id)
        with item.future._condition:
            item.future._sent = False
        self.settled += 1
        hold()
        return True

    def _settle_twins(self, item: _WorkItem, status: int, blob: Any) -> None:
        """Identical memoized calls share their carrier's outcome; if the
        carrier was cancelled, the next of them is sent in its place."""
        twins = self.memo_waiting.pop(item.memo_key, [])
        if status == P.OK:
            self._remember(item.memo_key, P.as_bytes(blob))
        if status == P.CANCELLED:
            twins = [t for t in twins if not t.future.cancelled()]
            if twins:
                carrier, *rest = twins
                self.memo_waiting[item.memo_key] = rest
                with carrier.future._condition:
                    carrier.future._sent = True
                self.pending[carrier.task_id] = carrier
                self._add_to_batch(carrier)
                self._send_batch()
            return
        for twin in twins:
            self._finish(twin, status, blob, None)

    def _remember(self, key: bytes, blob: bytes) -> None:
        if len(self.memo_results) >= MEMO_ENTRIES:
            for old in list(self.memo_results)[: MEMO_ENTRIES // 2]:  # oldest first
                del self.memo_results[old]
        self.memo_results[key] = blob

    def _finish(self, item: _WorkItem, status: int, blob: Any, trace: list[float] | None) -> None:
        """Complete a future; nothing a callback raises escapes."""
        self.settled += 1
        if trace is not None:
            item.future.fedexec_timings = dict(zip(P.TRACE_STAGES, [*trace, time.time()]))  # type: ignore
        try:
            self._complete(item, status, blob)
        except BaseException:  # e.g. SystemExit from a user's done-callback
            log.exception("a callback of task %s raised", item.future.task_id)
        if self.relayed:
            self.relayed.pop(item.task_id, None)
        item.future._answered()

    def _complete(self, item: _WorkItem, status: int, blob: Any) -> None:
        future = item.future
        if status == P.CANCELLED:  # the relay or endpoint dropped it, as asked
            if Future.cancel(future):
                future.set_running_or_notify_cancel()
            elif not future.done():
                future.set_exception(CancelledError("the task was cancelled on the relay or endpoint"))
            return
        if not item.running and not future.set_running_or_notify_cancel():
            return  # cancelled here while its result was on the way
        item.running = True
        try:
            if status == P.OK:
                try:
                    value = decode_data(blob) if self.data_only else deserialize(blob)
                except NotData as exc:
                    future.set_exception(DeserializationError(
                        f"the result is not plain data, so it was not loaded ({exc}); this executor takes only "
                        f"plain data because {self.data_only_why}"))
                    return
                except Exception as exc:
                    future.set_exception(DeserializationError(
                        f"the result arrived but cannot be unpickled here: {type(exc).__name__}: {exc}"))
                    return
                future.set_result(value)
            elif status == P.EXCEPTION:
                try:
                    error = deserialize_data_exception(blob) if self.data_only else deserialize_exception(blob)
                except NotData as exc:
                    error = DeserializationError(
                        f"the task raised, and its exception is not plain data, so it was not loaded ({exc}); "
                        f"this executor takes only plain data because {self.data_only_why}")
                future.set_exception(error)
            else:
                error = _failure_exception(blob)
                if isinstance(error, DependencyError) and item.task_id in self.relayed:
                    _chain_dependency(error, self.relayed[item.task_id][0])
                future.set_exception(error)
        except Exception as exc:  # a malformed result must not take the thread down
            if not future.done():
                future.set_exception(DeserializationError(f"malformed result: {exc}"))


class FederatedExecutor(Executor):
    """Run functions on a fedexec endpoint through the standard Executor API.

    ``FederatedExecutor()`` with no endpoint and no relay starts a private
    relay and a local endpoint with ``max_workers`` workers (default: the
    usable cores) and stops them on :meth:`shutdown`. With an ``endpoint_id``
    it sends tasks to that endpoint through ``relay`` (default:
    ``$FEDEXEC_RELAY``, else the relay started by ``fedexec relay start`` in the
    fedexec home, else ``tcp://127.0.0.1:55700``). A list of endpoint ids, or
    the name of a group made with ``fedexec group set`` (any string that is not
    a UUID names a group), is a group: the relay runs each task on one member
    with free capacity, preferring one the function is warm on, and moves a
    task to a live member when the one it went to is lost.

    Functions are registered once by content hash; each function *object* is
    pickled once, on its first submission, so later changes to its globals or
    closure are not seen (as with Globus Compute's executor).

    ``data_only``: whether arguments travel and results are loaded as plain
    data only (see ``serialize.DATA_TYPES``), never as pickles. Unpickling a
    result runs whatever code the pickle names, so it trusts the endpoint's
    owner with this process. True: always (arguments that are not plain data
    fail with :class:`~fedexec.SerializationError`; a result or exception
    that is not plain data fails with :class:`~fedexec.DeserializationError`
    and is never loaded), whatever the endpoint says; its workers answer in
    the format the arguments came in. False: pickles, for an endpoint you
    trust (ValueError if the endpoint is data-only). None (the default):
    data only when the endpoint (or a member of the group) is data-only, or
    belongs to another user; pickles on your own endpoints.
    """

    def __init__(self, endpoint_id: str | None = None, *, relay: str | None = None,
                 max_workers: int | None = None, batch_size: int = 1024, batch_window: float = 0.0,
                 prefetch: int | None = None, worker_batch: int | None = None,
                 memoize: bool = False, trace: bool = False, max_retries: int = 0,
                 task_timeout: float | None = None, max_in_flight: int | None = 100_000,
                 token: str | None = None, relay_public_key: str | None = None,
                 connect_timeout: float = 30.0, data_only: bool | None = None,
                 max_payload: int | None = None) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if batch_size <= 0:
            raise ValueError("batch_size must be greater than 0")
        if not 0 <= batch_window <= 1:
            raise ValueError("batch_window must be from 0 to 1 second")
        if prefetch is not None and prefetch < 0:
            raise ValueError("prefetch must be >= 0")
        if worker_batch is not None and worker_batch < 1:
            raise ValueError("worker_batch must be >= 1")
        _check_task_options(task_timeout, max_retries)
        if data_only is not None and not isinstance(data_only, bool):
            raise ValueError(f"data_only must be None, True or False, not {data_only!r}")
        if max_in_flight is not None and (isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int)
                                          or max_in_flight < 1):
            raise ValueError(f"max_in_flight must be None or an integer > 0, not {max_in_flight!r}")
        self._max_in_flight = max_in_flight
        self._max_retries = max_retries
        self._task_timeout = task_timeout
        services: EmbeddedFederation | None = None
        if endpoint_id is None:
            if relay is not None:
                raise ValueError("an endpoint_id is needed to use a relay; omit both for the embedded default")
            services = EmbeddedFederation(max_workers, prefetch=1 if prefetch is None else prefetch,
                                          worker_batch=worker_batch or DEFAULT_WORKER_BATCH,
                                          max_payload=None if max_payload is None
                                          else P.check_payload_limit(max_payload))
            services.start()
            endpoint_id, relay = services.endpoint_id, services.relay_address
        else:
            # an endpoint id, a list of them (a group: each task runs on one) or a group's name (groups.toml)
            members = endpoint_targets(endpoint_id)
            endpoint_id = members[0] if len(members) == 1 else members
            for name, value in (("max_workers", max_workers), ("prefetch", prefetch),
                                ("worker_batch", worker_batch), ("max_payload", max_payload)):
                if value is not None:
                    raise ValueError(f"{name} only applies to the embedded default; "
                                     "a remote endpoint sets it in its config")
            relay = relay or _default_relay()
        try:
            check_token(relay, token, relay_public_key)   # here, not in the dispatcher thread
        except BaseException:
            if services is not None:
                services.stop()
            raise
        #: the endpoint id, or for a group the list of its members' ids (SUBMIT's ``ep``)
        self.endpoint_id: str | list[str] = endpoint_id
        self.endpoint_ids: list[str] = endpoint_id if isinstance(endpoint_id, list) else [endpoint_id]
        self.relay: str = relay
        self._task_ids = _TaskIds()
        self._batch_size = batch_size
        self._functions = _FunctionCache()
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._memoize = memoize
        self._trace = trace
        self._dispatcher = _Dispatcher(relay, endpoint_id, batch_size, batch_window, services, token,
                                       relay_public_key)
        self._serialize_arguments, self._serialize_chunk = serialize_arguments, serialize_chunk
        # a call's arguments as submit pickles them: finding futures in the same pass
        self._submit_arguments: Callable[[Callable[..., Any], tuple, dict], bytes] = arguments_or_futures
        self._dispatcher.start()
        try:
            infos = [self._lookup_endpoint(connect_timeout, wait_for_it=services is not None, services=services,
                                           endpoint_id=member) for member in self.endpoint_ids]
        except BaseException:
            self.shutdown(wait=True)
            raise
        try:
            why = _data_only_reason(data_only, infos)
        except BaseException:
            self.shutdown(wait=True)
            raise
        #: arguments go as plain data (others fail with SerializationError), and
        #: what the endpoint returns is never unpickled here (see ``data_only``)
        self.data_only: bool = why is not None
        if why is not None:
            self._serialize_arguments, self._serialize_chunk = serialize_data_arguments, serialize_data_chunk
            self._submit_arguments = serialize_data_arguments
            self._dispatcher.data_only_why = why
            self._dispatcher.data_only = True
        #: the endpoints' worker count; Dask reads it to size its concurrency
        self._max_workers = max(1, sum(int(info.get("workers") or 0) for info in infos))
        self.endpoint_name: str = ",".join(str(info.get("name", "")) for info in infos)
        _live_executors.add(self)

    def _lookup_endpoint(self, timeout: float, *, wait_for_it: bool,
                         services: EmbeddedFederation | None, endpoint_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            future: Future = Future()
            self._dispatcher.post("lookup", (endpoint_id, future))
            while not future.done():
                handshake = self._dispatcher.handshake
                refused = handshake.refused_for(AUTH_GRACE) if handshake is not None else None
                if refused:
                    raise AuthenticationFailed(refused)
                if services is not None and services.failed():
                    raise RuntimeError(f"fedexec could not start its embedded default: {services.failed()}")
                if time.monotonic() > deadline:
                    raise RelayUnavailable(f"no answer from the relay at {self.relay} within {timeout:g} s")
                try:
                    future.result(0.05)
                except TimeoutError:
                    pass
            reply = future.result()
            if reply.get("refused"):
                raise NotAuthorized(f"the relay at {self.relay} refused: {reply['refused']}")
            if reply.get("found"):
                info = reply["endpoint"]
                if info.get("py") and info["py"] != P.PYTHON_VERSION:
                    raise VersionMismatch(
                        f"endpoint {info.get('name')!r} runs Python {info['py']} but this client runs Python "
                        f"{P.PYTHON_VERSION}; pickled functions need the same minor version")
                if not wait_for_it or info.get("status") == "connected":
                    return info
            elif not wait_for_it:
                raise UnknownEndpoint(f"the relay at {self.relay} knows no endpoint {endpoint_id}")
            if time.monotonic() > deadline:
                raise RelayUnavailable(f"the embedded endpoint did not connect within {timeout:g} s")
            time.sleep(0.02)

    # -- the Executor API ----------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)`` on the endpoint; return its Future.

        Futures among the arguments (at any depth) are dependencies: the task
        runs once they are all done, on their values (see :mod:`fedexec.dependencies`)."""
        try:
            future = self._submit(fn, P.TASK_CALL, lambda: self._submit_arguments(fn, args, kwargs))
        except FuturesFound as found:
            fn, memoize, extra = self._callable(fn)
            return self._submit_dependent(fn, memoize, extra, args, kwargs, None, found)
        if future._state == _FINISHED and isinstance(future._exception, SerializationError):
            fn, memoize, extra = self._callable(fn)
            return self._submit_dependent(fn, memoize, extra, args, kwargs, future)
        return future

    def _callable(self, fn: Callable[..., Any]) -> tuple[Callable[..., Any], bool, dict[str, Any] | None]:
        """The function to send, whether its calls are memoized, and the task
        options that travel with it; raises if the executor is shut down or
        ``fn`` is not callable."""
        self._check_open()
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        memoize, timeout, retries = self._memoize, self._task_timeout, self._max_retries
        if isinstance(fn, with_options):
            memoize = fn.memoize if fn.memoize is not None else memoize
            timeout = fn.timeout if fn.timeout is not None else timeout
            retries = fn.max_retries if fn.max_retries is not None else retries
            fn = fn.fn
        extra: dict[str, Any] = {}
        if retries:
            extra["r"] = retries
        if timeout is not None:
            extra["to"] = timeout
        return fn, memoize, extra or None

    def _submit(self, fn: Callable[..., Any], kind: int, make_payload: Callable[[], bytes]) -> Future:
        fn, memoize, extra = self._callable(fn)
        future, item = self._new_task(fn, kind, make_payload, memoize, extra)
        if item is not None:
            self._post_group([item])
        return future

    def _submit_calls(self, fn: Callable[..., Any], calls: Iterable[tuple]) -> list[Future]:
        """``submit(fn, *args)`` for each args tuple, handed to the dispatcher
        in groups of ``batch_size`` rather than one by one (``map``'s path)."""
        fn, memoize, extra = self._callable(fn)
        futures: list[Future] = []
        group: list[_WorkItem] = []
        for args in calls:
            try:
                future, item = self._new_task(fn, P.TASK_CALL, lambda: self._submit_arguments(fn, args, {}), memoize,
                                              extra)
            except FuturesFound as found:
                future, item = self._submit_dependent(fn, memoize, extra, args, {}, None, found), None
            if item is None and isinstance(future._exception, SerializationError):
                future = self._submit_dependent(fn, memoize, extra, args, {}, future)
            futures.append(future)
            if item is not None:
                group.append(item)
                if len(group) >= self._batch_size:
                    self._post_group(group)
                    group = []
        if group:
            self._post_group(group)
        return futures

    def _new_task(self, fn: Callable[..., Any], kind: int, make_payload: Callable[[], bytes], memoize: bool,
                  extra: dict[str, Any] | None,
                  future: TaskFuture | None = None) -> tuple[TaskFuture, _WorkItem | None]:
        """A task's future (``future``, or a new one) and what travels for
        it; when its function or arguments cannot be sent, the future already
        holds the error and there is nothing to send."""
        submitted = time.time() if self._trace else 0.0
        if future is None:
            task_id = self._task_ids.next()
            future = TaskFuture(self._dispatcher, task_id)
        else:
            task_id = future._task_bytes
        try:
            fn_hash, fn_body = self._functions.lookup(fn)
            payload = make_payload()
            limit = self._dispatcher.max_payload
            if limit is not None and (len(payload) > limit or len(fn_body) > limit):
                self._check_size(payload)
                self._check_size(fn_body, "the function")
            if len(payload) > BIG_THRESHOLD or len(fn_body) > BIG_THRESHOLD:
                self._check_size(fn_body, "the function", P.MAX_PAYLOAD_LIMIT)   # a body travels in one frame
                if len(payload) > BIG_THRESHOLD:   # uploaded in chunks first; the task carries its reference
                    payload = self._dispatcher.transfers.upload(payload)
        except (SerializationError, PayloadTooLarge, TransferError) as exc:
            future.set_exception(exc)
            return future, None
        item = _WorkItem(future, task_id, fn_hash, fn_body, payload, kind)
        item.extra = extra
        if memoize:
            item.memo_key = content_hash(fn_hash + bytes([kind]) + payload)
        if self._trace:
            item.trace = [submitted]
        return future, item

    def _submit_dependent(self, fn: Callable[..., Any], memoize: bool, extra: dict[str, Any] | None,
                          args: tuple, kwargs: dict[str, Any], failed: TaskFuture | None,
                          found: FuturesFound | None = None) -> TaskFuture:
        """A call whose arguments hold futures (``found``: their snapshot
        already made), or could not be pickled (``failed``: its future, which
        holds the error): if that is because they hold futures or DataRefs,
        a new future for the call (held here until those futures are done
        and then sent with their values in their place, or failed with a
        DependencyError); otherwise ``failed``."""
        if found is not None:   # (no DataRefs: those pickle only while collecting, dataref.py)
            blob, futures = found.blob, found.futures
        else:
            assert failed is not None
            try:
                with dataref.collecting() as refs:
                    blob, futures = snapshot((args, kwargs))
            except Exception:
                return failed   # something else cannot be pickled: the original error stands
            if refs:
                extra = self._with_refs(extra, refs)
                if extra is None:
                    return failed
                if not futures:
                    return self._submit_with_refs(fn, memoize, extra, blob)
            if not futures:
                return failed
        dispatcher = self._dispatcher
        dependent = TaskFuture(dispatcher, self._task_ids.next())
        hold = functools.partial(self._hold_dependent, fn, memoize, extra, blob, futures, dependent)
        if (memoize or self.data_only or not dispatcher.relay_deps or len(futures) > P.MAX_ITEMS
                or len(blob) > BIG_THRESHOLD   # (the relay cannot wrap results around an upload)
                or not all(type(f) is TaskFuture and f._dispatcher is dispatcher for f in futures)):
            hold()   # held here until they are done, then sent with their values
            return dependent
        # all are this executor's tasks: the relay holds it, and their values never come here
        options = dict(extra or {})
        options["d"] = [f._task_bytes for f in futures]
        _, item = self._new_task(fn, P.TASK_CALL, lambda: blob, False, options, future=dependent)
        if item is not None:
            with dispatcher._post_lock:   # (before the dispatcher can see it)
                dispatcher.relayed[item.task_id] = (futures, hold)
            self._post_group([item])
        return dependent

    def _with_refs(self, extra: dict[str, Any] | None, refs: list[dataref.DataRef]) -> dict[str, Any] | None:
        """The task options ``extra`` plus the DataRefs the arguments name
        (``rf``); None (the call fails with its pickling error) for a data-only
        executor, which sends no pickles, or too many refs."""
        wire = dataref.wire_refs(refs)
        if self.data_only or len(wire) > P.MAX_REFS:
            return None
        return {**(extra or {}), "rf": wire}

    def _submit_with_refs(self, fn: Callable[..., Any], memoize: bool, extra: dict[str, Any],
                          blob: bytes) -> TaskFuture:
        """A call whose arguments name DataRefs (``blob``, pickled while
        collecting them): sent with their ids in ``extra`` (``rf``)."""
        future, item = self._new_task(fn, P.TASK_CALL, lambda: blob, memoize, extra)
        if item is not None:
            self._post_group([item])
        return future

    def _submit_chunk(self, fn: Callable[..., Any], chunk: list[tuple]) -> Future:
        """One ``map`` chunk as a task; if its arguments name DataRefs, with
        them (pickled again while collecting, only after the ordinary
        pickling failed)."""
        future = self._submit(fn, P.TASK_CHUNK, lambda: self._serialize_chunk(fn, chunk))
        if not (future._state == _FINISHED and isinstance(future._exception, SerializationError)):
            return future
        try:
            with dataref.collecting() as refs:
                blob = self._serialize_chunk(fn, chunk)
        except Exception:
            return future
        target, memoize, extra = self._callable(fn)
        extra = self._with_refs(extra, refs) if refs else None
        if extra is None:
            return future
        chunk_future, item = self._new_task(target, P.TASK_CHUNK, lambda: blob, memoize, extra)
        if item is not None:
            self._post_group([item])
        return chunk_future

    def _serialize_with_refs(self, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> bytes:
        with dataref.collecting():
            return self._serialize_arguments(fn, args, kwargs)

    def _hold_dependent(self, fn: Callable[..., Any], memoize: bool, extra: dict[str, Any] | None, blob: bytes,
                        futures: list[Future], dependent: TaskFuture) -> None:
        """Hold a task here until ``futures`` are done, then send it with
        their values in the arguments (``blob``, from ``snapshot``), or fail
        it with a DependencyError."""
        dispatcher = self._dispatcher
        held = dispatcher.held
        lock = dispatcher._post_lock
        claimed = [False]   # ready() has taken it: from then on, a cancel is handled where it goes
        with lock:
            held.add(dependent)

        def wake() -> None:
            try:
                dispatcher.post("wake")   # it may be waiting to stop
            except RuntimeError:
                pass

        def on_cancel(future: Future) -> None:
            """Cancelled while it waits: it is dropped at once (for wait()
            and as_completed(), and so that shutdown does not wait for it)."""
            with lock:
                if not future.cancelled() or claimed[0]:
                    return   # ready() has it: failed there, or the dispatcher drops it
                held.discard(future)
            future.set_running_or_notify_cancel()
            wake()

        def ready(failed_dependency: Future | None) -> None:
            with lock:
                if dependent not in held:
                    return   # cancelled meanwhile: on_cancel dropped it
                claimed[0] = True   # it stays in `held` until it is posted
            try:
                if failed_dependency is not None:
                    _fail(dependent, dependency_error(failed_dependency))
                    return
                try:
                    if extra is not None and "rf" in extra:   # its DataRefs stay handles here (dataref.py)
                        with dataref.as_handles():
                            values = rebuild(blob, futures)
                    else:
                        values = rebuild(blob, futures)
                except Exception as exc:
                    _fail(dependent, SerializationError(f"cannot rebuild the arguments of "
                                                        f"{getattr(fn, '__qualname__', repr(fn))}() with their "
                                                        f"dependencies' values: {exc}"))
                    return
                try:
                    serialize = self._serialize_arguments
                    if extra is not None and "rf" in extra:   # (its DataRefs pickle only while collecting)
                        serialize = self._serialize_with_refs
                    _, item = self._new_task(fn, P.TASK_CALL, lambda: serialize(fn, values[0], values[1]),
                                             memoize, extra, future=dependent)
                except InvalidStateError:
                    return   # could not be sent, and was cancelled meanwhile
                if item is not None:
                    try:
                        dispatcher.post("submit", [item], 1)
                    except RuntimeError as exc:   # the dispatcher has stopped
                        _fail(dependent, BrokenExecutor(str(exc)))
            finally:
                with lock:
                    held.discard(dependent)
                wake()

        dependent.add_done_callback(on_cancel)
        DependentCall(futures, ready)

    def _check_size(self, payload: bytes, what: str = "the arguments", limit: int | None = None) -> None:
        limit = limit or self._dispatcher.max_payload
        if limit is not None and len(payload) > limit:
            message, details = P.too_large(what, len(payload), limit)
            raise PayloadTooLarge(message, **details)

    def _post_group(self, group: list[_WorkItem]) -> None:
        """Hand tasks to the dispatcher, once there is room for them; if the
        executor is shut down meanwhile, their futures fail and this raises."""
        if self._max_in_flight is not None:
            self._dispatcher.wait_for_room(self._max_in_flight, len(group))
        with self._shutdown_lock:  # so no task slips in after shutdown() posted "stop"
            try:
                self._check_open()
                self._dispatcher.post("submit", group, len(group))
            except BaseException as exc:  # nothing of this group left: its futures must not hang
                for item in group:
                    if item.future.set_running_or_notify_cancel():
                        item.future.set_exception(exc if isinstance(exc, Exception) else BrokenExecutor(str(exc)))
                raise

    def reattach(self, task_ids: Iterable[str | uuid.UUID]) -> list[TaskFuture]:
        """Futures for tasks submitted earlier, by this or another process (a
        program that restarted, say), from their ids (``TaskFuture.task_id``).

        The relay keeps a result until a client has received and acknowledged
        it, and one nobody fetches until its ``--result-ttl``; a task it has no
        record of fails with :class:`~fedexec.TaskLost`.
        """
        self._check_open()
        items = []
        for value in task_ids:
            try:
                task_id = value.bytes if isinstance(value, uuid.UUID) else uuid.UUID(str(value)).bytes
            except ValueError:
                raise ValueError(f"{value!r} is not a task id (a UUID string, as TaskFuture.task_id)") from None
            future = TaskFuture(self._dispatcher, task_id)
            future._sent = True  # it is the relay's: cancel() asks there
            items.append(_WorkItem(future, task_id, b"", b"", b"", P.TASK_CALL))
        if items:
            with self._shutdown_lock:
                self._check_open()
                self._dispatcher.post("reattach", items, len(items))
        return [item.future for item in items]

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _global_shutdown:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if self._dispatcher.closed:
            raise BrokenExecutor(self._dispatcher.failure or "the executor's dispatcher has stopped")

    def put(self, obj: Any, ttl: float = dataref.DEFAULT_TTL) -> dataref.DataRef:
        """Store ``obj`` at the relay once, for ``ttl`` seconds (at most the
        relay's maximum), and return a small handle to pass to any number of
        tasks instead of the object: see :class:`fedexec.DataRef`. It counts
        against your byte quota at the relay until it is deleted or expires.
        A large object streams in chunks like any large payload."""
        self._check_open()
        if self.data_only:
            raise DataRefError("put() needs pickled tasks; this executor sends plain data only (data_only)")
        if not (isinstance(ttl, (int, float)) and ttl > 0):
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        try:
            blob = dataref.dumps_put(obj)
        except Exception as exc:
            raise SerializationError(f"cannot serialize the object to put ({type(obj).__qualname__}): {exc}") from exc
        limit = self._dispatcher.max_payload
        if limit is not None and len(blob) > limit:
            self._check_size(blob, "the object to put")
        transfers = self._dispatcher.transfers
        reference = transfers.upload(blob)
        del blob
        ref_id, size, digest = parse_big(reference)
        answer = dataref.request(transfers.get(), {"op": "put", "b": ref_id, "n": size, "h": digest,
                                                   "ttl": float(ttl)})
        return dataref.DataRef(self, ref_id, size, digest, float(answer.get("e", 0.0)))

    def _ref_request(self, ref: dataref.DataRef, op: str) -> dict[str, Any]:
        """Ask the relay about one of this executor's DataRefs (``del``, ``info``)."""
        self._check_open()
        return dataref.request(self._dispatcher.transfers.get(), {"op": op, "b": ref._id})

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None) -> Iterator[Any]:
        """Like :meth:`Executor.map`; with ``chunksize`` > 1 each chunk of
        arguments travels and runs as one task, as in ProcessPoolExecutor.
        With ``buffersize`` (as in Python 3.14) the iterables are read lazily
        and at most that many tasks (chunks) are out at once, topped up in
        groups as results are taken."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and (isinstance(buffersize, bool) or not isinstance(buffersize, int)
                                       or buffersize < 1):
            raise ValueError("buffersize must be None or > 0.")
        end_time = None if timeout is None else timeout + time.monotonic()
        chunked = chunksize > 1
        source: Iterator[Any] = _chunked(zip(*iterables), chunksize) if chunked else zip(*iterables)

        def submit_next(count: int | None) -> list[Future]:
            items = source if count is None else itertools.islice(source, count)
            if chunked:
                return [self._submit_chunk(fn, chunk) for chunk in items]
            return self._submit_calls(fn, items)

        futures: deque[Future] = deque(submit_next(buffersize))
        exhausted = buffersize is None or len(futures) < buffersize

        def result_iterator() -> Iterator[Any]:
            nonlocal exhausted
            try:
                while futures:
                    future = futures.popleft()
                    if not exhausted and len(futures) < (buffersize or 0) // 2 + 1:
                        wanted = buffersize - len(futures) - 1  # type: ignore[operator]
                        more = submit_next(wanted)
                        exhausted = len(more) < wanted
                        futures.extend(more)
                    try:
                        if end_time is None:
                            value = future.result()
                        else:
                            value = future.result(end_time - time.monotonic())
                    finally:
                        future.cancel()
                    if chunked:
                        yield from value
                    else:
                        yield value
                    del value
            finally:
                self._cancel_quietly(list(futures))

        return result_iterator()

    def _cancel_quietly(self, futures: list[Future]) -> None:
        """Cancel what is left of a ``map`` whose iterator was abandoned: like
        ``cancel()`` on each, but without waiting for the endpoint's answers
        one by one."""
        remote: list[bytes] = []
        for future in futures:
            with future._condition:
                if future._state != _PENDING:
                    continue
                if not future._sent:  # still here: the dispatcher will skip it
                    Future.cancel(future)
                    continue
            remote.append(future._task_bytes)
        if remote:
            try:
                self._dispatcher.post("cancel_many", remote)
            except RuntimeError:
                pass  # the dispatcher has stopped; its leftovers are failed

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; optionally cancel those not yet running; with
        ``wait``, return once every remaining future is done and embedded
        services are stopped."""
        dispatcher = self._dispatcher
        in_dispatcher = dispatcher is threading.current_thread()
        cancelled = threading.Event()
        with self._shutdown_lock:
            self._shutdown = True
            try:
                if cancel_futures:
                    # The dispatcher owns the pending set: it cancels every task
                    # not running, after every submit made before now.
                    dispatcher.cancel_unsent = True
                    dispatcher.post("cancel_all", cancelled)
                dispatcher.post("stop")
            except RuntimeError:
                cancelled.set()  # it has stopped already; nothing is pending
        if cancel_futures and not in_dispatcher:
            cancelled.wait(10.0)
        if wait and not in_dispatcher:
            dispatcher.join()
            _live_executors.discard(self)
        # without wait, interpreter exit still waits for the remaining tasks,
        # as with the standard executors


def _fail(future: Future, error: BaseException) -> None:
    """Fail a future not yet running (unless it was cancelled meanwhile)."""
    try:
        if future.set_running_or_notify_cancel():
            future.set_exception(error)
    except (RuntimeError, InvalidStateError):
        pass   # finished meanwhile


def _chain_dependency(error: DependencyError, futures: list[TaskFuture]) -> None:
    """Chain the exception of the dependency ``error`` names, when this
    process has it (its future is among ``futures`` and done)."""
    for future in futures:
        if future.task_id == error.dependency and future.done():
            if future.cancelled():
                error.__cause__ = CancelledError(f"task {future.task_id} was cancelled")
            elif future.exception() is not None:
                cause = error.__cause__ = future.exception()
                error.args = (f"{error}: {type(cause).__name__}: {cause}",)
            return


def _data_only_reason(data_only: bool | None, infos: list[dict[str, Any]]) -> str | None:
    """Why an executor takes only plain data (None: it takes pickles), from
    its ``data_only`` and what the relay said of each endpoint: whether it is
    data-only, and whether it is the asker's own (``yours``; a relay that
    does not say is taken to mean not). ValueError for data_only=False with
    a data-only endpoint."""
    says = [info for info in infos if info.get("data_only") is True]
    if data_only is False:
        if says:
            raise ValueError(f"endpoint {says[0].get('name')!r} ({says[0].get('id')}) is data-only: it takes and "
                             "gives plain data only, never pickles, so data_only=False cannot be used with it")
        return None
    if data_only is True:
        return "it was made with data_only=True"
    if says:
        return f"endpoint {says[0].get('name')!r} ({says[0].get('id')}) is data-only"
    foreign = [info for info in infos if info.get("yours") is not True]
    if foreign:
        return (f"endpoint {foreign[0].get('name')!r} ({foreign[0].get('id')}) belongs to another user "
                f"({foreign[0].get('owner')!r}), whose results are not unpickled here unless you pass "
                "data_only=False (which trusts its owner with this process)")
    return None


def _check_task_options(timeout: float | None, max_retries: int | None) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= P.MAX_WALLTIME):
        raise ValueError(f"timeout must be a number of seconds greater than 0 (at most {P.MAX_WALLTIME:g}), "
                         f"not {timeout!r}")
    if max_retries is not None and (isinstance(max_retries, bool) or not isinstance(max_retries, int)
                                    or not 0 <= max_retries <= P.MAX_RETRIES):
        raise ValueError(f"max_retries must be an integer from 0 to {P.MAX_RETRIES}, not {max_retries!r}")


class with_options:
    """Options for the calls of one function, for ``submit`` and ``map``:
    ``ex.submit(with_options(f, timeout=60, max_retries=2), x)``.

    ``timeout``: the walltime of each call in seconds, enforced on the
    endpoint (the worker running a call past it is stopped and the call fails
    with :class:`~fedexec.TaskTimeout`). ``max_retries``: times a call that
    raised is run again before its exception is returned. ``memoize``: see
    :class:`memoized`. Unset options take the executor's.
    """

    def __init__(self, fn: Callable[..., Any], *, timeout: float | None = None, max_retries: int | None = None,
                 memoize: bool | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        _check_task_options(timeout, max_retries)
        if isinstance(fn, with_options):  # the outer options win
            timeout = fn.timeout if timeout is None else timeout
            max_retries = fn.max_retries if max_retries is None else max_retries
            memoize = fn.memoize if memoize is None else memoize
            fn = fn.fn
        self.fn = fn
        self.timeout = timeout
        self.max_retries = max_retries
        self.memoize = memoize
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class memoized(with_options):
    """Mark a function's calls as memoizable: ``ex.submit(memoized(f), x)``
    returns the earlier result of ``f(x)`` when there is one (from this
    executor, or from the relay's store), without running it again.

    The key is the hash of the function's pickled code and of the pickled
    arguments, so use it for pure functions only: side effects are not
    repeated, and arguments that pickle differently each time (sets of
    strings across processes, objects with unordered state) miss the cache.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__(fn, memoize=True)


def _chunked(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(iterable)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _default_relay() -> str:
    env = os.environ.get("FEDEXEC_RELAY")
    if env:
        return env
    info = relay_dir() / "relay.json"
    try:
        import json

        return str(json.loads(info.read_text())["address"])
    except (OSError, ValueError, KeyError):
        return DEFAULT_RELAY_ADDRESS
