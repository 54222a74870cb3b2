"""``fedexec endpoint restart``, ``delete NAME [--yes]`` and the
``--exclusive`` configure flag (issue 16, item 6), through the real CLI,
relay and endpoint daemons."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from fedexec.config import EndpointConfig, endpoint_dir
from fedexec.pidfile import PidFile
from test_faults import running_relay


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "fedexec.cli", *args], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    if check:
        assert out.returncode == 0, f"fedexec {' '.join(args)}: {out.stdout}{out.stderr}"
    return out


def running_pid(name: str) -> int | None:
    record = PidFile(endpoint_dir(name) / "endpoint.json").read() if endpoint_dir(name).exists() else None
    return int(record["pid"]) if record else None


@contextlib.contextmanager
def daemons_stopped(pids: list[int]):
    """Whatever endpoint daemon a failing test left running is stopped, by its pid."""
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                children = proc.children(recursive=True)
                proc.kill()
                psutil.wait_procs([proc, *children], timeout=10)


def test_exclusive_is_a_configure_flag():
    cli("endpoint", "configure", "hpc", "--provider", "slurm", "--partition", "debug", "--no-exclusive")
    assert EndpointConfig.load("hpc").provider.exclusive is False
    assert "exclusive = false" in (endpoint_dir("hpc") / "config.toml").read_text()
    cli("endpoint", "configure", "hpc", "--exclusive")
    assert EndpointConfig.load("hpc").provider.exclusive is True
    cli("endpoint", "configure", "hpc", "--max-blocks", "3")   # not given: kept
    assert EndpointConfig.load("hpc").provider.exclusive is True


@pytest.mark.timeout(240)
def test_restart_then_delete_an_endpoint(tmp_path):
    started: list[int] = []
    with running_relay(tmp_path) as relay, daemons_stopped(started):
        cli("endpoint", "configure", "ep", "--relay", relay, "--max-workers", "1")
        cli("endpoint", "start", "ep", "--daemon")
        first = running_pid("ep")
        assert first is not None
        started.append(first)
        out = cli("endpoint", "restart", "ep")
        second = running_pid("ep")
        assert second is not None and second != first and "running" in out.stdout, out.stdout
        started.append(second)
        assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
        # asked first: with no terminal to ask on, nothing happens without --yes
        refused = cli("endpoint", "delete", "ep", check=False)
        assert refused.returncode != 0 and "--yes" in refused.stderr + refused.stdout
        assert running_pid("ep") == second and (endpoint_dir("ep") / "config.toml").exists()
        out = cli("endpoint", "delete", "ep", "--yes")
        assert "deleted endpoint ep" in out.stdout
        assert f"the relay at {relay} forgot endpoint" in out.stdout, out.stdout   # (local mode: told too)
        assert not endpoint_dir("ep").exists()
        psutil.wait_procs([psutil.Process(second)] if psutil.pid_exists(second) else [], timeout=10)
        assert not psutil.pid_exists(second) or psutil.Process(second).status() == psutil.STATUS_ZOMBIE
        assert "not configured" in cli("endpoint", "status", "ep", check=False).stderr


@pytest.mark.timeout(240)
def test_status_says_when_the_config_file_differs_from_the_running_endpoint(tmp_path):
    started: list[int] = []
    with running_relay(tmp_path) as relay, daemons_stopped(started):
        cli("endpoint", "configure", "ep", "--relay", relay, "--max-workers", "1")
        cli("endpoint", "start", "ep", "--daemon")
        started.append(running_pid("ep"))
        deadline = time.monotonic() + 30
        while "workers:" not in (out := cli("endpoint", "status", "ep").stdout):
            assert time.monotonic() < deadline, out
            time.sleep(0.5)
        assert "settings:" not in out, out
        cli("endpoint", "configure", "ep", "--max-workers", "2", "--max-blocks", "3")
        out = cli("endpoint", "status", "ep").stdout
        assert "its config file changed since it started (max_workers, provider.max_blocks differ)" in out, out
        assert "fedexec endpoint restart ep" in out
        cli("endpoint", "restart", "ep")
        started.append(running_pid("ep"))
        deadline = time.monotonic() + 30
        while "workers:" not in (out := cli("endpoint", "status", "ep").stdout):
            assert time.monotonic() < deadline, out
            time.sleep(0.5)
        assert "settings:" not in out, out
        cli("endpoint", "stop", "ep")


@pytest.mark.timeout(240)
def test_logs_prints_the_endpoints_log_and_follows_it(tmp_path):
    started: list[int] = []
    with running_relay(tmp_path) as relay, daemons_stopped(started):
        cli("endpoint", "configure", "ep", "--relay", relay, "--max-workers", "1")
        assert "has no log yet" in cli("endpoint", "logs", "ep", check=False).stderr
        cli("endpoint", "start", "ep", "--daemon")
        started.append(running_pid("ep"))
        out = cli("endpoint", "logs", "ep").stdout
        assert "connected to relay" in out, out
        assert len(cli("endpoint", "logs", "ep", "-n", "1").stdout.splitlines()) == 1
        follower = subprocess.Popen([sys.executable, "-m", "fedexec.cli", "endpoint", "logs", "ep", "-f", "-n", "0"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            time.sleep(1.0)   # (it is following)
            cli("endpoint", "stop", "ep")
            cli("endpoint", "start", "ep", "--daemon")
            started.append(running_pid("ep"))
            deadline = time.monotonic() + 30
            seen = b""
            os.set_blocking(follower.stdout.fileno(), False)
            while b"connected to relay" not in seen:
                assert time.monotonic() < deadline, f"-f did not show the restarted endpoint's lines: {seen!r}"
                seen += follower.stdout.read() or b""
                time.sleep(0.2)
        finally:
            follower.send_signal(signal.SIGINT)   # our own child, by pid
            follower.wait(10)
        assert follower.returncode == 0
        cli("endpoint", "stop", "ep")
