"""Chains of dependent tasks stay on the fast path (issue 13: a chain of 1,000
links >= 10x faster than Parsl, every run).

A link that reaches the relay, or is taken by the client's dispatcher, just
after the link before it finished must not send the rest of the chain
through the client (one round trip per link): the relay holds it with the
finished link's result, and the client sends a link it held itself ahead of
the links already posted behind it.
"""

from __future__ import annotations

import pickle
import sys
import time
import uuid

import cloudpickle
import pytest

from fedexec import FederatedExecutor
from fedexec import protocol as P
from fedexec.serialize import serialize_arguments, serialize_function

from test_access import RawClient
from test_durability import started_federation
from test_faults import tail

DEADLINE = 60.0
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def inc(x):
    return x + 1


def results_of(client: RawClient, task_ids: list[bytes], timeout: float = 30.0) -> dict[bytes, tuple[int, bytes]]:
    """The outcomes of these tasks as the relay sends them (not acknowledged)."""
    deadline = time.monotonic() + timeout
    while not all(t in client.outcomes for t in task_ids) and time.monotonic() < deadline:
        msg = client.expect(P.RESULTS, max(0.1, deadline - time.monotonic()))
        for row in msg.fields["rows"] if msg else ():
            client.outcomes[row[0]] = (row[1], bytes(P.blob(msg.blobs, row[2])))
    missing = [t.hex() for t in task_ids if t not in client.outcomes]
    assert not missing, f"no answer for tasks {missing}"
    return {t: client.outcomes[t] for t in task_ids}


@pytest.mark.timeout(120)
def test_a_link_reaching_the_relay_after_its_unacknowledged_dependency_finished_is_held_there(tmp_path):
    """Its dependency has no dependencies itself (so its result is not among
    the relay's recent ones): the relay reads it back from its record rather
    than refusing the link (DEPENDENCY_DONE), which made the client hold it
    and, in turn, every link after it."""
    with started_federation(tmp_path) as (relay, endpoint):
        client = RawClient(relay.address, None)
        try:
            fn_hash, body = serialize_function(inc)
            first = uuid.uuid4().bytes
            blobs = P.Blobs()
            row = [first, fn_hash, blobs.ref(serialize_arguments(inc, (1,), {})), blobs.ref(body), P.TASK_CALL,
                   P.PYTHON_VERSION]
            client.send(P.SUBMIT, {"ep": endpoint.endpoint_id, "tasks": [row]}, blobs.frames)
            status, blob = results_of(client, [first])[first]   # finished; not acknowledged
            assert status == P.OK and pickle.loads(blob) == 2
            second, third = uuid.uuid4().bytes, uuid.uuid4().bytes
            blobs = P.Blobs()
            args = pickle.dumps(((_placeholder(0),), {}))
            rows = [[second, fn_hash, blobs.ref(args), -1, P.TASK_CALL, P.PYTHON_VERSION, {"d": [first]}],
                    [third, fn_hash, blobs.ref(args), -1, P.TASK_CALL, P.PYTHON_VERSION, {"d": [second]}]]
            client.send(P.SUBMIT, {"ep": endpoint.endpoint_id, "tasks": rows}, blobs.frames)
            outcomes = results_of(client, [second, third])
            for task_id, value in ((second, 3), (third, 4)):
                status, blob = outcomes[task_id]
                assert status == P.OK, P.unpack_failure(blob)   # was: failed, dependency_done
                assert pickle.loads(blob) == value
        finally:
            client.close()
        assert "Traceback" not in relay.log.read_text(), tail(relay.log)


