"""A shell task's directory made ahead of time, while its worker is idle.

Making a task directory and its two output files (``taskdirs.py``) is three
inode creations: 0.15 ms on a quiet disk, a millisecond or more on a busy
ext4 (measured: 1 ms for ``mkdir`` alone under load), all on the path of the
task. So after a shell task took its directory, its worker makes the next
one in the same base, and the next shell task only renames it to its own
name, which costs one ``rename`` instead of three creations.

*When.* While the command that took the last spare runs: once it has
started (``shell.py`` calls :meth:`SpareTaskDir.refill_soon`), a thread of
the worker of its own (the *maker*) makes the next one, so the worker's
loop never waits on the file system for it. Before, the worker made it
itself when idle for a millisecond after the result went; where a creation
is slow (ext4 without a journal spends about a millisecond of CPU per
file in a directory whose block group had many files deleted in the last
minutes: its ``recently_deleted`` scan) the next task, arriving meanwhile,
waited for it. Now a command runs beside it on a second core, and the
result and the next task go by without waiting. A task that comes while
the spare is still being made waits for it (:data:`MAKE_WAIT` at most):
making its own would cost the same again. Where no thread can be started,
the worker's idle loop makes it as before (``WorkerProcess.run`` calls
:meth:`SpareTaskDir.refill` when its queue is empty and no message waits).

The spare is made exactly as a task's directory is (``make_dir``: 0700,
held with a shared flock, so no cleaner removes it; its files 0600), named
``task-<8 hex>`` (a name the cleaner knows: one a killed worker leaves
behind expires with the TTL), and renamed to ``<task id>-<the same 8 hex>``
when a task takes it. It is used only if it is in the base the task asks
for, that base is still the same directory (by device and inode) and still
passes ``check_base``, the spare is younger than SPARE_MAX_AGE (so its
times are not much older than its task: the cleaner's TTL counts from
them), and it was made by this process (not inherited over a fork);
otherwise it is removed and the task makes a fresh directory as before.
Nothing changes for the command: the same directory, files and modes. A
spare is made only in a base that exists (one removed after a task is made
again by the next task, as before, not by an idle worker).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from .taskdirs import OUTPUT_FILES, check_base, create_file, make_dir, open_base

log = logging.getLogger(__name__)

SPARE_PREFIX = "task-"
SPARE_MAX_AGE = 60.0   # seconds a spare may wait for a task; older, it is made again
MAKE_WAIT = 2.0        # seconds a task waits at most for the spare being made (then makes its own)


class _Spare:
    """A spare directory: where it is (its base's path, a descriptor of the
    base and the base's identity), its name, its inode, descriptors of it and
    its two output files, when and by which process it was made."""

    __slots__ = ("base", "base_fd", "base_id", "name", "ino", "fd", "out", "err", "made", "pid")

    def __init__(self, base: str, base_fd: int, name: str, fd: int, out: int, err: int) -> None:
        self.base, self.base_fd, self.name, self.fd, self.out, self.err = base, base_fd, name, fd, out, err
        info = os.fstat(base_fd)
        self.base_id = (info.st_dev, info.st_ino)
        self.ino = os.fstat(fd).st_ino
        self.made = time.monotonic()
        self.pid = os.getpid()

    def close(self) -> None:
        for fd in (self.out, self.err, self.fd, self.base_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def remove(self) -> None:
        """Remove the (unused) directory and its files, then close."""
        if self.pid == os.getpid():   # (a forked child leaves its parent's spare alone)
            for name in OUTPUT_FILES:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self.fd)
            with contextlib.suppress(OSError):
                os.rmdir(self.name, dir_fd=self.base_fd)
        self.close()


class SpareTaskDir:
    """At most one spare task directory of this process (see the module's
    docstring). ``wanted``: the base a shell task last made its directory
    in, for :meth:`refill`; None when there is nothing to make."""

    def __init__(self) -> None:
        self.wanted: str | None = None
        self._spare: _Spare | None = None
        self._lock = threading.Lock()   # (a task's own threads may run shell commands at once)
        self._maker: threading.Thread | None = None   # makes the spare asked by refill_soon
        self._asked: str | None = None                # the base it is asked to make one in
        self._ask = threading.Event()                 # set: a spare is asked of the maker
        self._made = threading.Event()                # set: none is being made
        self._made.set()
        self._forked_child = False

    def _forked(self) -> None:
        """In a child forked by a task: no maker thread there, and no lock
        held by one (the parent's spare, if any, stays the parent's: see
        ``_Spare.pid``); the child makes no spare (nothing would remove it)."""
        self._lock = threading.Lock()
        self._maker, self._asked = None, None
        self._ask, self._made = threading.Event(), threading.Event()
        self._made.set()
        self._forked_child = True

    def take(self, base: str, task_id: bytes | None) -> tuple[str, int, int, int] | None:
        """The spare, renamed for task ``task_id`` in ``base``: its path and
        descriptors of it and of its stdout and stderr files (the caller's to
        close); None when there is no spare fit for it (then the caller makes
        the directory). Either way the next spare is wanted in ``base``.
        While the maker is making one, waits for it (MAKE_WAIT at most)."""
        if not self._made.is_set():
            self._made.wait(MAKE_WAIT)
        with self._lock:
            spare, self._spare = self._spare, None
        self.wanted = base
        if spare is None:
            return None
        if spare.base != base or spare.pid != os.getpid() or time.monotonic() - spare.made > SPARE_MAX_AGE:
            spare.remove()
            return None
        name = spare.name if task_id is None else task_id.hex() + spare.name[len(SPARE_PREFIX) - 1:]
        try:
            info = os.stat(base, follow_symlinks=False)
            if (info.st_dev, info.st_ino) != spare.base_id:   # the base was moved away and another put there
                spare.remove()
                return None
            check_base(base, info)
            if name != spare.name:
                os.rename(spare.name, name, src_dir_fd=spare.base_fd, dst_dir_fd=spare.base_fd)
            if os.stat(name, dir_fd=spare.base_fd, follow_symlinks=False).st_ino != spare.ino:
                spare.close()   # (swapped under us: not ours to remove)
                return None
        except OSError as exc:   # (TaskDirError too: the fresh directory's attempt says why)
            log.debug("spare task directory not used: %s", exc)
            spare.remove()
            return None
        with contextlib.suppress(OSError):
            os.close(spare.base_fd)
        return os.path.join(base, name), spare.fd, spare.out, spare.err

    def refill_soon(self) -> None:
        """Have the spare wanted made by the maker thread, now (the worker's
        shell command has just started); the worker's idle loop makes it
        instead where no thread can be started. Nothing when none is wanted."""
        base = self.wanted
        if base is None or self._spare is not None or not self._made.is_set() or self._forked_child:
            return
        with self._lock:   # (a task's own threads may start shell commands at once: one maker)
            if self._maker is None or not self._maker.is_alive():
                maker = threading.Thread(target=self._make_asked, name="fedexec-spare-taskdir", daemon=True)
                try:
                    maker.start()
                except RuntimeError:   # (no thread to be had: left to the idle loop)
                    return
                self._maker = maker
        self.wanted = None
        self._asked = base
        self._made.clear()
        self._ask.set()

    def _make_asked(self) -> None:
        """The maker thread: make each spare asked (refill_soon), one at a time."""
        while True:
            self._ask.wait()
            self._ask.clear()
            base, self._asked = self._asked, None
            try:
                if base is not None:
                    self._make(base)
            except Exception as exc:   # (never leave a task waiting on a maker gone)
                log.debug("no spare task directory made in %s: %s", base, exc)
            finally:
                self._made.set()

    def refill(self) -> None:
        """Make the spare wanted, in this thread (nothing when none is: no
        shell task ran since the last one was made, or the maker has it).
        A failure is left for the next task's own attempt to report."""
        base, self.wanted = self.wanted, None
        if base is not None:
            self._make(base)

    def _make(self, base: str) -> None:
        """Make the spare in ``base``, unless there is one."""
        if self._spare is not None:
            return
        base_fd = fd = out = err = -1
        try:
            base_fd = open_base(base, create=False)   # (a base removed since is made by a task, not here)
            name, fd = make_dir(base_fd, SPARE_PREFIX)
            out = create_file(fd, OUTPUT_FILES[0])
            err = create_file(fd, OUTPUT_FILES[1])
            spare = _Spare(base, base_fd, name, fd, out, err)
        except OSError as exc:
            log.debug("no spare task directory made in %s: %s", base, exc)
            if fd >= 0:
                for made in OUTPUT_FILES:
                    with contextlib.suppress(OSError):
                        os.unlink(made, dir_fd=fd)
                with contextlib.suppress(OSError):
                    os.rmdir(name, dir_fd=base_fd)
            for opened in (err, out, fd, base_fd):
                if opened >= 0:
                    os.close(opened)
            return
        with self._lock:
            if self._spare is None:
                self._spare, spare = spare, None
        if spare is not None:   # (another thread made one meanwhile)
            spare.remove()

    def discard(self) -> None:
        """Remove the spare, if any (the worker is stopping), once the maker
        is done with one being made."""
        self.wanted = None
        self._made.wait(MAKE_WAIT)
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.remove()


SPARE = SpareTaskDir()   # this process's (a worker's)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=SPARE._forked)
