"""Task directories of shell tasks: made safely under a checked base, and
removed again once they expire.

*Where.* The base is ``$FEDEXEC_TASK_DIR`` if the workers' environment sets
it, else ``tasks`` under the fedexec home (:func:`base_path`). Each shell
task gets ``<base>/<task id>-<random>`` (mode 0700) holding its ``stdout``
and ``stderr`` files (0600). A sandboxed worker gets a directory of its own,
``<base>/sandbox-<random>``, bound into its sandbox at ``/task-kept`` (and
nothing else of the base, whose path stays out of its view), and makes its
tasks' directories in there; their results name them by their host paths
(``pool/workers.py``).

*Safely* (:func:`open_base`, :func:`make_task_dir`, :func:`create_file`).
Everything under the base is made with calls relative to a descriptor of the
base (``mkdirat``, ``openat``) with ``O_NOFOLLOW``: a symlink planted where
the base, a task directory or an output file is expected (by an earlier task,
or another one running as the same OS user) makes the call fail, it is never
followed. The base itself must be a real directory (not a symlink) owned by
the endpoint's OS user and writable by no one else (it is made 0700 when
missing); otherwise shell tasks fail, saying why.

*Expiry* (:class:`TaskDirCleaner`). A pool removes the task directories
under its base once they are ``ttl`` seconds old (the endpoint setting
``task_dir_ttl``, by default TASK_DIR_TTL, 7 days; 0 keeps them for ever):
old meaning that neither the directory nor its ``stdout``/``stderr`` changed
for that long (a command still writing its output keeps its directory), and
never while it is in use: a running shell task holds a shared flock on its
directory, and a pool on each of its live sandboxed workers' directories
(:func:`hold`), which every cleaner sharing the base respects. It
runs in a thread of the pool, off the path of tasks, and does at most
PASS_BUDGET removals per pass (a pass every ``ttl / 4``, at most hourly,
the first one FIRST_PASS seconds after the pool starts, the next one after
BACKLOG_INTERVAL when a pass spent its budget); a large tree goes over
several passes. Only entries named as fedexec names
them are looked at (the base may be a scratch directory that holds other
things too). Removal never follows a symlink: a link (to anywhere) is
unlinked itself, and a directory is entered only through a descriptor
opened with ``O_NOFOLLOW`` from its parent's, so it stays inside the base
whatever a task replaced by links.

*Who can read them.* The directories are 0700, their files 0600, so other
OS users cannot read them. Tasks on an unsandboxed endpoint all run as the
endpoint's OS user, so one user's task can read (or remove) another user's
task directories there: the endpoint cannot prevent that; use a sandbox
(``sandbox = "bwrap"``) on an endpoint shared between users, where each
worker (which serves one user) sees only its own directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import stat
import struct
import threading
import time
from typing import Callable, Iterator

from .config import TASK_DIR_TTL, fedexec_home

log = logging.getLogger(__name__)

TASK_DIR_ENV = "FEDEXEC_TASK_DIR"
# set by the pool inside a sandbox: the directory of that worker's own (bound in) its tasks' directories go
# to, and its path on the host (what results name)
SANDBOX_DIR_ENV = "FEDEXEC_SANDBOX_TASK_DIR"
SANDBOX_HOST_DIR_ENV = "FEDEXEC_SANDBOX_TASK_DIR_ON_HOST"
PASS_BUDGET = 2000               # removals (unlink, rmdir) one cleaning pass makes at most
MAX_INTERVAL = 3600.0            # seconds between passes at most
MIN_INTERVAL = 0.2               # ... and at least
BACKLOG_INTERVAL = 1.0           # ... after a pass that spent its whole budget
FIRST_PASS = 10.0                # seconds after a pool starts its first pass comes, at most (short-lived
#                                  pools, as the embedded default's, clean too)
MAX_DEPTH = 64                   # directories held open at once while removing a tree (deeper: moved up)
OUTPUT_FILES = ("stdout", "stderr")
CLEANED_MARK = ".cleaned"        # in the base: its time says when a cleaner last finished a whole pass
SANDBOX_PREFIX = "sandbox-"
REMOVING_PREFIX = ".removing-"
# what fedexec names entries of the base: task directories (the older ones were made by
# tempfile.mkdtemp: 8 of [a-z0-9_]), sandboxed workers' directories, and subtrees being removed
TASK_NAME = re.compile(r"(?:[0-9a-f]{32}|task)-[a-z0-9_]{8}")
SANDBOX_NAME = re.compile(re.escape(SANDBOX_PREFIX) + r"[0-9a-f]{16}")
REMOVING_NAME = re.compile(re.escape(REMOVING_PREFIX) + r"[0-9a-f]{16}")

# the file-attribute ioctls (linux/fs.h: _IOR('f', 1, long), _IOW('f', 2, long): the numbers of x86,
# arm and most others; elsewhere refused, and nothing happens) and ext4's flag EXT4_TOPDIR_FL; the
# kernel reads and writes an int at the start of the buffer, the size of a long is what the number says
_FLAGS_SIZE = struct.calcsize("l")
_FS_IOC_GETFLAGS = 0x80006601 | (_FLAGS_SIZE << 16)
_FS_IOC_SETFLAGS = 0x40006602 | (_FLAGS_SIZE << 16)
_FS_TOPDIR_FL = 0x00020000

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class TaskDirError(OSError):
    """The task directories' base cannot be used safely; the message says why."""


