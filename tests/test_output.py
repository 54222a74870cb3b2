"""Output of Python tasks (issue 14, item 2): what a task writes to stdout
and stderr (print, sys.stderr, os.write on fd 1/2, subprocesses) comes back
on its future, capped with a note, echoed with a prefix on request, never
mixed between tasks; results that carry output still load everywhere
(dependencies, large results, the data-only format, a sandbox)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import cloudpickle
import pytest

from fedexec import FederatedExecutor, TaskTimeout, WorkerLost, with_options
from fedexec.output import MAGIC, OUTPUT_LIMIT, split, trailer

from test_sandbox import bwrap, bwrap_federation  # noqa: F401  (fixtures)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEADLINE = 60.0


# -- functions run on the endpoint ------------------------------------------------------

def talk(tag):
    print(f"print {tag}")
    sys.stderr.write(f"stderr {tag}\n")
    os.write(1, f"fd {tag}\n".encode())
    subprocess.run(["echo", f"child {tag}"], check=True)
    subprocess.run(f"echo child-err {tag} >&2", shell=True, check=True)
    return tag


def silent(x):
    return x * 2


def shout(n):
    sys.stdout.write("x" * (n - 4) + "END\n")
    return n


def fail_loudly():
    print("about to fail")
    raise ValueError("failed on purpose")


class Unpicklable(Exception):
    """An exception that cannot travel: it holds a lock."""

    def __init__(self):
        super().__init__("cannot travel")
        self.lock = threading.Lock()


def fail_unpicklably():
    print("before the odd exception")
    sys.stderr.write("err before\n")
    raise Unpicklable()


def return_unpicklable():
    print("before the odd result")
    return threading.Lock()


def loud_then_hang():
    print("started, then hung", flush=True)
    os.write(2, b"on stderr too\n")
    time.sleep(120)


def loud_then_crash():
    print("about to crash", flush=True)
    os.write(2, b"and on stderr\n")
    os._exit(3)


def repeat(tag, times, pause):
    for i in range(times):
        print(f"{tag} {i}", flush=True)
        time.sleep(pause)
    return tag


def big_and_loud():
    import numpy as np
    print("made a big array")
    return np.arange(3 * 1024 * 1024, dtype=np.float64)   # 24 MiB: the large-result path


def total(array):
    return float(array.sum())


def paint():
    print("\x1b]0;owned\x07\x1b[2Jred\u202etxt.exe")
    return 0


def add_one(x):
    print(f"adding to {x}")
    return x + 1


# -- the embedded default ---------------------------------------------------------------

@pytest.mark.timeout(120)
def test_task_output_reaches_the_future(executor):
    future = executor.submit(talk, "a")
    assert future.result(DEADLINE) == "a"
    # fd-level capture: print, os.write and a subprocess's output share stdout, in the order written
    assert future.stdout == "print a\nfd a\nchild a\n"
    assert future.stderr == "stderr a\nchild-err a\n"
    quiet = executor.submit(silent, 21)
    assert quiet.result(DEADLINE) == 42
    assert (quiet.stdout, quiet.stderr) == ("", "")


@pytest.mark.timeout(120)
def test_output_of_a_task_that_raised(executor):
    future = executor.submit(fail_loudly)
    with pytest.raises(ValueError, match="failed on purpose"):
        future.result(DEADLINE)
    assert future.stdout == "about to fail\n"


@pytest.mark.timeout(120)
def test_output_of_failed_tasks_reaches_the_future(executor):
    """FAILED results, not only values and exceptions, carry what the task
    printed: a result that cannot be sent back, a task stopped past its
    timeout (its worker killed: its output read just before), and one whose
    worker died under it (its capture files held by the pool)."""
    bad_exception = executor.submit(fail_unpicklably)
    with pytest.raises(Exception, match="cannot travel"):   # (sent as a stand-in, with its traceback)
        bad_exception.result(DEADLINE)
    assert (bad_exception.stdout, bad_exception.stderr) == ("before the odd exception\n", "err before\n")
    bad_result = executor.submit(return_unpicklable)
    with pytest.raises(Exception, match="cannot serialize the result"):
        bad_result.result(DEADLINE)
    assert bad_result.stdout == "before the odd result\n"
    hung = executor.submit(with_options(loud_then_hang, timeout=2.0))
    with pytest.raises(TaskTimeout):
        hung.result(DEADLINE)
    assert (hung.stdout, hung.stderr) == ("started, then hung\n", "on stderr too\n")
    # a task whose worker dies under it (run again, and again, then WorkerLost): what it printed
    crashed = executor.submit(loud_then_crash)
    with pytest.raises(WorkerLost, match="exited with code 3"):
        crashed.result(DEADLINE)
    assert (crashed.stdout, crashed.stderr) == ("about to crash\n", "and on stderr\n")
    # the next task of that user gets a fresh worker, with nothing of the others' output
    follow = executor.submit(talk, "after")
    assert follow.result(DEADLINE) == "after" and "hung" not in follow.stdout and "crash" not in follow.stdout


@pytest.mark.timeout(120)
def test_output_is_cut_to_the_last_mib_with_a_note(executor):
    n = 3 * OUTPUT_LIMIT
    future = executor.submit(shout, n)
    assert future.result(DEADLINE) == n
    note, kept = future.stdout.split("\n", 1)
    assert note == (f"[fedexec: the first {n - OUTPUT_LIMIT} bytes of the task's stdout were cut; "
                    f"the last {OUTPUT_LIMIT} follow]")
    assert len(kept) == OUTPUT_LIMIT and kept.endswith("xxEND\n")
    # the next task on that worker starts clean
    again = [executor.submit(talk, "after") for _ in range(2)]
    for f in again:
        f.result(DEADLINE)
        assert f.stdout == "print after\nfd after\nchild after\n"


@pytest.mark.timeout(120)
def test_concurrent_tasks_never_mix_their_output(executor):
    slow = [executor.submit(repeat, f"slow{i}", 20, 0.005) for i in range(6)]
    # and many fast ones, which the endpoint sends to its workers in batches
    fast = list(range(300))
    fast_futures = [executor.submit(repeat, f"fast{i}", 1, 0) for i in fast]
    for i, future in enumerate(slow):
        assert future.result(DEADLINE) == f"slow{i}"
        assert future.stdout == "".join(f"slow{i} {k}\n" for k in range(20)), future.stdout[:200]
    for i, future in zip(fast, fast_futures):
        assert future.result(DEADLINE) == f"fast{i}"
        assert future.stdout == f"fast{i} 0\n", (i, future.stdout)


@pytest.mark.timeout(120)
def test_results_that_carry_output_feed_dependents_and_large_results(executor):
    first = executor.submit(add_one, 1)
    second = executor.submit(add_one, first)   # its argument is first's result (with output after it)
    assert second.result(DEADLINE) == 3
    assert (first.stdout, second.stdout) == ("adding to 1\n", "adding to 2\n")
    big = executor.submit(big_and_loud)
    array = big.result(DEADLINE)
    assert array.shape == (3 * 1024 * 1024,) and array[-1] == 3 * 1024 * 1024 - 1
    assert big.stdout == "made a big array\n"
    # a large result with output after it, as a dependency (its file loaded where the dependent runs)
    assert executor.submit(total, executor.submit(big_and_loud)).result(DEADLINE) == float(array.sum())


@pytest.mark.timeout(120)
def test_echo_output_writes_each_line_prefixed_with_the_task(capsys):
    with FederatedExecutor(max_workers=2, echo_output=True) as ex:
        futures = [ex.submit(talk, f"e{i}") for i in range(3)]
        for future in futures:
            future.result(DEADLINE)
        quiet = ex.submit(silent, 1)
        quiet.result(DEADLINE)
        painted = ex.submit(paint)
        painted.result(DEADLINE)
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    # terminal control sequences are shown, not sent to the caller's terminal; the future keeps them
    assert painted.stdout == "\x1b]0;owned\x07\x1b[2Jred\u202etxt.exe\n"
    shown = f"[{painted.task_id[-8:]}] \\x1b]0;owned\\x07\\x1b[2Jred\\u202etxt.exe\n"
    assert shown in out and "\x1b" not in out and "\u202e" not in out, out   # (bidi controls too)
    out = out.replace(shown, "")
    for i, future in enumerate(futures):
        prefix = f"[{future.task_id.replace('-', '')[-8:]}] "
        assert f"{prefix}print e{i}\n{prefix}fd e{i}\n{prefix}child e{i}\n" in out, out
        assert f"{prefix}stderr e{i}\n{prefix}child-err e{i}\n" in err, err
        assert future.task_id.endswith(prefix[1:9])
    assert out.count("\n") == 9 and err.count("\n") == 6   # nothing from the quiet task


@pytest.mark.timeout(120)
def test_data_only_results_carry_output_too():
    with FederatedExecutor(max_workers=1, data_only=True) as ex:
        future = ex.submit(talk, "d")
        assert future.result(DEADLINE) == "d"
        assert future.stdout == "print d\nfd d\nchild d\n"


@pytest.mark.timeout(120)
def test_the_endpoint_sets_the_limit_or_turns_the_capture_off(monkeypatch):
    monkeypatch.setenv("FEDEXEC_OUTPUT_LIMIT", "6")   # the embedded endpoint's workers inherit it
    with FederatedExecutor(max_workers=1) as ex:
        future = ex.submit(talk, "limit")
        assert future.result(DEADLINE) == "limit"
        whole = "print limit\nfd limit\nchild limit\n"
        assert future.stdout == (f"[fedexec: the first {len(whole) - 6} bytes of the task's stdout were cut; "
                                 f"the last 6 follow]\n" + whole[-6:])
    monkeypatch.setenv("FEDEXEC_OUTPUT_LIMIT", "0")
    with FederatedExecutor(max_workers=1) as ex:
        future = ex.submit(talk, "off")
        assert future.result(DEADLINE) == "off"
        assert (future.stdout, future.stderr) == ("", "")
    monkeypatch.setenv("FEDEXEC_OUTPUT_LIMIT", "lots")   # ignored (said in the endpoint's log): the default
    with FederatedExecutor(max_workers=1) as ex:
        future = ex.submit(talk, "bad")
        assert future.result(DEADLINE) == "bad"
        assert future.stdout == "print bad\nfd bad\nchild bad\n"


@pytest.mark.timeout(180)
def test_an_executors_output_limit_caps_its_tasks_under_the_endpoints(monkeypatch):
    monkeypatch.setenv("FEDEXEC_OUTPUT_LIMIT", "20")   # the endpoint's limit (its workers inherit it)
    whole = "print lim\nfd lim\nchild lim\n"
    for asked, kept in ((6, 6), (1000, 20)):   # the executor's, capped by the endpoint's
        with FederatedExecutor(max_workers=1, output_limit=asked) as ex:
            future = ex.submit(talk, "lim")
            assert future.result(DEADLINE) == "lim"
            assert future.stdout == (f"[fedexec: the first {len(whole) - kept} bytes of the task's stdout were cut; "
                                     f"the last {kept} follow]\n" + whole[-kept:]), asked
    with FederatedExecutor(max_workers=1, output_limit=0) as ex:   # none at all
        future = ex.submit(talk, "none")
        assert future.result(DEADLINE) == "none" and (future.stdout, future.stderr) == ("", "")
        assert ex.submit(talk, "again").result(DEADLINE) == "again"   # (nothing left over for the next)
    for bad in (-1, True, 1 << 30, "1M", 1.5):
        with pytest.raises(ValueError, match="output_limit must be None or a number of bytes"):
            FederatedExecutor(max_workers=1, output_limit=bad)
    from fedexec import protocol as P
    for bad in (-1, 1 << 30, "1M"):   # on the wire too: the relay refuses such a task
        with pytest.raises(P.ProtocolError, match="output limit"):
            P.task_row([b"\0" * 16, b"\0" * 32, 0, -1, P.TASK_CALL, "3.11", {"ol": bad}])


# -- the capture and the trailer, in a worker-like process of their own ------------------

CAPTURE_SCRIPT = textwrap.dedent("""
    import os, subprocess, sys
    from fedexec.output import OutputCapture, split
    capture = OutputCapture(limit=64)
    results = [capture.take()]                          # nothing written yet
    print("hello"); sys.stderr.write("oops\\n")
    results.append(capture.take())
    subprocess.run("printf child; printf err >&2", shell=True)
    results.append(capture.take())
    results.append(capture.take())                      # emptied by the last take
    os.write(1, b"y" * 100)
    results.append(capture.take())
    capture.close()
    print("back on the real stdout")
    for r in results:
        print(repr(None if r is None else split(b"VALUE" + r)[1]))
