"""A worker's finished results not sent yet, where its pool finds them if the
worker dies.

A worker holds the results of short tasks for a few milliseconds and sends
them together (process.py: FLUSH_DELAY, SLOW_HOLD). Killed meanwhile (a
later task crashes it, the OOM killer, a walltime), it took those results
with it, and its pool ran those tasks again elsewhere: their side effects
happened twice. So the worker also writes each result it holds into a file
of its own beside its marker (the pool makes it, private, in its socket
directory, its space allocated), through a memory map: no system call, a
copy of a few dozen bytes for a small result. When the worker dies, its pool reads the file
(``read_held``, with ``pread``, never a map) and takes the results of the
tasks it still counted as held by the worker as if they had come: they
finish once, and only the task that was running when the worker died
(the culprit its marker names) and those never started run again.

Layout: an 8-byte header (the offset where the records end, then a magic
number), then records of ``[blob length u32][task id 16 B][status u8]
[blob]``. A record is written first and the header's end after it, so a
worker killed in the middle of a record leaves it out. When the next record
would not fit, the worker sends what it holds and starts over at the top;
a result over MAX_RECORDED is not written: the worker sends it at once.

The file is the worker's to write, and a task runs in the worker: it may
write anything there, as in its marker. Whatever it writes is read within
bounds and taken only for tasks of that worker (one user's: a worker runs
one user's tasks), so a task can forge nothing but its own user's results.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import stat
import struct
from typing import Any, Callable

log = logging.getLogger("fedexec.worker")

SIZE = 256 * 1024            # bytes of the file, allocated when made (256 KiB of tmpfs memory per worker)
MAX_RECORDED = 32 * 1024     # a result larger than this is sent at once rather than held
_HEADER = struct.Struct("<II")   # end of the records, magic
_RECORD = struct.Struct("<I16sB")   # blob length, task id, status
_END = struct.Struct("<I")
MAGIC = 0x46584844   # "FXHD"
START = _HEADER.size
SUFFIX = ".held"


def path_for(marker_path: str) -> str:
    """The held-results file beside a worker's marker file."""
    return os.path.splitext(marker_path)[0] + SUFFIX


def create(path: str) -> bool:
    """Make a worker's (empty) file, private (the pool, before it starts the
    worker); False, and no file, when its space cannot be had. The space is
    allocated here, not left sparse: a worker writing through its map into a
    page a full tmpfs cannot back would die of SIGBUS after its task had
    finished, and the task would run again (review, session 26)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, SIZE)
        os.pwrite(fd, _HEADER.pack(START, MAGIC), 0)
    except OSError as exc:   # ENOSPC: the worker runs without (as a sandboxed one does)
        log.warning("no held-results file for a worker (%s): its held results are lost should it die", exc)
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return False
    os.close(fd)
    return True


class HeldLog:
    """The worker's side: results written through a memory map."""

    __slots__ = ("map", "end")

    def __init__(self, path: str) -> None:
        with open(path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), SIZE)
        self.end = START
        _HEADER.pack_into(self.map, 0, START, MAGIC)

    def record(self, task_id: bytes, status: int, blob: Any, send_held: Callable[[], None]) -> None:
        """Write one result (just added to those the worker holds). One over
        MAX_RECORDED is not written: ``send_held`` sends it, with the others
        held, at once. When the file is full, ``send_held`` sends what is
        held and the file starts over. (Written whether or not the result is
        sent at once: a message just sent may still be in ZeroMQ's queue in
        this process when it dies.)"""
        size = len(blob)
        if size > MAX_RECORDED or len(task_id) != 16:
            send_held()
            return
        end = self.end
        new_end = end + _RECORD.size + size
        if new_end > SIZE:   # full: what is held goes, and the file starts over (emptied first)
            send_held()
            _END.pack_into(self.map, 0, START)
            end = START
            new_end = end + _RECORD.size + size
        _RECORD.pack_into(self.map, end, size, task_id, status)
        self.map[end + _RECORD.size:new_end] = blob
        _END.pack_into(self.map, 0, new_end)   # (last: a record cut short by the worker's death is left out)
        self.end = new_end

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.map.close()


def read_held(path: str) -> list[tuple[bytes, int, bytes]]:
    """The pool's side, once the worker is dead: ``(task id, status, blob)``
    of the records in the file, read within bounds; [] if there is none, or
    what is there is not a held-results file (a task may have spoiled it)."""
    try:   # (non-blocking: a task may have put a FIFO in its place, whose open would wait for ever)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        header = os.pread(fd, _HEADER.size, 0)
        if len(header) != _HEADER.size:
            return []
        end, magic = _HEADER.unpack(header)
        if magic != MAGIC or not START <= end <= SIZE:
            return []
        data = os.pread(fd, end - START, START)
    except OSError:
        return []
    finally:
        os.close(fd)
    found = []
    offset, limit = 0, len(data)
    while offset + _RECORD.size <= limit:
        size, task_id, status = _RECORD.unpack_from(data, offset)
        offset += _RECORD.size
        if size > limit - offset:
            break
        found.append((task_id, status, data[offset:offset + size]))
        offset += size
    return found
