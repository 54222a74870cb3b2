"""How a shell task's command is started and waited for (shell.start,
shell.wait), run in this process with real shells: it starts in its task's
directory without moving the caller's, and a walltime's wait notices the
command's end at once (a pidfd), not at the next of doubling polls."""

from __future__ import annotations

import os
import time

import pytest

from fedexec import ShellFunction
from fedexec import shell
from fedexec.shell import TASK_DIR_ENV


@pytest.fixture
def task_base(tmp_path, monkeypatch):
    base = tmp_path / "tasks"
    monkeypatch.setenv(TASK_DIR_ENV, str(base))
    return base


def test_the_command_runs_in_its_directory_and_the_caller_stays_where_it_was(task_base, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = ShellFunction("pwd -P; echo oops >&2; exit 3")()
    assert result.returncode == 3
    assert result.stdout.strip() == os.path.realpath(result.task_dir)
    assert os.path.dirname(result.task_dir) == str(task_base)
    assert result.stderr == "oops\n"
    assert os.getcwd() == str(elsewhere)


def test_without_descriptor_links_the_worker_changes_in_and_back(task_base, tmp_path, monkeypatch):
    """A process that cannot see /proc/self/fd (some containers) starts the
    command from the directory with fchdir, and goes back after."""
    def no_links(*args):
        raise OSError("no /proc here")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(os.path, "samefile", no_links)
    shell._proc_fd_links.cache_clear()
    try:
        assert shell._proc_fd_links() is False
        result = ShellFunction("pwd -P")()
    finally:
        shell._proc_fd_links.cache_clear()
    assert result.stdout.strip() == os.path.realpath(result.task_dir)
    assert os.getcwd() == str(elsewhere)


def _sleeps(fn: ShellFunction) -> int:
    """The times this thread went to sleep while ``fn`` ran (its voluntary
    context switches): a count, not a duration, so a loaded machine does not
    change it."""
    def switches() -> int:
        with open("/proc/thread-self/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
        raise AssertionError("no voluntary_ctxt_switches in /proc/thread-self/status")

    before = switches()
    result = fn()
    assert result.returncode == 0, result
    return switches() - before


def test_a_walltime_waits_for_the_end_of_the_command_not_in_polls(task_base):
    """Popen.wait(timeout) looks at the process at doubling intervals of up
    to 50 ms (a 0.3 s command: 12 sleeps, and its end seen up to 50 ms
    late); the pidfd wait sleeps once, until the command ends, as a wait
    without a walltime does: about as many sleeps with a walltime as without.
    (A sleep or two more happen on a loaded machine, a page brought in or a
    lock waited for: CI saw 4 against 2 once; polling would be 12 or so.)"""
    plain = ShellFunction("sleep 0.3")
    limited = ShellFunction("sleep 0.3", walltime=60)
    without = min(_sleeps(plain) for _ in range(3))
    with_walltime = min(_sleeps(limited) for _ in range(3))
    assert with_walltime <= without + 3, (with_walltime, without)
    started = time.perf_counter()
    limited()
    assert 0.3 <= time.perf_counter() - started < 20


def test_without_pidfds_a_walltime_still_kills_and_codes_come_back(task_base, monkeypatch):
    """Where pidfd_open is missing or refused (old kernels, seccomp), the
    wait falls back to Popen.wait(timeout): same results."""
    def refused(pid, flags=0):
        raise PermissionError(1, "refused by a seccomp filter")

    monkeypatch.setattr(os, "pidfd_open", refused)
    started = time.monotonic()
    killed = ShellFunction("sleep 100 & sleep 100", walltime=0.5)()
    assert killed.returncode == shell.TIMEOUT_CODE and killed.timed_out
    assert time.monotonic() - started < 20
    done = ShellFunction("exit 7", walltime=30)()
    assert done.returncode == 7 and not done.timed_out


def test_a_walltime_kills_at_its_deadline_not_before(task_base):
    started = time.monotonic()
    result = ShellFunction("sleep 100", walltime=0.4)()
    elapsed = time.monotonic() - started
    assert result.returncode == shell.TIMEOUT_CODE and result.timed_out
    assert 0.4 <= elapsed < 20, elapsed
    quick = ShellFunction("echo done", walltime=0.4)()
    assert (quick.returncode, quick.stdout, quick.timed_out) == (0, "done\n", False)
