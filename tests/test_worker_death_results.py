"""A worker killed while it holds finished results not sent yet: those tasks
finish once, with the results the worker wrote in its held-results file
(worker/heldlog.py, pool/recovery.py), instead of running a second time
elsewhere. Only the task that killed it runs again (or fails with
WorkerLost), as before."""

from __future__ import annotations

import os
import signal
import struct
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
