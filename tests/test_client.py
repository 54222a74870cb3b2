"""fedexec.Client (the Globus Compute-shaped API) and task listing, through a
token-mode relay started from the CLI with two users (alice and bob), each
with an endpoint of their own, as real processes on loopback."""

from __future__ import annotations

import operator
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedexec import Client, FederatedExecutor, TaskLost, TaskPending
from fedexec import protocol as P
from fedexec.relay import inspect as relay_inspect

from test_access import RawClient, fedexec_cli, running_endpoint, slow_value, wait_connected
from test_faults import running_relay, stop_process, tail

DEADLINE = 30


def double(x):
    return 2 * x


def fails(message):
    raise ValueError(message)


def wait_done(client: Client, task_id: str, timeout: float = DEADLINE) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.get_task(task_id)
        if not info["pending"]:
            return info
        time.sleep(0.1)
    pytest.fail(f"task {task_id} not done within {timeout} s: {info}")


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """A token-mode relay (users alice and bob, added with the CLI) with an
    endpoint of each user's."""
    directory = tmp_path_factory.mktemp("client-relay")
    data = directory / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "bob")}
    with running_relay(directory, "--auth", "token") as address:
        with running_endpoint(directory, "alice-ep", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address,
                              max_workers=2) as alice_ep, \
                running_endpoint(directory, "bob-ep", {"FEDEXEC_TOKEN": tokens["bob"]}, relay=address) as bob_ep:
            wait_connected(address, alice_ep.id, tokens["alice"], alice_ep.proc, alice_ep.log)
            wait_connected(address, bob_ep.id, tokens["bob"], bob_ep.proc, bob_ep.log)
            yield SimpleNamespace(address=address, data=data, tokens=tokens, alice_ep=alice_ep, bob_ep=bob_ep,
                                  dir=directory, log=directory / "relay.log")


@pytest.fixture
def alice(relay):
    with Client(relay=relay.address, token=relay.tokens["alice"]) as client:
        yield client


@pytest.fixture
def bob(relay):
    with Client(relay=relay.address, token=relay.tokens["bob"]) as client:
        yield client


@pytest.mark.timeout(120)
def test_register_run_get_result_read_twice(relay, alice):
    func_id = alice.register_function(double, description="doubles")
    assert func_id == alice.register_function(double, description="doubles")   # a content hash: the same again
    info = alice.get_function(func_id)
    assert info["function_name"] == "double" and info["description"] == "doubles" and info["yours"]
    assert info["function"](4) == 8
    task_id = alice.run(21, endpoint_id=relay.alice_ep.id, function_id=func_id)
    uuid.UUID(task_id)
    done = wait_done(alice, task_id)
    assert done["status"] == "success" and done["result"] == 42 and done["endpoint_id"] == relay.alice_ep.id
    assert done["completed"] >= done["submitted"] > 0
    time.sleep(0.5)   # its executor has acknowledged it by now: still readable, as often as asked
    for _ in range(3):
        assert alice.get_result(task_id) == 42


@pytest.mark.timeout(120)
def test_pending_failed_batch_and_delete(relay, alice):
    slow = alice.register_function(slow_value)
    bad = alice.register_function(fails)
    task_id = alice.run(3.0, "late", endpoint_id=relay.alice_ep.id, function_id=slow)
    with pytest.raises(TaskPending) as pending:
        alice.get_result(task_id)
    assert pending.value.status in relay_inspect.PENDING_STATUSES
    failed = alice.run("boom", endpoint_id=relay.alice_ep.id, function_id=bad)
    info = wait_done(alice, failed)
    assert info["status"] == "failed" and isinstance(info["exception"], Exception)
    with pytest.raises(Exception, match="boom"):
        alice.get_result(failed)
    batch = alice.create_batch()
    for i in range(5):
        batch.add(0.0, i, endpoint_id=relay.alice_ep.id, function_id=slow)
    ids = alice.batch_run(batch)
    assert len(ids) == 5
    for task_id_ in ids:
        wait_done(alice, task_id_)
    results = alice.get_batch_result(ids)
    assert [results[t]["result"] for t in ids] == list(range(5))
    assert alice.delete_result(ids[0]) is True
    assert alice.delete_result(ids[0]) is False
    with pytest.raises(TaskLost):
        alice.get_task(ids[0])
    assert wait_done(alice, task_id)["result"] == "late"


