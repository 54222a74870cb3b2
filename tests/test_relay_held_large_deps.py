"""Results over 16 MiB feeding tasks the RELAY holds (relay/kept.py).

A dependent task whose dependencies ran on another endpoint, on a group of
endpoints, or across a relay restart is held at the relay; when a
dependency's result is an upload (over transfer.BIG_THRESHOLD), the relay
keeps that upload while the dependent needs it (a client's DROP is put off),
sends the dependent with its id (option "dr"), and lets only that
dependent's endpoint fetch it. Real relay and endpoint processes. The
relays here keep no received result (--no-keep-results), so that the
uploads' lifetime is kept.py's alone; a relay that keeps results keeps a
result's upload until the result goes (relay/retained.py; the sandbox test
below deletes it).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from concurrent.futures import Future
from pathlib import Path

import cloudpickle
import pytest

from fedexec import Client, FederatedExecutor
from fedexec import protocol as P
from fedexec.config import EndpointConfig
from fedexec.dependencies import snapshot
from fedexec.serialize import deserialize, deserialize_large, serialize_function
from fedexec.transfer import TransferError, TransferLink, big_ref, is_big, parse_big

from test_access import RawClient, fedexec_cli, running_endpoint, slow_value, wait_connected
from test_dependencies import _big_results_feed_their_dependents, big_ones, big_sum, sleep_then
from test_durability import Relay
from test_faults import lookup_endpoint, running_relay, stop_process, tail
from test_routing import Endpoints
from test_sandbox import big_dependency_in_sandbox, big_result_in_sandbox, bwrap, sandboxed_federation  # noqa: F401

cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEADLINE = 90.0
N = 20 * 2**17   # float64 elements of big_ones: 20 MiB


def big_ones_after(delay, scale):
    time.sleep(delay)
    return big_ones(scale)


def big_sum_after(array, plus, delay):
    time.sleep(delay)
    return float(array.sum()) + plus


def uploads_at(data_dir: Path) -> list[Path]:
    """The uploads (complete or partial) in a relay's spool, every user's."""
    return sorted(p for p in (data_dir / "spool").glob("*/*") if p.name != "user")


def markers_at(data_dir: Path) -> list[Path]:
    """The put-off DROPs noted on disk (relay/kept.py)."""
    return sorted((data_dir / "kept").glob("*"))


def assert_acknowledged(address: str, task_id: bytes) -> None:
    """The relay's record no longer has task ``task_id``'s result: it was
    acknowledged (RESUME answers that it is lost, saying so)."""
    client = RawClient(address, None)
    try:
        # the acknowledgement is written by the relay's writer thread: until its commit the record
        # may still answer with the result itself, so ask again for a while
        deadline = time.monotonic() + 20
        while True:
            client.send(P.RESUME, {"tids": [task_id]})
            msg = client.expect(P.RESULTS, 20)
            rows = {row[0]: (row[1], P.blob(msg.blobs, row[2])) for row in (msg.fields["rows"] if msg else ())}
            status, blob = rows.get(task_id, (None, b""))
            if status == P.FAILED:
                failure = P.unpack_failure(blob)
                assert failure["kind"] == P.LOST and "acknowledged" in failure["msg"], failure
                return
            assert time.monotonic() < deadline, ("the result stayed unacknowledged", status, bytes(blob)[:64])
            time.sleep(0.2)
    finally:
        client.close()


def wait_until(predicate, what: str, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {limit:g} s: {what}")
        time.sleep(0.05)


def outcome_of(client: RawClient, task_id: bytes, timeout: float = DEADLINE) -> tuple[int, bytes]:
    """The ``(status, blob)`` of a raw client's task (other outcomes are kept for later)."""
    deadline = time.monotonic() + timeout
    while task_id not in client.outcomes and time.monotonic() < deadline:
        msg = client.expect(P.RESULTS, max(0.1, deadline - time.monotonic()))
        for row in msg.fields["rows"] if msg else ():
            client.outcomes[row[0]] = (row[1], bytes(P.blob(msg.blobs, row[2])))
    if task_id not in client.outcomes:
        pytest.fail(f"no outcome for task {task_id.hex()} within {timeout:g} s")
    return client.outcomes.pop(task_id)


