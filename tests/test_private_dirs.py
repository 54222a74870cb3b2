"""The embedded default's private directory left behind by a kill -9 of its
program and its colocated process is removed by the next embedded start
(privatedir.py); a live one, an unmarked young one, another boot's, a
symbolic link, and other kinds of fedexec directories are not."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from fedexec.endpoint.sockdir import UNMARKED_AGE, _this_boot, _this_host
from fedexec.privatedir import MARKER, make_private_directory, remove_stale_private_dirs

# A program using the embedded default: (with argument "hold") a task running with a 20 MiB argument
# (its upload, a spool file in the private directory), then it prints its private directory and
# colocated process, and waits for its stdin to close.
PROGRAM = r"""
import json, os, sys, time
import psutil
from fedexec import FederatedExecutor

def hold(data, path):
    open(path, "w").close()
    time.sleep(600)

with FederatedExecutor(max_workers=1) as ex:
    if sys.argv[1:] == ["hold"]:
        started = os.path.join(os.environ["TMPDIR"], f"started-{os.getpid()}")
        ex.submit(hold, b"x" * (20 * 1024 * 1024), started)
        while not os.path.exists(started):
            time.sleep(0.05)
    colocated = [p.pid for p in psutil.Process().children() if "fedexec.colocated" in " ".join(p.cmdline())]
    directory = os.path.dirname(ex._dispatcher.services.relay_address[len("ipc://"):])
    print(json.dumps({"dir": directory, "colocated": colocated}), flush=True)
    sys.stdin.read()
"""


def start_program(tmpdir: Path, *args: str) -> tuple[subprocess.Popen, dict]:
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=env, text=True)
    line = proc.stdout.readline()   # (the program ends, and with it this read, if it fails)
    assert line, f"the program failed to start (exit code {proc.wait(30)})"
    return proc, json.loads(line)


def end_program(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dead_pid() -> tuple[int, float]:
    """The pid and start time of a process that ran and is gone."""
    proc = psutil.Popen([sys.executable, "-c", "pass"])
    started = proc.create_time()
    proc.wait(30)
    return proc.pid, started


def marked(base: Path, name: str, pid: int, started: float, boot: str | None = None) -> Path:
    directory = base / name
    directory.mkdir(mode=0o700)
    (directory / MARKER).write_text(f"{pid} {started!r} {_this_host()} {boot or _this_boot()}\n")
    (directory / "spool").write_bytes(b"x" * 4096)
    return directory


def test_kill_9_of_program_and_colocated_then_next_start_removes_the_directory(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    killed, info = start_program(tmpdir, "hold")
    live = None
    try:
        live, live_info = start_program(tmpdir)
        victim = Path(info["dir"])
        assert victim.parent == tmpdir and victim.is_dir() and (victim / MARKER).is_file()
        assert len(info["colocated"]) == 1
        colocated = psutil.Process(info["colocated"][0])
        workers = colocated.children(recursive=True)
        colocated.send_signal(signal.SIGKILL)   # both at once: the colocated process first, so it cannot clean up
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        psutil.wait_procs([colocated], timeout=30)
        for worker in workers:   # (they stop by themselves with their parent gone; not left to chance)
            try:
                worker.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(workers, timeout=30)
        time.sleep(0.5)
        assert victim.is_dir(), "the private directory was removed although both its owners were killed"
        assert sum(f.stat().st_size for f in victim.rglob("*") if f.is_file()) > 20 * 1024 * 1024

        later, later_info = start_program(tmpdir)   # the next embedded start
        try:
            deadline = time.monotonic() + 30
            while victim.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not victim.exists(), "the next embedded start did not remove the stale private directory"
            assert Path(live_info["dir"]).is_dir(), "a live program's private directory was removed"
            assert Path(later_info["dir"]).is_dir()
        finally:
            end_program(later)
        assert not Path(later_info["dir"]).exists()
    finally:
        end_program(killed)
        if live is not None:
            end_program(live)


def test_only_stale_directories_of_this_user_host_and_boot_go(tmp_path):
    pid, started = dead_pid()
    stale = marked(tmp_path, "fedexec-stale000", pid, started)
    other_boot = marked(tmp_path, "fedexec-otherbt0", pid, started, boot="another-boot-id")
    agents = marked(tmp_path, "fedexec-ep-stale000", pid, started)   # (an agent's: sockdir.py judges those)
    (tmp_path / "elsewhere").mkdir()
    outside = marked(tmp_path / "elsewhere", "fedexec-target00", pid, started)
    (tmp_path / "fedexec-symlink0").symlink_to(outside)
    young = tmp_path / "fedexec-unmarkd0"
    young.mkdir()
    old = tmp_path / "fedexec-unmarkd1"
    old.mkdir()
    listening = tmp_path / "fedexec-unmarkd2"
    listening.mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(listening / "relay.sock"))
    server.listen(1)
    for directory in (old, listening):
        os.utime(directory, (time.time() - UNMARKED_AGE - 60,) * 2)
    try:
        removed = remove_stale_private_dirs(tmp_path)
    finally:
        server.close()
    assert sorted(removed) == sorted([str(stale), str(old)])
    for kept in (other_boot, agents, outside, young, listening):
        assert kept.is_dir(), f"{kept.name} was removed"
    assert (tmp_path / "fedexec-symlink0").is_symlink()


def test_a_held_lock_keeps_a_directory_whose_program_is_gone(tmp_path):
    """The colocated process holds the lock after its program died: its directory stays."""
    directory, fd = make_private_directory(str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                              pass_fds=(fd,))
    try:
        os.close(fd)   # (only the child holds it now, as the colocated process after its program's kill -9)
        pid, started = dead_pid()
        marker = Path(directory) / MARKER
        marker.write_text(f"{pid} {started!r} {_this_host()} {_this_boot()}\n")   # (its program is gone)
        assert remove_stale_private_dirs(tmp_path) == []
        assert Path(directory).is_dir()
        probe = os.open(marker, os.O_RDONLY)
        try:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                raise AssertionError("the marker's lock was not held by the child")
            except BlockingIOError:
                pass
        finally:
            os.close(probe)
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert remove_stale_private_dirs(tmp_path) == [directory]
    assert not os.path.exists(directory)
