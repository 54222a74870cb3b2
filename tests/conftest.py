"""Shared fixtures: real relays, endpoints and workers on loopback/ipc."""

from __future__ import annotations

import os

import psutil
import pytest

from fedexec import FederatedExecutor

# the `slurm_cluster` fixture: a real single-node Slurm on loopback, one per session
pytest_plugins = ["slurm_cluster"]


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