@pytest.mark.timeout(120)
def test_reading_finished_results_back_from_the_record_is_bounded(tmp_path):
    """Each read may wait for a group commit on the relay's loop: at most
    RECORD_READS_PER_SECOND a second per user. Past that, a task naming
    a finished task is refused as before (DEPENDENCY_DONE: its client sends
    it with the value); those held run with the right values."""
    from fedexec.relay.server import RECORD_READS_PER_SECOND

    with started_federation(tmp_path) as (relay, endpoint):
        client = RawClient(relay.address, None)
        try:
            fn_hash, body = serialize_function(inc)
            firsts = [uuid.uuid4().bytes for _ in range(30)]
            blobs = P.Blobs()
            rows = [[task_id, fn_hash, blobs.ref(serialize_arguments(inc, (value,), {})),
                     blobs.ref(body) if value == 0 else -1, P.TASK_CALL, P.PYTHON_VERSION]
                    for value, task_id in enumerate(firsts)]
            client.send(P.SUBMIT, {"ep": endpoint.endpoint_id, "tasks": rows}, blobs.frames)
            results_of(client, firsts)   # all finished; none acknowledged
            dependents = [uuid.uuid4().bytes for _ in firsts]
            blobs = P.Blobs()
            args = blobs.ref(pickle.dumps(((_placeholder(0),), {})))
            rows = [[task_id, fn_hash, args, -1, P.TASK_CALL, P.PYTHON_VERSION, {"d": [first]}]
                    for task_id, first in zip(dependents, firsts)]
            client.send(P.SUBMIT, {"ep": endpoint.endpoint_id, "tasks": rows}, blobs.frames)
            outcomes = results_of(client, dependents)
        finally:
            client.close()
        held = [value for value, task_id in enumerate(dependents) if outcomes[task_id][0] == P.OK]
        refused = [task_id for task_id in dependents if outcomes[task_id][0] == P.FAILED
                   and P.unpack_failure(outcomes[task_id][1])["kind"] == P.DEPENDENCY_DONE]
        assert len(held) + len(refused) == 30, outcomes
        # a fresh budget: the first RECORD_READS_PER_SECOND reads are held (more only if they span two seconds)
        assert RECORD_READS_PER_SECOND <= len(held) <= 2 * RECORD_READS_PER_SECOND, held
        assert all(pickle.loads(outcomes[dependents[value]][1]) == value + 2 for value in held)


def fail_with(x):
    raise ValueError(f"task {x} fails")


def _finished_unacknowledged(client: RawClient, endpoint_id: str, fn, count: int) -> list[bytes]:
    """``count`` tasks ``fn(i)`` of this client, finished and not acknowledged."""
    fn_hash, body = serialize_function(fn)
    ids = [uuid.uuid4().bytes for _ in range(count)]
    blobs = P.Blobs()
    rows = [[task_id, fn_hash, blobs.ref(serialize_arguments(fn, (value,), {})), blobs.ref(body) if value == 0
             else -1, P.TASK_CALL, P.PYTHON_VERSION] for value, task_id in enumerate(ids)]
    client.send(P.SUBMIT, {"ep": endpoint_id, "tasks": rows}, blobs.frames)
    results_of(client, ids)
    return ids


def _dependents(dependencies: list[bytes]) -> tuple[list[bytes], list[list], P.Blobs]:
    """Rows of tasks ``inc(dependency)``, one per dependency: their ids, rows, blobs."""
    fn_hash, _ = serialize_function(inc)
    ids = [uuid.uuid4().bytes for _ in dependencies]
    blobs = P.Blobs()
    args = blobs.ref(pickle.dumps(((_placeholder(0),), {})))
    return ids, [[task_id, fn_hash, args, -1, P.TASK_CALL, P.PYTHON_VERSION, {"d": [dependency]}]
                 for task_id, dependency in zip(ids, dependencies)], blobs


@pytest.mark.timeout(180)
def test_one_users_record_reads_spend_neither_their_own_budget_on_hopeless_reads_nor_anothers(tmp_path):
    """Mallory (who owns an endpoint shared with bob) sends 30 tasks naming
    her own finished tasks that failed (their results cannot feed a
    dependent: reading them back from the record is hopeless), then 8
    naming tasks of hers that succeeded; bob, in the same second, sends 8
    naming his own. Hopeless reads are skipped without a wait for the
    record or a share of the budget, and each user's reads come from a
    budget of their own: all 16 good ones are held at the relay and run."""
    from fedexec.relay.server import RECORD_READS_PER_SECOND
    from test_access import running_endpoint, wait_connected
    from test_faults import running_relay
    from test_put import two_users

    tokens = two_users(tmp_path)
    mallory_token, bob_token = tokens["alice"], tokens["bob"]
    with running_relay(tmp_path, "--auth", "token") as address, \
            running_endpoint(tmp_path, "mallorys", {"FEDEXEC_TOKEN": mallory_token}, relay=address,
                             max_workers=2) as endpoint:
        wait_connected(address, endpoint.id, mallory_token, endpoint.proc, endpoint.log)
        mallory, bob = RawClient(address, mallory_token), RawClient(address, bob_token)
        try:
            mallory.send(P.SHARE, {"ep": endpoint.id, "add_users": ["bob"]})
            assert mallory.expect(P.SHARED)
            failed = _finished_unacknowledged(mallory, endpoint.id, fail_with, 30)
            good = _finished_unacknowledged(mallory, endpoint.id, inc, RECORD_READS_PER_SECOND)
            bobs = _finished_unacknowledged(bob, endpoint.id, inc, RECORD_READS_PER_SECOND)
            time.sleep(0.5)   # (all of them written to the record)
            while time.monotonic() % 1.0 > 0.2:   # early in a second (the relay's budget is per second of
                time.sleep(0.01)                  # CLOCK_MONOTONIC, which this process shares)
            hers, rows, blobs = _dependents(failed + good)
            mallory.send(P.SUBMIT, {"ep": endpoint.id, "tasks": rows}, blobs.frames)
            his, rows, blobs = _dependents(bobs)
            bob.send(P.SUBMIT, {"ep": endpoint.id, "tasks": rows}, blobs.frames)
            outcomes = {**results_of(mallory, hers), **results_of(bob, his)}
        finally:
            mallory.close()
            bob.close()
        for task_id in hers[:30]:   # refused as before: her client would send them with the values
            status, blob = outcomes[task_id]
            assert status == P.FAILED and P.unpack_failure(blob)["kind"] == P.DEPENDENCY_DONE, outcomes[task_id]
        held = hers[30:] + his
        assert all(outcomes[task_id][0] == P.OK for task_id in held), \
            [P.unpack_failure(outcomes[t][1]) for t in held if outcomes[t][0] != P.OK]
        assert all(pickle.loads(outcomes[task_id][1]) == value + 2
                   for task_id, value in zip(held, [*range(RECORD_READS_PER_SECOND)] * 2))


