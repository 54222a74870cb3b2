"""The embedded default's private directory (``fedexec-XXXXXXXX``, in
/dev/shm or the temporary directory, embedded.py), and the removal of those
left behind when both the program and its colocated process were killed.

That directory holds the private relay's record, its sockets and every large
payload's spool file, so one left behind can hold gigabytes of a memory
filesystem. Its program removes it when the executor shuts down, and the
colocated process when it stops (also when it sees its program gone); a
``kill -9`` of both (or the OOM killer taking both) leaves it. So:

- Each directory holds a marker, ``owner.lock``: the program's pid, that
  process's start time, and the host and boot it runs on (as
  endpoint/sockdir.py's markers), and a shared ``flock`` on it that the
  program takes as it makes the directory and hands to the colocated process
  (an inherited descriptor: one lock, held until the last of the two exits;
  the kernel lets go of it however they end). The marker appears under its
  name only once it is locked (written under another name, then renamed), so
  a marked directory is never seen unlocked while its owners live.
- As the colocated process starts, it removes every directory of this user
  beside its own whose marker names this host and this boot, whose lock
  nobody holds, and whose program is gone (a pid that no longer runs, or runs
  a process started at another time). A directory without a marker (an older
  release's, or one being made) is removed only when it is older than
  :data:`fedexec.endpoint.sockdir.UNMARKED_AGE` and no socket in it accepts
  a connection (a live private relay listens in it).

Only directories named as embedded.py names them are looked at (not the
agents' ``fedexec-ep-*``, which endpoint/sockdir.py judges, nor the pools'
small ``fedexec-pool-*``, which nothing removes yet), and only those that
are this user's own, are not symbolic links and
sit directly in the directory searched; removal never follows links
(``shutil.rmtree`` works on file descriptors).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

from .endpoint.sockdir import UNMARKED_AGE, _anything_listens, _start_time, _this_boot, _this_host, own_directories

PREFIX = "fedexec-"
MARKER = "owner.lock"
# what tempfile.mkdtemp(prefix=PREFIX) names: 8 characters of its alphabet (no "-": not fedexec-ep-*)
NAME = re.compile(r"fedexec-[a-z0-9_]{8}\Z")


def make_private_directory(base: str | None) -> tuple[str, int]:
    """A new private (0700) directory in ``base`` (None: the temporary
    directory), marked as this process's: ``(path, fd)``, where ``fd`` holds
    the marker's shared lock; keep it open while the directory is in use,
    and pass it to the processes that use it too (``pass_fds``)."""
    directory = tempfile.mkdtemp(prefix=PREFIX, dir=base)
    os.chmod(directory, 0o700)
    making = os.path.join(directory, MARKER + ".new")
    fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.write(fd, f"{os.getpid()} {_start_time(os.getpid())!r} {_this_host()} {_this_boot()}\n".encode())
        os.rename(making, os.path.join(directory, MARKER))
    except BaseException:
        os.close(fd)
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory, fd


def remove_stale_private_dirs(base: str | Path | None = None) -> list[str]:
    """Remove this user's embedded private directories in ``base`` (default:
    the temporary directory) whose program and colocated process are gone;
    the ones removed."""
    return [path for path, info in own_directories(base, NAME.match) if _remove_if_stale(path, info)]



def _remove_if_stale(path: str, info: os.stat_result) -> bool:
    """Remove the directory ``path`` (lstat ``info``) if its owners are gone; whether it was."""
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        opened = os.fstat(dir_fd)
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino) or opened.st_uid != os.getuid():
            return False   # (replaced meanwhile)
        try:
            fd = os.open(MARKER, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
        except FileNotFoundError:
            if time.time() - info.st_mtime > UNMARKED_AGE and not _anything_listens(Path(path)):
                return _remove(path)
            return False
        except OSError:
            return False
        try:
            if not _owners_gone(fd):
                return False
            return _remove(path)   # (under the exclusive lock: no one else judges it meanwhile)
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)


def _owners_gone(fd: int) -> bool:
    """Whether the marker open at ``fd`` names this host and boot, nobody
    holds its lock (then this process holds it, exclusively) and the program
    it names is gone."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return False
    try:
        pid_text, started_text, host, boot = os.read(fd, 200).decode().split()
        pid, started = int(pid_text), float(started_text)
    except (ValueError, UnicodeDecodeError, OSError):
        return False   # (not ours to judge: it stays)
    if host != _this_host() or boot != _this_boot() or pid == os.getpid():
        return False   # another node's (a shared temporary directory), or this one's before a reboot
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:   # (held: the program or its colocated process lives)
        return False
    now_started = _start_time(pid)
    return now_started is None or abs(now_started - started) > 1.0


def _remove(path: str) -> bool:
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)