def base_path(environ: "os._Environ[str] | dict[str, str] | None" = None) -> str:
    """The base of task directories: ``$FEDEXEC_TASK_DIR`` or ``<fedexec home>/tasks``."""
    env = os.environ if environ is None else environ
    return env.get(TASK_DIR_ENV) or str(fedexec_home() / "tasks")


def open_base(path: str, create: bool = True) -> int:
    """A descriptor of the base directory ``path``, made (0700, with its
    parents) when missing (with ``create``; else FileNotFoundError);
    TaskDirError unless it is a real directory (its last component not a
    symlink) owned by this OS user and writable by it alone."""
    made = False
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        if not create:
            raise
        with contextlib.suppress(FileExistsError):
            os.makedirs(path, mode=0o700)
            made = True
        fd = _open_dir(path)
    except OSError as exc:
        raise _not_usable(path, exc) from None
    try:
        check_base(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    if made:   # (checked first: the directory open is this user's and private)
        spread_subdirectories(fd)
    return fd


def spread_subdirectories(fd: int) -> bool:
    """Mark the directory open on ``fd`` as the top of separate trees (ext2/3/4's
    "top directory" flag, ``chattr +T``), so that the file system places
    each directory made in it in a block group of its own choosing, with
    the files made in that one, instead of all in the group of the base;
    elsewhere nothing happens. Whether the flag is set.

    Why: ext4 without a journal will not reuse an inode freed in the last
    minute (five if not yet written back), and every file or directory made
    in a group scans past all such inodes of it first. Once thousands of
    task directories of a base were removed (a TTL cleaning pass, a
    removed base of a benchmark's run), each new one in the same group
    cost about 2 ms of kernel CPU instead of 0.06 ms, for minutes (measured
    here). Spread over groups, a task directory costs 0.17 ms (the
    directory's placement looks over the groups), removals or not.
    Set only on directories fedexec makes (a base it makes, the default
    one or one named that did not exist, and sandboxed workers'
    directories): a directory that existed is left as it is."""
    try:
        raw = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(_FLAGS_SIZE))
        (flags,) = struct.unpack_from("i", raw)   # (the kernel reads and writes an int there, whatever the size)
        if not flags & _FS_TOPDIR_FL:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", flags | _FS_TOPDIR_FL).ljust(_FLAGS_SIZE, b"\0"))
        return True
    except (OSError, struct.error):   # (not ext2/3/4, or the flag not allowed: placed as the file system will)
        return False


