"""Shell commands as tasks: :class:`ShellFunction` and its :class:`ShellResult`.

``ex.submit(ShellFunction("wc -l {path}"), path="/data/x")`` runs ``wc -l
/data/x`` with ``/bin/sh`` on the endpoint, in a fresh directory of the
task's own, and its future's value is a :class:`ShellResult`: the return
code and the last lines of stdout and stderr; the whole output stays in two
files in that directory.

*Where the task directory is* (``taskdirs.py``). On an unsandboxed
endpoint: ``$FEDEXEC_TASK_DIR`` if the worker's environment sets it (an
endpoint's ``worker_init`` or environment can), else ``tasks`` under the
fedexec home (``$FEDEXEC_HOME``, by default ``~/.fedexec``) of the account
the endpoint runs as; each task gets ``<that>/<task id>-<random>`` (mode
0700, its files 0600), made with ``*at`` calls that follow no symlink (by
the worker ahead of time, while the previous shell task ran: ``spare_taskdir.py``), and
left for the user (it is the task's output) until the endpoint's
``task_dir_ttl`` (7 days by default) expires it. In a sandbox
(``worker/sandbox.py``) the directory is made in the directory of that
worker's own under the same base (``<base>/sandbox-<random>``), the one
part of the base bound into its sandbox (at ``/task-kept``), and the
ShellResult's paths are the host's (a sandbox without one, as a pool of an
older version starts: the task's fresh sandbox directory, removed after
it, and the ShellResult's paths are None).

*Walltime.* The command leads a process group of its own; past ``walltime``
seconds the whole group is killed (SIGKILL), and so are the
processes that left the group (``setsid``) but are still descendants of the
shell, found through ``/proc``; the return code is then 124, as
``timeout(1)`` gives. Without a walltime, processes the command leaves
running in the background (``cmd &``) are left alone, as ``subprocess.run``
leaves them. A task timeout (``with_options(..., timeout=)``) is not a
walltime: the pool then kills the worker, and on an unsandboxed endpoint the
command, in a process group of its own, can outlive it (in a sandbox the whole
namespace goes); give commands a walltime.

*Subclasses* (MPI): :meth:`ShellFunction.command` is the one place that
turns the call's keyword arguments into the command line; override it to
prefix a launcher.

The values are put into the command as they are (``str.format``), not
quoted, as Globus Compute and Parsl do: quote untrusted values yourself
(``shlex.quote``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import select
import signal
import string
import subprocess
import sys
import time
from typing import Any, Iterator

from .config import ConfigError
from .spare_taskdir import SPARE
from .taskdirs import OUTPUT_FILES, SANDBOX_DIR_ENV, SANDBOX_HOST_DIR_ENV, base_path, create_file, make_task_dir
from .taskdirs import TASK_DIR_ENV  # noqa: F401  (the setting's name, as callers and tests import it from here)

TIMEOUT_CODE = 124                     # what timeout(1) returns for a command it killed
SNIPPET_BYTES = 1 << 20                # at most this much of each stream comes back in a snippet
SHELL = "/bin/sh"
_READ_BLOCK = 64 * 1024
_MAX_POLL_MS = 86_400_000              # a walltime is waited for a day at a time at most (poll takes an int)
# The command leads a process group of its own, which a walltime kills whole.
# process_group (Python 3.11+: setpgid in the child) rather than a new
# session (setsid), which costs a millisecond or more per command on some
# kernels (measured: 5.3 ms against 1.8 ms for a plain `true`).
OWN_GROUP: dict[str, Any] = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}


class ShellResult:
    """What a shell command did: ``returncode`` (124 if it ran past its
    walltime), the last lines of ``stdout`` and ``stderr`` (str, decoded as
    UTF-8 with replacement), the command as it ran (``cmd``), and where the
    whole output is (``stdout_file``, ``stderr_file`` in ``task_dir``: paths
    on the endpoint, None where the files are not kept, in a sandbox)."""

    __slots__ = ("cmd", "returncode", "stdout", "stderr", "stdout_file", "stderr_file", "task_dir", "timed_out")

    def __init__(self, cmd: str, returncode: int, stdout: str, stderr: str, *, stdout_file: str | None = None,
                 stderr_file: str | None = None, task_dir: str | None = None, timed_out: bool = False) -> None:
        self.cmd = cmd
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.stdout_file = stdout_file
        self.stderr_file = stderr_file
        self.task_dir = task_dir
        self.timed_out = timed_out

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in self.__slots__:
            setattr(self, name, state.get(name))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShellResult) and self.__getstate__() == other.__getstate__()

    def __repr__(self) -> str:
        return (f"ShellResult(cmd={self.cmd!r}, returncode={self.returncode}, "
                f"stdout={_short(self.stdout)!r}, stderr={_short(self.stderr)!r})")


class ShellFunction:
    """A shell command to run as a task; submit it with the values of its
    format fields as keyword arguments.

    ``cmd``: a ``str.format`` template with named fields only
    (``"wc -l {path}"``). ``walltime``: seconds the command may run (None:
    no limit); past it the command's process tree is killed and the return
    code is 124. ``snippet_lines``: how many last lines of stdout and stderr
    the ShellResult carries (each at most 1 MiB; 0: none). ``check``: a
    non-zero return code raises :class:`subprocess.CalledProcessError` (with
    ``output`` and ``stderr``: the snippets), as ``subprocess.run(check=True)``
    does; otherwise it is part of the value.

    Bad input fails here or in ``submit`` (a missing field, a positional
    argument), with an error that names it, before anything is sent.
    """

    def __init__(self, cmd: str, walltime: float | None = None, snippet_lines: int = 1000,
                 check: bool = False) -> None:
        if not isinstance(cmd, str):
            raise TypeError(f"ShellFunction's cmd must be a str (a format string), not {type(cmd).__name__}")
        if not cmd.strip():
            raise ConfigError("ShellFunction's cmd is empty")
        if walltime is not None:
            if isinstance(walltime, bool) or not isinstance(walltime, (int, float)):
                raise TypeError(f"ShellFunction's walltime must be a number of seconds or None, not {walltime!r}")
            if not walltime > 0:   # (NaN too)
                raise ConfigError(f"ShellFunction's walltime must be > 0 seconds, not {walltime!r}")
        if isinstance(snippet_lines, bool) or not isinstance(snippet_lines, int) or snippet_lines < 0:
            raise ConfigError(f"ShellFunction's snippet_lines must be an integer >= 0, not {snippet_lines!r}")
        if not isinstance(check, bool):
            raise TypeError(f"ShellFunction's check must be True or False, not {check!r}")
        self.cmd = cmd
        self.walltime = walltime
        self.snippet_lines = snippet_lines
        self.check = check
        self.fields = _fields(cmd)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cmd!r}, walltime={self.walltime!r})"

    # -- in the caller (submit) -------------------------------------------------------
    def check_call(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Raise (TypeError, naming the problem) unless a call with ``args``
        and ``kwargs`` can fill the command: keyword arguments only, one for
        each field. ``submit`` calls this before it sends anything."""
        if args:
            raise TypeError(f"{self!r} takes keyword arguments only (the command's fields), "
                            f"not {len(args)} positional")
        missing = [name for name in self.fields if name not in kwargs]
        if missing:
            raise TypeError(f"{self!r} needs a value for " + ", ".join(f"{{{name}}}" for name in missing)
                            + ": pass " + ", ".join(f"{name}=..." for name in missing) + " to submit")
        self.fill(kwargs)   # (an index or attribute the value lacks, a bad format spec)

    def fill(self, kwargs: dict[str, Any]) -> str:
        """``cmd`` filled from ``kwargs``; errors are TypeErrors naming the field."""
        try:
            return self.cmd.format(**kwargs)
        except (KeyError, IndexError, AttributeError, ValueError) as exc:
            raise TypeError(f"cannot fill {self!r} from {sorted(kwargs)}: {type(exc).__name__}: {exc}") from None

    def command(self, kwargs: dict[str, Any]) -> str:
        """The command line this call runs, made on the endpoint (in the
        worker, just before it starts; ``submit`` checks only the template,
        with :meth:`fill`): here ``cmd`` filled from ``kwargs``. The hook for
        subclasses that prefix a launcher (MPI), which may read the task's
        environment there."""
        return self.fill(kwargs)

    # -- on the endpoint ----------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> ShellResult:
        if args:
            raise TypeError(f"{self!r} takes keyword arguments only (the command's fields), "
                            f"not {len(args)} positional")
        cmd = self.command(kwargs)
        # (directory: as the caller may find it: the host's)
        directory, dir_fd, out_fd, err_fd, keep = _task_directory()
        out_path = os.path.join(directory, OUTPUT_FILES[0])
        err_path = os.path.join(directory, OUTPUT_FILES[1])
        try:   # (the files stay open here, to read the snippets back without opening them again)
            process = start(cmd, dir_fd, out_fd, err_fd)
            if _in_worker():   # the next task's directory, made while this command runs
                SPARE.refill_soon()
            timed_out = False
            try:
                returncode = wait(process, self.walltime)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_tree(process)
                returncode = TIMEOUT_CODE
            except BaseException:   # (the task cancelled or the worker stopping: take the command with it)
                kill_tree(process)
                raise
            stdout = tail_lines(out_fd, self.snippet_lines)
            stderr = tail_lines(err_fd, self.snippet_lines)
        finally:
            os.close(out_fd)
            os.close(err_fd)
            os.close(dir_fd)
        if not keep:
            out_path = err_path = directory = None   # type: ignore[assignment]
        if self.check and returncode != 0:
            raise subprocess.CalledProcessError(returncode, cmd, output=stdout, stderr=stderr)
        return ShellResult(cmd, returncode, stdout, stderr, stdout_file=out_path, stderr_file=err_path,
                           task_dir=directory, timed_out=timed_out)