def submit_raw(client: RawClient, endpoint_id: str, fn, args_blob: bytes, options: dict | None = None) -> bytes:
    fn_hash, body = serialize_function(fn)
    blobs = P.Blobs()
    task_id = uuid.uuid4().bytes
    row = [task_id, fn_hash, blobs.ref(args_blob), blobs.ref(body), P.TASK_CALL, P.PYTHON_VERSION]
    if options:
        row.append(options)
    client.send(P.SUBMIT, {"ep": endpoint_id, "tasks": [row]}, blobs.frames)
    return task_id


@pytest.mark.timeout(300)
def test_a_large_result_feeds_a_dependent_on_another_endpoint_and_only_that_dependent_may_fetch_it(tmp_path):
    """Two endpoints of one user (and one of another user): A (20 MiB result)
    runs on the first, its dependent D on the second, so the relay holds D.
    The client still gets A's result, D gets its value, the upload is kept
    while D runs although the client dropped it, and is deleted after. No
    one else gets it: not bob as a client, not bob's endpoint naming a task
    of alice's that does not depend on A, nor naming D, which is not on his
    endpoint; and those refusals read the same as for an upload that does not
    exist. A client cannot set the relay's "dr" option itself."""
    data_dir = tmp_path / "relay-data"
    tokens = {user: fedexec_cli("relay", "add-user", user, "--data-dir", data_dir).stdout.strip()
              for user in ("alice", "bob")}
    alice_env, bob_env = {"FEDEXEC_TOKEN": tokens["alice"]}, {"FEDEXEC_TOKEN": tokens["bob"]}
    with running_relay(tmp_path, "--auth", "token", "--no-keep-results") as address, \
            running_endpoint(tmp_path, "alice-1", alice_env, relay=address) as ep1, \
            running_endpoint(tmp_path, "alice-2", alice_env, relay=address) as ep2, \
            running_endpoint(tmp_path, "bob-ep", bob_env, relay=address) as bob_ep:
        for ep, user in ((ep1, "alice"), (ep2, "alice"), (bob_ep, "bob")):
            wait_connected(address, ep.id, tokens[user], ep.proc, ep.log)
        alice, bob = RawClient(address, tokens["alice"]), RawClient(address, tokens["bob"])
        alice_link, bob_link = TransferLink(address, token=tokens["alice"]), TransferLink(address, token=tokens["bob"])
        try:
            bob.send(P.SHARE, {"ep": bob_ep.id, "add_users": ["alice"]})
            assert bob.expect(P.SHARED)
            # A on alice-1; D (A's value, + 1, after 10 s) on alice-2, sent while A runs: held at the relay
            a_id = submit_raw(alice, ep1.id, big_ones_after, cloudpickle.dumps(((1.0, 2.0), {})))
            d_args, found = snapshot(((Future(), 1, 10.0), {}))
            assert len(found) == 1
            d_id = submit_raw(alice, ep2.id, big_sum_after, d_args, {"d": [a_id]})
            t_id = alice.submit(bob_ep.id, slow_value, 20.0, "on bob's endpoint")   # depends on nothing

            status, ref = outcome_of(alice, a_id)
            assert status == P.OK and is_big(ref), (status, ref[:200])
            bid, size, digest = parse_big(ref)
            array = deserialize_large(alice_link.fetch_bytes(ref))   # the client gets A's large result
            assert array.shape == (N,) and array[0] == 2.0 and array[-1] == 2.0
            alice_link.drop(ref)   # as a client does once it has it: put off while D needs it
            upload = data_dir / "spool" / _user_dir(data_dir, "alice") / bid.hex()
            wait_until(lambda: len(markers_at(data_dir)) == 1, "the put-off DROP noted on disk")
            assert upload.exists(), uploads_at(data_dir)

            # the endpoint's owner may fetch it for D (what alice-2's agent did), nothing else may
            assert bytes(alice_link.fetch_bytes(ref, task_id=d_id))[:64] == bytes(alice_link.fetch_bytes(ref))[:64]
            other = alice_link.upload(os.urandom(P.MAX_HEADER))   # another upload of alice's
            with pytest.raises(TransferError, match="may not fetch the arguments of task") as own_other:
                alice_link.fetch_bytes(other, task_id=d_id)   # not a result D depends on
            with pytest.raises(TransferError, match="no upload .* of user 'bob'"):
                bob_link.fetch_bytes(ref)   # as a client: only his own uploads
            refusals = []
            for task_id, named in ((t_id, ref), (d_id, ref), (t_id, big_ref(os.urandom(16), size, digest)),
                                   (uuid.uuid4().bytes, ref)):
                with pytest.raises(TransferError, match="may not fetch the arguments of task") as info:
                    bob_link.fetch_bytes(named, task_id=task_id)
                refusals.append(str(info.value).replace(P.shorten(task_id), "<task>"))
            # T (alice's, on bob's endpoint) naming A's upload reads as T naming one that does not exist
            assert refusals[0] == refusals[2], refusals
            assert "alice" not in " ".join(refusals) and bid.hex() not in " ".join(refusals), refusals
            assert bid.hex() not in str(own_other.value)

            # a client cannot hand its own "dr" to an endpoint
            forged = submit_raw(alice, ep2.id, big_sum_after, d_args, {"dr": [[a_id, bid, size, digest]]})
            failure = alice.failure_of(forged, 20)
            assert failure["kind"] == P.REJECTED and "dr" in failure["msg"], failure
            # nor choose the nodes of a multi-node task (an endpoint's "nl", for its pools)
            forged = submit_raw(alice, ep2.id, big_sum_after, d_args, {"nl": ["node1", "node2"]})
            failure = alice.failure_of(forged, 20)
            assert failure["kind"] == P.REJECTED and "option nl" in failure["msg"], failure

            status, value = outcome_of(alice, d_id)
            assert status == P.OK, P.unpack_failure(value) if status == P.FAILED else value
            assert deserialize(value) == 2.0 * N + 1
            # D is done and the client dropped A's result: the upload and its marker go
            wait_until(lambda: not upload.exists() and not markers_at(data_dir),
                       f"A's upload deleted after D finished: {uploads_at(data_dir)} {markers_at(data_dir)}")
            with pytest.raises(TransferError):   # and no finished task opens it again
                alice_link.fetch_bytes(ref, task_id=d_id)
            alice_link.drop(other)
        finally:
            for closeable in (alice_link, bob_link, alice, bob):
                closeable.close()
        for ep in (ep1, ep2, bob_ep):
            assert ep.proc.poll() is None, tail(ep.log)
    assert "Traceback" not in tail(tmp_path / "relay.log", 200_000), tail(tmp_path / "relay.log")


