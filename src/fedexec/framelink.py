"""A local worker's main channel to its pool: a socketpair with our own framing.

Over ZeroMQ every message between a pool and its worker crosses the I/O
thread of each process: a task's way there and its result's way back cost
two thread wake-ups more each than the two processes' own (measured on 2
cores: ~0.35 ms from the pool's send to the task's start, ~0.5 ms from its
end to the agent). A worker the pool starts on its own machine, outside any
sandbox, gets one end of a ``socket.socketpair()`` instead (inherited, by
number: ``--link-fd``), and the pool's loop reads the other end directly.
Nothing else can reach the channel: no path, no routing id; the pool knows
the worker by the end it holds.

A message is its frames, as on ZeroMQ: ``count`` (u32), ``count`` lengths
(u32 each), then the frames' bytes. The same limits hold as on the pool's
ZeroMQ socket: at most ``protocol.MAX_FRAMES`` frames, each at most
``protocol.MAX_FRAME`` bytes; a peer that sends more is cut off (as libzmq
drops a connection sending a frame over ZMQ_MAXMSGSIZE).

- :class:`PoolLinks`: the pool's ends, never blocking (a message the worker
  does not read at once waits here, sent as the socket takes it; the loop
  polls one descriptor for them all: an epoll set).
- :class:`WorkerLink`: the worker's end, with the few methods of a
  ``zmq.Socket`` its loop uses (so worker/process.py runs unchanged on
  either); it may block. The pool closing its end reads as a STOP.

The default (``FEDEXEC_WORKER_LINK=0`` in the pool's environment turns it
off; the embedded default's process and a CLI endpoint inherit it).
Session 29 made it the default, then took that back, because a 10 MB
argument's round trip took ~43 ms over it against ~21 ms over ZeroMQ: each
large message was copied twice on each side and, in a thread's malloc arena,
filled fresh memory each time. Session 30 reads a large frame straight into
its own buffer and uses that buffer again (:class:`_Reader`); a 10 MiB echo
between two processes takes 5.9 ms (ZeroMQ ipc: 8.7-10 ms).

Sandboxed workers (bwrap, podman: their own view of the system) and
workers in containers keep their ZeroMQ channel; so do every worker's
control connection (worker/control.py) and remote pools' links to their
endpoint.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import select
import socket
import struct
import sys
from collections import deque
from typing import Any, Iterator, Sequence

import zmq

from . import protocol as P

log = logging.getLogger("fedexec.pool")

_U32 = struct.Struct("<I")
READ_CHUNK = 1 << 18         # bytes read per recv at most (but into a large frame: its rest)
READS_PER_TURN = 64         # recv calls per end and call of PoolLinks.messages (the rest: next turn)
MAX_IOV = 64                 # buffers per sendmsg (a message of more frames takes several)
DIRECT_FRAME = 1 << 18       # a frame this large is read straight into a buffer of its own (_Reader)
BUFFER_SIZE = 1 << 21        # each end's socket buffers (a batch of tasks or results fits at once)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)


class LinkError(Exception):
    """The peer broke the framing or its limits; the link is closed."""


ENABLE_VARIABLE = "FEDEXEC_WORKER_LINK"


def enabled() -> bool:
    """Whether a pool gives its unsandboxed workers links: unless ``FEDEXEC_WORKER_LINK=0``."""
    return os.environ.get(ENABLE_VARIABLE, "1") != "0"


def pair() -> tuple[socket.socket, socket.socket]:
    """A new link: (our end, the end for the process we start, inheritable):
    a pool's and its worker's, or the embedded default's program's and its
    relay's (embedded.py)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for end in (ours, theirs):
        set_buffers(end)
    theirs.set_inheritable(True)
    return ours, theirs