def _fields(cmd: str) -> tuple[str, ...]:
    """The named fields of ``cmd`` (each once, in order); ValueError for a
    malformed template or a positional field."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(cmd))
    except ValueError as exc:
        raise ConfigError(f"ShellFunction's cmd {cmd!r} is not a valid format string: {exc} "
                         f"(write a literal brace as {{{{ or }}}})") from None
    for _, field, spec, _ in parsed:
        if field is None:
            continue
        name = field.split(".", 1)[0].split("[", 1)[0]
        if not name or name.isdigit():
            raise ConfigError(f"ShellFunction's cmd {cmd!r} has a positional field {{{field}}}: name every field "
                             f"(as in {{path}}) and pass its value as a keyword argument")
        for inner in string.Formatter().parse(spec or ""):   # nested fields in a format spec
            if inner[1] is not None:
                raise ConfigError(f"ShellFunction's cmd {cmd!r}: fields inside a format spec are not supported")
        if name not in names:
            names.append(name)
    return tuple(names)


def _task_directory() -> tuple[str, int, int, int, bool]:
    """A fresh private directory for this task with its stdout and stderr
    files: its path, descriptors of it and of the two files, and whether it
    is kept after the task (see the module's docstring)."""
    from .worker import process   # the worker running this task (imported there already)

    if process.sandboxed_task_dir is not None:
        kept = os.environ.get(SANDBOX_DIR_ENV)
        if not kept:   # (a sandbox without a directory kept for it: the task's own, removed after it)
            fd = os.open(process.sandboxed_task_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            return (process.sandboxed_task_dir, fd, *_output_files(fd), False)
        path, fd, out_fd, err_fd = _made_task_dir(kept, process.current_task_id)
        host = os.environ.get(SANDBOX_HOST_DIR_ENV)   # where it is on the host, which results name
        return (os.path.join(host, os.path.basename(path)) if host else path), fd, out_fd, err_fd, True
    return (*_made_task_dir(base_path(), process.current_task_id), True)


def _in_worker() -> bool:
    """Whether this process is a worker running a task (not a program
    calling a ShellFunction itself, which is left no spare directory)."""
    from .worker import process   # (imported there already)

    return process.current_task_id is not None


def _made_task_dir(base: str, task_id: bytes | None) -> tuple[str, int, int, int]:
    """Task ``task_id``'s directory under ``base`` with its two output
    files: the one its worker made ahead of time if it fits
    (``spare_taskdir.py``), else made now."""
    taken = SPARE.take(base, task_id)
    if taken is not None:
        return taken
    path, fd = make_task_dir(base, task_id)
    return (path, fd, *_output_files(fd))


def _output_files(dir_fd: int) -> tuple[int, int]:
    """New ``stdout`` and ``stderr`` files in the directory open on
    ``dir_fd``, whose descriptor is closed if they cannot be made."""
    try:
        out_fd = create_file(dir_fd, OUTPUT_FILES[0])
        try:
            return out_fd, create_file(dir_fd, OUTPUT_FILES[1])
        except BaseException:
            os.close(out_fd)
            raise
    except BaseException:
        os.close(dir_fd)
        raise


def start(cmd: str, dir_fd: int, out_fd: int, err_fd: int) -> subprocess.Popen:
    """``cmd`` started by SHELL in the directory open on ``dir_fd`` (as
    opened: no path is looked up again, so nothing put in its place since
    is followed), its stdin /dev/null, its stdout and stderr onto
    ``out_fd`` and ``err_fd``, leading a process group of its own.

    Where ``/proc/self/fd`` exists the child changes into the directory
    itself, through its descriptor's magic link (which names the directory
    open on it, not a path), so the worker's own working directory is never
    touched and no descriptor of it is opened and closed per command;
    elsewhere the worker changes in with ``fchdir`` and back (the child
    starts where its parent is). The child is started with vfork (no
    ``preexec_fn``, no ``start_new_session``: see OWN_GROUP), so its cost
    does not grow with the worker's memory."""
    argv = [SHELL, "-c", cmd]
    if _proc_fd_links():
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_fd, stderr=err_fd,
                                cwd=f"/proc/self/fd/{dir_fd}", **OWN_GROUP)
    with _working_directory(dir_fd):
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_fd, stderr=err_fd, **OWN_GROUP)


