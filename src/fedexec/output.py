"""What a Python task writes to stdout and stderr: captured in the worker,
carried with the task's result, and given to the caller on its future.

*Capture (worker side, :class:`OutputCapture`).* At start a worker points
its file descriptors 1 and 2 at two private, nameless files of its own
(``O_TMPFILE``: in ``$TMPDIR``, or in a sandboxed worker's task root, on
disk rather than in the sandbox's memory-backed /tmp). So the capture is at
the descriptor level: ``print``, ``sys.stderr.write``, C code writing to fd
1/2 and subprocesses that inherit them all land there, in the order they
were written. A worker runs one task at a time; after each task it flushes
``sys.stdout``/``sys.stderr`` (no system call when nothing is buffered) and
asks each file's size (one ``lseek(fd, 0, SEEK_END)`` each: the whole cost
for a task that prints nothing, which adds no bytes to its result). The
files are in append mode, so writes through any descriptor of them (a
child reopening /dev/stdout) land at their end and are counted. When there is output it
reads at most ``limit`` bytes of each stream (the *last* ones: the end of a
long log is where the error is) and empties the files for the next task.
The worker's own memory never holds more than that, whatever a task writes
(the files are on disk). Output written after a task returned (by a thread
or a background process it left running) is seen with the next task of the
same worker, which runs the same user's tasks only. A memoized hit (a result
kept by the client or the relay, or a twin call that waited for it) carries
no output: only the call that ran the task gets what it printed (so neither
another user's output nor a leftover thread's reaches anyone through a shared
memoized result).
A task that fails carries its output too: an exception, a result that cannot
be serialized or is too large (the trailer after the failure's fields), and a
task stopped past its timeout or whose worker died under it (a crash,
``os._exit``: WorkerLost), whose output its pool reads from the worker's
capture files (:class:`HeldOutput`: unsandboxed workers only, a sandboxed
worker's files are out of the pool's reach; the pool holds them from the
moment the worker says it is ready). The limit is the workers'
environment's ``$FEDEXEC_OUTPUT_LIMIT`` if set (0: no capture at all), else
OUTPUT_LIMIT; an executor's ``output_limit`` (the task option ``ol``) lowers
it for that executor's tasks, never raises it (0: their output is dropped).

*Carried (the trailer).* The output travels inside the result's (or the
exception's, or the failure's) payload, as a trailer after it: the relay only forwards those
bytes, counts them toward the user's limits like the rest of the result,
and never looks inside. Every loader of a result ignores a trailer: pickle
stops at its STOP opcode, the data-only format has its own length, and
:func:`strip` is applied where a layout is checked to the last byte (a large
pickle with out-of-band buffers). Layout: msgpack ``[stdout, stderr,
stdout_cut, stderr_cut]`` (bytes, bytes, int, int), its length (4 bytes,
little-endian), then MAGIC. A pickle never ends with MAGIC (it ends with
STOP, ``.``).

*Given (client side).* :func:`split` takes the trailer off before the value
is loaded; the dispatcher sets ``future.stdout`` / ``future.stderr``
(str, decoded as UTF-8 with replacement; ``""`` when nothing was written),
with a note in front saying how many bytes were cut, and, with
``echo_output``, writes each line to the caller's own streams prefixed with
the task's short id (:func:`echo`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import functools
import os
import resource
import stat
import struct
import sys
import tempfile
from typing import Any, TextIO

import msgpack

from . import protocol as P
from .config import ConfigError
from .transfer import Pieces

OUTPUT_LIMIT = 1 << 20          # bytes of each stream a task's result carries at most (the last ones)
LIMIT_ENV = "FEDEXEC_OUTPUT_LIMIT"   # the workers' environment may set another (0: no capture)
MAX_LIMIT = 16 * OUTPUT_LIMIT   # (two streams of it must fit in a result's frame with the value)
assert MAX_LIMIT == P.MAX_OUTPUT_LIMIT   # (what a task's "ol" option may ask, checked on the wire)
MAGIC = b"\x00fedexec-output\x01"   # ends the trailer; never the end of a pickle (those end with ".")
_LENGTH = struct.Struct("<I")
_TAIL = _LENGTH.size + len(MAGIC)


class OutputCapture:
    """A worker's capture of fd 1 and 2 (see the module's docstring).
    ``directory``: where the nameless files are made (None: ``$TMPDIR``)."""

    def __init__(self, directory: str | None = None, limit: int = OUTPUT_LIMIT) -> None:
        self.limit = limit
        self.files = [tempfile.TemporaryFile(dir=directory, buffering=0) for _ in range(2)]
        self.fds = [f.fileno() for f in self.files]
        for fd in self.fds:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        _flush()
        # the worker's own messages (a crash's traceback) still go where fd 2 went: restored by close()
        self.saved = [os.dup(1), os.dup(2)]
        for fd, target in zip(self.fds, (1, 2)):
            os.dup2(fd, target)
        # and a hard crash's (a segfault's) Python traceback too: written at once to the worker's own
        # stderr (the endpoint's log), not into a nameless capture file that goes with the process
        faulthandler.enable(file=self.saved[1], all_threads=True)

    def take(self, limit: int | None = None) -> bytes | None:
        """The trailer of what was written since the last call, or None
        when nothing was (then it has cost two lseeks). ``limit``: the
        task's own (its executor's ``output_limit``), capped by the
        worker's; 0: the output is dropped."""
        _flush()
        out_fd, err_fd = self.fds
        out_end = os.lseek(out_fd, 0, os.SEEK_END)
        err_end = os.lseek(err_fd, 0, os.SEEK_END)
        if not out_end and not err_end:
            return None
        keep = self.limit if limit is None or limit > self.limit else limit
        out, out_cut = self._read(out_fd, out_end, keep)
        err, err_cut = self._read(err_fd, err_end, keep)
        return trailer(out, err, out_cut, err_cut) if keep else None

    def discard(self) -> None:
        """Forget what was written since the last call (a task that failed
        to load: its output has no result to travel with)."""
        self.take()

    @staticmethod
    def _read(fd: int, end: int, limit: int) -> tuple[bytes, int]:
        """The last ``limit`` bytes written to ``fd`` (up to ``end``) and how
        many before them were cut; the file is emptied."""
        if not end:
            return b"", 0
        keep = min(end, limit)
        data = b""
        with contextlib.suppress(OSError):
            if keep:
                data = os.pread(fd, keep, end - keep)
        os.ftruncate(fd, 0)   # (append mode: the next write lands at 0)
        return data, end - len(data)

    def close(self) -> None:
        """Point fd 1 and 2 back where they were, and drop the files."""
        _flush()
        faulthandler.disable()
        for saved, target in zip(self.saved, (1, 2)):
            with contextlib.suppress(OSError):
                os.dup2(saved, target)
                os.close(saved)
        for f in self.files:
            f.close()


