"""Where the relay and endpoints log, and repeated lines collapsed (issue 15,
"Logs"): a relay or endpoint run in the foreground writes the same log file
as a daemon does, private to its user."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedexec import FederatedExecutor
from test_cli import free_port
from test_faults import stop_process

FEDEXEC = [sys.executable, "-m", "fedexec.cli"]


def wait_for_line(path: Path, words: str, proc: subprocess.Popen, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if words in text:
            return text
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    out = proc.stdout.read() if proc.poll() is not None and proc.stdout else ""
    pytest.fail(f"{words!r} not in {path} within {timeout} s (exit code {proc.poll()}):\n"
                f"{path.read_text() if path.exists() else '(no file)'}\n{out}")


@pytest.mark.timeout(120)
def test_foreground_relay_and_endpoint_write_their_log_files(fedexec_home, tmp_path):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    relay_log = fedexec_home / "relay" / "relay.log"
    endpoint_log = fedexec_home / "endpoints" / "fg" / "endpoint.log"
    relay = subprocess.Popen([*FEDEXEC, "relay", "start", "--port", str(port)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    endpoint = None
    try:
        wait_for_line(relay_log, f"relay listening on {address}", relay)
        subprocess.run([*FEDEXEC, "endpoint", "configure", "fg", "--relay", address, "--max-workers", "1"],
                       check=True, capture_output=True, timeout=60)
        endpoint = subprocess.Popen([*FEDEXEC, "endpoint", "start", "fg"], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
        text = wait_for_line(relay_log, "endpoint fg (", relay)
        assert "connected" in text
        wait_for_line(endpoint_log, "pool", endpoint)
        for path in (relay_log, endpoint_log):
            assert path.stat().st_mode & 0o777 == 0o600, (path, oct(path.stat().st_mode))
        endpoint.send_signal(signal.SIGINT)
        endpoint.wait(timeout=30)
        relay.send_signal(signal.SIGINT)
        relay.wait(timeout=30)
        assert "relay stopping" in relay_log.read_text()
        # what went to the terminal went to the file too
        assert f"relay listening on {address}" in relay.stdout.read()
    finally:
        for proc in (endpoint, relay):
            if proc is not None:
                stop_process(proc)


def test_repeated_lines_are_collapsed_and_counted(tmp_path):
    log_file = tmp_path / "logs" / "service.log"
    script = textwrap.dedent(f"""
        import logging
        from pathlib import Path
        from fedexec.logs import configure
        configure("INFO", Path({str(log_file)!r}))
        log = logging.getLogger("fedexec.relay")
        for _ in range(50):
            log.warning("endpoint ep1 connected")
        log.info("something else")
        log.warning("endpoint ep1 connected")
        log.warning("endpoint ep1 connected")   # pending at exit: counted then
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [line.split(" ", 2)[2] for line in log_file.read_text().splitlines()]
    assert lines == ["fedexec.relay WARNING endpoint ep1 connected",
                     "fedexec.relay WARNING (the line above was repeated 49 more times in 0 s)",
                     "fedexec.relay INFO something else",
                     "fedexec.relay WARNING endpoint ep1 connected",
                     "fedexec.relay WARNING (the line above was repeated 1 more time in 0 s)"], lines
    assert [line.split(" ", 2)[2] for line in done.stderr.splitlines()] == lines   # the same on stderr
    assert log_file.stat().st_mode & 0o777 == 0o600
    assert log_file.parent.stat().st_mode & 0o777 == 0o700


def test_the_embedded_default_writes_no_log_file(fedexec_home):
    with FederatedExecutor(max_workers=1) as ex:
        assert ex.submit(pow, 2, 3).result(timeout=60) == 8
    assert not (fedexec_home / "relay" / "relay.log").exists()


def test_a_log_file_leaves_an_existing_directory_alone_and_refuses_a_symlink(tmp_path):
    """--log-file in a shared directory (/tmp-like) does not change that
    directory's mode; a symlink planted where the log goes is not followed."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    target = tmp_path / "victim"
    target.write_text("untouched\n")
    (shared / "planted.log").symlink_to(target)
    script = textwrap.dedent(f"""
        import logging, sys
        from pathlib import Path
        from fedexec.logs import configure
        configure("INFO", Path({str(shared / 'relay.log')!r}))
        logging.getLogger("fedexec.relay").info("hello")
        try:
            configure("INFO", Path({str(shared / 'planted.log')!r}))
        except OSError as exc:
            print("refused", exc.errno)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert shared.stat().st_mode & 0o7777 == 0o1777
    assert "hello" in (shared / "relay.log").read_text()
    assert (shared / "relay.log").stat().st_mode & 0o777 == 0o600
    assert "refused" in done.stdout and target.read_text() == "untouched\n"
