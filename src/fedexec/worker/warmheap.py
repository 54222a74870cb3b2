"""A worker's freed memory kept for its next task, handed back when it idles.

A task that makes a large value (``array + 1`` of a 1 GB array) gets fresh
pages from the kernel: glibc's malloc maps every allocation over 32 MiB on
its own and unmaps it when freed. On this project's machines fresh pages are
dear: a VM hands memory free for a couple of seconds back to its host, and
taking it again costs ~1 s per GB, against ~0.3 s for the arithmetic itself
(benchmarks/results/large-payloads-gig-s25-2026-12-01.md). Ray's and
ProcessPoolExecutor's workers pay it on every such task.

So a worker (:func:`keep_freed_memory`, as it starts) has malloc serve
allocations up to :data:`KEEP_UP_TO` from its heap and keep what is freed
there instead of giving it back at once; the next task's large value reuses
those pages (no page faults, no zeroing). Once the worker has had no task
for :data:`IDLE_POLLS` seconds (that many of its polls for messages timed
out: process.PARENT_CHECK_MS) it gives all free memory back (:meth:`WarmHeap.idle`, ``malloc_trim``), so an idle worker holds no more
than before; a busy one gives back what is over its share of the memory available (:func:`busy_cap`),
looked at once a second (:meth:`WarmHeap.ran`). Allocations over KEEP_UP_TO are mapped and unmapped as before.

On only where one user's tasks run in the worker: a kept page is not zeroed
before malloc hands it out again, so a task of another user (a shared
endpoint's worker without a sandbox serves several) could read what the
last task left there in an uninitialized array (as it already can in
allocations under 32 MiB, which malloc always keeps). So the embedded
default (one user, colocated.py) turns it on for its workers
(``FEDEXEC_WARM_HEAP=on`` unless the program's environment says otherwise);
elsewhere it is off unless the endpoint's environment sets it to ``on``.
Only with glibc (Linux); elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

ENV = "FEDEXEC_WARM_HEAP"
CAP_ENV = "FEDEXEC_WARM_HEAP_CAP"   # bytes of free memory a busy worker keeps at most (default: busy_cap())
KEEP_UP_TO = 2 ** 31 - 1   # bytes: allocations up to this come from the heap and are kept (malloc takes an int)

# polls for messages timed out in a row (a second each) before free memory goes back: more than one,
# since a pool of N workers running one user's trips in turn leaves each idle for N - 1 trips
IDLE_POLLS = 3
BUSY_CHECK = 1.0           # seconds between looks at the free memory a busy worker keeps (ran())

_M_TRIM_THRESHOLD = -1     # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


class WarmHeap:
    """This process's malloc set to keep freed memory (see the module's doc);
    :meth:`ran` after each task, :meth:`idle` while waiting for one."""

    def __init__(self) -> None:
        self.libc = _glibc()
        self.enabled = False
        self.dirty = False       # a task ran since memory was last given back
        self.quiet = 0           # polls for messages timed out in a row since
        self._next_check = 0.0   # time.monotonic() of the next look at the free memory while busy
        if self.libc is None or os.environ.get(ENV, "off").lower() != "on":
            return
        # (both or neither: a raised mmap threshold alone would still give the heap's top back at once)
        self.enabled = bool(self.libc.mallopt(_M_MMAP_THRESHOLD, KEEP_UP_TO)
                            and self.libc.mallopt(_M_TRIM_THRESHOLD, KEEP_UP_TO))

    def ran(self) -> None:
        """A task ended (cheap: a system call at most once a BUSY_CHECK).
        A worker that is never idle still holds no more free memory than
        its share of what the machine has available (:func:`busy_cap`):
        beyond it, free memory goes back at once."""
        self.dirty = True
        self.quiet = 0
        if not self.enabled:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + BUSY_CHECK
        free = self._free_bytes()
        if free is None or free > busy_cap():
            self.libc.malloc_trim(0)

    def _free_bytes(self) -> int | None:
        """Bytes free in malloc's heap (glibc's mallinfo2), None where unknown."""
        mallinfo2 = getattr(self.libc, "mallinfo2", None)
        if mallinfo2 is None:
            return None
        mallinfo2.restype = _MallInfo2
        info = mallinfo2()
        return int(info.fordblks)

    def idle(self) -> bool:
        """The worker's poll for messages timed out: give free memory back
        once that happened IDLE_POLLS times in a row, if a task ran since it
        last did; whether it did now."""
        if not (self.enabled and self.dirty):
            return False
        self.quiet += 1
        if self.quiet < IDLE_POLLS:
            return False
        self.libc.malloc_trim(0)
        self.dirty = False
        return True


def busy_cap() -> int:
    """The free memory a busy worker may keep: CAP_ENV's bytes if set, else
    an equal share, between the node's cores, of half the memory available
    now; at most KEEP_UP_TO."""
    setting = os.environ.get(CAP_ENV, "")
    if setting.isdigit():
        return min(KEEP_UP_TO, int(setting))
    available = 0
    try:
        with open("/proc/meminfo", "rb") as meminfo:
            for line in meminfo:
                if line.startswith(b"MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        return 0
    return min(KEEP_UP_TO, available // (2 * (os.cpu_count() or 1)))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc() -> ctypes.CDLL | None:
    """glibc's malloc functions, or None where malloc is not glibc's."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None