""")


@pytest.mark.timeout(60)
def test_capture_costs_nothing_without_output_and_caps_at_the_worker(tmp_path):
    done = subprocess.run([sys.executable, "-c", CAPTURE_SCRIPT], capture_output=True, text=True, timeout=30,
                          cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "back on the real stdout"
    assert lines[1:] == [
        "None",
        repr((b"hello\n", b"oops\n", 0, 0)),
        repr((b"child", b"err", 0, 0)),
        "None",
        repr((b"y" * 64, b"", 36, 0)),
    ]


def test_trailer_split_is_exact():
    value = cloudpickle.dumps({"a": 1})
    blob = value + trailer(b"out", b"err", 5, 0)
    payload, output = split(blob)
    assert bytes(payload) == value and output == (b"out", b"err", 5, 0)
    assert split(value) == (value, None)
    # a value ending like a trailer but malformed stays whole
    forged = value + b"\xff\xff\xff\x7f" + MAGIC
    assert split(forged) == (forged, None)
    assert cloudpickle.loads(blob) == {"a": 1}   # pickle ignores what follows its STOP


# -- the bwrap sandbox -----------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_output_of_a_sandboxed_task(bwrap_federation):
    ex = bwrap_federation.executor
    future = ex.submit(talk, "s")
    assert future.result(DEADLINE) == "s"
    assert future.stdout == "print s\nfd s\nchild s\n"
    assert future.stderr == "stderr s\nchild-err s\n"
    for root in bwrap_federation.task_roots():   # the capture files have no name in the task root
        assert list(root.iterdir()) == [], list(root.iterdir())


CRASH_SCRIPT = textwrap.dedent("""
    import ctypes
    from fedexec import FederatedExecutor, WorkerLost
    def crash():
        print("before the crash")   # (captured: goes with the worker)
        ctypes.string_at(0)
    with FederatedExecutor(max_workers=1) as ex:
        try:
            ex.submit(crash).result(60)
        except WorkerLost as exc:
            print("lost", exc.exitcode)
""")


@pytest.mark.timeout(120)
def test_a_crashing_workers_traceback_reaches_the_endpoints_log_not_the_capture(tmp_path):
    """A segfault in a task: Python's fatal-error traceback is written to the
    worker's own stderr (the embedded endpoint's, the caller's here), not
    into the nameless capture file that dies with the worker."""
    done = subprocess.run([sys.executable, "-c", CRASH_SCRIPT], capture_output=True, text=True, timeout=100,
                          cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lost -11" in done.stdout, (done.stdout, done.stderr[-3000:])
    assert "Fatal Python error: Segmentation fault" in done.stderr, done.stderr[-3000:]
    assert "in crash" in done.stderr, done.stderr[-3000:]   # the task's frame, named
