"""The CLI tour, as a user runs it: a relay and two endpoints as separate
processes, one client sending to each by endpoint id."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fedexec import FederatedExecutor

FEDEXEC = [sys.executable, "-m", "fedexec.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fedexec(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run([*FEDEXEC, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"fedexec {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def endpoint_name() -> str:
    """Runs on the endpoint: which endpoint am I? (set by the test through the config dir)"""
    import os

    return os.environ.get("FEDEXEC_TEST_ENDPOINT", "?")


def pid_of(path: Path) -> int | None:
    import json

    try:
        return int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture
def relay(fedexec_home):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    pid = None
    try:
        out = fedexec("relay", "start", "--daemon", "--port", str(port)).stdout
        pid = pid_of(fedexec_home / "relay" / "relay.json")
        assert address in out
        yield address
    finally:
        fedexec("relay", "stop", check=False)
        if pid and psutil.pid_exists(pid):
            psutil.Process(pid).kill()


@pytest.mark.timeout(120)
def test_relay_and_two_endpoints_by_cli(relay, fedexec_home, monkeypatch):
    ids = {}
    for name in ("alpha", "beta"):
        out = fedexec("endpoint", "configure", name, "--relay", relay, "--max-workers", "1").stdout
        assert "configured endpoint" in out
        # the worker processes inherit the endpoint's environment: tag them
        monkeypatch.setenv("FEDEXEC_TEST_ENDPOINT", name)
        # as a user installs their code on an endpoint: this module is importable there
        monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
        start = fedexec("endpoint", "start", name, "--daemon")
        ids[name] = start.stdout.strip().splitlines()[-1]
    monkeypatch.delenv("FEDEXEC_TEST_ENDPOINT")
    monkeypatch.delenv("PYTHONPATH")
    pids = [pid_of(fedexec_home / "endpoints" / n / "endpoint.json") for n in ids]
    try:
        listing = fedexec("endpoint", "list").stdout
        for name, endpoint_id in ids.items():
            line = next(l for l in listing.splitlines() if l.startswith(name))
            assert endpoint_id in line and "running" in line
        status = fedexec("endpoint", "status", "alpha").stdout
        assert "connected" in status and ids["alpha"] in status

        for name, endpoint_id in ids.items():
            with FederatedExecutor(endpoint_id, relay=relay) as ex:
                assert ex.endpoint_name == name
                results = {f.result(timeout=30) for f in [ex.submit(endpoint_name) for _ in range(10)]}
                assert results == {name}

        # the endpoint id is stable across restarts
        fedexec("endpoint", "stop", "beta")
        assert "stopped" in next(l for l in fedexec("endpoint", "list").stdout.splitlines() if l.startswith("beta"))
        again = fedexec("endpoint", "start", "beta", "--daemon").stdout.strip().splitlines()[-1]
        assert again == ids["beta"]
        pids.append(pid_of(fedexec_home / "endpoints" / "beta" / "endpoint.json"))
        with FederatedExecutor(ids["beta"], relay=relay) as ex:
            assert ex.submit(pow, 3, 4).result(timeout=30) == 81
    finally:
        for name in ids:
            fedexec("endpoint", "stop", name, check=False)
        for pid in pids:
            if pid and psutil.pid_exists(pid):
                psutil.Process(pid).kill()
    listing = fedexec("endpoint", "list").stdout
    assert "running" not in listing


@pytest.mark.timeout(60)
def test_cli_errors_are_clear(fedexec_home):
    bad = fedexec("endpoint", "start", "nosuch", check=False)
    assert bad.returncode == 1 and "not configured" in bad.stderr and "Traceback" not in bad.stderr
    bad = fedexec("endpoint", "configure", "bad/name", check=False)
    assert bad.returncode == 1 and "invalid endpoint name" in bad.stderr
    bad = fedexec("endpoint", "configure", "ok", "--relay", "http://x", check=False)
    assert bad.returncode == 1 and "tcp://" in bad.stderr
    status = fedexec("relay", "status", check=False)
    assert status.returncode == 3 and "stopped" in status.stdout


@pytest.mark.timeout(60)
def test_relay_refuses_a_second_instance(relay):
    second = fedexec("relay", "start", "--daemon", "--port", str(free_port()), check=False)
    assert second.returncode == 1 and "already running" in second.stderr


@pytest.mark.timeout(60)
def test_bad_config_values_are_named(fedexec_home):
    fedexec("endpoint", "configure", "good")
    fedexec("endpoint", "configure", "typo")
    path = fedexec_home / "endpoints" / "typo" / "config.toml"
    path.write_text(path.read_text().replace("max_workers = 0", 'max_workers = "4"'))
    bad = fedexec("endpoint", "start", "typo", check=False)
    assert bad.returncode == 1 and "max_workers must be an int" in bad.stderr and "Traceback" not in bad.stderr
    listing = fedexec("endpoint", "list").stdout
    assert "misconfigured" in listing and "good" in listing
