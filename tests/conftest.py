"""Shared fixtures: real relays, endpoints and workers on loopback/ipc."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil
import pytest

from fedexec import FederatedExecutor

# the `slurm_cluster` fixture: a real single-node Slurm on loopback, one per session
pytest_plugins = ["slurm_cluster"]


# The fedexec home the suite must leave untouched: the one programs run outside
# the tests would use (``$FEDEXEC_HOME`` as the run started, else ~/.fedexec).
REAL_HOME = Path(os.environ.get("FEDEXEC_HOME") or Path.home() / ".fedexec")


def _home_entries(home: Path) -> set[str]:
    """What is in a fedexec home, two levels deep (its relays' keys, endpoints, task directories...)."""
    entries: set[str] = set()
    try:
        top = list(os.scandir(home))
    except OSError:
        return entries
    for entry in top:
        entries.add(entry.name)
        if entry.is_dir(follow_symlinks=False):
            try:
                entries.update(f"{entry.name}/{inner.name}" for inner in os.scandir(entry.path))
            except OSError:
                pass
    return entries


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config._real_home_before = _home_entries(REAL_HOME)   # (also in each xdist worker: each checks)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The suite leaves the real fedexec home as it found it: anything that
    appeared there came from a process of the tests that used the default
    home (a fixture or subprocess without the private one below), unless
    another fedexec program of the same user (a benchmark, a real endpoint)
    wrote there at the same time, which the message says too."""
    before = getattr(session.config, "_real_home_before", None)
    if before is None:
        return
    new = sorted(_home_entries(REAL_HOME) - before)
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = (f"{len(new)} entr{'y' if len(new) == 1 else 'ies'} appeared in the real fedexec home {REAL_HOME} "
                   f"while the tests ran: a test used it (every test must use a private one: see tests/conftest.py), "
                   f"or another fedexec program of this user ran meanwhile (run the tests alone to tell): "
                   f"{', '.join(new[:20])}{' ...' if len(new) > 20 else ''}")
        if reporter is not None:
            reporter.write_line(f"FAILED (real fedexec home): {message}", red=True)
        else:
            print(message, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def session_fedexec_home(tmp_path_factory):
    """A private fedexec home for the whole session, set before any module-
    or session-scoped fixture starts a relay, endpoint or executor (those
    come before a test's own home below, and would otherwise use ~/.fedexec:
    relay keys and shell tasks' directories piled up there)."""
    home = tmp_path_factory.mktemp("session-fedexec-home")
    patch = pytest.MonkeyPatch()
    patch.setenv("FEDEXEC_HOME", str(home))
    patch.delenv("FEDEXEC_RELAY", raising=False)
    yield home
    patch.undo()


@pytest.fixture(autouse=True)
def fedexec_home(tmp_path, monkeypatch):
    """Each test gets its own fedexec home, so nothing touches ~/.fedexec."""
    home = tmp_path / "fedexec-home"
    monkeypatch.setenv("FEDEXEC_HOME", str(home))
    monkeypatch.delenv("FEDEXEC_RELAY", raising=False)
    return home


@pytest.fixture(scope="module")
def executor():
    """One embedded-default executor (private relay + local endpoint, 2
    workers) shared by a module's tests; shut down at the module's end."""
    ex = FederatedExecutor(max_workers=2)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


def child_processes() -> list[psutil.Process]:
    return psutil.Process(os.getpid()).children(recursive=True)


def wait_no_children(timeout: float = 10.0) -> list[psutil.Process]:
    """Children still alive after waiting up to ``timeout`` seconds."""
    gone, alive = psutil.wait_procs(child_processes(), timeout=timeout)
    return alive


def workers_of(pid: int) -> list[psutil.Process]:
    """The worker processes under an endpoint (they run in its pools)."""
    found = []
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            if "fedexec.worker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found