def _user_dir(data_dir: Path, user: str) -> str:
    import hashlib
    return hashlib.sha256(user.encode()).hexdigest()[:32]


@pytest.mark.timeout(300)
def test_large_results_feed_dependents_on_a_group_of_two_endpoints_and_their_uploads_go_after(tmp_path):
    """On a group, every dependent is held at the relay: a 20 MiB result
    feeding a dependent, a chain of three, the client still getting each
    large result; a dependent cancelled while held lets its upload go. No
    upload is left once all are done."""
    data_dir = tmp_path / "relay-data"
    with running_relay(tmp_path, "--no-keep-results") as address:
        endpoints = Endpoints(tmp_path, address)
        try:
            a, b = endpoints("a", workers=2), endpoints("b", workers=2)
            with FederatedExecutor([a.id, b.id], relay=address) as ex:
                _big_results_feed_their_dependents(ex)
                wait_until(lambda: not uploads_at(data_dir), f"uploads deleted: {uploads_at(data_dir)}")
                # a dependent held for a slow dependency and a large one, cancelled while held
                large = ex.submit(big_ones, 3.0)
                slow = ex.submit(sleep_then, 20.0, 1.0)
                dependent = ex.submit(big_sum, large, slow)
                assert large.result(DEADLINE)[0] == 3.0
                wait_until(lambda: len(markers_at(data_dir)) == 1, "the put-off DROP noted on disk")
                assert len(uploads_at(data_dir)) == 1 and not slow.done()
                assert dependent.cancel() is True
                wait_until(lambda: not uploads_at(data_dir) and not markers_at(data_dir),
                           f"the upload deleted once its only dependent was cancelled: {uploads_at(data_dir)}")
                slow.cancel()
            assert not uploads_at(data_dir) and not markers_at(data_dir)
            for endpoint in (a, b):
                assert endpoint.proc.poll() is None, tail(endpoint.log)
        finally:
            endpoints.stop()