@functools.lru_cache(maxsize=1)
def _proc_fd_links() -> bool:
    """Whether this process sees its descriptors in ``/proc/self/fd`` (not
    in every container or on every OS); asked once per process."""
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return os.path.samefile(f"/proc/self/fd/{fd}", "/")
    except OSError:
        return False
    finally:
        os.close(fd)


def wait(process: subprocess.Popen, walltime: float | None) -> int:
    """``process``'s return code once it ends; past ``walltime`` seconds
    (None: no limit) :class:`subprocess.TimeoutExpired`, the process left
    running.

    With a walltime the end is noticed at once, through a pidfd polled
    until the deadline (Linux 5.3+): ``Popen.wait(timeout)`` instead looks
    at the process at doubling intervals of up to 50 ms, which added tens of
    milliseconds to every command that ran longer than a few. Without
    pidfds (older kernels, a seccomp filter refusing the call) it falls back
    to ``Popen.wait(timeout)``. No thread is started either way."""
    if walltime is None:
        return process.wait()
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):   # (no pidfd_open here: Python or kernel too old, or refused)
        return process.wait(walltime)
    try:
        deadline = time.monotonic() + walltime
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # (poll's timeout is an int of milliseconds: at most a day at a time)
            if poller.poll(min(math.ceil(left * 1000), _MAX_POLL_MS)):
                return process.wait()   # (it ended: reaped at once)
    finally:
        os.close(pidfd)
    returncode = process.poll()   # (it may have ended just as the time ran out)
    if returncode is not None:
        return returncode
    raise subprocess.TimeoutExpired(process.args, walltime)