def set_buffers(sock: socket.socket) -> None:
    """Give a link's socket BUFFER_SIZE buffers each way (as far as the system allows)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER_SIZE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER_SIZE)
    except OSError:
        pass


def _buffers(frames: Sequence[Any]) -> list[Any]:
    """A message's bytes as buffers for sendmsg: its header, then each frame."""
    views = [f.buffer if isinstance(f, zmq.Frame) else f for f in frames]
    if len(views) > P.MAX_FRAMES:
        raise LinkError(f"a message of {len(views)} frames, over the limit of {P.MAX_FRAMES} (MAX_FRAMES)")
    lengths = [memoryview(v).nbytes for v in views]
    if any(n > P.MAX_FRAME for n in lengths):
        raise LinkError(f"a frame of {max(lengths):,} bytes, over the limit of {P.MAX_FRAME:,} (MAX_FRAME)")
    header = struct.pack(f"<{len(lengths) + 1}I", len(lengths), *lengths)
    return [header, *views]   # (written MAX_IOV at a time: _write_out)


def _views(buffers: list[Any]) -> list[memoryview]:
    return [memoryview(b).cast("B") for b in buffers]


def _write_out(sock: socket.socket, out: deque) -> None:
    """Write the buffers waiting in ``out`` (byte memoryviews, in order) as far
    as the socket takes them now, at most MAX_IOV per system call (sendmsg
    refuses more than IOV_MAX); what it took leaves ``out``, a buffer it took
    part of stays as the rest of it (nothing is joined or copied). OSError
    when the peer is gone."""
    while out:
        chunk = list(itertools.islice(out, MAX_IOV))
        try:
            sent = sock.sendmsg(chunk)
        except (BlockingIOError, InterruptedError):
            return
        for view in chunk:
            n = view.nbytes
            if sent >= n:
                out.popleft()
                sent -= n
            else:   # (the socket is full: the rest of this buffer, and those after it, wait)
                out[0] = view[sent:]
                return


class _SpareBuffer:
    """The buffer of the last large frame read by the readers of one loop,
    used again for the next once nothing else holds it.

    Memory a process already touched costs nothing to fill again; fresh
    memory costs a page fault per 4 KiB: ~7 ms for 10 MB on a 2-core VM, in
    a thread whose malloc arena hands large blocks back each time (the
    program's dispatcher: a 10 MB result's round trip took 42 ms against 27
    over ZeroMQ, whose I/O thread keeps its buffers). One per loop (a pool's
    links share one), so what is kept is one frame's buffer, at most
    MAX_FRAME. Its old bytes are never seen: a frame is handed on only once
    it is read whole. Whether nothing else holds it is its reference count,
    against the count of an unheld one measured at import with the same
    code (:func:`_calibrate`); where that cannot be measured (no
    ``sys.getrefcount``, no GIL), every large frame gets a new buffer."""

    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer: bytearray | None = None

    def take(self, n: int) -> bytearray:
        """A buffer of ``n`` bytes for a frame about to be read into it."""
        # (the count first: a local naming the buffer here would be one more reference than _UNHELD has)
        if self.buffer is not None and _UNHELD is not None and _references(self) == _UNHELD:
            spare = self.buffer
            capacity = spare.__alloc__()
            if capacity // 2 <= n < capacity:   # (within its allocation: no realloc)
                if len(spare) > n:
                    del spare[n:]
                elif len(spare) < n:
                    spare.extend(bytes(n - len(spare)))
                return spare
        self.buffer = buffer = bytearray(n)
        return buffer


def _references(holder: _SpareBuffer) -> int:
    """The reference count of ``holder``'s buffer as this code sees it (what
    the count includes besides the holder's own reference differs between
    Python versions: compared only with :data:`_UNHELD`, measured here too)."""
    buffer = holder.buffer
    return sys.getrefcount(buffer)


def _calibrate() -> int | None:
    """:func:`_references` of a buffer nothing else holds, or None when that
    count does not tell (it must be steady, and one more holder must add
    exactly one)."""
    if not hasattr(sys, "getrefcount") or getattr(sys, "_is_gil_enabled", lambda: True)() is False:
        return None
    probe = _SpareBuffer()
    probe.buffer = bytearray(1)
    unheld = {_references(probe) for _ in range(64)}   # (past the interpreter's specialising of the code)
    held_by = probe.buffer
    held = {_references(probe) for _ in range(64)}
    del held_by
    if len(unheld) != 1 or held != {min(unheld) + 1}:
        return None
    return unheld.pop()


#: :func:`_references` of a spare buffer nothing else holds (None: never used again)
_UNHELD = _calibrate()


