"""A link between two parts of one process that share one thread's loop.

The embedded default runs its relay, its endpoint agent and its pool on
one thread (``fedexec.colocated``, endpoint/inprocess.py). Their messages
went over ZeroMQ ``inproc://`` sockets: each cost a send and a receive
through libzmq, with a wake-up signal through the receiver's mailbox
(~9-20 us per message on the 2-core machine, against ~0.3 us for a list
handed over in memory), five of them per task. Here a message is the same
list of frames, appended to the other end's queue: nothing is copied and
nobody is woken, because the loop that reads the other end is this one. It
looks at both ends every turn (their :meth:`MemoryEnd.readable`), and polls
without waiting while a message is queued.

Only code given an end can use the link: nothing outside the process, and
nothing inside it but the part that made it, can read or write it. The
receiver sees frames as it would from ZeroMQ (``zmq.Frame`` objects;
bytes handed to :meth:`MemoryEnd.send_multipart` are wrapped once), and
reads them with :func:`protocol.waiting_messages` as from a socket.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterator, Sequence

import zmq

_FRAME = zmq.Frame
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)


class MemoryEnd:
    """One end of a link: what the other end sends, in order, as lists of frames."""

    def __init__(self, kind: int = zmq.DEALER) -> None:
        self.type = kind     # (read by protocol.waiting_messages, as a socket's)
        self.peer: MemoryEnd | None = None
        self.inbox: deque[list[Any]] = deque()
        self.closed = False

    def send_multipart(self, frames: Sequence[Any], flags: int = 0, copy: bool = True) -> None:
        """Queue a message at the other end. Once either end is closed:
        ``zmq.Again`` from a DEALER end (as from a DEALER with no peer, sent
        to without blocking), ``zmq.ZMQError`` EHOSTUNREACH from a ROUTER
        end (as a mandatory ROUTER says of a peer that is gone). The frames
        are the receiver's from now on (as with ``copy=False``)."""
        peer = self.peer
        if self.closed or peer is None or peer.closed:
            raise zmq.Again() if self.type == zmq.DEALER else zmq.ZMQError(zmq.EHOSTUNREACH)
        peer.inbox.append([f if type(f) is _FRAME else _FRAME(f) for f in frames])

    def readable(self) -> bool:
        """Whether a message waits here."""
        return bool(self.inbox)

    def getsockopt(self, option: int) -> int:
        if option == zmq.EVENTS:
            return _POLLOUT | (_POLLIN if self.inbox else 0)
        raise zmq.ZMQError(zmq.EINVAL)

    def messages(self, limit: int) -> Iterator[list[Any]]:
        """At most ``limit`` of the messages waiting here, in order; never blocks."""
        inbox = self.inbox
        for _ in range(limit):
            if not inbox:
                return
            yield inbox.popleft()

    def close(self, linger: int | None = None) -> None:
        """Close this end: what waits here is dropped, the other end's sends fail."""
        self.closed = True
        self.inbox.clear()


def memory_link(a_kind: int = zmq.DEALER, b_kind: int = zmq.DEALER) -> tuple[MemoryEnd, MemoryEnd]:
    """Two ends joined to each other."""
    a, b = MemoryEnd(a_kind), MemoryEnd(b_kind)
    a.peer, b.peer = b, a
    return a, b