@pytest.mark.timeout(300)
def test_a_dependent_held_at_the_relay_across_a_kill_and_restart_gets_a_large_result(tmp_path):
    """The client has A's 20 MiB result and dropped it; D waits at the relay
    for a slow task too when the relay is killed -9 and started again: D
    still gets A's value (the put-off DROP was noted on disk), and A's upload
    goes once D is done, its result acknowledged."""
    data_dir = tmp_path / "relay-data"
    relay = Relay(tmp_path, "--no-keep-results")
    relay.start()
    endpoints = Endpoints(tmp_path, relay.address)
    try:
        a, b = endpoints("a", workers=2), endpoints("b", workers=2)
        with FederatedExecutor([a.id, b.id], relay=relay.address) as ex:
            large = ex.submit(big_ones, 2.0)
            slow = ex.submit(sleep_then, 12.0, 1.0)
            dependent = ex.submit(big_sum, large, slow)
            assert large.result(DEADLINE)[0] == 2.0
            wait_until(lambda: len(markers_at(data_dir)) == 1, "the put-off DROP noted on disk")
            if slow.done():
                pytest.fail("the slow task finished before the relay was killed: this machine is too loaded "
                            "for the test to show what it means to")
            relay.kill()
            assert len(uploads_at(data_dir)) == 1 and len(markers_at(data_dir)) == 1
            time.sleep(0.5)
            relay.start()
            assert dependent.result(DEADLINE) == 2.0 * N + 1.0
            wait_until(lambda: not uploads_at(data_dir) and not markers_at(data_dir),
                       f"A's upload deleted after D finished: {uploads_at(data_dir)} {markers_at(data_dir)}")
            # and A's result left the record: its acknowledgement, put off for D, outlived the restart
            assert_acknowledged(relay.address, large._task_bytes)
        for endpoint in (a, b):
            assert endpoint.proc.poll() is None, tail(endpoint.log)
    finally:
        endpoints.stop()
        relay.stop()


