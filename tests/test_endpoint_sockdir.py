"""An endpoint killed with SIGKILL leaves its socket directory
(``$TMPDIR/fedexec-ep-*``) behind; the next endpoint started on the machine,
or ``fedexec endpoint stop``, removes it (issue 16, item 8). Nothing of a
live endpoint's, nor anything not this user's own directory, is touched.

Endpoints are real processes with their own ``TMPDIR`` (a directory of the
test's), so the test sees exactly what they make.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedexec.config import EndpointConfig
from fedexec.endpoint.sockdir import MARKER, UNMARKED_AGE, remove_stale_socket_dirs
from test_faults import lookup_endpoint, running_relay, stop_process, tail


HOST = socket.gethostname()
BOOT = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def socket_dirs(tmpdir: Path) -> set[str]:
    return {p.name for p in tmpdir.glob("fedexec-ep-*") if p.is_dir() and not p.is_symlink()}


def start_endpoint(tmp_path: Path, relay: str, tmpdir: Path, endpoint_id: str | None = None):
    config = EndpointConfig(name="ep", relay=relay, max_workers=1, heartbeat_period=0.5,
                            **({"endpoint_id": endpoint_id} if endpoint_id else {}))
    config.save()
    log = tmp_path / "endpoint.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedexec.endpoint", "--name", "ep"],
                                env={**os.environ, "TMPDIR": str(tmpdir)}, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
    lookup_endpoint(relay, config.endpoint_id, proc, log)
    return config, proc, log


def wait_disconnected(relay: str, endpoint_id: str, timeout: float = 30.0) -> None:
    from fedexec.relay.query import lookup_endpoint as query

    deadline = time.monotonic() + timeout
    while (query(relay, endpoint_id, timeout=5) or {}).get("status") != "disconnected":
        assert time.monotonic() < deadline, f"the relay still says the killed endpoint is connected after {timeout} s"
        time.sleep(0.2)


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    stop_process(proc)   # its pools and workers, by pid


@pytest.mark.timeout(180)
def test_a_restart_or_endpoint_stop_clears_what_a_killed_endpoint_left(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    with running_relay(tmp_path) as relay:
        config, proc, log = start_endpoint(tmp_path, relay, tmpdir)
        first = socket_dirs(tmpdir)
        assert len(first) == 1, f"expected one socket directory, found {first}"
        (marker,) = [tmpdir / name / MARKER for name in first]
        assert oct(marker.stat().st_mode & 0o777) == "0o600"
        assert marker.read_text().split()[0] == str(proc.pid)
        kill_9(proc)
        assert socket_dirs(tmpdir) == first, "SIGKILL should leave the directory behind (the case tested)"
        wait_disconnected(relay, config.endpoint_id)   # (so that the restart's connection is the one waited for)

        # a restart removes it, and keeps its own
        config, proc, log = start_endpoint(tmp_path, relay, tmpdir, config.endpoint_id)
        try:
            second = socket_dirs(tmpdir)
            assert len(second) == 1 and not second & first, f"before: {first}, now: {second}:\n{tail(log)}"
            # `fedexec endpoint stop` while it runs removes nothing of a live endpoint's
            assert remove_stale_socket_dirs(str(tmpdir)) == []
            # its in-process pool's directory, once marked: a kill between its mkdtemp and its marker
            # leaves an unmarked one, kept 10 minutes in case its maker is starting (sockdir.UNMARKED_AGE;
            # CI hit that window once)
            deadline = time.monotonic() + 10
            def pool_marked() -> bool:
                return any((d / MARKER).exists() and (d / MARKER).stat().st_size for d in tmpdir.glob("fedexec-pool-*"))

            while not pool_marked():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        finally:
            kill_9(proc)
        assert socket_dirs(tmpdir) == second

        # `fedexec endpoint stop` after a SIGKILL removes it, and says so
        out = subprocess.run([sys.executable, "-m", "fedexec.cli", "endpoint", "stop", "ep"], capture_output=True,
                             text=True, timeout=60, env={**os.environ, "TMPDIR": str(tmpdir)})
        assert out.returncode == 0, out.stderr
        # (and its in-process pool's workers' channels, if that pool had begun: the pool died with it)
        assert re.search(r"removed (1 socket directory|2 socket directories) left by endpoints that did not exit "
                         r"cleanly", out.stdout), out.stdout
        assert socket_dirs(tmpdir) == set() and not list(tmpdir.glob("fedexec-pool-*")), list(tmpdir.iterdir())


def test_only_this_users_dead_endpoints_directories_are_removed(tmp_path):
    base = tmp_path / "tmp"
    base.mkdir()
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep").write_text("x")
    # a link named like a socket directory, pointing elsewhere: never followed
    (base / "fedexec-ep-link").symlink_to(target, target_is_directory=True)
    # a directory without a marker, young: an agent may be starting in it
    (base / "fedexec-ep-young").mkdir()
    # one without a marker, old, with nothing listening: left by an older release
    old = base / "fedexec-ep-old"
    old.mkdir()
    past = time.time() - UNMARKED_AGE - 10
    os.utime(old, (past, past))
    # one whose marker names a live process started at another time (a reused pid)
    reused = base / "fedexec-ep-reused"
    reused.mkdir()
    (reused / MARKER).write_text(f"{os.getppid()} 12345.0 {HOST} {BOOT}\n")
    # one whose marker names a pid that does not run
    dead = base / "fedexec-ep-dead"
    dead.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(10)
    (dead / MARKER).write_text(f"{gone.pid} 12345.0 {HOST} {BOOT}\n")
    # the same pid on another node sharing this temporary directory, or before a reboot: not judged here
    for name, host, boot in (("other-host", "node-b", BOOT), ("other-boot", HOST, "0" * 8 + BOOT[8:])):
        (base / f"fedexec-ep-{name}").mkdir()
        (base / f"fedexec-ep-{name}" / MARKER).write_text(f"{gone.pid} 12345.0 {host} {boot}\n")
    # an older release's marker (no host and boot), young: as if unmarked, left alone
    (base / "fedexec-ep-old-format").mkdir()
    (base / "fedexec-ep-old-format" / MARKER).write_text(f"{gone.pid} 12345.0\n")
    # a file, not a directory
    (base / "fedexec-ep-file").write_text("x")
    # this process's own (alive, right start time)
    import psutil

    own = base / "fedexec-ep-own"
    own.mkdir()
    (own / MARKER).write_text(f"{os.getppid()} {psutil.Process(os.getppid()).create_time()!r} {HOST} {BOOT}\n")

    removed = sorted(Path(p).name for p in remove_stale_socket_dirs(str(base)))
    assert removed == ["fedexec-ep-dead", "fedexec-ep-old", "fedexec-ep-reused"], removed
    assert (target / "keep").exists() and (base / "fedexec-ep-link").is_symlink()
    assert (base / "fedexec-ep-young").is_dir() and (base / "fedexec-ep-file").exists()
    assert (base / "fedexec-ep-own").is_dir()
    for name in ("other-host", "other-boot", "old-format"):
        assert (base / f"fedexec-ep-{name}" / MARKER).exists(), name


def test_an_agents_marker_names_its_pid_start_host_and_boot(tmp_path, monkeypatch):
    """What a shared temporary directory's other nodes go by (review finding 10)."""
    import psutil

    from fedexec.endpoint.sockdir import make_socket_dir

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)   # (the standard library's cache of TMPDIR)
    directory = make_socket_dir()
    pid, started, host, boot = (Path(directory) / MARKER).read_text().split()
    assert Path(directory).parent == tmp_path
    assert int(pid) == os.getpid() and float(started) == psutil.Process().create_time()
    assert (host, boot) == (HOST, BOOT)
    assert remove_stale_socket_dirs(str(tmp_path)) == [] and Path(directory).is_dir()


@pytest.mark.timeout(60)
def test_a_killed_pools_socket_directory_goes_with_the_next_sweep_and_a_live_ones_stays(tmp_path):
    """A pool's workers' channels live in ``fedexec-pool-*``, marked as an
    agent's directory is: one left by a pool killed with SIGKILL is removed
    by the next sweep (an agent's start, ``fedexec endpoint stop``)."""
    from fedexec.endpoint.sockdir import POOL_PREFIX

    code = ("import sys, time; from fedexec.endpoint.sockdir import POOL_PREFIX, make_socket_dir; "
            "print(make_socket_dir(POOL_PREFIX), flush=True); time.sleep(60)")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    killed = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    live = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        killed_dir, live_dir = killed.stdout.readline().strip(), live.stdout.readline().strip()
        assert Path(killed_dir).name.startswith(POOL_PREFIX) and (Path(killed_dir) / MARKER).exists()
        kill_9(killed)
        assert remove_stale_socket_dirs(str(tmp_path)) == [killed_dir]
        assert not os.path.lexists(killed_dir) and Path(live_dir).is_dir()
    finally:
        stop_process(live)
        stop_process(killed)
