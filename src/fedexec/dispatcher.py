"""The dispatcher: the one background thread of a FederatedExecutor, which
owns its ZeroMQ socket to the relay (the executor's transport, as
mpi4py.futures keeps its pool apart from its executor facade).

It sends what ``submit`` queued as batches, registers each function once by
content hash, heartbeats while tasks are out, sends unfinished tasks again
after a relay restart, and completes each task's :class:`TaskFuture` as its
result arrives (large results fetched on a thread of their own). Commands
come from other threads through :meth:`Dispatcher.post`; nothing else
touches the socket.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import threading
import time
import uuid
from collections import deque
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures._base import CANCELLED as _CANCELLED
from concurrent.futures._base import CANCELLED_AND_NOTIFIED as _CANCELLED_AND_NOTIFIED
from concurrent.futures._base import FINISHED as _FINISHED
from concurrent.futures._base import PENDING as _PENDING
from concurrent.futures._base import RUNNING as _RUNNING
from typing import Any, Callable, Iterator

import zmq

from . import protocol as P
from . import samehost
from .auth import REFUSED_GRACE, HandshakeWatch, NoHandshake
from .embedded import EmbeddedFederation
from .framelink import StreamEnd, keep_polled
from .transfer import LinkPool, is_big
from .errors import (
    BrokenExecutor,
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
    VersionMismatch,
    WorkerLost,
)
from .output import MAGIC as OUTPUT_MAGIC, echo as echo_output, split as split_output, strip as strip_output, \
    text as output_text
from .serialize import NotData, decode_data, deserialize, deserialize_data_exception, deserialize_exception

log = logging.getLogger("fedexec.executor")


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
# An acknowledgement of results waits this long at most for a batch of tasks
# to go with (just before the next submit, usually at once in a loop of
# calls): the relay then reads both in one wake-up, and one ACK covers the
# results of several messages. Meanwhile the relay keeps those results (and
# counts them against the user's quotas) a little longer.
ACK_DELAY = 0.005


class _FutureCondition(threading.Condition):
    """A future's condition (on a re-entrant lock, as the standard one) whose
    lock's methods are looked up on the class rather than bound and stored
    in each instance, as ``threading.Condition.__init__`` does: a program
    holding 10,000 futures then holds 50,000 fewer objects for the garbage
    collector to walk, and each future is made faster (a fan-out's futures
    are made and kept by the thousand). The same behaviour: waiting
    releases and restores the lock through the RLock's own methods.

    The deque of waiting threads is made by the first :meth:`wait` only:
    an empty deque is 760 bytes, 60 % of a finished future, and most
    futures are never waited on one by one (a 1M-task ``map`` held 760 MB
    of empty deques). Until then ``_waiters`` is the class's empty tuple,
    which ``notify`` and ``notify_all`` read as "nobody waits"."""

    _waiters: "deque | tuple" = ()

    def __init__(self) -> None:   # (threading.Condition.__init__'s state, without the bound methods)
        self._lock = threading.RLock()

    def wait(self, timeout: float | None = None) -> bool:  # noqa: D102 - threading.Condition's
        if self._waiters.__class__ is tuple:   # the first waiter (under the lock, held by the caller)
            self._waiters = deque()
        return super().wait(timeout)

    def acquire(self, *args: Any, **kwargs: Any) -> bool:  # noqa: D102 - threading.Condition's
        return self._lock.acquire(*args, **kwargs)

    def release(self) -> None:  # noqa: D102
        self._lock.release()

    def _release_save(self) -> Any:
        return self._lock._release_save()   # type: ignore[attr-defined]

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)   # type: ignore[attr-defined]

    def _is_owned(self) -> bool:
        return self._lock._is_owned()   # type: ignore[attr-defined]


class TaskFuture(Future):
    """The :class:`concurrent.futures.Future` of a task sent to an endpoint.

    ``cancel()`` keeps the standard promise (True only if the call will not
    run) for a task that has already left this process: it asks the relay
    and endpoint to drop the task and returns True once they confirm it, or
    False when the task turns out to be running or done (or no answer comes
    within ``CANCEL_TIMEOUT`` seconds). ``task_id`` is the task's durable id.

    ``stdout`` and ``stderr``: what the task wrote to them on its worker
    (output.py), as str, once it is done: at most 1 MiB each (the last),
    after a note saying how many bytes were cut; ``""`` when it wrote nothing.
    """

    stdout: str = ""   # (set on the future only when the task wrote something: output.py)
    stderr: str = ""

    def __init__(self, dispatcher: "Dispatcher", task_id: bytes) -> None:
        # Future.__init__'s state (the same attributes: a test checks it), with a lighter condition
        self._condition = _FutureCondition()
        self._state = _PENDING
        self._result = None
        self._exception = None
        self._waiters: list = []
        self._done_callbacks: list = []
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


class WorkItem:
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
    if kind == P.NEED_FUNCTION:   # not honoured (see Dispatcher._needs_function): an outcome
        return TaskRejected(f"the task was not run: the relay asked for its function body again after it was "
                            f"sent with it, or after the task was accepted ({msg})")
    if kind == P.SERIALIZATION:
        return DeserializationError(msg) if info.get("remote") else SerializationError(msg)
    return TaskRejected(msg)


class Dispatcher(threading.Thread):
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
        self.pending: dict[bytes, WorkItem] = {}
        # sent, but not yet in the relay's durable record: kept with their
        # arguments, to send again if the relay restarts
        self.unaccepted: dict[bytes, WorkItem] = {}
        self.watchers: dict[bytes, list[WorkItem]] = {}   # more futures of a pending task (reattach)
        self.relay_incarnation: bytes | None = None
        self.resending = False   # batches being sent again after a relay restart
        self.registered: set[bytes] = set()
        self.lookups: deque[tuple[str, Future]] = deque()   # LOOKUPs not answered yet, in order
        # something could not be sent (no connection: the relay refused the
        # handshake): everything is sent again once there is one (_send_again)
        self.unsent = False
        self.unsent_acks: list[bytes] = []
        self.acks_due: list[bytes] = []   # results to acknowledge with the next batch (ACK_DELAY)
        self.acks_deadline = 0.0
        self.out_rows: list[list[Any]] = []        # a batch being gathered (batch_window)
        self.out_blobs = P.Blobs()
        self.out_deadline = 0.0
        self.memo_results: dict[bytes, bytes] = {}               # memo key -> pickled result
        self.memo_waiting: dict[bytes, list[WorkItem]] = {}     # memo key -> identical calls in flight
        self.stopping = False
        self.detaching = False   # stopping once every task is in the relay's record, not done (detach)
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
        self.fetching: dict[bytes, tuple[WorkItem, list[float] | None]] = {}   # large results being fetched
        self.fetcher: ThreadPoolExecutor | None = None   # the thread that fetches them (made when needed)
        # results are decoded as plain data only, never unpickled (the
        # executor's data_only); data_only_why says why, for its errors
        self.data_only = False
        self.data_only_why = ""
        #: the executor's initializer by name, when it has one: each function then travels wrapped with it
        #: (worker/initializer.py), so an endpoint's allow-list never holds its hash; errors say so
        self.initializer_name: str | None = None
        self.echo_output = False   # tasks' output also to this process's streams (FederatedExecutor's echo_output)
        # a stream link to the relay, when it has one: the embedded default's socketpair (for good), or a
        # same-host link to a local-mode relay of this user (samehost.py), ZeroMQ's socket beside it
        self.link: StreamEnd | None = None
        # may look for a same-host link: until a HELLO finds none (ZeroMQ from then on, see _hello)
        self.same_host = services is None and token is None
        self.link_ended = False   # no link now, though one is expected: nothing is sent until _send_again
        self.link_grace_until = time.monotonic() + samehost.LINK_GRACE   # (see _hello)
        self.link_polled: tuple[int, int] | None = None   # (descriptor, events) the link is polled for
        self.ended_links: list[StreamEnd] = []   # same-host links that ended, open until off the poller

    # -- called from user threads --------------------------------------------
    def post(self, command: str, value: Any = None, tasks: int = 0) -> None:
        """Hand a command to the thread; RuntimeError once it has stopped.
        ``tasks``: how many futures it brings (counted until they settle)."""
        inline = command == "submit" and threading.current_thread() is self
        with self._post_lock:
            if self.closed:
                raise RuntimeError(self.failure or "cannot schedule new futures after shutdown")
            self.posted += tasks
            if not inline:
                self.commands.append((command, value))
                if not self._wake_pending:
                    self._wake_pending = True
                    os.write(self._wake_w, b"x")
        if inline:
            self._accept_now(value)

    def _accept_now(self, items: list[WorkItem]) -> None:
        """Tasks submitted from this thread itself (a task held here for its
        dependencies, sent once their values arrived) are taken at once, not
        queued behind tasks posted meanwhile: those may depend on them, and
        go to the relay to be held there only if these are out already
        (``_hold_here``); queued behind them, each would be held here in turn,
        a round trip through this client per link of a chain."""
        for item in items:
            self._accept(item)

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
        watch: HandshakeWatch | NoHandshake
        sock: Any
        link = self.services.client_socket if self.services is not None else None
        if link is not None:   # the embedded default's: a socketpair to its relay (embedded.py)
            self.services.client_socket = None   # (ours to close from now on)
            sock = self.link = StreamEnd(link)
            watch = NoHandshake()
            self.same_host = False
        else:
            sock = P.dealer(ctx, 0, b"C" + self.client_id)
            watch = HandshakeWatch(sock, self.relay, self.token,
                                   self.services.secret_file if self.services is not None else None,
                                   relay_key=self.relay_public_key)
        self.handshake = watch
        self.sock = sock
        self._hello()
        poller = zmq.Poller()
        if link is None:
            poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        if watch.monitor is not None:
            poller.register(watch.monitor, zmq.POLLIN)
        next_beat = time.monotonic() + HEARTBEAT_PERIOD
        self.last_heard = time.monotonic()
        try:
            while True:
                timeout = int(HEARTBEAT_PERIOD * 1000)
                if self.out_rows:
                    timeout = max(0, math.ceil((self.out_deadline - time.monotonic()) * 1000))
                if self.acks_due:
                    timeout = min(timeout, max(0, math.ceil((self.acks_deadline - time.monotonic()) * 1000)))
                self._poll_link(poller)
                events = dict(poller.poll(timeout))
                if self._wake_r in events:
                    self._run_commands()
                if self.link is not None:
                    self.link.flush()
                if (events.get(self.link_polled[0], 0) if self.link_polled is not None else 0) & P.POLLIN \
                        or (link is None and sock in events):
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
                if self.acks_due and now >= self.acks_deadline:
                    self._flush_acks()
                if now >= next_beat:
                    next_beat = now + HEARTBEAT_PERIOD
                    gone = self.services.failed() if self.services is not None else None
                    if gone is not None:   # the embedded default's one process: what it held went with it
                        self.failure = (f"{gone}, so this task's outcome is lost (the embedded default keeps "
                                        "nothing after its process ends)")
                        break
                    # no event follows a refusal: look for other credentials now and then
                    if (watch.failure and watch.read()) or self.unsent:
                        self._send_again()
                    if self.pending or self.held:  # its answer says whether the relay restarted meanwhile
                        self._send(P.encode(P.HEARTBEAT))
                if self.stopping and not self.pending and not self.commands and not self.held and not self.fetching:
                    self._flush_acks()
                    break
                if self.detaching and not self.unaccepted and not self.commands and not self.held:
                    self._flush_acks()
                    self.failure = ("the fedexec.Client that submitted this task was closed before it finished; "
                                    "its result stays at the relay: read it with Client.get_result(task_id)")
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
            if self.link is not None:
                self.link.close()
            for ended in self.ended_links:
                ended.close()
            ctx.term()
            self.transfers.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            if self.services is not None:
                self.services.stop()

    def _poll_link(self, poller: zmq.Poller) -> None:
        """Keep the poller on the link's descriptor as it is now: for reading,
        for writing too while something waits that its socket did not take,
        and off it once the link has ended (its end-of-file would spin the
        loop). An ended same-host link is let go here too (:meth:`_drop_link`)."""
        link = self.link
        if link is not None and link.closed and self.same_host:
            self._drop_link()
            link = None
        self.link_polled = keep_polled(poller, self.link_polled, link)
        for ended in self.ended_links:   # (off the poller now: their numbers may be taken again)
            ended.close()
        self.ended_links.clear()

    def _drop_link(self) -> None:
        """The same-host link ended (the relay stopped, or restarted), found
        reading or writing. Nothing is sent until the next heartbeat's
        :meth:`_send_again`, whose HELLO takes a new relay's link or, with
        none there, ZeroMQ's socket for good, and then everything not
        answered goes again, over that one transport. (Sent over ZeroMQ
        meanwhile, a message could wait in its queue for the relay to come
        back and arrive after its copy sent again over a new link, or, with
        the relay back, be overtaken by messages on a later link: a task of
        it would run twice, or a LOOKUP's answer go to the next one.) The
        link stays open until it is off the poller, so that its descriptor's
        number is not a new one's meanwhile. (The embedded default's link is
        never let go: its relay is gone for good, and the heartbeat finds its
        process gone.)"""
        if self.link is not None:
            self.ended_links.append(self.link)
            self.link = None
            self.link_ended = True
            self.link_grace_until = time.monotonic() + samehost.LINK_GRACE
            self.unsent = True

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
            elif command == "detach":   # (fedexec.Client.close) stop once the relay has every task
                self.stopping = self.detaching = True
        if self.out_rows and not (busy and self.batch_window > 0):
            self._send_batch()
        for part in P.chunks(cancels):
            if not self._send(P.encode(P.CANCEL, {"tids": part})):
                # no connection: the tasks stay; cancel() says False once no answer came
                log.warning("could not ask the relay to cancel %d task(s): no connection", len(part))

    def _accept(self, item: WorkItem) -> None:
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

    def _hold_here(self, item: WorkItem) -> bool:
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
        pending.pop(item.task_id, None)   # (it may be sent again at once, in hold: _accept_now)
        with item.future._condition:
            item.future._sent = False
        self.settled += 1
        hold()
        return True

    def _memoized(self, item: WorkItem) -> bool:
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

    def _add_to_batch(self, item: WorkItem) -> None:
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
        link = self.link
        if link is not None:
            sent = link.send_message(frames)
            if sent or not self.same_host:
                return sent
            self._drop_link()   # (the relay's end is gone)
        if self.link_ended:   # nothing until _send_again has chosen the transport (_drop_link)
            return False
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
        # Acknowledgements waiting go first: the relay counts an unacknowledged
        # result against its user's task quota, and this batch may need the room.
        # (Results arrived before they were queued; a task in the batch that
        # depends on one is held here, its value at hand: _hold_here.)
        self._flush_acks()
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
                if item.task_id not in self.relayed or not self._hold_here(item):
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
        if self.same_host and self.link is None:   # (the relay's, on this host; a new one after a restart)
            self.link = samehost.connect(self.relay, b"C" + self.client_id, token=self.token)
            if self.link is None:
                if time.monotonic() < self.link_grace_until and samehost.expected(self.relay, token=self.token):
                    self.link_ended = True   # its relay is starting: nothing yet, tried again at the next heartbeat
                    self.unsent = True
                    return False
                # ZeroMQ for good: never from ZeroMQ to a link (what ZeroMQ still held could arrive
                # after what follows on the link, samehost.py)
                self.same_host = False
        self.link_ended = False
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

    def _ack_later(self, task_ids: list[bytes]) -> None:
        """Acknowledge these results with the next batch this thread sends,
        or ACK_DELAY from now, whichever comes first (a message's worth at once)."""
        if not self.acks_due:
            self.acks_deadline = time.monotonic() + ACK_DELAY
        self.acks_due += task_ids
        if len(self.acks_due) >= P.MAX_ITEMS:
            self._flush_acks()

    def _flush_acks(self) -> None:
        if self.acks_due:
            acks, self.acks_due = self.acks_due, []
            self._ack(acks)

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

    def _incoming(self) -> Iterator[list[Any]]:
        """The messages from the relay waiting now (on a same-host link, and
        on ZeroMQ's socket beside it, what came before the link did)."""
        link = self.link
        if link is not None:
            yield from link.read()
            if not self.same_host:
                return
            if link.closed and self.link is link:
                self._drop_link()
        sock = self.sock
        while True:
            try:
                yield sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return

    def _read_results(self) -> None:
        acks: list[bytes] = []
        for frames in self._incoming():
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
            self._ack_later(acks)
        if self._room_waiters:
            with self._room:
                self._room.notify_all()

    def _settle(self, item: WorkItem, status: int, blob: Any, trace: list[float] | None) -> None:
        """A task's outcome: its future, and those of its watchers and memoized twins."""
        shared = blob
        if type(blob) in (bytearray, mmap.mmap) and (item.task_id in self.watchers or item.memo_key is not None):
            shared = bytes(blob)   # the others' (the item's value may be views of its fetched bytearray)
        self._finish(item, status, blob, trace)
        for watcher in self.watchers.pop(item.task_id, ()):
            self._finish(watcher, status, shared, None)
        if item.memo_key is not None:
            self._settle_twins(item, status, shared)

    def _fetch_later(self, item: WorkItem, ref: Any, trace: list[float] | None) -> None:
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

    def _settle_twins(self, item: WorkItem, status: int, blob: Any) -> None:
        """Identical memoized calls share their carrier's outcome; if the
        carrier was cancelled, the next of them is sent in its place."""
        twins = self.memo_waiting.pop(item.memo_key, [])
        blob = strip_output(blob)   # the twins and later hits did not run: no output of the carrier's (memo.py)
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

    def _finish(self, item: WorkItem, status: int, blob: Any, trace: list[float] | None) -> None:
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

    def _complete(self, item: WorkItem, status: int, blob: Any) -> None:
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
        # a task's output after its result, exception or failure (output.py); the common result,
        # bytes without it, costs no call
        if type(blob) is not bytes or blob.endswith(OUTPUT_MAGIC):
            blob, output = split_output(blob)
            if output is not None:
                self._show_output(item, output)
        try:
            if status == P.OK:
                try:
                    value = decode_data(blob) if self.data_only else deserialize(blob)
                except NotData as exc:
                    future.set_exception(DeserializationError(
                        f"the result is not plain data, so it was not loaded ({exc}); this executor takes only "
                        f"plain data because {self.data_only_why}"))
                    return
                except BaseException as exc:   # SystemExit too: it fails this future, not this thread
                    error = DeserializationError(
                        f"the result arrived but cannot be unpickled here: {type(exc).__name__}: {exc}")
                    error.__cause__ = exc
                    future.set_exception(error)
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
                if isinstance(error, NotAuthorized) and self.initializer_name and "allow-list" in str(error):
                    error = NotAuthorized(
                        f"{error} (this executor has an initializer, {self.initializer_name}(): each function is "
                        f"sent wrapped with it, in a wrapper made for this executor alone, so its hash is never "
                        f"the one `fedexec function hash` gives and no allow-list can name it; on an endpoint "
                        f"with an allow-list, do the setup inside the allowed function instead)")
                if isinstance(error, DependencyError) and item.task_id in self.relayed:
                    _chain_dependency(error, self.relayed[item.task_id][0])
                future.set_exception(error)
        except BaseException as exc:  # a malformed result (or a BaseException loading one) must not take the thread down
            if not future.done():
                future.set_exception(DeserializationError(f"malformed result: {type(exc).__name__}: {exc}"))

    def _show_output(self, item: WorkItem, output: tuple[bytes, bytes, int, int]) -> None:
        """A task's captured output onto its future, and (``echo_output``)
        onto this process's streams, each line prefixed with the task."""
        future = item.future
        stdout, stderr, stdout_cut, stderr_cut = output
        future.stdout = output_text(stdout, stdout_cut, "stdout")
        future.stderr = output_text(stderr, stderr_cut, "stderr")
        if self.echo_output:
            echo_output(f"[{item.task_id.hex()[-8:]}] ", future.stdout, future.stderr)


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
