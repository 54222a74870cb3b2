"""``fedexec relay start --endpoint NAME``: a configured endpoint run inside
the relay's process, on its loop (colocated.py ``host_configured_endpoint``),
through the real CLI and daemons: tasks run, the endpoint's own commands see
it, ``relay stop`` stops both, what cannot work is refused before anything
starts, and a kill -9 of the one process loses no accepted task."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import cloudpickle
import psutil
import pytest

from fedexec import FederatedExecutor
from fedexec.config import endpoint_dir, relay_dir
from fedexec.pidfile import PidFile
from test_cli_lifecycle import cli, daemons_stopped
from test_faults import free_port

cloudpickle.register_pickle_by_value(sys.modules[__name__])   # (the daemons' workers cannot import this file)


def slow_square(x: float) -> float:
    import time as _time

    _time.sleep(0.2)
    return x * x


def _record(name: str) -> dict | None:
    return PidFile(endpoint_dir(name) / "endpoint.json").read()


def _relay_record() -> dict | None:
    return PidFile(relay_dir() / "relay.json").read()


def _loopback() -> tuple[str, str]:
    """A free loopback address and its port."""
    port = str(free_port())
    return f"tcp://127.0.0.1:{port}", port


def _start_inside(port: str, name: str, started: list[int]) -> tuple[int, str]:
    """``fedexec relay start --daemon --endpoint NAME``: the relay's pid
    (added to ``started``) and the endpoint's id."""
    out = cli("relay", "start", "--port", port, "--daemon", "--endpoint", name)
    assert f"endpoint {name} running inside the relay" in out.stdout, out.stdout
    pid = int(_relay_record()["pid"])
    started.append(pid)
    return pid, _record(name)["endpoint_id"]


@pytest.mark.timeout(240)
def test_an_endpoint_runs_inside_the_relay_and_stops_with_it():
    address, port = _loopback()
    cli("endpoint", "configure", "inner", "--relay", address, "--max-workers", "2")
    started: list[int] = []
    with daemons_stopped(started):
        pid, _ = _start_inside(port, "inner", started)
        relay = _relay_record()
        record = _record("inner")
        assert record is not None and record["pid"] == relay["pid"] == pid and record["in_relay"] is True
        assert record["status"] == "connected"
        listed = cli("endpoint", "list").stdout
        assert "running" in listed and str(relay["pid"]) in listed and "connected" in listed, listed
        logs = cli("endpoint", "logs", "inner").stdout   # the relay's log: the endpoint's lines are there
        assert "runs inside the relay" in logs and "relay listening on" in logs, logs
        endpoint_id = record["endpoint_id"]
        relay_proc = psutil.Process(int(relay["pid"]))
        with FederatedExecutor(endpoint_id, relay=address) as ex:
            assert list(ex.map(slow_square, range(6))) == [x * x for x in range(6)]
            # no endpoint process of its own: only workers run beside the relay, as its children
            for child in relay_proc.children(recursive=True):
                assert "fedexec.endpoint" not in " ".join(child.cmdline()), child.cmdline()
        refused = cli("endpoint", "stop", "inner", check=False)
        assert refused.returncode != 0 and "relay stop" in refused.stderr, refused.stderr
        assert relay_proc.is_running()
        out = cli("relay", "stop")
        assert "stopped" in out.stdout
        assert not relay_proc.is_running() or relay_proc.status() == psutil.STATUS_ZOMBIE
        assert not (endpoint_dir("inner") / "endpoint.json").exists()
        assert "stopped" in cli("endpoint", "list").stdout