@pytest.mark.timeout(120)
def test_a_result_survives_a_client_restart(relay, tmp_path):
    program = tmp_path / "first.py"
    program.write_text(f"""
from fedexec import Client
from test_client import double
with Client(relay={relay.address!r}, token={relay.tokens['alice']!r}) as c:
    fid = c.register_function(double)
    tid = c.run(50, endpoint_id={relay.alice_ep.id!r}, function_id=fid)
    print(tid, fid, flush=True)
""")
    out = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert out.returncode == 0, out.stderr
    task_id, func_id = out.stdout.split()
    with Client(relay=relay.address, token=relay.tokens["alice"]) as again:
        assert again.get_result(task_id) == 100
        assert again.get_result(task_id) == 100
        # the function registered by the other process runs from here by its id alone
        assert again.get_result(wait_done(again, again.run(1, endpoint_id=relay.alice_ep.id,
                                                          function_id=func_id))["task_id"]) == 2
    # reattach reads it too, and does not consume it
    with FederatedExecutor(relay.alice_ep.id, relay=relay.address, token=relay.tokens["alice"]) as ex:
        assert ex.reattach([task_id])[0].result(DEADLINE) == 100
        assert ex.reattach([task_id])[0].result(DEADLINE) == 100
    with Client(relay=relay.address, token=relay.tokens["alice"]) as again:
        assert again.get_result(task_id) == 100


@pytest.mark.timeout(120)
def test_another_users_ids_are_as_unknown(relay, alice, bob):
    func_id = alice.register_function(double)
    private = alice.run(7, endpoint_id=relay.alice_ep.id, function_id=func_id)
    wait_done(alice, private)
    unknown = str(uuid.uuid4())
    for task_id in (private, unknown):
        with pytest.raises(TaskLost) as lost:
            bob.get_task(task_id)
        assert "alice" not in str(lost.value) and "another user" not in str(lost.value)
        with pytest.raises(TaskLost):
            bob.get_result(task_id)
        assert bob.delete_result(task_id) is False
    # the relay's answers to bob are the same for alice's id and an unknown one
    rows = bob.questions.task_rows([private, unknown], results=True)
    assert rows[private][1:] == rows[unknown][1:]
    assert all(t["task_id"] != private for t in bob.list_tasks(limit=1000))
    with pytest.raises(LookupError):   # alice's private function
        bob.get_function(func_id)
    assert alice.get_result(private) == 14   # bob's delete did nothing
    # a public one bob may read (not unpickled for him) and run on his own endpoint
    public = alice.register_function(operator.mul, public=True)
    info = bob.get_function(public)
    assert info["public"] and not info["yours"] and "function" not in info
    assert bob.get_result(wait_done(bob, bob.run(6, 7, endpoint_id=relay.bob_ep.id,
                                                 function_id=public))["task_id"]) == 42
    # endpoints: each sees their own
    assert {e["id"] for e in bob.list_endpoints()} == {relay.bob_ep.id}
    with pytest.raises(LookupError):
        bob.get_endpoint_status(relay.alice_ep.id)


@pytest.mark.timeout(120)
def test_endpoint_status_and_metadata(relay, alice):
    deadline = time.monotonic() + DEADLINE   # (as the endpoint counts them: once its pool has started)
    while (status := alice.get_endpoint_status(relay.alice_ep.id))["workers"] != 2 or status["blocks"] is None:
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert status["status"] == "online" and status["queued"] == 0 and status["blocks"] == 1
    assert 0 <= status["idle_workers"] <= 2
    meta = alice.get_endpoint_metadata(relay.alice_ep.id)
    import fedexec
    import socket
    assert meta["hostname"] == socket.gethostname() and meta["fedexec_version"] == fedexec.__version__
    assert meta["python_version"] == P.PYTHON_VERSION and meta["provider"] == "local"
    assert relay.alice_ep.id in {e["id"] for e in alice.list_endpoints()}


