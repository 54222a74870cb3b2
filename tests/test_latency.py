"""The small-task latency work (issue 17's profile, issue 14's shell target):
fewer messages and wake-ups per task, and what they must not break.

- The relay's record: a longer commit window (the embedded default's) nets
  out a task submitted, finished and acknowledged within it, and a read of
  what was just recorded (``RelayStore.sync``) does not wait the window out.
- Start notices alone wait ``outbox.START_DELAY``; results do not.
- The client's acknowledgements wait for its next batch, and go before it: a
  user at their task quota (which counts unacknowledged results) can go on
  submitting one task at a time.

Real relays, endpoints and SQLite record; nothing mocked.
"""

from __future__ import annotations

import operator
import sqlite3
import time

import pytest

from fedexec import FederatedExecutor
from fedexec.embedded import EMBEDDED_COMMIT_WINDOW
from fedexec.outbox import FLUSH_DELAY, START_DELAY, ResultOutbox
from fedexec.relay.store import GROUP_COMMIT_WINDOW, RelayStore

from test_access import fedexec_cli, running_endpoint, wait_connected
from test_faults import running_relay


def task_rows(store: RelayStore) -> int:
    db = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM tasks").fetchone()[0]
    finally:
        db.close()


def test_a_task_done_within_the_commit_window_is_never_written_and_sync_cuts_the_window(tmp_path):
    store = RelayStore(tmp_path / "record", commit_window=1.0)
    try:
        # submitted, finished and acknowledged in three turns of the relay's loop, within one window
        store.add_task(b"a" * 16, b"client", "ep", b"f" * 32, 0, "3.11", b"args", "alice")
        store.flush()
        store.add_result(b"a" * 16, 0, b"result", "alice")
        store.flush()
        assert store.acknowledge([b"a" * 16], "alice") == [b"a" * 16]
        # and one that is still out when the window closes
        store.add_task(b"b" * 16, b"client", "ep", b"f" * 32, 0, "3.11", b"args", "alice")
        started = time.monotonic()
        assert store.sync()
        took = time.monotonic() - started
        assert took < 0.5, f"sync() waited {took:.3f} s of the 1 s commit window"
        assert task_rows(store) == 1   # b only: a cancelled out in the same commit
        assert store.task_outcome(b"b" * 16) is not None and store.task_outcome(b"a" * 16) is None
    finally:
        store.close()


def test_the_commit_window_is_checked(tmp_path):
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="commit_window"):
            RelayStore(tmp_path / f"record-{bad}", commit_window=bad)


def test_start_notices_alone_wait_but_results_do_not():
    box = ResultOutbox()
    box.start(b"t" * 16)
    now = time.monotonic()
    assert not box.due(now, nothing_else=False)   # a quick task's result will come first
    assert box.wait_ms(now, 1000) >= round(START_DELAY * 1000) - 1
    assert box.due(now + START_DELAY, nothing_else=False)
    assert box.due(now, nothing_else=True)          # a task that goes alone (its notice at once)
    box.add(b"t" * 16, 0, b"value")
    assert box.wait_ms(time.monotonic(), 1000) <= round(FLUSH_DELAY * 1000)
    assert box.due(time.monotonic() + FLUSH_DELAY, nothing_else=False)
    (message,) = box.take()
    assert not box
    assert len(message) >= 1


@pytest.mark.timeout(120)
def test_a_long_task_still_shows_running_and_quick_ones_need_no_notice():
    with FederatedExecutor(max_workers=1) as ex:
        assert ex.submit(operator.add, 1, 1).result(60) == 2   # (the pool and its worker are up)
        slow = ex.submit(time.sleep, 1.5)
        deadline = time.monotonic() + 1.2
        while not slow.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slow.running(), "a task running for a second was not reported running"
        assert slow.result(30) is None
        assert [ex.submit(operator.add, i, 1).result(30) for i in range(50)] == list(range(1, 51))


@pytest.mark.timeout(120)
def test_a_user_at_the_task_quota_submits_one_after_another(tmp_path):
    """Unacknowledged results count against the task quota (here 1): each
    next task may go only once the last result is acknowledged, so the
    acknowledgement that waited for the next batch must go before it."""
    token = fedexec_cli("relay", "add-user", "alice", "--data-dir", tmp_path / "relay-data").stdout.strip()
    with running_relay(tmp_path, "--auth", "token", "--max-tasks-per-user", "1") as address:
        with running_endpoint(tmp_path, "one", {"FEDEXEC_TOKEN": token}, relay=address) as ep:
            wait_connected(address, ep.id, token, ep.proc, ep.log)
            with FederatedExecutor(ep.id, relay=address, token=token) as ex:
                assert [ex.submit(operator.add, i, 1).result(30) for i in range(30)] == list(range(1, 31))


def test_the_embedded_relay_keeps_its_record_in_memory_and_would_commit_no_more_often_than_a_started_one():
    assert GROUP_COMMIT_WINDOW <= EMBEDDED_COMMIT_WINDOW <= 0.1
    with FederatedExecutor(max_workers=1) as ex:
        relay = ex._dispatcher.services.processes[0]
        assert relay.args[relay.args.index("--commit-window") + 1] == str(EMBEDDED_COMMIT_WINDOW)
        assert "--memory-record" in relay.args
        assert ex.submit(operator.mul, 6, 7).result(30) == 42
