"""`fedexec endpoint delete` tells the relay (relay/deregister.py): the relay
forgets the endpoint for good, fails its tasks saying so, keeps group tasks
for the other members, refuses a copy still running, stays that way after a
restart, and answers anyone but the owner as for an unknown endpoint. Real
relay, endpoints and CLI processes, two users (token mode), on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedexec import Client, DependencyError, FederatedExecutor, TaskRejected, UnknownEndpoint
from fedexec.config import EndpointConfig
from fedexec.relay.query import deregister_endpoint, lookup_endpoint, share_endpoint

from test_access import fedexec_cli, running_endpoint, wait_connected
from test_faults import free_port, running_relay, stop_process, tail

DEADLINE = 30


def start_endpoint(home: Path, name: str, token: str, log: Path) -> subprocess.Popen:
    """The endpoint configured under ``home`` as ``python -m fedexec.endpoint``."""
    env = {**os.environ, "FEDEXEC_HOME": str(home), "FEDEXEC_TOKEN": token,
           "PYTHONPATH": str(Path(__file__).parent)}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "fedexec.endpoint", "--name", name], env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def exits_with(proc: subprocess.Popen, log: Path, code: int, timeout: float = 20.0) -> None:
    try:
        assert proc.wait(timeout) == code, tail(log)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the endpoint did not stop within {timeout} s:\n{tail(log)}")


def relay_log_has(log: Path, text: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.timeout(240)
def test_delete_tells_the_relay_fails_its_tasks_and_only_the_owner_may(tmp_path):
    data = tmp_path / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "bob")}
    alice, bob = tokens["alice"], tokens["bob"]
    with running_relay(tmp_path, "--auth", "token") as address:
        relay_log = tmp_path / "relay.log"
        with running_endpoint(tmp_path, "ep-a", {"FEDEXEC_TOKEN": alice}, relay=address) as a, \
                running_endpoint(tmp_path, "ep-c", {"FEDEXEC_TOKEN": alice}, relay=address) as c:
            wait_connected(address, a.id, alice, a.proc, a.log)
            wait_connected(address, c.id, alice, c.proc, c.log)
            backup = tmp_path / "backup-a"          # an old copy of ep-a's config, for later
            shutil.copytree(a.home, backup)
            share_endpoint(address, a.id, add_users=["bob"], token=alice)
        # both stopped: tasks for them wait at the relay
        with pytest.warns(Warning):
            ex = FederatedExecutor(a.id, relay=address, token=alice)
        with pytest.warns(Warning):
            group = FederatedExecutor([a.id, c.id], relay=address, token=alice)
        try:
            mine = [ex.submit(pow, 2, i) for i in range(3)]
            grouped = [group.submit(pow, 3, i) for i in range(2)]
            dependent = ex.submit(pow, mine[0], 2)   # fails with the task it depends on
            time.sleep(1.5)   # accepted by the relay before the deletion below (another connection)

            # bob (ep-a is shared with him) and an unknown id get the same answer; ep-a stays
            assert deregister_endpoint(address, a.id, token=bob) == {"ep": a.id, "known": False}
            other = str(uuid.uuid4())
            assert deregister_endpoint(address, other, token=bob) == {"ep": other, "known": False}
            assert lookup_endpoint(address, a.id, token=alice) is not None
            assert relay_log_has(relay_log, f"refused user 'bob': delete endpoint {a.id}")
            assert not any(f.done() for f in mine)

            # alice deletes ep-a with the CLI, on its machine
            out = fedexec_cli("endpoint", "delete", "ep-a", "--yes",
                              env={"FEDEXEC_HOME": str(a.home), "FEDEXEC_TOKEN": alice})
            assert f"forgot endpoint {a.id}; 3 task(s) waiting for it failed" in out.stdout, out.stdout
            assert not (a.home / "endpoints" / "ep-a").exists()
            with pytest.raises(DependencyError, match=mine[0].task_id):
                dependent.result(DEADLINE)
            for future in mine:
                with pytest.raises(TaskRejected, match=f"endpoint 'ep-a' \\({a.id}\\) was deleted by its owner"):
                    future.result(DEADLINE)
            with Client(relay=address, token=alice) as client:   # what the Client API shows of them
                info = client.get_task(mine[0].task_id)
            assert info["status"] == "failed" and "was deleted by its owner" in str(info["exception"]), info
            assert lookup_endpoint(address, a.id, token=alice) is None
            assert lookup_endpoint(address, a.id, token=bob) is None
            with pytest.raises(UnknownEndpoint):
                FederatedExecutor(a.id, relay=address, token=alice)

            # the group's tasks stay for its other member, and run there once it is back
            time.sleep(1.0)
            assert not any(f.done() for f in grouped)
            c_log = tmp_path / "endpoint-ep-c-again.log"
            c_proc = start_endpoint(c.home, "ep-c", alice, c_log)
            try:
                assert [f.result(DEADLINE) for f in grouped] == [1, 3]
                # ep-c deleted while it runs: the relay tells it, and it stops (exit code 2)
                assert deregister_endpoint(address, c.id, token=alice) == {"ep": c.id, "known": True, "failed": 0}
                exits_with(c_proc, c_log, 2)
                assert "was deleted by its owner" in tail(c_log)
            finally:
                stop_process(c_proc)

            # an old copy of ep-a started again is refused, logged, and stops
            old_log = tmp_path / "endpoint-ep-a-old.log"
            old = start_endpoint(backup, "ep-a", alice, old_log)
            try:
                exits_with(old, old_log, 2)
            finally:
                stop_process(old)
            assert "was deleted by its owner" in tail(old_log)
            assert relay_log_has(relay_log, f"connect as endpoint {a.id}: it was deleted by its owner")
        finally:
            ex.shutdown(wait=False, cancel_futures=True)
            group.shutdown(wait=False, cancel_futures=True)

    # a restarted relay still does not know them, and still refuses the old copy
    with running_relay(tmp_path, "--auth", "token") as address:
        assert lookup_endpoint(address, a.id, token=alice) is None
        with Client(relay=address, token=alice) as client:   # the failures are in the record
            info = client.get_task(mine[1].task_id)
        assert info["status"] == "failed" and "was deleted by its owner" in str(info["exception"]), info
        assert lookup_endpoint(address, c.id, token=alice) is None
        with pytest.raises(UnknownEndpoint):
            FederatedExecutor(a.id, relay=address, token=alice)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("FEDEXEC_HOME", str(backup))
            config = EndpointConfig.load("ep-a")
            config.relay = address
            config.save()
        old_log = tmp_path / "endpoint-ep-a-old-2.log"
        old = start_endpoint(backup, "ep-a", alice, old_log)
        try:
            exits_with(old, old_log, 2)
        finally:
            stop_process(old)


@pytest.mark.timeout(120)
def test_delete_with_the_relay_unreachable_says_so_and_how_to_tell_it_later(tmp_path, fedexec_home):
    nowhere = f"tcp://127.0.0.1:{free_port()}"
    fedexec_cli("endpoint", "configure", "away", "--relay", nowhere)
    endpoint_id = EndpointConfig.load("away").endpoint_id
    other = str(uuid.uuid4())
    fedexec_cli("group", "set", "pair", "away", other)
    fedexec_cli("group", "set", "alone", "away")
    started = time.monotonic()
    out = fedexec_cli("endpoint", "delete", "away", "--yes", check=False)
    assert time.monotonic() - started < 20
    assert out.returncode == 1, out
    assert f"the relay at {nowhere} was NOT told" in out.stderr
    retry = f"fedexec endpoint delete --relay-only {endpoint_id} --relay {nowhere}"
    assert retry in out.stderr
    assert not (fedexec_home / "endpoints" / "away").exists()   # deleted here all the same
    assert "it left the endpoint group(s) pair" in out.stdout
    assert "the endpoint group(s) alone had no other endpoint and were removed" in out.stdout
    groups = fedexec_cli("group", "list").stdout
    assert other in groups and endpoint_id not in groups and "alone" not in groups

    # the command it names works once a relay listens (here on another port; this one never met the endpoint)
    with running_relay(tmp_path) as address:
        again = fedexec_cli(*retry.replace(nowhere, address).split()[1:])
        assert f"knows no endpoint {endpoint_id} of yours" in again.stdout


@pytest.mark.timeout(120)
def test_deregister_messages_are_checked_and_rate_limited(tmp_path):
    """Malformed DEREGISTERs get an error naming the problem (the relay goes
    on); a burst is cut at DELETIONS_PER_SECOND a second per user."""
    from fedexec import protocol as P
    from fedexec.relay.deregister import DELETIONS_PER_SECOND

    from test_access import RawClient

    with running_relay(tmp_path) as address:
        client = RawClient(address, None)
        try:
            for fields, why in (({}, "endpoint id must be a string"), ({"ep": "x" * 10_000}, "at most 256"),
                                ({"ep": "not-a-uuid"}, "is not a UUID"), ({"ep": 7}, "must be a string")):
                client.send(P.DEREGISTER, fields)
                error = client.expect(P.ERROR)
                assert error is not None and why in error.fields["msg"], (fields, error and error.fields)
            burst = DELETIONS_PER_SECOND * 2 + 1   # (a second may turn within the burst: at most twice the budget)
            for _ in range(burst):
                client.send(P.DEREGISTER, {"ep": str(uuid.uuid4())})
            answers: list = []
            deadline = time.monotonic() + 10
            while len(answers) < burst and time.monotonic() < deadline:
                if client.sock.poll(100):
                    answers.append(P.decode(client.sock.recv_multipart()))
            done = [a for a in answers if a.type == P.DEREGISTERED]
            cut = [a for a in answers if a.type == P.ERROR and "too many endpoint deletions" in a.fields["msg"]]
            assert len(done) + len(cut) == burst, [(a.type, a.fields) for a in answers]
            assert DELETIONS_PER_SECOND <= len(done) <= 2 * DELETIONS_PER_SECOND and cut
            assert all(a.fields["known"] is False for a in done)
            client.send(P.LOOKUP, {"ep": str(uuid.uuid4())})   # still serving
            assert client.expect(P.LOOKUP_REPLY) is not None
        finally:
            client.close()