class _placeholder:
    """Pickles as the placeholder of dependency ``index`` (as the client's
    snapshot writes a future: dependencies._dependency)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self):
        from fedexec.dependencies import _dependency
        return _dependency, (self.index,)


@pytest.mark.timeout(120)
def test_links_posted_behind_a_link_the_client_held_still_go_to_the_relay(tmp_path):
    """The dispatcher takes a chain's links only after the link they start
    from has finished here (it was busy: a done-callback that sleeps), so it
    holds the first link itself and sends it with the value. The links
    posted behind it must still leave with their dependency's id, before it
    finishes, not each wait here for the one before (which they did when the
    held link was queued again behind them)."""
    with started_federation(tmp_path) as (relay, endpoint):
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address, trace=True) as ex:
            assert ex.submit(inc, 0).result(DEADLINE) == 1
            root = ex.submit(inc, 0)
            root.add_done_callback(lambda _: time.sleep(1.0))   # runs in the dispatcher thread
            assert root.result(DEADLINE) == 1
            chain = [root]
            for _ in range(200):
                chain.append(ex.submit(inc, chain[-1]))
            assert chain[-1].result(DEADLINE) == 201
            timings = [future.fedexec_timings for future in chain[1:]]
            early = sum(after["sent"] < before["done"] for before, after in zip(timings, timings[1:]))
            assert early >= 150, f"only {early} of 199 links left before the link before them finished"


# -- links sent on to the worker that runs the link before them (worker/chain.py) --------

def sleep_then(delay, value):
    time.sleep(delay)
    return value


def once_then(directory, name, how, value):
    """Fails the first time it runs for ``name`` (``how``: "raise", or
    "exit": its worker dies), then returns ``value + 1``."""
    import os
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        open(path, "w").close()
        if how == "exit":
            os._exit(3)
        raise ValueError("first try fails")
    return value + 1


def boom_at(index, at, value):
    if index == at:
        raise ValueError(f"link {index} fails")
    return value + 1


def grow(value):
    """A result over the worker's keep limit (64 KiB) when value is bytes."""
    return value + b"x" * 70_000


@pytest.mark.timeout(120)
def test_a_chain_runs_in_one_worker_each_link_sent_there_before_the_link_before_it_ends():
    """Links that wait at the pool go on to the worker running the link
    before them, and run there with its value: each reaches that worker
    (trace: worker_in) before the link before it ended, so the value did not
    come back through the pool to be sent with it."""
    with FederatedExecutor(max_workers=2, trace=True) as ex:
        assert ex.submit(inc, 0).result(DEADLINE) == 1
        chain = [ex.submit(sleep_then, 1.0, 0)]   # the links reach the pool while it runs
        for _ in range(100):
            chain.append(ex.submit(inc, chain[-1]))
        assert chain[-1].result(DEADLINE) == 100
        assert [f.result() for f in chain] == list(range(101))
        timings = [future.fedexec_timings for future in chain]
        ahead = sum(after["worker_in"] < before["end"] for before, after in zip(timings, timings[1:]))
        assert ahead >= 90, f"only {ahead} of 100 links were at their worker before the link before them ended"


