"""An endpoint agent's private socket directory (``$TMPDIR/fedexec-ep-*``),
and a pool's (``$TMPDIR/fedexec-pool-*``: its workers' channels), and the
removal of those left behind by processes that did not exit cleanly.

An agent removes its directory when it stops; one killed with SIGKILL (or
by the OOM killer, or a lost node) cannot. So each directory holds a
marker, ``agent.pid``, naming the agent's pid, that process's start time,
and the host and boot (``/proc/sys/kernel/random/boot_id``) it runs on; the
next agent to start on the machine, or ``fedexec endpoint stop``, removes
every such directory of this user whose agent is gone (a pid that no longer
runs, or runs a process started at another time: the pid was reused).
Only a marker naming this host and this boot is judged so: with a
temporary directory shared by several nodes (a network file system), a pid
says nothing of another node's processes, whose live agents' directories
must stay. A directory with no marker, or a marker without host and boot
(made by an older release, or by an agent killed between making it and
writing the marker) is removed once it is older than :data:`UNMARKED_AGE`
and no socket in it accepts a connection.

Only directories are touched that are this user's own, are not symbolic
links, and sit directly in the temporary directory; removal never follows
links (``shutil.rmtree`` works on file descriptors).
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import psutil

PREFIX = "fedexec-ep-"
POOL_PREFIX = "fedexec-pool-"
MARKER = "agent.pid"
UNMARKED_AGE = 600.0   # seconds an unmarked directory is left alone, in case its agent is starting


def make_socket_dir(prefix: str = PREFIX) -> str:
    """A new private (0700) socket directory for this process's agent (or,
    with POOL_PREFIX, pool), marked with its pid and start time."""
    directory = tempfile.mkdtemp(prefix=prefix)
    fd = os.open(os.path.join(directory, MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as marker:
        marker.write(f"{os.getpid()} {_start_time(os.getpid())!r} {_this_host()} {_this_boot()}\n")
    return directory


def _this_host() -> str:
    """This machine's host name, as a marker names it (no white space)."""
    return "".join(socket.gethostname().split()) or "-"


def _this_boot() -> str:
    """This boot's id (Linux: a random UUID made at boot), or "-" where there is none."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return "".join(f.read(100).split()) or "-"
    except OSError:
        return "-"


def remove_stale_socket_dirs(base: str | None = None) -> list[str]:
    """Remove this user's agent and pool socket directories in ``base``
    (default: the temporary directory) whose process is gone; the ones removed."""
    removed: list[str] = []
    for path, info in own_directories(base, lambda name: name.startswith((PREFIX, POOL_PREFIX))):
        if _is_stale(Path(path), info.st_mtime):
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                removed.append(path)
    return removed


def own_directories(base: str | Path | None, named: Callable[[str], object]) -> Iterator[tuple[str, os.stat_result]]:
    """``(path, lstat)`` of each directory in ``base`` (default: the
    temporary directory) that is this OS user's, not a link, and whose name
    ``named`` accepts: what a sweep of leftovers may look at."""
    base = str(base or tempfile.gettempdir())
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    uid = os.getuid()
    for entry in entries:
        if not named(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == uid:
            yield entry.path, info


def _is_stale(directory: Path, mtime: float) -> bool:
    """Whether the agent that made ``directory`` is gone."""
    try:
        fd = os.open(directory / MARKER, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return time.time() - mtime > UNMARKED_AGE and not _anything_listens(directory)
    except OSError:
        return False
    with os.fdopen(fd) as marker:
        text = marker.read(200)
    try:
        pid_text, started_text, host, boot = text.split()
        pid, started = int(pid_text), float(started_text)
    except ValueError:   # unreadable, or an older release's (no host and boot)
        return time.time() - mtime > UNMARKED_AGE and not _anything_listens(directory)
    if host != _this_host() or boot != _this_boot():
        return False   # another node's (a shared temporary directory), or this one's before a reboot
    if pid == os.getpid():
        return False
    now_started = _start_time(pid)
    return now_started is None or abs(now_started - started) > 1.0


def _start_time(pid: int) -> float | None:
    """When process ``pid`` started (None: no such process)."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _anything_listens(directory: Path) -> bool:
    """Whether a Unix socket in ``directory`` accepts a connection."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return True   # cannot tell: keep it
    for entry in entries:
        try:
            if not stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                continue
        except OSError:
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(entry.path)
                return True
            except OSError:
                pass
    return False