class _Reader:
    """Bytes read from a link, cut into messages as they complete.

    Small messages are read in chunks into one buffer and cut out of it. A
    message with a frame of DIRECT_FRAME bytes or more is read *into its
    frames*: each gets a buffer of its own size when the stream reaches it,
    and the socket reads a large frame straight into its buffer, so its
    bytes are copied once here (by the kernel), not into the stream buffer
    and out again. Such a frame is handed on as that ``bytearray`` (copying
    it into ``bytes`` would cost what this saves); every other frame is
    ``bytes``. A frame's buffer is made only when the stream reaches it, so
    what a peer makes this end hold is at most what it sent plus one frame's
    buffer: a header announcing a frame of MAX_FRAME (32 MiB) commits that
    much here at once, per link (before, only what had come). A worker's
    task can take far more memory on its node directly; a link cannot make
    this end hold more than that.

    Large frames' buffers come from ``spare`` (:class:`_SpareBuffer`): one
    per loop, shared by its readers."""

    __slots__ = ("buffer", "start", "full", "error", "max_frame", "_lengths", "_frames", "_frame", "_filled",
                 "_ready", "_spare")

    def __init__(self, spare: "_SpareBuffer | None" = None) -> None:
        self.buffer = bytearray()
        self.start = 0
        #: whether the last read filled all it asked for (more may be waiting on the socket)
        self.full = False
        #: why the peer's stream was refused (pull), if it was
        self.error: LinkError | None = None
        #: the largest frame taken (a link that has not said who it is yet gets a small one)
        self.max_frame = P.MAX_FRAME
        self._lengths: tuple[int, ...] = ()   # a message read into its frames: their lengths,
        self._frames: list[Any] = []          # the frames read whole,
        self._frame: memoryview | None = None  # the one being read (None: not reading one into its frames)
        self._filled = 0                      # and how much of it has come
        self._ready: list[list[Any]] = []     # messages read into their frames, whole, not yet taken
        self._spare = spare if spare is not None else _SpareBuffer()

    def feed(self, data: Any) -> None:
        if self.start and self.start == len(self.buffer):
            self.buffer.clear()
            self.start = 0
        self.buffer += data

    def read_from(self, sock: socket.socket, scratch: memoryview) -> int:
        """One recv from ``sock``, kept here; how many bytes came (0: the end
        of the stream). Into the large frame being read when there is one,
        else into ``scratch`` (a buffer kept for it: a fresh 256 KiB bytes per
        call would cost a mapping of its own)."""
        frame = self._frame
        if frame is not None and frame.nbytes >= DIRECT_FRAME:
            want = frame.nbytes - self._filled
            n = sock.recv_into(frame[self._filled:], want)
            self.full = n == want
            if n:
                self._filled += n
                if self._filled == frame.nbytes:
                    self._next_frame()
            return n
        n = sock.recv_into(scratch)
        self.full = n == scratch.nbytes
        if n:
            if frame is not None:
                self._spread(scratch[:n])
            else:
                self.feed(scratch[:n])
        return n

    def _spread(self, data: memoryview) -> None:
        """Bytes read while a message is read into its frames: into them, in
        order; what follows the message goes to the stream buffer."""
        while data.nbytes:
            frame = self._frame
            if frame is None:
                self.feed(data)
                return
            take = min(frame.nbytes - self._filled, data.nbytes)
            frame[self._filled:self._filled + take] = data[:take]
            self._filled += take
            data = data[take:]
            if self._filled == frame.nbytes:
                self._next_frame()

    def _next_frame(self) -> None:
        """The frame being read is whole: keep it, and start the next (the
        message is ready after its last)."""
        frame = self._frame
        assert frame is not None
        done = frame.obj
        frame.release()
        self._frame = None   # (a buffer the next frame cannot get leaves no released view behind)
        self._frames.append(done if len(done) >= DIRECT_FRAME else bytes(done))
        self._start_frame()

    def _start_frame(self) -> None:
        frames, lengths = self._frames, self._lengths
        while len(frames) < len(lengths) and lengths[len(frames)] == 0:
            frames.append(b"")
        if len(frames) == len(lengths):
            self._ready.append(frames)
            self._frames, self._lengths, self._frame, self._filled = [], (), None, 0
            return
        n = lengths[len(frames)]
        self._frame = memoryview(self._spare.take(n) if n >= DIRECT_FRAME else bytearray(n))
        self._filled = 0

    def pull(self, sock: socket.socket, scratch: memoryview,
             reads: int = READS_PER_TURN) -> tuple[list[list[Any]], bool]:
        """Read what has come, at most ``reads`` recv calls (what is left
        keeps the descriptor readable for the next turn), cutting messages
        out after each, so that a large one's frames are found before its
        bytes arrive; ``(whole messages, ended)``. ``ended``: the peer
        closed its end, the socket failed, or the peer broke the framing or
        its limits (then ``error`` says how; the messages before it count)."""
        messages: list[list[Any]] = []
        for _ in range(reads):
            try:
                n = self.read_from(sock, scratch)
            except (BlockingIOError, InterruptedError):
                return messages, False
            except OSError:
                return messages, True
            except MemoryError:
                self.error = LinkError("no memory for a message being read")
                return messages, True
            try:
                while (frames := self.message()) is not None:
                    messages.append(frames)
            except LinkError as exc:
                self.error = exc
                return messages, True
            except MemoryError:
                self.error = LinkError("no memory for a message being read")
                return messages, True
            if not n:
                return messages, True
            if not self.full:   # (all there was: no second call to hear EAGAIN)
                break
        return messages, False

    def message(self) -> list[Any] | None:
        """The next whole message, or None until it has all come; LinkError past a limit."""
        if self._ready:
            return self._ready.pop(0)
        if self._frame is not None:
            return None
        buffer, start = self.buffer, self.start
        have = len(buffer) - start
        if have < 4:
            return None
        (count,) = _U32.unpack_from(buffer, start)
        if not 0 < count <= P.MAX_FRAMES:
            raise LinkError(f"a message of {count} frames (at most {P.MAX_FRAMES}: MAX_FRAMES)")
        head = 4 + 4 * count
        if have < head:
            return None
        lengths = struct.unpack_from(f"<{count}I", buffer, start + 4)
        largest = max(lengths)
        if largest > self.max_frame:
            raise LinkError(f"a frame of {largest:,} bytes (at most {self.max_frame:,}"
                            f"{': MAX_FRAME' if self.max_frame == P.MAX_FRAME else ' here'})")
        if have < head + sum(lengths):
            if largest >= DIRECT_FRAME:   # read the rest into its frames, not into the buffer
                body = memoryview(buffer)[start + head:]
                self._lengths = lengths
                self._start_frame()
                self._spread(body)
                body.release()
                buffer.clear()
                self.start = 0
            return None
        frames = []
        at = start + head
        view = memoryview(buffer)
        for n in lengths:
            frames.append(bytes(view[at:at + n]))
            at += n
        view.release()
        if at == len(buffer):
            buffer.clear()
            self.start = 0
        elif at > 1 << 20:   # compact now and then, not per message
            del buffer[:at]
            self.start = 0
        else:
            self.start = at
        return frames