@contextlib.contextmanager
def _working_directory(dir_fd: int) -> Iterator[None]:
    """This process's working directory is the one open on ``dir_fd``
    meanwhile (a child started here starts there), then back where it was
    (or at / if that cannot be opened: it was removed)."""
    try:
        saved: int | None = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        saved = None
    try:
        os.fchdir(dir_fd)
        yield
    finally:
        if saved is not None:
            os.fchdir(saved)
            os.close(saved)
        else:
            os.chdir("/")


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL ``process``'s process group (it leads one) and the
    descendants that left it, then reap ``process``."""
    strays = _descendants(process.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid in strays:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    # a descendant forked meanwhile by one not yet dead: one more look
    for pid in _descendants(process.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def _descendants(root: int) -> list[int]:
    """The pids of ``root``'s living descendants, from /proc (empty where
    there is no /proc). Processes whose parent has died are reparented
    away and are not found: the group kill covers those still in it."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def tail_lines(fd: int, lines: int, limit: int = SNIPPET_BYTES) -> str:
    """The last ``lines`` lines of the file open on ``fd`` (at most
    ``limit`` bytes of them), read from its end (``pread``: the descriptor's
    offset is left alone), decoded as UTF-8 with replacement."""
    if lines <= 0:
        return ""
    pos = os.fstat(fd).st_size
    data = b""
    while pos > 0 and len(data) < limit:
        step = min(_READ_BLOCK, pos)
        pos -= step
        data = os.pread(fd, step, pos) + data
        # lines + 1 newlines seen (the last line may end with one): enough
        if data.count(b"\n", 0, len(data) - 1) >= lines:
            break
    body = data[:-1] if data.endswith(b"\n") else data
    kept = body.split(b"\n")[-lines:]
    text = b"\n".join(kept) + (b"\n" if data.endswith(b"\n") else b"")
    if len(text) > limit:
        text = text[-limit:]
    return text.decode("utf-8", errors="replace")


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]