@pytest.mark.timeout(120)
def test_links_after_a_failing_link_fail_naming_it_and_a_retried_link_feeds_the_next(tmp_path):
    from fedexec import DependencyError, with_options

    with FederatedExecutor(max_workers=2) as ex:
        assert ex.submit(inc, 0).result(DEADLINE) == 1
        chain = [ex.submit(sleep_then, 0.5, 0)]
        for index in range(20):
            chain.append(ex.submit(boom_at, index, 10, chain[-1]))
        with pytest.raises(ValueError, match="link 10 fails"):
            chain[11].result(DEADLINE)
        assert [f.result(DEADLINE) for f in chain[:11]] == list(range(11))
        for future in chain[12:]:
            with pytest.raises(DependencyError):
                future.result(DEADLINE)
        # a link that raises once and is tried again (max_retries) feeds its next links its value
        retried = with_options(once_then, max_retries=1)
        chain = [ex.submit(sleep_then, 0.5, 0)]
        for index in range(20):
            chain.append(ex.submit(retried, str(tmp_path), f"r{index}", "raise", chain[-1]) if index == 7
                         else ex.submit(inc, chain[-1]))
        assert chain[-1].result(DEADLINE) == 20


@pytest.mark.timeout(120)
def test_a_worker_dying_mid_chain_and_results_too_large_to_keep_lose_no_link(tmp_path):
    with FederatedExecutor(max_workers=2) as ex:
        assert ex.submit(inc, 0).result(DEADLINE) == 1
        chain = [ex.submit(sleep_then, 0.5, 0)]
        for index in range(30):   # link 10 kills its worker the first time (WorkerLost: run again)
            chain.append(ex.submit(once_then, str(tmp_path), "exit", "exit", chain[-1]) if index == 10
                         else ex.submit(inc, chain[-1]))
        assert chain[-1].result(DEADLINE) == 30
        assert [f.result() for f in chain] == list(range(31))
        chain = [ex.submit(sleep_then, 0.5, b"")]
        for _ in range(5):
            chain.append(ex.submit(grow, chain[-1]))
        assert chain[-1].result(DEADLINE) == b"x" * 350_000


def pair(a, b, c):
    return (a, b, c)


def test_arguments_that_are_plain_values_and_futures_are_snapshot_as_the_general_pickler_does():
    """submit(f, future, ...) takes a fast path (the standard pickler, no
    cloudpickle pickler per call): the same values in the same places."""
    from concurrent.futures import Future

    from fedexec.dependencies import _load, _plain_snapshot, snapshot

    first, second = Future(), Future()
    args = (first, 1, "x", second, first, None, 2.5, b"b", True)
    fast, found = _plain_snapshot(args)
    general, found_too = snapshot((args, {}))
    assert found == found_too == [first, second]
    expected = ((10, 1, "x", 20, 10, None, 2.5, b"b", True), {})
    assert _load(fast, [10, 20]) == _load(general, [10, 20]) == expected
    assert _plain_snapshot(([first],)) is None and _plain_snapshot((first, object())) is None
    with FederatedExecutor(max_workers=1) as ex:
        one = ex.submit(inc, 0)
        assert ex.submit(pair, one, one, 5).result(DEADLINE) == (1, 1, 5)
        assert ex.submit(pair, one, [one], {"k": one}).result(DEADLINE) == (1, [1], {"k": 1})


def test_record_reads_are_capped_for_the_whole_relay_as_well_as_per_user():
    """Ten users with reads to make in one second get USERS_PER_SECOND
    users' budgets between them, no more, each at most their own (from
    session 22's review: per-user budgets alone let many accounts make the
    relay's loop wait for a commit as often as they liked)."""
    from fedexec.relay.reads import USERS_PER_SECOND, RecordReads
    from fedexec.relay.server import RECORD_READS_PER_SECOND
    for _ in range(5):   # (within one second of the clock; tried again if the loop crossed into the next)
        reads = RecordReads(RECORD_READS_PER_SECOND)
        second = int(time.monotonic())
        granted = {f"user{i}": sum(reads.take(uuid.uuid4().bytes, f"user{i}") for _ in range(20)) for i in range(10)}
        if int(time.monotonic()) == second:
            break
    assert sum(granted.values()) == USERS_PER_SECOND * RECORD_READS_PER_SECOND, granted
    assert max(granted.values()) == RECORD_READS_PER_SECOND, granted
