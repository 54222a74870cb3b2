"""Start notices of short tasks that go one at a time (shell commands) are
held at the pool (outbox.notices_wait): their results come first and the
notices are dropped, so a short shell task costs no start notice message at
each hop to the client; a long one still shows running, and cancel() stays
truthful (a cancel of a running task is answered at once)."""

from __future__ import annotations

import os
import time

import pytest

from fedexec import FederatedExecutor, ShellFunction
from fedexec import protocol as P
from fedexec.outbox import START_DELAY, ResultOutbox, notices_wait
from fedexec.taskdirs import TASK_DIR_ENV

DEADLINE = 60.0
TASK = b"t" * 16


def test_held_notices_wait_unless_they_answer_a_cancel():
    assert not notices_wait(None)                 # not measured yet: at once, as before
    assert notices_wait(0.002)                    # a shell command's few milliseconds
    assert not notices_wait(START_DELAY * 2)      # long tasks: their notices would go anyway
    box = ResultOutbox()
    box.start(TASK)
    now = time.monotonic()
    assert box.due(now, nothing_else=True)                          # unchanged without notices_wait
    assert not box.due(now, nothing_else=True, notices_wait=True)   # held: the result may come first
    assert box.wait_ms(now, 1000) >= round(START_DELAY * 1000) - 1
    assert box.due(now + START_DELAY, nothing_else=True, notices_wait=True)   # a long task: announced
    box.add(TASK, P.OK, b"value")
    (message,) = box.take()
    assert P.decode(message).fields.get("started", []) == []   # finished: its notice dropped
    box.start(TASK, answer=True)                  # a cancel's answer: at once
    assert box.due(time.monotonic(), nothing_else=False, notices_wait=True)
    assert box.wait_ms(time.monotonic(), 1000) == 0
    (message,) = box.take()
    assert list(P.decode(message).fields["started"]) == [TASK]
    assert not box.answer and not box.due(time.monotonic(), nothing_else=True, notices_wait=True)


class _NoticeCounter:
    """Counts the start notices this client receives (the relay's RESULTS
    messages are decoded by ``protocol.decode``, wrapped here to look)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = P.decode

        def decode(frames, *args, **kwargs):
            msg = original(frames, *args, **kwargs)
            if msg.type == P.RESULTS:
                self.count += len(msg.fields.get("started") or ())
            return msg

        monkeypatch.setattr(P, "decode", decode)


@pytest.mark.timeout(180)
def test_short_shell_tasks_send_no_start_notices_and_a_long_one_shows_running(tmp_path, monkeypatch):
    monkeypatch.setenv(TASK_DIR_ENV, str(tmp_path / "tasks"))
    short = ShellFunction("true")
    with FederatedExecutor(max_workers=1) as ex:
        for _ in range(20):   # the pool measures them: a few milliseconds each
            assert ex.submit(short).result(DEADLINE).returncode == 0
        counter = _NoticeCounter(monkeypatch)
        calls = 60
        for _ in range(calls):
            assert ex.submit(short).result(DEADLINE).returncode == 0
        # before, every one was announced (calls notices); now only those that ran past START_DELAY
        # (a loaded machine slows some): most are not
        assert counter.count < calls // 2, f"{counter.count} start notices for {calls} short shell tasks"

        long = ex.submit(ShellFunction("sleep 2; echo done"))
        deadline = time.monotonic() + 1.5
        while not long.running() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert long.running(), "a shell task running for a second and a half was not reported running"
        assert counter.count >= 1
        assert long.cancel() is False   # running: it will not be stopped, and cancel() says so
        assert long.result(DEADLINE).stdout == "done\n"


@pytest.mark.timeout(180)
def test_cancel_stays_truthful_while_notices_are_held(tmp_path, monkeypatch):
    """Cancels at a few moments around a short-measured shell task's start
    (before its notice is due): True only if the command never ran."""
    monkeypatch.setenv(TASK_DIR_ENV, str(tmp_path / "tasks"))
    with FederatedExecutor(max_workers=1) as ex:
        for _ in range(20):
            ex.submit(ShellFunction("true")).result(DEADLINE)
        outcomes = []
        for i, delay in enumerate([0.0, 0.001, 0.002, 0.004, 0.006, 0.008, 0.012, 0.02] * 2):
            marker = tmp_path / f"ran-{i}"
            future = ex.submit(ShellFunction("touch {path}; sleep 0.3"), path=str(marker))
            time.sleep(delay)
            started = time.monotonic()
            cancelled = future.cancel()
            answered = time.monotonic() - started
            if cancelled:
                assert future.cancelled()
            else:
                assert future.result(DEADLINE).returncode == 0
            time.sleep(0.35)   # a command that was wrongly reported cancelled would have touched it by now
            assert marker.exists() != cancelled, (i, delay, cancelled)
            assert answered < 5.0, f"cancel() took {answered:.2f} s to answer"
            outcomes.append(cancelled)
        assert False in outcomes, "no cancel found its task running (the test did not test that case)"
