"""``fedexec relay start --endpoint NAME``: a configured endpoint run inside
the relay's process, on its loop (colocated.py ``host_configured_endpoint``),
through the real CLI and daemons: tasks run, the endpoint's own commands see
it, ``relay stop`` stops both, what cannot work is refused before anything
starts, and a kill -9 of the one process loses no accepted task."""

from __future__ import annotations

import os
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


@pytest.mark.timeout(240)
def test_an_endpoint_runs_inside_the_relay_and_stops_with_it():
    address = f"tcp://127.0.0.1:{free_port()}"
    port = address.rsplit(":", 1)[1]
    cli("endpoint", "configure", "inner", "--relay", address, "--max-workers", "2")
    started: list[int] = []
    with daemons_stopped(started):
        out = cli("relay", "start", "--port", port, "--daemon", "--endpoint", "inner")
        relay = _relay_record()
        assert relay is not None
        started.append(int(relay["pid"]))
        assert "endpoint inner running inside the relay" in out.stdout, out.stdout
        record = _record("inner")
        assert record is not None and record["pid"] == relay["pid"] and record["in_relay"] is True
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
    address = f"tcp://127.0.0.1:{free_port()}"
    port = address.rsplit(":", 1)[1]

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
    address = f"tcp://127.0.0.1:{free_port()}"
    port = address.rsplit(":", 1)[1]
    cli("endpoint", "configure", "inner", "--relay", address, "--max-workers", "2")
    started: list[int] = []
    with daemons_stopped(started):
        cli("relay", "start", "--port", port, "--daemon", "--endpoint", "inner")
        first = int(_relay_record()["pid"])
        started.append(first)
        endpoint_id = _record("inner")["endpoint_id"]
        with FederatedExecutor(endpoint_id, relay=address) as ex:
            futures = [ex.submit(slow_square, x) for x in range(30)]
            futures[0].result(timeout=60)   # accepted and running
            workers = psutil.Process(first).children(recursive=True)
            os.kill(first, signal.SIGKILL)
            psutil.wait_procs([psutil.Process(first)], timeout=10) if psutil.pid_exists(first) else None
            # its workers see their pool gone and leave by themselves
            psutil.wait_procs(workers, timeout=30)
            deadline = time.monotonic() + 30
            while True:   # the dead process's pid files no longer count as running
                out = cli("relay", "start", "--port", port, "--daemon", "--endpoint", "inner", check=False)
                if out.returncode == 0:
                    break
                assert time.monotonic() < deadline, out.stderr
                time.sleep(0.5)
            started.append(int(_relay_record()["pid"]))
            assert [f.result(timeout=120) for f in futures] == [x * x for x in range(30)]
        cli("relay", "stop")