@pytest.mark.timeout(120)
def test_list_tasks_filters_and_pages(relay, tmp_path):
    data = relay.data   # a user of their own, so the listing holds only this test's tasks
    token = fedexec_cli("relay", "add-user", "carol", "--data-dir", data).stdout.strip()
    with running_endpoint(tmp_path, "carol-ep", {"FEDEXEC_TOKEN": token}, relay=relay.address) as ep:
        wait_connected(relay.address, ep.id, token, ep.proc, ep.log)
        with Client(relay=relay.address, token=token) as carol:
            start = time.time()
            ok = carol.register_function(double)
            bad = carol.register_function(fails)
            good_ids = [carol.run(i, endpoint_id=ep.id, function_id=ok) for i in range(25)]
            bad_ids = [carol.run("x", endpoint_id=ep.id, function_id=bad) for _ in range(3)]
            for task_id in good_ids + bad_ids:
                wait_done(carol, task_id)
            everything = carol.list_tasks(limit=1000)
            assert {t["task_id"] for t in everything} == set(good_ids + bad_ids)
            submitted = [t["submitted"] for t in everything]
            assert submitted == sorted(submitted, reverse=True)
            assert {t["task_id"] for t in carol.list_tasks(status="failed", limit=1000)} == set(bad_ids)
            assert {t["task_id"] for t in carol.list_tasks(status="success", limit=1000)} == set(good_ids)
            assert carol.list_tasks(status="pending") == []
            assert len(carol.list_tasks(limit=7)) == 7
            assert carol.list_tasks(endpoint_id=relay.alice_ep.id) == []
            assert carol.list_tasks(since=time.time() + 60) == []
            assert len(carol.list_tasks(since=start - 1, limit=1000)) == 28
            # pages of at most 10 through the raw question: each page's cursor gives the next
            pages = list(carol.questions.list_tasks(limit=28))
            assert [str(uuid.UUID(bytes=row[0])) for row in pages] == [t["task_id"] for t in everything]
            answer = carol.questions.ask("list", limit=10).fields
            assert len(answer["tasks"]) == 10 and answer["next"] is not None
            second = carol.questions.ask("list", limit=10, before=answer["next"]).fields
            assert not {row[0] for row in answer["tasks"]} & {row[0] for row in second["tasks"]}
            with pytest.raises(RuntimeError, match="limit must be"):
                carol.questions.ask("list", limit=relay_inspect.MAX_LIST + 1)


@pytest.mark.timeout(120)
def test_a_flood_of_questions_is_rate_limited_per_user(relay):
    raw = RawClient(relay.address, relay.tokens["bob"])
    try:
        for q in range(3 * relay_inspect.QUERIES_PER_SECOND):
            raw.send(P.INSPECT, {"op": "tasks", "q": q, "tids": [uuid.uuid4().bytes]})
        answers = [raw.expect(P.INSPECTED) for _ in range(3 * relay_inspect.QUERIES_PER_SECOND)]
        busy = sum(1 for a in answers if a is not None and a.fields.get("busy"))
        assert busy >= relay_inspect.QUERIES_PER_SECOND - 5, busy
    finally:
        raw.close()
    # alice is not slowed by bob's flood beyond the relay's total
    with Client(relay=relay.address, token=relay.tokens["alice"]) as alice:
        assert isinstance(alice.list_endpoints(), list)