class _PoolEnd:
    __slots__ = ("sock", "fd", "reader", "out")

    def __init__(self, sock: socket.socket, spare: _SpareBuffer) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = _Reader(spare)
        self.out: deque[memoryview] = deque()   # buffers not yet taken by the socket, in order


class PoolLinks:
    """The pool's ends of its local workers' links, by worker id. Poll this
    object (``fileno()``: one epoll descriptor for every end, readable when
    any is); :meth:`messages` then reads what came; :meth:`send` never
    blocks. Used from the pool's loop only."""

    def __init__(self) -> None:
        #: whether its pool gives workers links (:func:`enabled`): only then is it polled
        self.wanted = enabled()
        self._epoll = select.epoll()
        self._ends: dict[bytes, _PoolEnd] = {}
        self._by_fd: dict[int, bytes] = {}
        self._backlog: set[bytes] = set()   # ends with output the socket has not taken yet
        self._scratch = memoryview(bytearray(READ_CHUNK))   # what each recv reads into
        self._spare = _SpareBuffer()   # large frames' buffers, for every end (one loop)

    def fileno(self) -> int:
        return self._epoll.fileno()

    def __contains__(self, worker_id: bytes) -> bool:
        return worker_id in self._ends

    def add(self, worker_id: bytes, sock: socket.socket) -> None:
        end = _PoolEnd(sock, self._spare)
        self._ends[worker_id] = end
        self._by_fd[end.fd] = worker_id
        self._epoll.register(end.fd, select.EPOLLIN)

    def drop(self, worker_id: bytes) -> None:
        """Close a worker's end (it is gone, or given up on)."""
        end = self._ends.pop(worker_id, None)
        if end is None:
            return
        self._backlog.discard(worker_id)
        del self._by_fd[end.fd]
        try:
            self._epoll.unregister(end.fd)
        except OSError:
            pass
        end.sock.close()

    def close(self) -> None:
        for worker_id in list(self._ends):
            self.drop(worker_id)
        self._epoll.close()

    def send(self, worker_id: bytes, frames: Sequence[Any]) -> bool:
        """Send a message to a worker with a link; False when it has none
        (it talks over ZeroMQ). A message the socket cannot take now waits
        here, sent as the socket takes it (:meth:`messages`); one to a worker that is gone is dropped, as ZeroMQ
        drops one to a peer that left."""
        end = self._ends.get(worker_id)
        if end is None:
            return False
        try:
            buffers = _buffers(frames)
        except LinkError as exc:
            log.warning("not sent to a worker: %s", exc)
            return True
        end.out.extend(_views(buffers))
        self._write(worker_id, end)
        return True

    def _write(self, worker_id: bytes, end: _PoolEnd) -> None:
        try:
            _write_out(end.sock, end.out)
        except OSError as exc:   # EPIPE, ECONNRESET: the worker is gone (reaped as any other)
            log.debug("could not send to a worker: %s", exc)
            end.out.clear()
            self._backlog.discard(worker_id)
            return
        if not end.out:
            if worker_id in self._backlog:   # all out: readable again only when the worker writes
                self._backlog.discard(worker_id)
                self._epoll.modify(end.fd, select.EPOLLIN)
            return
        if worker_id not in self._backlog:   # the epoll set wakes the pool's loop when the socket takes more
            self._backlog.add(worker_id)
            self._epoll.modify(end.fd, select.EPOLLIN | select.EPOLLOUT)

    def messages(self) -> Iterator[tuple[bytes, list[Any]]]:
        """``(worker id, frames)`` of the messages that have come; never
        blocks, and reads at most READS_PER_TURN times per end (a chunk, or
        the rest of a large frame; what is left keeps its descriptor readable
        for the next turn). An end past
        the limits, or closed by its worker, is dropped."""
        if not self._ends:   # (no system call for a pool whose workers have none)
            return
        for fd, events in self._epoll.poll(0):
            worker_id = self._by_fd.get(fd)
            if worker_id is None:
                continue
            end = self._ends[worker_id]
            if events & select.EPOLLOUT and end.out:   # the socket takes more of what waits for it
                self._write(worker_id, end)
            if not events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                continue
            messages, closed = end.reader.pull(end.sock, self._scratch)
            for frames in messages:
                yield worker_id, frames
            if end.reader.error is not None:
                log.warning("a worker's link is closed: %s", end.reader.error)
            if closed:
                self.drop(worker_id)