def check_output_limit(limit: object) -> int | None:
    """An executor's ``output_limit``: None, or bytes from 0 to MAX_LIMIT;
    ValueError naming it otherwise."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_LIMIT:
        raise ConfigError(f"output_limit must be None or a number of bytes from 0 to {MAX_LIMIT} "
                         f"(0: no output), not {limit!r}")
    return limit


class HeldOutput:
    """A pool's hold on an unsandboxed worker's capture files, so that the
    output of a task that never sent a result (its worker killed past its
    timeout, or dead: a crash, ``os._exit``) still reaches its caller: the
    files live on while the pool holds them, whatever became of the worker.

    Opened through ``/proc/<pid>/fd/1`` and ``2`` (:meth:`open`) when the
    worker says it is ready (it sets its capture up first). A stream is
    held only if it is a nameless regular file (no link left: the capture's,
    or one the task made itself), never a file with a name (say, the
    endpoint's log, put back on fd 1 by the task) nor a pipe or device; it
    is opened without blocking. What the files hold is what the worker's
    tasks wrote since its last task's result was sent (``OutputCapture.take``
    empties them): the output of the task running when it died."""

    __slots__ = ("fds",)

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds

    @classmethod
    def open(cls, pid: int) -> "HeldOutput | None":
        """The capture files of live process ``pid``, or None (no /proc,
        gone, or neither stream is a capture file)."""
        fds = []
        for fd_number in (1, 2):
            path = f"/proc/{pid}/fd/{fd_number}"
            try:
                # only a file with no name left is opened: never one a task put on fd 1 or 2 that could block
                # the pool's loop in open() (a FIFO, a FUSE or hung-NFS file; those rename an unlinked open
                # file rather than delete it)
                if not os.readlink(path).endswith(" (deleted)"):
                    fds.append(-1)
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError:
                fds.append(-1)
                continue
            if fd >= _most_descriptors():   # (descriptors go lowest first: about this many are open)
                os.close(fd)
                fds.append(-1)
                continue
            try:
                info = os.fstat(fd)
            except OSError:
                info = None
            if info is None or not stat.S_ISREG(info.st_mode) or info.st_nlink != 0:
                os.close(fd)
                fd = -1
            fds.append(fd)
        if fds == [-1, -1]:
            return None
        return cls(fds)

    def read(self, limit: int) -> bytes | None:
        """The trailer of the last ``limit`` bytes of each stream, or None
        when there is nothing (or ``limit`` is 0)."""
        if not limit:
            return None
        streams: list[tuple[bytes, int]] = []
        for fd in self.fds:
            data, cut = b"", 0
            if fd >= 0:
                with contextlib.suppress(OSError):
                    size = os.fstat(fd).st_size
                    keep = min(size, limit)
                    data = os.pread(fd, keep, size - keep)
                    cut = size - len(data)
            streams.append((data, cut))
        (out, out_cut), (err, err_cut) = streams
        if not (out or err or out_cut or err_cut):
            return None
        return trailer(out, err, out_cut, err_cut)

    def close(self) -> None:
        for fd in self.fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fds = [-1, -1]


@functools.lru_cache(maxsize=1)
def _most_descriptors() -> int:
    """The descriptors a pool may have open before it stops holding its
    workers' capture files: three quarters of its limit (the rest stays for
    its sockets, workers and files)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (soft if soft != resource.RLIM_INFINITY else 1 << 20) * 3 // 4