@pytest.mark.timeout(120)
def test_cli_task_commands(relay, alice, tmp_path):
    func_id = alice.register_function(double)
    task_id = alice.run(8, endpoint_id=relay.alice_ep.id, function_id=func_id)
    wait_done(alice, task_id)
    env = {"FEDEXEC_TOKEN": relay.tokens["alice"]}
    listed = fedexec_cli("task", "list", "--relay", relay.address, "--status", "success", env=env).stdout
    assert task_id in listed
    status = fedexec_cli("task", "status", task_id, "--relay", relay.address, env=env).stdout
    assert "success" in status
    result = fedexec_cli("task", "result", task_id, "--relay", relay.address, env=env).stdout
    assert result.strip() == "16"
    bob_env = {"FEDEXEC_TOKEN": relay.tokens["bob"]}
    out = fedexec_cli("task", "result", task_id, "--relay", relay.address, env=bob_env, check=False)
    assert out.returncode == 1 and "no task" in out.stderr and "Traceback" not in out.stderr
    # a task for an endpoint that is not connected waits at the relay: cancelled from the command line
    with running_endpoint(tmp_path, "alice-off", {"FEDEXEC_TOKEN": relay.tokens["alice"]},
                          relay=relay.address) as off:
        wait_connected(relay.address, off.id, relay.tokens["alice"], off.proc, off.log)
        stop_process(off.proc)
    deadline = time.monotonic() + DEADLINE
    while alice.get_endpoint_status(off.id)["status"] != "offline":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    queued = alice.run(8, endpoint_id=off.id, function_id=func_id)
    deadline = time.monotonic() + DEADLINE
    while "waiting-for-ep" not in fedexec_cli("task", "status", queued, "--relay", relay.address, env=env).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    out = fedexec_cli("task", "cancel", queued, "--relay", relay.address, env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert "cancelled" in out.stdout
    assert alice.get_task(queued)["status"] == "cancelled"
    out = fedexec_cli("task", "cancel", task_id, "--relay", relay.address, env=env, check=False)
    assert out.returncode == 1 and "could not be cancelled" in out.stderr


def readme_section(title: str) -> list[str]:
    """The Python code blocks of a README section."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.index("\n## ", start + 1)
    blocks = text[start:end].split("```python\n")[1:]
    return [block.split("```", 1)[0] for block in blocks]


@pytest.mark.timeout(180)
def test_the_readme_funcx_snippets_run_as_written(relay, tmp_path):
    blocks = readme_section("Coming from funcX / Globus Compute")
    assert len(blocks) == 2 and "from fedexec import Client" in blocks[0]
    program = tmp_path / "funcx_snippets.py"
    program.write_text("\n".join(blocks).replace("'ENDPOINT_ID'", repr(relay.alice_ep.id)))
    out = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=150, cwd=tmp_path,
                         env={**os.environ, "FEDEXEC_RELAY": relay.address, "FEDEXEC_TOKEN": relay.tokens["alice"]})
    assert out.returncode == 0, out.stderr
    import platform
    lines = out.stdout.splitlines()
    assert lines == [platform.platform(), "Hello Bob Smith", repr([f"Hello {x} Smith" for x in range(5)])], out.stdout
    # the Client API section's CLI lines name commands that exist
    for line in (Path(__file__).parent.parent / "README.md").read_text().splitlines():
        if line.startswith("fedexec task "):
            action = line.split()[2]
            assert fedexec_cli("task", action, "--help").returncode == 0


@pytest.mark.timeout(180)
def test_kept_results_are_bounded_per_user_and_survive_a_relay_kill(tmp_path):
    """--max-kept-per-user 3: of five received results the two received first
    go; the kept ones survive a kill -9 of the relay (they are in its record)."""
    data = tmp_path / "relay-data"
    token = fedexec_cli("relay", "add-user", "dave", "--data-dir", data).stdout.strip()
    with running_relay(tmp_path, "--auth", "token", "--max-kept-per-user", "3") as address:
        with running_endpoint(tmp_path, "dave-ep", {"FEDEXEC_TOKEN": token}, relay=address) as ep:
            wait_connected(address, ep.id, token, ep.proc, ep.log)
            with FederatedExecutor(ep.id, relay=address, token=token) as ex:
                ids = []
                for i in range(5):   # one after the other: received (acknowledged) in this order
                    future = ex.submit(double, i)
                    assert future.result(DEADLINE) == 2 * i
                    ids.append(future.task_id)
            time.sleep(0.5)   # the acknowledgements reach the relay
            with Client(relay=address, token=token) as dave:
                for task_id in ids[:2]:
                    with pytest.raises(TaskLost):
                        dave.get_task(task_id)
                assert [dave.get_result(t) for t in ids[2:]] == [4, 6, 8]
                assert {t["task_id"] for t in dave.list_tasks()} == set(ids[2:])
    # (running_relay stops its relay; a kill -9 of the next one below)
    import signal
    with running_relay(tmp_path, "--auth", "token", "--max-kept-per-user", "3") as address:
        with Client(relay=address, token=token) as dave:
            assert [dave.get_result(t) for t in ids[2:]] == [4, 6, 8]
        pid = __import__("json").loads((data / "relay.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    with running_relay(tmp_path, "--auth", "token", "--max-kept-per-user", "3") as address:
        with Client(relay=address, token=token) as dave:
            assert [dave.get_result(t) for t in ids[2:]] == [4, 6, 8]
            assert dave.delete_result(ids[2]) is True
            with pytest.raises(TaskLost):
                dave.get_result(ids[2])


@pytest.mark.timeout(120)
def test_malformed_questions_are_refused_by_name(relay):
    raw = RawClient(relay.address, relay.tokens["bob"])
    try:
        for fields, why in (({"op": "drop-tables"}, "unknown inspect op"),
                            ({"op": "tasks", "tids": "x"}, "task ids must be a list"),
                            ({"op": "tasks", "tids": [], "results": "yes"}, "results must be true or false"),
                            ({"op": "list", "limit": 0}, "limit must be"),
                            ({"op": "list", "status": "done"}, "status must be one of"),
                            ({"op": "list", "before": [1.0, b"short"]}, "before must be a cursor"),
                            ({"op": "fn_get", "h": b"x"}, "a function id (h) is 32 bytes"),
                            ({"op": "fn_put", "h": b"x" * 32, "public": True}, "one frame")):
            raw.send(P.INSPECT, fields)
            error = raw.expect(P.ERROR)
            assert error is not None and why in error.fields["msg"], (fields, error and error.fields)
        # a body that is not what its id says is not registered
        raw.send(P.INSPECT, {"op": "fn_put", "h": b"\0" * 32, "name": "f", "public": False}, [b"not a pickle"])
        answer = raw.expect(P.INSPECTED)
        assert "does not match its id" in answer.fields["err"]
        raw.send(P.INSPECT, {"op": "fn_get", "h": b"\0" * 32})
        assert raw.expect(P.INSPECTED).fields["found"] is False
    finally:
        raw.close()


def blob_of(n):
    return b"k" * n


@pytest.mark.timeout(180)
def test_kept_results_yield_their_bytes_to_new_work_oldest_first(tmp_path):
    """Kept results count against their user's byte quota; a task needing the
    bytes is not refused: the oldest received results go to make room."""
    data = tmp_path / "relay-data"
    token = fedexec_cli("relay", "add-user", "erin", "--data-dir", data).stdout.strip()
    with running_relay(tmp_path, "--auth", "token", "--max-bytes-per-user", "200000") as address:
        with running_endpoint(tmp_path, "erin-ep", {"FEDEXEC_TOKEN": token}, relay=address) as ep:
            wait_connected(address, ep.id, token, ep.proc, ep.log)
            with FederatedExecutor(ep.id, relay=address, token=token) as ex:
                first = ex.submit(blob_of, 70_000)
                assert len(first.result(DEADLINE)) == 70_000
                second = ex.submit(blob_of, 70_000)
                assert len(second.result(DEADLINE)) == 70_000
                time.sleep(0.5)   # both received and kept: 140,000 of erin's 200,000 bytes
                with Client(relay=address, token=token) as erin:
                    assert len(erin.get_result(first.task_id)) == 70_000
                    # 100,000 bytes of arguments: room is made by dropping the oldest kept result
                    assert ex.submit(len, b"a" * 100_000).result(DEADLINE) == 100_000
                    with pytest.raises(TaskLost):
                        erin.get_result(first.task_id)
                    assert len(erin.get_result(second.task_id)) == 70_000


@pytest.mark.timeout(120)
def test_executor_registry_and_the_embedded_relay_keeps_nothing_received(relay):
    with FederatedExecutor(relay.alice_ep.id, relay=relay.address, token=relay.tokens["alice"]) as ex:
        function_id = ex.register_function(double)
        assert ex.submit_to_registered_function(function_id, (3,)).result(DEADLINE) == 6
        assert ex.submit_to_registered_function(function_id, kwargs={"x": 4}).result(DEADLINE) == 8
        with pytest.raises(LookupError):
            ex.submit_to_registered_function("0" * 64, (1,))
        with pytest.raises(ValueError, match="not a function id"):
            ex.submit_to_registered_function("nope", (1,))
        with pytest.raises(TypeError, match="runs on endpoints only"):
            ex._registered[function_id](1)
    # the embedded default's relay dies with its program: it keeps no received result
    with FederatedExecutor(max_workers=1) as ex:
        future = ex.submit(double, 5)
        assert future.result(DEADLINE) == 10
        questions = ex._questions()
        deadline = time.monotonic() + DEADLINE
        while questions.task_rows([future.task_id], results=False)[future.task_id][1] != "unknown":
            assert time.monotonic() < deadline
            time.sleep(0.1)