@pytest.mark.timeout(300)
def test_a_large_result_dropped_before_its_commit_is_made_again_after_a_restart_and_goes_with_its_dependent(tmp_path):
    """The relay is killed -9 after the client fetched and dropped A's 20 MiB
    result but before the record had it (the record is set back to that
    state: A's row as it was while A ran; a kill cannot be timed into those
    milliseconds). Started again, the relay runs A again: its new upload
    serves D, which the restart held again, and goes once D is done, with
    the one dropped before; A's result, which no client will fetch again,
    is acknowledged (the relay's record forgets it)."""
    data_dir = tmp_path / "relay-data"
    database = data_dir / "relay.sqlite3"
    relay = Relay(tmp_path, "--no-keep-results")
    relay.start()
    endpoints = Endpoints(tmp_path, relay.address)
    try:
        a, b = endpoints("a", workers=2), endpoints("b", workers=2)
        with FederatedExecutor([a.id, b.id], relay=relay.address) as ex:
            large = ex.submit(big_ones_after, 1.0, 2.0)
            slow = ex.submit(sleep_then, 15.0, 1.0)
            dependent = ex.submit(big_sum, large, slow)
            row = None
            deadline = time.monotonic() + DEADLINE
            while row is None or row[0] is None:   # A's row as it is while A runs: accepted, with its arguments
                if time.monotonic() > deadline:
                    pytest.fail(f"A's row was not in the record: {row}")
                with contextlib.closing(sqlite3.connect(database)) as db:
                    row = db.execute("SELECT args, args_file, state FROM tasks WHERE id=?",
                                     (large._task_bytes,)).fetchone()
                time.sleep(0.05)
            assert row[1] == 0 and row[2] == 0, row   # (small arguments, in the row; not finished)
            assert large.result(DEADLINE)[0] == 2.0
            wait_until(lambda: len(markers_at(data_dir)) == 1, "the put-off DROP noted on disk")
            dropped_before = uploads_at(data_dir)
            if slow.done():
                pytest.fail("the slow task finished before the relay was killed: this machine is too loaded "
                            "for the test to show what it means to")
            relay.kill()
            with contextlib.closing(sqlite3.connect(database)) as db, db:
                changed = db.execute("UPDATE tasks SET state=0, status=NULL, result=NULL, finished=NULL, "
                                     "result_file=0, args=? WHERE id=?", (row[0], large._task_bytes)).rowcount
            assert changed == 1
            relay.start()
            assert dependent.result(DEADLINE) == 2.0 * N + 1.0
            wait_until(lambda: not uploads_at(data_dir) and not markers_at(data_dir),
                       f"A's uploads deleted after D finished: before the kill {dropped_before}, "
                       f"now {uploads_at(data_dir)} {markers_at(data_dir)}")
            assert_acknowledged(relay.address, large._task_bytes)
        for endpoint in (a, b):
            assert endpoint.proc.poll() is None, tail(endpoint.log)
    finally:
        endpoints.stop()
        relay.stop()


@pytest.mark.timeout(300)
def test_a_dependent_whose_endpoint_went_away_is_held_at_the_relay_and_gets_a_large_result(tmp_path):
    """D waits at its endpoint for A (20 MiB result, done) and a slow task
    when the endpoint is killed -9 with its workers; started again, it gets
    D back from the relay, which now holds D (A's result is in, so it is not
    forwarded again) and sends it with A's upload to fetch."""
    data_dir = tmp_path / "relay-data"
    with running_relay(tmp_path, "--no-keep-results") as address:
        endpoints = Endpoints(tmp_path, address)
        try:
            endpoint = endpoints("e", workers=2)
            with FederatedExecutor(endpoint.id, relay=address) as ex:
                large = ex.submit(big_ones, 2.0)
                slow = ex.submit(sleep_then, 8.0, 1.0)
                dependent = ex.submit(big_sum, large, slow)   # forwarded to the endpoint, to wait there
                assert large.result(DEADLINE)[0] == 2.0
                wait_until(lambda: len(markers_at(data_dir)) == 1, "the put-off DROP noted on disk")
                if slow.done():
                    pytest.fail("the slow task finished before the endpoint was killed: this machine is too "
                                "loaded for the test to show what it means to")
                endpoint.kill()
                endpoint.start()
                assert dependent.result(DEADLINE) == 2.0 * N + 1.0
                wait_until(lambda: not uploads_at(data_dir) and not markers_at(data_dir),
                           f"A's upload deleted after D finished: {uploads_at(data_dir)} {markers_at(data_dir)}")
            assert endpoint.proc.poll() is None, tail(endpoint.log)
        finally:
            endpoints.stop()


