"""A worker killed while it holds finished results not sent yet: those tasks
finish once, with the results the worker wrote in its held-results file
(worker/heldlog.py, pool/recovery.py), instead of running a second time
elsewhere. Only the task that killed it runs again (or fails with
WorkerLost), as before."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedexec import FederatedExecutor
from fedexec.worker import heldlog

DEADLINE = 60


def record_short(runs_dir: str, value: int) -> int:
    """Leaves one file per run, and takes a millisecond: its worker holds
    several such tasks and their results for a few milliseconds (the low
    mark, pool/stealing.py)."""
    with open(os.path.join(runs_dir, f"{value}-{os.getpid()}-{time.monotonic_ns()}"), "w"):
        pass
    time.sleep(0.001)
    return value


def short(_: int) -> None:
    time.sleep(0.001)


def kill_own_worker_once(flag: str) -> int:
    """SIGKILLs its own worker the first time it runs; returns its pid after."""
    if not os.path.exists(flag):
        open(flag, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def runs_per_value(runs_dir: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for name in os.listdir(runs_dir):
        value = int(name.split("-")[0])
        counts[value] = counts.get(value, 0) + 1
    return counts


@pytest.mark.timeout(120)
def test_results_held_by_a_killed_worker_are_taken_from_its_file_and_nothing_runs_twice(tmp_path):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    with FederatedExecutor(max_workers=1) as ex:
        list(ex.map(short, range(300)))   # warm: the pool learns the tasks take a millisecond
        total = 0
        for attempt in range(5):   # where the killer lands among them is the pool's choice: several rounds
            flag = tmp_path / f"killed-{attempt}"
            values = range(total, total + 20)
            total += 20
            # the killer amid them: the worker holds the results of those before it while tasks wait behind it
            futures = [ex.submit(record_short, str(runs_dir), v) for v in values[:10]]
            killer = ex.submit(kill_own_worker_once, str(flag))
            futures += [ex.submit(record_short, str(runs_dir), v) for v in values[10:]]
            assert [f.result(DEADLINE) for f in futures] == list(values)
            assert killer.result(DEADLINE) > 0
            assert flag.exists()
        counts = runs_per_value(runs_dir)
        twice = {value: n for value, n in counts.items() if n != 1}
        assert not twice, f"tasks that finished before their worker was killed ran again: {twice}"
        assert sorted(counts) == list(range(total))


def test_the_held_results_file_reads_back_what_was_written_and_no_record_cut_short(tmp_path):
    path = str(tmp_path / "w1.held")
    heldlog.create(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    log = heldlog.HeldLog(path)
    sent = []
    log.record(b"a" * 16, 0, b"first", lambda: sent.append("held"))
    log.record(b"b" * 16, 1, b"", lambda: sent.append("held"))
    assert not sent
    log.record(b"c" * 16, 0, b"x" * (heldlog.MAX_RECORDED + 1), lambda: sent.append("large"))
    assert sent == ["large"]   # too large to write: sent at once instead
    assert heldlog.read_held(path) == [(b"a" * 16, 0, b"first"), (b"b" * 16, 1, b"")]
    # a record whose end was not written yet (the worker died within it) is left out
    end = log.end
    log.map[end:end + 21] = struct.pack("<I16sB", 3, b"d" * 16, 0)
    assert len(heldlog.read_held(path)) == 2
    # full: what is held is sent, and the file starts over with the new record alone
    blob = b"y" * heldlog.MAX_RECORDED
    count = 0
    while not sent[1:]:
        log.record(count.to_bytes(16, "big"), 0, blob, lambda: sent.append("full"))
        count += 1
    assert count > 2 and heldlog.read_held(path) == [((count - 1).to_bytes(16, "big"), 0, blob)]
    # anything a task may write there reads within bounds, as nothing or as records
    for junk in (b"\xff" * 8, struct.pack("<II", heldlog.SIZE + 1, heldlog.MAGIC),
                 struct.pack("<II", 100, heldlog.MAGIC) + b"\xff" * 92):
        log.map[:len(junk)] = junk
        assert isinstance(heldlog.read_held(path), list)
    log.close()
    assert heldlog.read_held(str(tmp_path / "missing")) == []


# -- review findings (session 26) ---------------------------------------------------------
def fail_and_record(runs_dir: str) -> None:
    """Raises each time, after leaving a file per run: retried once (max_retries=1)."""
    with open(os.path.join(runs_dir, f"{os.getpid()}-{time.monotonic_ns()}"), "w"):
        pass
    time.sleep(0.002)   # (over SLOW_RESULT: its result is recorded in the held-results file)
    raise ValueError("this try failed")


def kill_own_worker_after(seconds: float) -> None:
    time.sleep(seconds)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.timeout(120)
def test_a_retry_back_on_its_worker_is_not_finished_by_its_first_tries_record(tmp_path):
    """A task that raised goes back to the queue (max_retries) and often to the
    same worker, whose file still holds the first try's EXCEPTION. That worker
    dying before the retry starts must not finish the task with that stale
    record: the retry runs (before the fix, in 3 of 3 trials it ran once)."""
    with FederatedExecutor(max_workers=1, max_retries=1, worker_batch=8) as ex:
        assert ex.submit(abs, -1).result(DEADLINE) == 1
        for trial in range(2):
            runs_dir = tmp_path / f"runs-{trial}"
            runs_dir.mkdir()
            failing = ex.submit(fail_and_record, str(runs_dir))
            killer = ex.submit(kill_own_worker_after, 0.2)
            with pytest.raises(ValueError, match="this try failed"):
                failing.result(DEADLINE)
            with pytest.raises(Exception):
                killer.result(DEADLINE)
            assert len(os.listdir(runs_dir)) == 2, f"trial {trial}: ran {len(os.listdir(runs_dir))} time(s), not 2"


def test_no_held_results_file_is_made_where_its_space_cannot_be_had(tmp_path):
    """Its space is allocated when it is made (not sparse: a worker writing into
    a page a full tmpfs cannot back dies of SIGBUS after its task finished, and
    the task ran 3 times); where it cannot be (here: a file size limit under
    its size), no file, and the worker runs without one."""
    script = (
        "import resource, signal, sys\n"
        "from fedexec.worker import heldlog\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({heldlog.SIZE // 4}, {heldlog.SIZE // 4}))\n"
        "print(heldlog.create(sys.argv[1]))\n")
    path = tmp_path / "w.held"
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", (out.stdout, out.stderr)
    assert not path.exists()
    assert heldlog.create(str(tmp_path / "ok.held")) is True
    assert os.stat(tmp_path / "ok.held").st_blocks * 512 >= heldlog.SIZE   # allocated, not sparse


def test_a_fifo_put_in_place_of_the_held_file_reads_as_nothing_at_once(tmp_path):
    """A task may replace its worker's file by a FIFO before killing it: the
    pool's read must not wait for a writer for ever (it froze the embedded
    default's agent, and the process outlived its program)."""
    path = tmp_path / "w.held"
    os.mkfifo(path, 0o600)
    began = time.monotonic()
    assert heldlog.read_held(str(path)) == []
    assert time.monotonic() - began < 5
