"""A shell task's directory made ahead of time, while its worker is idle.

Making a task directory and its two output files (``taskdirs.py``) is three
inode creations: 0.15 ms on a quiet disk, a millisecond or more on a busy
ext4 (measured: 1 ms for ``mkdir`` alone under load), all on the path of the
task. So after a shell task took its directory, its worker makes the next
one in the same base while it waits for work (``WorkerProcess.run`` calls
:meth:`SpareTaskDir.refill` when its queue is empty and no message waits),
and the next shell task only renames it to its own name, which costs one
``rename`` instead of three creations.

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

    def take(self, base: str, task_id: bytes | None) -> tuple[str, int, int, int] | None:
        """The spare, renamed for task ``task_id`` in ``base``: its path and
        descriptors of it and of its stdout and stderr files (the caller's to
        close); None when there is no spare fit for it (then the caller makes
        the directory). Either way the next spare is wanted in ``base``."""
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

    def refill(self) -> None:
        """Make the spare wanted (nothing when none is: no shell task ran
        since the last one was made). A failure is left for the next task's
        own attempt to report."""
        base, self.wanted = self.wanted, None
        if base is None or self._spare is not None:
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
        """Remove the spare, if any (the worker is stopping)."""
        self.wanted = None
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.remove()


SPARE = SpareTaskDir()   # this process's (a worker's)