@pytest.mark.timeout(240)
def test_a_sandboxed_dependent_held_at_the_relay_reads_a_large_result_from_its_inbox(bwrap, tmp_path, monkeypatch):
    """A group of two bwrap-sandboxed endpoints: the dependent, held at the
    relay, gets its dependency's 20 MiB upload (fetched by its agent) as a
    read-only file in its inbox, which leaves the inbox with the task."""
    monkeypatch.setenv("FEDEXEC_HOME", str(tmp_path / "fedexec-home"))   # the executor finds the relay's secret
    monkeypatch.delenv("FEDEXEC_RELAY", raising=False)
    with sandboxed_federation(tmp_path, "bwrap") as one:
        config = EndpointConfig(name="sandboxed-two", relay=one.address, max_workers=2, sandbox="bwrap",
                                heartbeat_period=0.5)
        config.save()
        log = tmp_path / "endpoint-two.log"
        with open(log, "wb") as out:
            two = subprocess.Popen(
                [sys.executable, "-m", "fedexec.endpoint", "--name", config.name, "--parent-pid", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            lookup_endpoint(one.address, config.endpoint_id, two, log)
            with FederatedExecutor([one.config.endpoint_id, config.endpoint_id], relay=one.address) as ex:
                first = ex.submit(big_result_in_sandbox, 3.0)
                dependent = ex.submit(big_dependency_in_sandbox, first, 1)
                total, inbox = dependent.result(DEADLINE)
                assert total == 3.0 * N + 1
                assert inbox == [f"{dependent._task_bytes.hex()}.{first._task_bytes.hex()}.ref"], inbox
                assert first.result(DEADLINE)[0] == 3.0
            # (this relay keeps received results, those over 16 MiB too: relay/retained.py) deleted, it goes
            with Client(relay=one.address) as client:
                assert client.get_result(first.task_id)[0] == 3.0
                assert client.delete_result(first.task_id) is True
            wait_until(lambda: not uploads_at(tmp_path / "relay-data"),
                       f"uploads deleted: {uploads_at(tmp_path / 'relay-data')}")
            assert two.poll() is None, tail(log)
        finally:
            stop_process(two)


def count_sizes(*arrays):
    return [len(a) for a in arrays]


@pytest.mark.timeout(300)
def test_a_thousand_dependents_of_seven_large_results_go_out_within_the_header_limit(tmp_path):
    """1,024 dependents of the same 7 uploads (20 MiB results), released at once to an
    endpoint with credit for them all: their rows (each naming 7 uploads,
    ~700 bytes) would make one TASKS header of ~720 KB, over MAX_HEADER,
    which the endpoint would refuse whole; the relay splits them."""
    with running_relay(tmp_path, "--no-keep-results") as address:
        endpoints = Endpoints(tmp_path, address)
        log = tmp_path / "endpoint-wide.log"
        wide_id = str(uuid.uuid4())
        with open(log, "wb") as out:
            wide = subprocess.Popen(
                [sys.executable, "-m", "fedexec.endpoint", "--name", "wide", "--relay", address, "--endpoint-id",
                 wide_id, "--max-workers", "1", "--prefetch", "1100", "--heartbeat-period", "0.2",
                 "--parent-pid", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        client = None
        try:
            producer = endpoints("producer", workers=2)
            lookup_endpoint(address, wide_id, wide, log)
            client = RawClient(address, None)
            sources = [submit_raw(client, producer.id, big_ones_after, cloudpickle.dumps(((3.0, float(i)), {})))
                       for i in range(7)]   # (each waits 3 s: the dependents reach the relay before)
            args, found = snapshot(((*[Future() for _ in sources],), {}))
            assert len(found) == 7
            fn_hash, body = serialize_function(count_sizes)
            dependents = []
            for start in range(0, 1024, 128):
                blobs = P.Blobs()
                rows = []
                for i in range(start, start + 128):
                    dependents.append(uuid.uuid4().bytes)
                    rows.append([dependents[-1], fn_hash, blobs.ref(args), blobs.ref(body) if i == 0 else -1,
                                 P.TASK_CALL, P.PYTHON_VERSION, {"d": sources}])
                client.send(P.SUBMIT, {"ep": wide_id, "tasks": rows}, blobs.frames)
            for source in sources:
                status, ref = outcome_of(client, source)
                assert status == P.OK and is_big(ref)
            for task_id in dependents:
                status, value = outcome_of(client, task_id)
                assert status == P.OK, P.unpack_failure(value) if status == P.FAILED else value
                assert deserialize(value) == [N] * 7
            assert "malformed message" not in log.read_text(), tail(log)
        finally:
            if client is not None:
                client.close()
            stop_process(wide)
            endpoints.stop()