def check_base(path: str, info: os.stat_result) -> None:
    """TaskDirError unless ``info`` (the base ``path``'s) is of a directory
    owned by this OS user and writable by it alone."""
    if not stat.S_ISDIR(info.st_mode):
        raise TaskDirError(f"the task directory base {path} is not a directory")
    if info.st_uid != os.geteuid():
        raise TaskDirError(f"the task directory base {path} belongs to uid {info.st_uid}, not to the "
                           f"endpoint's user (uid {os.geteuid()}): shell tasks do not write there "
                           f"(set {TASK_DIR_ENV} to a directory of its own)")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise TaskDirError(f"the task directory base {path} is writable by others (mode "
                           f"{stat.S_IMODE(info.st_mode):o}): shell tasks do not write there (chmod go-w it, "
                           f"or set {TASK_DIR_ENV} to a private directory)")


def _open_dir(path: str) -> int:
    try:
        return os.open(path, _DIR_FLAGS)
    except OSError as exc:
        raise _not_usable(path, exc) from None


def _not_usable(path: str, exc: OSError) -> TaskDirError:
    if os.path.islink(path):
        return TaskDirError(f"the task directory base {path} is a symlink: shell tasks do not follow it "
                            f"(remove it, or set {TASK_DIR_ENV} to the directory it points to)")
    return TaskDirError(f"the task directory base {path} cannot be opened: {exc.strerror or exc}")


def make_dir(base_fd: int, prefix: str) -> tuple[str, int]:
    """A fresh directory ``<prefix><random>`` (0700) in the directory open on
    ``base_fd``: its name and a descriptor of it (opened without following
    a link, checked to be a directory of this OS user)."""
    while True:
        name = prefix + secrets.token_hex(4 if prefix != SANDBOX_PREFIX else 8)
        try:
            os.mkdir(name, 0o700, dir_fd=base_fd)
            break
        except FileExistsError:
            continue
    fd = os.open(name, _DIR_FLAGS, dir_fd=base_fd)
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:   # swapped under us for another directory
        os.close(fd)
        raise TaskDirError(f"the task directory {name} just made was replaced by one that is not private")
    hold(fd)
    return name, fd


def hold(fd: int) -> None:
    """Mark the directory open on ``fd`` in use for as long as ``fd`` stays
    open (a shared flock): no cleaner, of this pool or any other sharing
    the base, removes it meanwhile, however long it stays unchanged (a
    quiet command running for weeks, an idle sandboxed worker's directory).
    Where the filesystem has no locks, nothing is held (said in the log)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        log.warning("task directory not marked in use (no flock here: %s); the TTL alone protects it", exc)


def _in_use(fd: int) -> bool:
    """Whether some process holds the directory open on ``fd`` (:func:`hold`)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:   # (no locks on this filesystem: the TTL decides)
        return False
    return False


def make_task_dir(base: str, task_id: bytes | None) -> tuple[str, int]:
    """A fresh private directory for task ``task_id`` under ``base``
    (``<base>/<task id hex>-<8 hex>``): its path and a descriptor of it."""
    base_fd = open_base(base)
    try:
        name, fd = make_dir(base_fd, (task_id.hex() if task_id else "task") + "-")
    finally:
        os.close(base_fd)
    return os.path.join(base, name), fd


def create_file(dir_fd: int, name: str) -> int:
    """A new file ``name`` (0600, read-write) in the directory open on
    ``dir_fd``; it must not exist (nor be a link)."""
    return os.open(name, _FILE_FLAGS, 0o600, dir_fd=dir_fd)


