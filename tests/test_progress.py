"""Progress bars (issue 16, item 4): ``fedexec.progress(futures)`` and
``ex.map(..., progress=...)`` draw on a terminal, through tqdm when it is
installed and a plain one-line bar otherwise, and draw nothing when standard
error is not a terminal unless forced.

Each test runs a real program (the embedded default: relay, endpoint and
workers) whose standard error is a pseudo-terminal or a pipe, and reads what
it drew."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time

import cloudpickle
import pytest

# tests/ is not importable on the workers: send this module's functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

CHILD_TIMEOUT = 240.0   # a program with its own embedded default: slow on a loaded machine

# The program under test: tasks 0..11, of which those divisible by 4 raise
# (3 failures); markers on stderr separate what each step drew.
PROGRAM = textwrap.dedent('''
    import sys
    if sys.argv[1] == "plain":
        sys.modules["tqdm"] = None          # tqdm not installed: the plain bar
    import fedexec
    from fedexec import FederatedExecutor

    def work(x):
        if x % 4 == 0:
            raise ValueError(x)
        return x * 10

    def ok(x):
        return x + 1

    with FederatedExecutor(max_workers=2) as ex:
        sys.stderr.write("<progress>"); sys.stderr.flush()
        futures = fedexec.progress([ex.submit(work, i) for i in range(12)], desc="work")
        failed = sum(1 for f in futures if f.exception() is not None)
        sys.stderr.write("</progress>"); sys.stderr.flush()
        print("failed", failed, flush=True)
        sys.stderr.write("<map>"); sys.stderr.flush()
        print("map", sum(ex.map(ok, range(20), progress=True)), flush=True)
        sys.stderr.write("</map>"); sys.stderr.flush()
        sys.stderr.write("<chunked>"); sys.stderr.flush()
        print("chunked", sum(ex.map(ok, range(10), chunksize=3, progress="force")), flush=True)
        sys.stderr.write("</chunked>"); sys.stderr.flush()
''')


def run_program(tmp_path, style: str, tty: bool) -> tuple[str, str]:
    """Run PROGRAM with standard error on a pseudo-terminal (``tty``) or a
    pipe; returns (stdout, what was written to stderr)."""
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="100")
    if not tty:
        proc = subprocess.run([sys.executable, str(script), style], capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT, env=env)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout, proc.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, str(script), style], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    drawn = bytearray()
    deadline = time.monotonic() + CHILD_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 0.5)[0]:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:   # EIO: the program closed the terminal's last other end
                break
            if not chunk:
                break
            drawn += chunk
        stdout = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert proc.returncode == 0, drawn.decode(errors="replace")
    return stdout, drawn.decode(errors="replace")


def section(text: str, name: str) -> str:
    match = re.search(f"<{name}>(.*)</{name}>", text, re.S)
    assert match, f"no <{name}> section in what was drawn: {text!r}"
    return match.group(1)


def last_line(drawn: str) -> str:
    """The bar as it stands at the end: the last of the lines it redrew with \\r."""
    return re.split(r"[\r\n]", drawn.strip())[-1].strip()


@pytest.mark.timeout(300)
def test_plain_bar_on_a_terminal(tmp_path):
    stdout, drawn = run_program(tmp_path, "plain", tty=True)
    assert "failed 3" in stdout and "map 210" in stdout and "chunked 55" in stdout
    bar = section(drawn, "progress")
    assert "\r" in bar, f"a bar redraws its line: {bar!r}"
    final = last_line(bar)
    assert re.fullmatch(r"work: 100% \|#{24}\| 12/12 done, 3 failed, [0-9.]+ tasks/s, 0:\d\d", final), final
    assert bar.endswith("\n") or bar.endswith("\r\n"), "the bar's line ends when it is done"
    final = last_line(section(drawn, "map"))
    assert re.fullmatch(r"100% \|#{24}\| 20/20 done, 0 failed, [0-9.]+ tasks/s, 0:\d\d", final), final
    # a chunk of map counts as the calls in it
    final = last_line(section(drawn, "chunked"))
    assert re.fullmatch(r"100% \|#{24}\| 10/10 done, 0 failed, [0-9.]+ tasks/s, 0:\d\d", final), final


@pytest.mark.timeout(300)
def test_tqdm_bar_on_a_terminal(tmp_path):
    try:
        import tqdm  # noqa: F401
    except ImportError:
        pytest.fail("tqdm is not installed: install the test extra (pip install -e '.[test]')")
    stdout, drawn = run_program(tmp_path, "tqdm", tty=True)
    assert "failed 3" in stdout and "map 210" in stdout
    final = last_line(section(drawn, "progress"))
    # tqdm's own format: "work: 100%|██████| 12/12 [00:00<00:00, 35.2task/s, 3 failed]"
    assert final.startswith("work: 100%|"), final
    # (the rate: tqdm writes s/task when slower than one a second, as on a loaded machine)
    assert "12/12" in final and re.search(r"(task/s|s/task)", final) and "3 failed" in final, final
    final = last_line(section(drawn, "map"))
    assert "20/20" in final and "0 failed" in final, final
    final = last_line(section(drawn, "chunked"))
    assert "10/10" in final, final


@pytest.mark.timeout(300)
def test_nothing_drawn_without_a_terminal_unless_forced(tmp_path):
    stdout, stderr = run_program(tmp_path, "plain", tty=False)
    assert "failed 3" in stdout and "map 210" in stdout and "chunked 55" in stdout
    assert section(stderr, "progress") == "", "progress() drew on a pipe"
    assert section(stderr, "map") == "", "map(progress=True) drew on a pipe"
    forced = last_line(section(stderr, "chunked"))
    assert re.fullmatch(r"100% \|#{24}\| 10/10 done, 0 failed, [0-9.]+ tasks/s, 0:\d\d", forced), forced


def test_progress_argument_is_checked(executor):
    with pytest.raises(ValueError, match="progress must be True, False or 'force'"):
        executor.map(abs, [1, 2], progress="yes")
    with pytest.raises(ValueError, match="progress must be"):
        executor.map(abs, [1, 2], progress=1)
    # without a terminal (pytest captures stderr), progress=True draws nothing and changes nothing
    assert list(executor.map(abs, [-1, -2], progress=True)) == [1, 2]


def slow_then(x):
    import time
    time.sleep(0.05)
    if x == 3:
        raise ValueError(x)
    return x


def test_progress_on_a_given_file(executor):
    import io

    import fedexec

    quiet = io.StringIO()   # not a terminal: nothing unless forced
    futures = [executor.submit(slow_then, i) for i in range(6)]
    assert fedexec.progress(futures, file=quiet) == futures
    assert quiet.getvalue() == ""
    assert all(f.done() for f in futures)
    forced = io.StringIO()
    futures = [executor.submit(slow_then, i) for i in range(6)]
    assert fedexec.progress(iter(futures), file=forced, force=True, desc="six") == futures
    final = last_line(forced.getvalue())   # (tqdm's format: the test extra installs it)
    assert final.startswith("six: 100%") and "6/6" in final and "1 failed" in final, final
    assert forced.getvalue().endswith("\n")


def test_progress_bar_counts_as_futures_come(executor):
    from concurrent.futures import Future

    from fedexec import ProgressBar

    import io

    out = io.StringIO()
    with ProgressBar(file=out, force=True, use_tqdm=False) as bar:
        for i in range(4):
            bar.expect(executor.submit(slow_then, i))
        cancelled: Future = Future()
        bar.expect(cancelled)
        assert cancelled.cancel()
        # a chunk of three calls counts as three
        bar.expect(executor.submit(slow_then, 0), weight=3)
        deadline = time.monotonic() + 60
        while bar.done < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert (bar.done, bar.failed, bar.total) == (8, 2, 8)   # 3 raised once, one cancelled
    assert last_line(out.getvalue()).startswith("100% |########################| 8/8 done, 2 failed")
    bar.close()   # again: nothing more drawn
    assert out.getvalue().count("\n") == 1
    with pytest.raises(ValueError, match="total"):
        ProgressBar(-1)


def test_map_with_buffersize_grows_its_total(executor, capsys):
    assert list(executor.map(abs, range(-10, 0), buffersize=3, progress="force")) == list(range(10, 0, -1))
    drawn = capsys.readouterr().err
    # read lazily, 3 at a time at first: the total grows as tasks go out, to all of them
    totals = {int(total) for total in re.findall(r"\d+/(\d+)", drawn)}
    assert max(totals) == 10 and "10/10" in last_line(drawn), drawn
