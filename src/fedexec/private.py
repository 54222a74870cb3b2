"""What fedexec's own processes write is private to their user.

The relay's record holds every user's arguments and results, an endpoint's
directory its pool secret and batch scripts: none of it may be readable by
other accounts on the machine, whatever the umask the process was started
with. The relay, endpoint, pool and CLI processes call :func:`make_private`
first thing (files 0600, directories 0700 from then on); code that may also
run inside someone else's process (``Relay(...)`` as a library) creates its
directories and files through :func:`private_dir` and
:func:`create_private_file` as well. Workers run users' code, whose files
follow the user's own umask again (:func:`restore_user_umask`).
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_UMASK = 0o077
USER_UMASK_ENV = "FEDEXEC_USER_UMASK"   # the umask fedexec was started with, for the workers


def make_private() -> None:
    """From now on this process creates files 0600 and directories 0700.
    The umask it had is kept in the environment (for its children) unless an
    ancestor kept one already."""
    previous = os.umask(PRIVATE_UMASK)
    os.environ.setdefault(USER_UMASK_ENV, f"{previous:03o}")


def restore_user_umask() -> None:
    """A worker: the files users' tasks write follow the umask of the user
    who started fedexec, not fedexec's private one."""
    value = os.environ.get(USER_UMASK_ENV, "")
    try:
        os.umask(int(value, 8) & 0o777)
    except ValueError:
        pass


def private_dir(path: Path) -> Path:
    """Make ``path`` (and missing parents) a directory only this user can
    enter: 0700, also when it existed with looser bits."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != 0o700:
        os.chmod(path, 0o700)
    return path


def create_private_file(path: Path) -> Path:
    """Create ``path`` (empty) 0600 if it does not exist, else make it 0600:
    before SQLite opens a database, whose WAL and SHM files it creates with
    the database file's mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return Path(path)