def salvage(pid: int, limit: int) -> bytes | None:
    """The trailer of what live worker ``pid`` has captured of the task it
    runs (:class:`HeldOutput`, opened and read at once), or None."""
    held = HeldOutput.open(pid) if limit else None
    if held is None:
        return None
    try:
        return held.read(limit)
    finally:
        held.close()


def configured_limit() -> int:
    """The bytes of each stream a worker sends back at most: ``$FEDEXEC_OUTPUT_LIMIT``
    (set in the endpoint's worker environment) or OUTPUT_LIMIT. 0 turns the
    capture off: tasks then write to the worker's own streams (the endpoint's
    log), as before there was a capture. A bad value is said in that log
    and the default used (a worker that refused to start would only be
    started again, and again)."""
    raw = os.environ.get(LIMIT_ENV, "").strip()
    if not raw:
        return OUTPUT_LIMIT
    try:
        limit = int(raw)
        if not 0 <= limit <= MAX_LIMIT:
            raise ValueError
    except ValueError:
        sys.stderr.write(f"fedexec worker: ignored {LIMIT_ENV}={raw!r} (give 0, no capture, to {MAX_LIMIT} "
                         f"bytes); using {OUTPUT_LIMIT}\n")
        return OUTPUT_LIMIT
    return limit


def _flush() -> None:
    """Python's buffered output onto the descriptors (the task may have
    replaced or closed the streams: whatever they are, errors ignored).
    Plain try blocks: this runs after every task, and a context manager
    would cost more than the flushes (which make no system call when
    nothing is buffered)."""
    try:
        sys.stdout.flush()
    except Exception:
        pass
    try:
        sys.stderr.flush()
    except Exception:
        pass