# -- expiry ----------------------------------------------------------------------------------------
class TaskDirCleaner:
    """Removes expired task directories under ``base`` in a daemon thread
    (see the module's docstring); ``ttl`` seconds, > 0. ``live``: the names
    of the sandboxed workers' directories in use (by this pool), never
    removed whole (only their expired tasks), however long idle."""

    def __init__(self, base: str, ttl: float, budget: int = PASS_BUDGET,
                 live: Callable[[], set[str]] | None = None) -> None:
        self.base = base
        self.ttl = ttl
        self.budget = budget
        self.live = live or set
        self.interval = min(MAX_INTERVAL, max(MIN_INTERVAL, ttl / 4))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedexec-task-dir-cleaner", daemon=True)

    def start(self) -> "TaskDirCleaner":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def _run(self) -> None:
        wait = min(self.interval, FIRST_PASS)
        while not self._stop.wait(wait):
            wait = self.interval
            if self._cleaned_within(self.interval):   # another pool sharing the base did it
                continue
            try:
                if self.clean_once() >= self.budget:   # more to do: the next pass soon
                    wait = min(self.interval, BACKLOG_INTERVAL)
                else:
                    self._mark_cleaned()
            except Exception as exc:   # (the base unusable: said, tried again next pass)
                log.warning("task directories under %s not cleaned: %s", self.base, exc)

    def _cleaned_within(self, seconds: float) -> bool:
        """Whether a cleaner (of any pool sharing the base: every embedded
        default of a user shares one) finished a whole pass less than
        ``seconds`` ago: then this one skips its pass, so that a base of many
        thousands of directories is read once an interval, not once by each
        of the many short-lived pools started meanwhile."""
        try:
            info = os.stat(os.path.join(self.base, CLEANED_MARK), follow_symlinks=False)
        except OSError:
            return False
        return (stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid()
                and 0 <= time.time() - info.st_mtime < seconds)

    def _mark_cleaned(self) -> None:
        """Say (CLEANED_MARK's time) that a whole pass just finished."""
        try:
            fd = os.open(os.path.join(self.base, CLEANED_MARK), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError:
            return
        try:
            os.utime(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def clean_once(self, now: float | None = None) -> int:
        """One pass: remove what expired, at most ``budget`` removals; the
        removals made. Nothing to do when the base does not exist."""
        if not os.path.isdir(self.base):
            return 0
        cutoff = (time.time() if now is None else now) - self.ttl
        budget = _Budget(self.budget)
        live = self.live()
        base_fd = open_base(self.base)
        try:
            for name in _names(base_fd):
                if budget.spent():
                    break
                if REMOVING_NAME.fullmatch(name):
                    remove_at(base_fd, name, budget, base_fd)
                elif TASK_NAME.fullmatch(name):
                    if _expired(base_fd, name, cutoff):
                        _take_away(base_fd, base_fd, name, budget)
                elif SANDBOX_NAME.fullmatch(name):
                    self._clean_sandbox_dir(base_fd, name, cutoff, budget, name in live)
        finally:
            os.close(base_fd)
        return budget.used

    def _clean_sandbox_dir(self, base_fd: int, name: str, cutoff: float, budget: "_Budget", live: bool) -> None:
        """A sandboxed worker's directory: the whole of it once it expired
        (no task directory was made in it since) and its worker is gone,
        else its expired tasks."""
        if not live and _expired(base_fd, name, cutoff, files=()):
            _take_away(base_fd, base_fd, name, budget)
            return
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=base_fd)
        except OSError:
            return
        try:
            for child in _names(fd):
                if budget.spent():
                    return
                if TASK_NAME.fullmatch(child) and _expired(fd, child, cutoff):
                    _take_away(fd, base_fd, child, budget)
        finally:
            os.close(fd)


def start_cleaner(ttl: object, live: Callable[[], set[str]] | None = None,
                  environ: "dict[str, str] | None" = None) -> TaskDirCleaner | None:
    """The cleaner of the task directories under this environment's base
    (:func:`base_path`), started, for ``ttl`` (the endpoint's
    ``task_dir_ttl`` as a pool gets it: TASK_DIR_TTL when it is missing or
    not a number); None when ``ttl`` is 0 (kept for ever)."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 <= ttl < float("inf"):
        ttl = TASK_DIR_TTL
    if not ttl:
        return None
    return TaskDirCleaner(base_path(environ), float(ttl), live=live).start()


class _Budget:
    __slots__ = ("left", "used")

    def __init__(self, left: int) -> None:
        self.left = left
        self.used = 0

    def spend(self) -> None:
        self.left -= 1
        self.used += 1

    def spent(self) -> bool:
        return self.left <= 0


def _names(dir_fd: int) -> list[str]:
    try:
        return os.listdir(dir_fd)
    except OSError:
        return []


def _mtime(dir_fd: int, name: str) -> float | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime
    except OSError:
        return None


def _expired(dir_fd: int, name: str, cutoff: float, files: tuple[str, ...] = OUTPUT_FILES) -> bool:
    """Whether entry ``name`` and its output ``files`` (if a directory) last
    changed before ``cutoff``; never following links."""
    mtime = _mtime(dir_fd, name)
    if mtime is None or mtime >= cutoff:
        return False
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        return True   # not a directory (or not one any more): nothing in it to keep it
    try:   # (held by a running task or a live sandboxed worker's pool: kept, however old)
        return not _in_use(fd) and all((_mtime(fd, f) or 0.0) < cutoff for f in files)
    finally:
        os.close(fd)


def _take_away(dir_fd: int, base_fd: int, name: str, budget: _Budget) -> None:
    """Remove entry ``name`` of ``dir_fd``: renamed first to a REMOVING_NAME
    in the base (at once out of sight; what one pass does not finish, the
    next one goes on with), then removed."""
    hidden = REMOVING_PREFIX + secrets.token_hex(8)
    try:
        os.rename(name, hidden, src_dir_fd=dir_fd, dst_dir_fd=base_fd)
    except OSError:
        return
    remove_at(base_fd, hidden, budget, base_fd)


def remove_at(dir_fd: int, name: str, budget: _Budget, base_fd: int) -> bool:
    """Remove entry ``name`` of the directory open on ``dir_fd``, and all
    under it, spending ``budget`` (one per unlink or rmdir); True when it is
    gone. Links are unlinked, never followed; directories are opened from
    their parent's descriptor with O_NOFOLLOW and made writable (0700) when a
    task had taken that away. A tree deeper than MAX_DEPTH has its deep part
    moved up into the base (``base_fd``) as a REMOVING_NAME of its own, so
    few descriptors are open at once."""
    stack: list[tuple[int, str, int, Iterator[str]]] = []   # (parent fd, name, fd, names left)

    def enter(parent: int, entry: str) -> bool:
        """Unlink ``entry`` if it is not a directory (True: done with it);
        else open it onto the stack (False)."""
        try:
            info = os.stat(entry, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return True
        if not stat.S_ISDIR(info.st_mode):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry, dir_fd=parent)
            budget.spend()
            return True
        if len(stack) >= MAX_DEPTH:
            with contextlib.suppress(OSError):
                os.rename(entry, REMOVING_PREFIX + secrets.token_hex(8), src_dir_fd=parent, dst_dir_fd=base_fd)
            return True
        try:
            fd = os.open(entry, _DIR_FLAGS, dir_fd=parent)
        except OSError:   # it became a link (or went) since the stat: unlink that
            with contextlib.suppress(OSError):
                os.unlink(entry, dir_fd=parent)
            budget.spend()
            return True
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o700)
        stack.append((parent, entry, fd, iter(_names(fd))))
        return False

    try:
        if enter(dir_fd, name):
            return True
        while stack:
            if budget.spent():
                return False
            parent, entry, fd, names = stack[-1]
            child = next(names, None)
            if child is not None:
                enter(fd, child)
                continue
            stack.pop()
            os.close(fd)
            try:
                os.rmdir(entry, dir_fd=parent)
            except FileNotFoundError:
                pass
            except OSError:   # (something was added meanwhile: the next pass)
                budget.spend()
                return False
            budget.spend()
        return True
    finally:
        for _, _, fd, _ in stack:
            os.close(fd)