class WorkerLink:
    """The worker's end of its link, with the methods of a ``zmq.Socket``
    that the worker's loop (process.py) uses: ``poll``, ``getsockopt(EVENTS)``,
    ``recv_multipart``, ``send_multipart``, ``close``. Blocking. When the
    pool's end closes, what comes next reads as a STOP message."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        self.reader = _Reader()
        self.waiting: list[list[Any]] = []   # whole messages read, not yet taken (bytes; large frames bytearray)
        self._scratch = memoryview(bytearray(READ_CHUNK))
        self.ended = False
        self._poller = select.poll()
        self._poller.register(self.sock.fileno(), select.POLLIN)

    def _fill(self, block: bool) -> None:
        """Read what has come (with ``block``, at least one whole message)."""
        while not self.waiting and not self.ended:
            if not block and not self._poller.poll(0):
                return
            messages, ended = self.reader.pull(self.sock, self._scratch, reads=1)
            self.waiting.extend(messages)
            if ended:
                self.ended = True

    def poll(self, timeout: int = -1, flags: int = _POLLIN) -> int:
        """POLLIN when a message (or the end) can be read within ``timeout`` ms, else 0."""
        if self.waiting or self.ended:
            return _POLLIN
        if self._poller.poll(timeout):
            self._fill(False)
            return _POLLIN if (self.waiting or self.ended) else 0
        return 0

    def getsockopt(self, option: int) -> int:
        if option != _EVENTS:
            raise ValueError("a worker link answers ZMQ_EVENTS only")
        return self.poll(0)

    def recv_multipart(self, flags: int = 0, copy: bool = True) -> list[Any]:
        self._fill(True)
        if self.waiting:
            return self.waiting.pop(0)
        return P.encode(P.STOP)   # the pool closed its end: stop

    def send_multipart(self, frames: Sequence[Any], flags: int = 0, copy: bool = True) -> None:
        """Send a whole message (blocking until the socket takes it); a pool that is gone drops it."""
        out = deque(_views(_buffers(frames)))
        try:
            while out:   # (a blocking socket: each call takes some, until all went)
                _write_out(self.sock, out)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                raise

    def close(self, linger: int | None = None) -> None:
        self.sock.close()


def worker_socket(fd: int) -> WorkerLink:
    """The worker's end of its link, from the descriptor it inherited."""
    os.set_inheritable(fd, False)   # (not passed on to what its tasks start)
    return WorkerLink(fd)