def trailer(stdout: bytes, stderr: bytes, stdout_cut: int = 0, stderr_cut: int = 0) -> bytes:
    """The bytes that carry a task's output after its payload."""
    body = msgpack.packb([stdout, stderr, stdout_cut, stderr_cut], use_bin_type=True)
    return body + _LENGTH.pack(len(body)) + MAGIC


def attach(blob: Any, extra: bytes | None) -> Any:
    """``blob`` (bytes, or Pieces) with the trailer ``extra`` after it."""
    if extra is None:
        return blob
    if isinstance(blob, Pieces):
        fallback = blob.fallback
        return Pieces([*blob.parts, extra], lambda: fallback() + extra)
    return bytes(blob) + extra


def split(blob: Any) -> tuple[Any, tuple[bytes, bytes, int, int] | None]:
    """``(payload, output)``: the payload without its trailer (a view, not
    a copy), and ``(stdout, stderr, stdout_cut, stderr_cut)``; or
    ``(blob, None)`` when there is no well-formed trailer."""
    if type(blob) is bytes:
        if not blob.endswith(MAGIC):
            return blob, None
        view = memoryview(blob)
    else:
        view = memoryview(getattr(blob, "buffer", blob)).cast("B")   # (a zmq.Frame, a bytearray, a mapping)
        if len(view) < _TAIL or view[len(view) - len(MAGIC):] != MAGIC:
            return blob, None
    end = len(view) - _TAIL
    if end < 0:
        return blob, None
    (length,) = _LENGTH.unpack_from(view, end)
    start = end - length
    if start < 0:
        return blob, None
    try:
        fields = msgpack.unpackb(view[start:end], raw=True, use_list=True)
        stdout, stderr, stdout_cut, stderr_cut = fields
        if not (type(stdout) is bytes and type(stderr) is bytes and type(stdout_cut) is int
                and type(stderr_cut) is int):
            raise ValueError("fields of the wrong types")
    except Exception:
        return blob, None
    return view[:start], (stdout, stderr, max(0, stdout_cut), max(0, stderr_cut))


def output_of(blob: Any) -> bytes | None:
    """The trailer of ``blob`` (bytes), to carry it on after another
    payload; None when it has none."""
    _, output = split(blob)
    return None if output is None else trailer(*output)


def strip(blob: Any) -> Any:
    """``blob`` without its output trailer, if it has one."""
    return split(blob)[0]


def text(data: bytes, cut: int, stream: str) -> str:
    """What ``future.stdout`` / ``future.stderr`` shows: the bytes kept,
    decoded, after a note of how many were cut before them."""
    shown = data.decode("utf-8", errors="replace")
    if cut:
        return f"[fedexec: the first {cut} bytes of the task's {stream} were cut; the last {len(data)} follow]\n" \
               + shown
    return shown


# Control characters (but tab) shown as escapes when echoed: a task's output
# (or an endpoint's forgery of it) must not drive the caller's terminal
# (move the cursor, retitle the window, hide text). future.stdout keeps them.
# And the bidirectional-text controls, which can make a line read as something it is not.
_SHOWN = {code: f"\\x{code:02x}" for code in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if code != 0x09}
_SHOWN.update({code: f"\\u{code:04x}" for code in [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F),
                                                    *range(0x2066, 0x206A)]})


def echo(prefix: str, stdout: str, stderr: str, out: TextIO | None = None, err: TextIO | None = None) -> None:
    """Write a task's output to the caller's streams (``sys.stdout`` and
    ``sys.stderr`` by default), each line after ``prefix``, control
    characters escaped; errors of the streams are ignored (a closed console
    must not stop results)."""
    for content, stream in ((stdout, out or sys.stdout), (stderr, err or sys.stderr)):
        if not content or stream is None:
            continue
        lines = [line.translate(_SHOWN) for line in content.splitlines()]
        with contextlib.suppress(Exception):
            stream.write("".join(f"{prefix}{line}\n" for line in lines))
            stream.flush()
