"""The dispatcher's socket lent to the thread waiting on the one task out.

A round trip's result normally reaches its caller through two thread
wake-ups in the client: ZeroMQ's I/O thread wakes the dispatcher, which
reads the result, completes the future and wakes the thread waiting in
``result()``. When that thread waits on the only task this executor has out,
the second one buys nothing: the dispatcher has nothing else to do. So the
waiting thread asks for the socket; the dispatcher, once it has sent what it
had to send, hands it over and sleeps until it is given back; the waiting
thread polls the socket itself, reads the result (the dispatcher's own
code, ``Dispatcher._read_results``), and returns it, one wake-up sooner.

ZeroMQ sockets are not thread-safe, but may change threads with a full
memory barrier between: the handover is under this object's lock, and only
one thread holds the socket at any time (the dispatcher waits on the lock's
condition while it is lent).

A loan is granted only when nothing else can need the dispatcher meanwhile
(``Dispatcher._may_lend``): its future is the only one out, with no done
callbacks (which would then run on the caller's thread), no batch or
acknowledgement waiting to go, nothing held, fetched, looked up or stopping.
The borrower gives the socket back as soon as its future is done, when the
dispatcher's wake pipe or handshake monitor has something (a command from
another thread: a submit, a cancel, a shutdown), when an acknowledgement
falls due, or after ``LOAN_SLICE`` (the dispatcher's heartbeats), so the
dispatcher's duties wait at most that long. Throughput is untouched: with
more than one task out no loan is given.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any

import zmq

if TYPE_CHECKING:
    from .dispatcher import Dispatcher, TaskFuture

log = logging.getLogger("fedexec.executor")

LOAN_SLICE = 0.05   # seconds a borrower keeps the socket at most before giving it back (heartbeats, timers)

_IDLE, _ASKED, _LENT = 0, 1, 2


class SocketLoan:
    """The handover of a :class:`~fedexec.dispatcher.Dispatcher`'s socket to
    one waiting thread at a time (see the module's docstring)."""

    __slots__ = ("dispatcher", "state", "future", "poller", "closed", "_cond")

    def __init__(self, dispatcher: "Dispatcher") -> None:
        self.dispatcher = dispatcher
        self._cond = threading.Condition(threading.Lock())
        self.state = _IDLE
        self.future: "TaskFuture | None" = None   # whose result the borrower waits for
        self.poller: zmq.Poller | None = None      # the borrower's: the socket, the wake pipe, the monitor
        self.closed = True                         # until the dispatcher's socket is up (open)

    # -- the dispatcher's thread -------------------------------------------------
    def open(self, sock: zmq.Socket, wake_fd: int, monitor: zmq.Socket) -> None:
        """The dispatcher's socket is up: loans may be asked from now on."""
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(wake_fd, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        with self._cond:
            self.poller = poller
            self.closed = False

    @property
    def asked(self) -> bool:
        """Whether a thread waits for the socket (read without the lock: :meth:`serve` looks again under it)."""
        return self.state == _ASKED

    def serve(self) -> None:
        """Grant the loan asked, if the dispatcher may lend now, and sleep
        until the socket is given back; else refuse it (the asker then waits
        as any other caller)."""
        with self._cond:
            if self.state != _ASKED:
                return
            future = self.future
            if future is None or not self.dispatcher._may_lend(future):
                self._refuse()
                return
            self.state = _LENT
            self._cond.notify_all()
            while self.state == _LENT:
                self._cond.wait()

    def close(self) -> None:
        """The dispatcher is ending: no more loans; an asker is refused."""
        with self._cond:
            self.closed = True
            if self.state == _ASKED:
                self._refuse()

    def _refuse(self) -> None:
        self.state = _IDLE
        self.future = None
        self._cond.notify_all()

    # -- the waiting thread ----------------------------------------------------------
    def receive_for(self, future: "TaskFuture", timeout: float | None) -> float | None:
        """Wait for ``future`` reading the dispatcher's socket on this thread,
        when the dispatcher lends it; return what is left of ``timeout``
        (None: no limit), for the ordinary wait that follows (at once, when
        the future is done)."""
        dispatcher = self.dispatcher
        if (self.state != _IDLE or self.closed or len(dispatcher.pending) > 1
                or threading.current_thread() is dispatcher):
            return timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self.state != _IDLE or self.closed:
                return timeout
            self.state = _ASKED
            self.future = future
        dispatcher.wake()
        with self._cond:
            while self.state == _ASKED:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self._refuse()   # (still only asked: the dispatcher will find nothing to serve)
                    return 0.0
                self._cond.wait(left)
            if self.state != _LENT:   # refused
                return _left(deadline)
        try:
            self._borrowed(future, deadline)
        finally:
            with self._cond:
                self.state = _IDLE
                self.future = None
                self._cond.notify_all()
        return _left(deadline)

    def _borrowed(self, future: "TaskFuture", deadline: float | None) -> None:
        """Read the socket until ``future`` is done or the socket must go back."""
        dispatcher = self.dispatcher
        sock = dispatcher.sock
        poller = self.poller
        assert poller is not None
        until = time.monotonic() + LOAN_SLICE
        if deadline is not None:
            until = min(until, deadline)
        while not future.done():
            now = time.monotonic()
            end = min(until, dispatcher.acks_deadline) if dispatcher.acks_due else until
            if now >= end:
                return
            events = dict(poller.poll(max(1, math.ceil((end - now) * 1000))))
            if sock in events:
                try:
                    dispatcher._read_results()
                except Exception:   # as the dispatcher's loop would: say so, and let it take over
                    log.exception("fedexec: reading results on a waiting thread failed")
                    return
                if dispatcher.auth_refused:
                    return
            if len(events) > (sock in events):   # the wake pipe or the monitor: the dispatcher's to read
                return


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())