def keep_polled(poller: zmq.Poller, polled: tuple[int, int] | None,
                end: "StreamEnd | None") -> tuple[int, int] | None:
    """Keep ``poller`` on ``end`` as it is now, given what it was polled for
    (``polled``: descriptor and events, or None): for reading, for writing
    too while it holds what its socket did not take, and off it once it is
    closed or gone (an end-of-file would spin the loop). What it is polled
    for now. (An end let go stays open until it is off the poller, so that
    its descriptor's number is not a new one's meanwhile.)"""
    wanted = None if end is None or end.closed else (
        end.fileno(), _POLLIN | (_POLLOUT if end.wants_write() else 0))
    if wanted != polled:
        if polled is not None and (wanted is None or wanted[0] != polled[0]):
            poller.unregister(polled[0])
            polled = None
        if wanted is not None:
            (poller.modify if polled is not None else poller.register)(*wanted)
    return wanted


class StreamEnd:
    """One end of a link over a stream socket (a socketpair's), with the
    same framing, used by one loop that polls :meth:`fileno`: it never
    blocks. :meth:`send_message` writes what the socket takes and keeps the
    rest, which :meth:`flush` (called each turn while :meth:`wants_write`)
    writes as the socket takes more; :meth:`read` returns the whole messages
    that have come. A peer that breaks the framing or its limits, or closes
    its end, leaves this one ``closed``: sends fail, reads return nothing.

    The embedded default's program and its colocated relay talk over one
    (fedexec.colocated): a message then crosses no ZeroMQ I/O thread, in
    either process, on its way."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.reader = _Reader()
        self.out: deque[memoryview] = deque()   # buffers the socket has not taken yet, in order
        self.closed = False
        self._scratch = memoryview(bytearray(READ_CHUNK))

    def fileno(self) -> int:
        return self.sock.fileno()

    def wants_write(self) -> bool:
        return bool(self.out) and not self.closed

    def send_message(self, frames: Sequence[Any]) -> bool:
        """Send (or keep to send) a whole message; False when the link is
        closed. LinkError for a message past the limits (nothing sent)."""
        if self.closed:
            return False
        self.out.extend(_views(_buffers(frames)))
        self.flush()
        return not self.closed

    def flush(self) -> None:
        """Write what waits, as far as the socket takes it now."""
        if self.out and not self.closed:
            try:
                _write_out(self.sock, self.out)
            except OSError:   # EPIPE, ECONNRESET: the peer is gone
                self.closed = True
                self.out.clear()

    def read(self) -> list[list[Any]]:
        """The whole messages that have come (at most READS_PER_TURN reads:
        what is left keeps the descriptor readable for the next turn)."""
        if self.closed:
            return []
        messages, ended = self.reader.pull(self.sock, self._scratch)
        if self.reader.error is not None:
            log.warning("the link is closed: %s", self.reader.error)
        if ended:
            self.closed = True
        return messages

    def close(self, linger: int | None = None) -> None:
        self.closed = True
        self.sock.close()