@pytest.mark.timeout(240)
def test_what_cannot_run_inside_the_relay_is_refused_before_it_starts(tmp_path):
    address, port = _loopback()

    def refused(*args: str) -> str:
        out = cli("relay", "start", "--port", port, "--daemon", *args, check=False)
        assert out.returncode != 0, out.stdout
        assert _relay_record() is None and not (relay_dir() / "relay.log").exists()
        return out.stderr

    assert "--endpoint nowhere" in refused("--endpoint", "nowhere")
    cli("endpoint", "configure", "elsewhere", "--relay", "tcp://127.0.0.1:1")
    err = refused("--endpoint", "elsewhere")
    assert "tcp://127.0.0.1:1" in err and address in err, err
    cli("endpoint", "configure", "inner", "--relay", address)
    err = refused("--endpoint", "inner", "--auth", "token")
    assert "--auth local" in err, err
    cli("endpoint", "configure", "anyport", "--relay", "tcp://127.0.0.1:0")
    out = cli("relay", "start", "--port", "0", "--daemon", "--endpoint", "anyport", check=False)
    assert out.returncode != 0 and "fixed port" in out.stderr, out.stderr
    assert shutil.which("apptainer") is None, "this test needs a sandbox tool this machine lacks: apptainer is here"
    cli("endpoint", "configure", "boxed", "--relay", address, "--sandbox", "apptainer", "--sandbox-image", "x.sif")
    err = refused("--endpoint", "boxed")
    assert "--endpoint boxed" in err and "apptainer" in err, err
    # the same checks in the relay itself (python -m fedexec.relay, as a service manager runs it)
    out = subprocess.run([sys.executable, "-m", "fedexec.relay", "--address", address, "--data-dir",
                          str(tmp_path / "data"), "--endpoint", "elsewhere"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode != 0 and "tcp://127.0.0.1:1" in out.stderr, out.stderr
    assert not (tmp_path / "data").exists()
    # an endpoint already running on its own is not started a second time inside the relay
    started: list[int] = []
    with daemons_stopped(started):
        cli("relay", "start", "--port", port, "--daemon")
        started.append(int(_relay_record()["pid"]))
        cli("endpoint", "start", "inner", "--daemon")
        started.append(int(_record("inner")["pid"]))
        cli("relay", "stop")
        out = cli("relay", "start", "--port", port, "--daemon", "--endpoint", "inner", check=False)
        assert out.returncode != 0 and "already running on its own" in out.stderr, out.stderr
        cli("endpoint", "stop", "inner")


@pytest.mark.timeout(300)
def test_a_kill_9_of_the_relay_with_its_endpoint_loses_no_task():
    address, port = _loopback()
    cli("endpoint", "configure", "inner", "--relay", address, "--max-workers", "2")
    started: list[int] = []
    with daemons_stopped(started):
        first, endpoint_id = _start_inside(port, "inner", started)
        with FederatedExecutor(endpoint_id, relay=address) as ex:
            futures = [ex.submit(slow_square, x) for x in range(30)]
            futures[0].result(timeout=60)   # accepted and running
            workers = psutil.Process(first).children(recursive=True)
            os.kill(first, signal.SIGKILL)
            psutil.wait_procs([psutil.Process(first)], timeout=10) if psutil.pid_exists(first) else None
            # its workers see their pool gone and leave by themselves
            psutil.wait_procs(workers, timeout=30)
            deadline = time.monotonic() + 30
            while True:   # the dead process's pid files and lock no longer count as running
                out = cli("relay", "start", "--port", port, "--daemon", "--endpoint", "inner", check=False)
                if out.returncode == 0:
                    break
                assert time.monotonic() < deadline, out.stderr
                time.sleep(0.5)
            started.append(int(_relay_record()["pid"]))
            assert [f.result(timeout=120) for f in futures] == [x * x for x in range(30)]
        cli("relay", "stop")


@pytest.mark.timeout(240)
def test_an_endpoint_starting_elsewhere_is_not_run_a_second_time(tmp_path):
    """Whatever runs a configured endpoint takes its lock before anything
    starts (its endpoint.json comes only later): while another process holds
    it, neither a relay with --endpoint nor a standalone endpoint runs it."""
    address, port = _loopback()
    cli("endpoint", "configure", "inner", "--relay", address, "--max-workers", "1")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fedexec.config import endpoint_lock; "
                               "assert endpoint_lock('inner', hold=True); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _record("inner") is None   # (no pid file yet: only the lock says it is starting)
        out = cli("relay", "start", "--port", port, "--daemon", "--endpoint", "inner", check=False)
        assert out.returncode != 0 and "lock is held" in out.stderr, out.stderr
        assert _relay_record() is None
        out = subprocess.run([sys.executable, "-m", "fedexec.relay", "--address", address, "--data-dir",
                              str(tmp_path / "data"), "--endpoint", "inner"],
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert out.returncode != 0 and "lock is held" in out.stderr, out.stderr
        out = subprocess.run([sys.executable, "-m", "fedexec.endpoint", "--name", "inner"],
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert out.returncode != 0 and "already running" in out.stderr, out.stderr
    finally:
        holder.stdin.close()
        holder.wait(30)
    started: list[int] = []
    with daemons_stopped(started):   # its holder gone, it starts
        _start_inside(port, "inner", started)
        cli("relay", "stop")


@pytest.mark.timeout(240)
def test_an_endpoint_deleted_at_the_relay_is_refused_before_it_serves():
    from fedexec.config import EndpointConfig

    address, port = _loopback()
    cli("endpoint", "configure", "gone", "--relay", address, "--max-workers", "1")
    deleted_id = EndpointConfig.load("gone").endpoint_id
    started: list[int] = []
    with daemons_stopped(started):
        cli("relay", "start", "--port", port, "--daemon")
        started.append(int(_relay_record()["pid"]))
        cli("endpoint", "start", "gone", "--daemon")
        started.append(int(_record("gone")["pid"]))
        assert "forgot endpoint" in cli("endpoint", "delete", "gone", "--yes").stdout
        cli("relay", "stop")
    config = EndpointConfig(name="again", relay=address, max_workers=1)
    config.endpoint_id = deleted_id   # (its old config kept somewhere, say)
    config.save()
    out = cli("relay", "start", "--port", port, "--daemon", "--endpoint", "again", check=False)
    assert out.returncode != 0 and "was deleted by its owner" in out.stdout + out.stderr, out.stdout + out.stderr
    assert _relay_record() is None and _record("again") is None
    assert not list((relay_dir().parent / "relays").glob("*")), "its discovery files are left"
