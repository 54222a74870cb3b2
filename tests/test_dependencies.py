"""Futures as arguments: a task passed other tasks' futures runs on their values,
once they are done; a failed or cancelled one fails it with DependencyError."""

from __future__ import annotations

import os
import re
import uuid
import sys
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait

import cloudpickle
import pytest

import fedexec
from fedexec import DependencyError, FederatedExecutor, memoized, with_options

from test_durability import started_federation
from test_faults import tail

cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEADLINE = 60.0


def inc(x):
    return x + 1


def total(values):
    return sum(values)


def describe(*args, **kwargs):
    return args, kwargs


def boom(x):
    raise ValueError(f"bad input {x}")


def wait_for(path, limit=30.0):
    """Blocks a worker until ``path`` exists (bounded), then returns its name."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.path.basename(path)


def zeros(size, _):
    return bytes(size)


def sleep_then(delay, value):
    time.sleep(delay)
    return value


def test_a_chain_of_100_dependent_tasks(executor):
    future = executor.submit(inc, 0)
    for _ in range(99):
        future = executor.submit(inc, future)
    assert future.result(DEADLINE) == 100


def test_a_fan_out_fan_in_graph_of_1000(executor):
    started = time.monotonic()
    root = executor.submit(inc, 0)
    leaves = [executor.submit(inc, root) for _ in range(999)]
    joined = executor.submit(total, leaves)
    assert joined.result(DEADLINE) == 2 * 999
    assert all(leaf.result() == 2 for leaf in leaves)
    print(f"fan-out/fan-in of 1,000 tasks: {time.monotonic() - started:.2f} s")


def test_a_task_whose_futures_are_done_already_goes_as_an_ordinary_task(executor):
    """The leaves of a fan-out submitted after its root finished take its
    value at once, in submit: neither held in the client nor sent for the
    relay to hold (so each costs what a plain task costs). A failed or
    cancelled one still fails its dependents with a DependencyError."""
    from fedexec.dependencies import arguments_or_futures
    import pickle

    root = executor.submit(inc, 0)
    assert root.result(DEADLINE) == 1
    done = Future()
    done.set_result([1, 2])
    assert pickle.loads(arguments_or_futures(inc, (root, 3, done), {})) == ((1, 3, [1, 2]), {})
    dispatcher = executor._dispatcher
    leaves, seen = [], 0
    for _ in range(200):
        leaves.append(executor.submit(inc, root))
        with dispatcher._post_lock:
            seen += len(dispatcher.relayed) + len(dispatcher.held)
    assert seen == 0, "tasks whose futures were done were held for them"
    assert [leaf.result(DEADLINE) for leaf in leaves] == [2] * 200
    failed = executor.submit(boom, 1)
    with pytest.raises(ValueError):
        failed.result(DEADLINE)
    with pytest.raises(DependencyError, match=failed.task_id):
        executor.submit(inc, failed).result(DEADLINE)
    cancelled = Future()
    cancelled.cancel()
    with pytest.raises(DependencyError):
        executor.submit(inc, cancelled).result(DEADLINE)


def test_futures_inside_lists_tuples_dicts_and_keywords_take_their_values(executor):
    a, b = executor.submit(inc, 1), executor.submit(inc, 10)
    future = executor.submit(describe, [a, (b, a)], {"k": {"deep": [b]}}, key=a)
    assert future.result(DEADLINE) == (([2, (11, 2)], {"k": {"deep": [11]}}), {"key": 2})


def test_with_options_memoized_and_map_take_futures(executor):
    a = executor.submit(inc, 41)
    assert executor.submit(with_options(inc, timeout=30, max_retries=1), a).result(DEADLINE) == 43
    first = executor.submit(memoized(inc), a)
    assert first.result(DEADLINE) == 43
    assert executor.submit(memoized(inc), executor.submit(inc, 41)).result(DEADLINE) == 43
    assert list(executor.map(inc, [a, 5, executor.submit(inc, a)], timeout=DEADLINE)) == [43, 6, 44]


def test_arguments_are_taken_at_submit_time(executor):
    gate = executor.submit(sleep_then, 0.3, 1)
    values = [gate, "before"]
    future = executor.submit(describe, values)
    values[1] = "after"   # mutated while the task waits for its dependency
    assert future.result(DEADLINE) == (([1, "before"],), {})


def test_a_failing_dependency_fails_its_dependents_naming_it(executor):
    bad = executor.submit(boom, 7)
    dependent = executor.submit(describe, {"x": [bad]})
    downstream = executor.submit(inc, dependent)
    with pytest.raises(DependencyError) as info:
        dependent.result(DEADLINE)
    assert bad.task_id in str(info.value) and info.value.dependency == bad.task_id
    assert "bad input 7" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError) and str(info.value.__cause__) == "bad input 7"
    assert isinstance(info.value, fedexec.FedexecError)
    # a task two steps down names its own dependency, whose error chains the first
    with pytest.raises(DependencyError) as info2:
        downstream.result(DEADLINE)
    assert info2.value.dependency == dependent.task_id
    assert isinstance(info2.value.__cause__, DependencyError)
    # the executor goes on working
    assert executor.submit(inc, executor.submit(inc, 1)).result(DEADLINE) == 3


def test_cancelling_a_depended_on_task_fails_its_dependents(executor, tmp_path):
    gate = tmp_path / "open"
    blockers = [executor.submit(wait_for, str(gate)) for _ in range(8)]   # every worker busy, more queued
    try:
        queued = executor.submit(inc, 1)
        dependents = [executor.submit(inc, queued), executor.submit(total, [queued, queued])]
        time.sleep(0.3)   # it has left for the relay and endpoint
        assert queued.cancel() is True
        for dependent in dependents:
            with pytest.raises(DependencyError) as info:
                dependent.result(DEADLINE)
            assert info.value.dependency == queued.task_id and "cancelled" in str(info.value)
            assert isinstance(info.value.__cause__, CancelledError)
    finally:
        gate.touch()
    assert [b.result(DEADLINE) for b in blockers] == ["open"] * 8


def test_cancelling_a_dependent_while_it_waits(executor):
    slow = executor.submit(sleep_then, 0.5, 1)
    dependent = executor.submit(inc, slow)
    assert dependent.cancel() is True
    assert slow.result(DEADLINE) == 1
    time.sleep(0.2)
    assert dependent.cancelled()


def test_plain_futures_and_other_executors_futures_are_waited_for_without_blocking_submit(executor):
    plain: Future = Future()
    started = time.monotonic()
    dependent = executor.submit(inc, plain)
    assert time.monotonic() - started < 1.0 and not dependent.done()
    threading.Timer(0.3, plain.set_result, (9,)).start()
    assert dependent.result(DEADLINE) == 10
    with ThreadPoolExecutor(1) as threads:
        other = threads.submit(sleep_then, 0.2, 20)
        assert executor.submit(total, [other, executor.submit(inc, other)]).result(DEADLINE) == 41
        failing = threads.submit(boom, 3)
        with pytest.raises(DependencyError) as info:
            executor.submit(inc, failing).result(DEADLINE)
        assert isinstance(info.value.__cause__, ValueError) and info.value.dependency == ""


def test_an_argument_that_cannot_be_pickled_still_fails_at_once(executor):
    future = executor.submit(describe, executor.submit(inc, 1), threading.Lock())
    with pytest.raises(fedexec.SerializationError):
        future.result(5)


def test_shutdown_waits_for_tasks_held_for_their_dependencies():
    with FederatedExecutor(max_workers=1) as ex:
        plain: Future = Future()
        dependent = ex.submit(inc, ex.submit(sleep_then, 0.2, plain))   # waits for a task that waits for `plain`
        late = ex.submit(inc, plain)
        threading.Timer(0.3, plain.set_result, (5,)).start()
    # leaving the block (shutdown(wait=True)) waited for both, held in the client meanwhile
    assert dependent.result(0) == 6 and late.result(0) == 6


@pytest.mark.timeout(120)
def test_a_graph_in_flight_survives_a_relay_kill_and_restart(tmp_path):
    with started_federation(tmp_path) as (relay, endpoint):
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            root = ex.submit(sleep_then, 1.0, 1)
            chain = root
            for _ in range(20):
                chain = ex.submit(inc, chain)
            leaves = [ex.submit(inc, root) for _ in range(200)]
            joined = ex.submit(total, [chain, *leaves])
            time.sleep(0.3)
            relay.kill()   # the root is running; everything else waits on it
            time.sleep(0.5)
            relay.start()
            assert joined.result(DEADLINE) == 21 + 200 * 2
            assert chain.result() == 21
        assert endpoint.proc.poll() is None, tail(endpoint.log)


def marked_inc(directory, x, delay=0.0):
    """inc, after ``delay`` seconds, leaving a mark per run (to count runs)."""
    time.sleep(delay)
    with open(os.path.join(directory, f"{os.getpid()}.marks"), "a") as f:
        f.write("x\n")
    return x + 1


def test_a_graph_that_ran_while_the_relay_was_down_runs_once_and_nothing_is_cancelled(tmp_path):
    """The relay is killed while a graph's root runs, and stays down until the
    whole graph has run at the endpoint (its dependents were sent there with
    their dependencies' ids). Restarted, it recovers the dependents as held
    for their dependencies; the endpoint, answered "unknown" for each of its
    heartbeats from the outage, says hello, holding every outcome the
    relay has not stored: the relay takes them all as sent there, none is
    sent again, cancelled there or run twice. (Under load the test above
    once met the race this guards against: several hellos put tasks back in
    the queue, and a dropped copy's CANCELLED was taken for the outcome of
    the copy sent again: DependencyError, 'was cancelled'.)"""
    marks = tmp_path / "marks"
    marks.mkdir()
    with started_federation(tmp_path) as (relay, endpoint):
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            root = ex.submit(marked_inc, str(marks), 0, 0.6)
            chain = root
            for _ in range(10):
                chain = ex.submit(marked_inc, str(marks), chain)
            leaves = [ex.submit(marked_inc, str(marks), root) for _ in range(50)]
            joined = ex.submit(total, [chain, *leaves])
            time.sleep(0.3)
            relay.kill()   # the root is running; everything else waits on it, at the endpoint
            time.sleep(2.5)   # the graph runs to its end meanwhile (beats every 0.2 s go unanswered)
            relay.start()
            assert joined.result(DEADLINE) == 11 + 50 * 2
            assert chain.result() == 11
        runs = sum(len(path.read_text().split()) for path in marks.glob("*.marks"))
        assert runs == 61, f"{runs} runs of 61 tasks"
        # the restarted relay took all 62 as sent there (the old hello held none of those that had run,
        # and the relay held their dependents for their dependencies again)
        reconnected = relay.log.read_text().split("recovered", 1)[1]
        assert "62 held there" in reconnected, tail(relay.log)
        assert endpoint.proc.poll() is None, tail(endpoint.log)


def test_a_task_waiting_on_a_future_that_never_finishes_can_be_cancelled_and_shut_down(tmp_path):
    never: Future = Future()
    ex = FederatedExecutor(max_workers=1)
    try:
        dependent = ex.submit(inc, never)
        also = ex.submit(inc, dependent)
        assert dependent.cancel() is True
        done, _ = wait([dependent], timeout=5)
        assert done == {dependent}
        with pytest.raises(DependencyError) as info:
            also.result(10)
        assert isinstance(info.value.__cause__, CancelledError)
        left = ex.submit(inc, never)
    finally:
        started = time.monotonic()
        ex.shutdown(wait=True, cancel_futures=True)
    assert left.cancelled() and time.monotonic() - started < 10


def test_data_only_executors_take_futures_as_values(tmp_path):
    with FederatedExecutor(max_workers=1, data_only=True) as ex:
        a = ex.submit(inc, 1)
        assert ex.submit(total, [a, ex.submit(inc, a)]).result(DEADLINE) == 5


WORKER_ONLY_MODULE = '''
class Box:
    def __init__(self, value):
        self.value = value
'''


def worker_only_value(directory, value):
    """Returns an object of a module that exists only in this worker's
    sys.path: the client cannot unpickle it, a task in this worker can."""
    import importlib

    path = os.path.join(directory, "fedexec_worker_only_box.py")
    with open(path, "w") as f:
        f.write(WORKER_ONLY_MODULE)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    return importlib.import_module("fedexec_worker_only_box").Box(value)


def unbox(*boxes):
    return sum(box.value for box in boxes)


def test_a_dependencys_value_goes_from_the_relay_not_through_the_client(tmp_path):
    with FederatedExecutor(max_workers=1) as ex:   # one worker: both tasks run in it
        gate = ex.submit(sleep_then, 0.5, 0)          # so that the dependents leave before their dependencies end
        boxes = [ex.submit(worker_only_value, str(tmp_path), gate) for _ in range(2)]
        total_value = ex.submit(unbox, *boxes)
        assert total_value.result(DEADLINE) == 0
        boxes = [ex.submit(worker_only_value, str(tmp_path), ex.submit(sleep_then, 0.3, v)) for v in (20, 22)]
        assert ex.submit(unbox, *boxes).result(DEADLINE) == 42
        for box in boxes:   # the client itself cannot load them
            with pytest.raises(fedexec.DeserializationError):
                box.result(DEADLINE)
        assert "fedexec_worker_only_box" not in sys.modules


@pytest.mark.timeout(120)
def test_another_user_cannot_depend_on_your_task(tmp_path):
    from fedexec import protocol as P
    from fedexec.serialize import serialize_arguments, serialize_function

    from test_access import RawClient, fedexec_cli, running_endpoint, slow_value, wait_connected
    from test_faults import running_relay

    data = tmp_path / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "bob")}
    with running_relay(tmp_path, "--auth", "token") as address, \
            running_endpoint(tmp_path, "alice-ep", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address) as alice_ep, \
            running_endpoint(tmp_path, "bob-ep", {"FEDEXEC_TOKEN": tokens["bob"]}, relay=address) as bob_ep:
        wait_connected(address, alice_ep.id, tokens["alice"], alice_ep.proc, alice_ep.log)
        wait_connected(address, bob_ep.id, tokens["bob"], bob_ep.proc, bob_ep.log)
        with FederatedExecutor(alice_ep.id, relay=address, token=tokens["alice"]) as alice:
            secret = alice.submit(slow_value, 3.0, "alice's secret")
            time.sleep(0.5)
            bob = RawClient(address, tokens["bob"])
            try:
                fn_hash, body = serialize_function(describe)
                for dependency in (uuid.UUID(secret.task_id).bytes, uuid.uuid4().bytes):
                    blobs = P.Blobs()
                    task_id = uuid.uuid4().bytes
                    args = serialize_arguments(describe, (1,), {})
                    row = [task_id, fn_hash, blobs.ref(args), blobs.ref(body), P.TASK_CALL, P.PYTHON_VERSION,
                           {"d": [dependency]}]
                    bob.send(P.SUBMIT, {"ep": bob_ep.id, "tasks": [row]}, blobs.frames)
                    failure = bob.failure_of(task_id)
                    assert failure["kind"] == P.NOT_ALLOWED, failure
                    assert uuid.UUID(bytes=dependency).hex[:8] in failure["msg"].replace("-", "")
                    assert "not an unfinished task of user 'bob'" in failure["msg"]
                    assert "alice" not in failure["msg"]
                # a malformed dependency list is refused as such
                blobs = P.Blobs()
                row = [uuid.uuid4().bytes, fn_hash, blobs.ref(serialize_arguments(describe, (1,), {})),
                       blobs.ref(body), P.TASK_CALL, P.PYTHON_VERSION, {"d": [b"short"]}]
                bob.send(P.SUBMIT, {"ep": bob_ep.id, "tasks": [row]}, blobs.frames)
                error = bob.expect(P.ERROR)
                assert error is not None and "dependencies" in error.fields["msg"]
                bob.send(P.ACK, {"tids": [uuid.UUID(secret.task_id).bytes]})   # cannot make the relay forget it
            finally:
                bob.close()
            assert secret.result(DEADLINE) == "alice's secret"   # untouched
            assert alice.submit(describe, secret).result(DEADLINE) == (("alice's secret",), {})
    assert "refused user 'bob': depend on task(s)" in tail(tmp_path / "relay.log", 200_000)


@pytest.mark.timeout(120)
def test_a_dependency_acknowledged_before_a_relay_restart_still_feeds_its_dependent(tmp_path):
    with started_federation(tmp_path) as (relay, endpoint):
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            quick = ex.submit(sleep_then, 0.5, 1)
            slow = ex.submit(sleep_then, 4.0, 10)
            joined = ex.submit(total, [quick, slow])   # held at the relay for both
            assert quick.result(DEADLINE) == 1         # received and acknowledged here
            time.sleep(0.5)
            relay.kill()   # the acknowledgement was put off: the record still has quick's result
            time.sleep(0.5)
            relay.start()
            assert joined.result(DEADLINE) == 11
        assert endpoint.proc.poll() is None, tail(endpoint.log)


def size_plus(data, extra):
    return len(data) + extra


def test_a_dependent_task_with_a_large_argument_waits_in_the_client_and_runs(executor):
    """Arguments over the chunking threshold travel as an upload, which the
    relay cannot wrap dependencies' results around: such a task waits in the
    client for its futures and is sent with their values (and still runs)."""
    big = b"\x07" * (20 * 1024 * 1024)   # over transfer.BIG_THRESHOLD (16 MiB) once pickled
    first = executor.submit(sleep_then, 0.3, 5)
    dependent = executor.submit(size_plus, big, first)
    assert dependent.result(DEADLINE) == len(big) + 5


# -- held at the endpoint: dependencies that run on the same endpoint ------------------

def test_a_chain_on_one_endpoint_waits_there_not_for_the_relay():
    """Each link of a chain is sent to the endpoint before the result of the
    link before it reaches the relay: it waited at the endpoint, which gave it
    that result itself (held at the relay, it would leave only after)."""
    with FederatedExecutor(max_workers=2, trace=True) as ex:
        chain = [ex.submit(sleep_then, 1.0, 0)]   # the others reach the relay while it runs
        for _ in range(10):
            chain.append(ex.submit(inc, chain[-1]))
        assert chain[-1].result(DEADLINE) == 10
        timings = [future.fedexec_timings for future in chain]
    for before, after in zip(timings[1:], timings[2:]):
        assert after["relay_out"] < before["relay_result"], (before, after)
        assert after["start"] >= before["end"]


def test_a_dependency_failing_at_the_endpoint_fails_the_tasks_held_there():
    with FederatedExecutor(max_workers=2) as ex:
        bad = ex.submit(boom, ex.submit(sleep_then, 0.5, 7))
        dependent = ex.submit(inc, bad)
        downstream = ex.submit(inc, dependent)
        with pytest.raises(DependencyError) as info:
            dependent.result(DEADLINE)
        assert bad.task_id in str(info.value) and info.value.dependency == bad.task_id
        assert isinstance(info.value.__cause__, ValueError) and "bad input 7" in str(info.value.__cause__)
        with pytest.raises(DependencyError) as info:
            downstream.result(DEADLINE)
        assert info.value.dependency == dependent.task_id
        assert ex.submit(inc, 1).result(DEADLINE) == 2   # the endpoint goes on


@pytest.mark.timeout(120)
def test_an_endpoint_killed_with_tasks_held_there_loses_nothing(tmp_path):
    import psutil
    import signal

    with started_federation(tmp_path) as (relay, endpoint):
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            root = ex.submit(sleep_then, 1.5, 1)
            chain = root
            for _ in range(20):
                chain = ex.submit(inc, chain)
            leaves = [ex.submit(inc, root) for _ in range(100)]
            joined = ex.submit(total, [chain, *leaves])
            time.sleep(0.7)   # the root runs; the rest wait at the endpoint
            procs = [psutil.Process(endpoint.proc.pid), *psutil.Process(endpoint.proc.pid).children(recursive=True)]
            for proc in procs:
                proc.send_signal(signal.SIGKILL)
            psutil.wait_procs(procs, timeout=10)
            endpoint.proc.wait(10)
            endpoint.start()   # the relay sends them all again
            assert joined.result(DEADLINE) == 21 + 100 * 2
            assert chain.result() == 21 and all(leaf.result() == 2 for leaf in leaves)


@pytest.mark.timeout(120)
def test_a_graph_on_a_group_of_endpoints(tmp_path):
    from test_faults import running_relay
    from test_routing import Endpoints, where

    with running_relay(tmp_path) as address:
        endpoints = Endpoints(tmp_path, address)
        try:
            a, b = endpoints("a"), endpoints("b")
            with FederatedExecutor([a.id, b.id], relay=address) as ex:
                root = ex.submit(sleep_then, 0.5, 1)
                chain = root
                for _ in range(10):
                    chain = ex.submit(inc, chain)
                spread = [ex.submit(where, 0.2, root) for _ in range(8)]   # a, b or both run them
                joined = ex.submit(describe, chain, *spread)   # fan-in over both endpoints
                bad = ex.submit(boom, root)
                after_bad = ex.submit(inc, bad)
                # held at the relay (a group's task), on a result it does not keep in memory
                # (over relay.graph.KEPT_IN_MEMORY): read back from its record when the task goes
                large = ex.submit(zeros, 1_000_000, root)
                sized = ex.submit(size_plus, large, 1)
                args, _ = joined.result(DEADLINE)
                assert args[0] == 11 and [value for _, value in args[1:]] == [1] * 8
                assert chain.result() == 11
                assert sized.result(DEADLINE) == 1_000_001
                with pytest.raises(DependencyError) as info:
                    after_bad.result(DEADLINE)
                assert info.value.dependency == bad.task_id
        finally:
            endpoints.stop()


# -- held at the pool: dependencies that went to the same pool --------------------------

def mark_then_inc(directory, index, value):
    """Leaves a file named ``index`` in ``directory``, then returns ``value + 1``."""
    with open(os.path.join(directory, str(index)), "w"):
        pass
    return value + 1


@pytest.mark.timeout(120)
def test_a_chain_waits_at_its_pool_and_goes_on_while_the_endpoint_agent_is_stopped(tmp_path):
    """The links of a chain wait at the pool their dependencies went to: a
    result releases the next link there. With the endpoint agent stopped
    (SIGSTOP) the whole chain still runs, which it could not if each link
    waited at the agent; the results reach the client once it goes on."""
    import psutil
    import signal

    marks = tmp_path / "marks"
    marks.mkdir()
    with started_federation(tmp_path) as (relay, endpoint):
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            assert ex.submit(inc, 1).result(DEADLINE) == 2   # the pool is up and knows the function
            root = ex.submit(sleep_then, 1.5, 0)
            chain = root
            for index in range(20):
                chain = ex.submit(mark_then_inc, str(marks), index, chain)
            time.sleep(1.0)   # the root runs; the chain has reached the pool
            agent = psutil.Process(endpoint.proc.pid)
            agent.send_signal(signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 20
                while len(os.listdir(marks)) < 20 and time.monotonic() < deadline:
                    time.sleep(0.05)
                ran = sorted(int(name) for name in os.listdir(marks))
            finally:
                agent.send_signal(signal.SIGCONT)
            assert ran == list(range(20)), f"with the agent stopped, only links {ran} ran\n{tail(endpoint.log)}"
            assert chain.result(DEADLINE) == 20 and root.result() == 0


@pytest.mark.timeout(120)
def test_a_pool_killed_with_tasks_waiting_there_loses_nothing(tmp_path):
    """SIGKILL the pool while a chain and a fan-out wait there for a running
    root: the endpoint sees the pool gone and runs everything on a new one,
    each task once, with the right values."""
    import contextlib
    import signal

    import psutil
    from test_faults import running_relay
    from test_providers import configured_endpoint, wait_for as wait_until

    with contextlib.ExitStack() as stack:
        address = stack.enter_context(running_relay(tmp_path))
        config, proc, log = stack.enter_context(configured_endpoint(
            tmp_path, address, max_workers=2, type="local", in_process=False, init_blocks=1, min_blocks=1,
            max_blocks=1))   # (a pool process, to be killed alone)
        with FederatedExecutor(config.endpoint_id, relay=address) as ex:
            assert ex.submit(inc, 1).result(DEADLINE) == 2
            root = ex.submit(sleep_then, 1.5, 1)
            chain = root
            for _ in range(20):
                chain = ex.submit(inc, chain)
            leaves = [ex.submit(inc, root) for _ in range(50)]
            joined = ex.submit(total, [chain, *leaves])
            wait_until(root.running, 30, "the root did not start", log)
            time.sleep(0.3)   # the rest reach the pool
            [pool] = [p for p in psutil.Process(proc.pid).children() if "fedexec.pool" in p.cmdline()]
            pool.send_signal(signal.SIGKILL)
            assert joined.result(DEADLINE) == 21 + 50 * 2
            assert chain.result() == 21 and all(leaf.result() == 2 for leaf in leaves)


def test_chains_whose_links_arrive_after_the_link_before_them_finished_are_not_refused(tmp_path):
    """The relay lets a function's body go with the last task using it; the
    next chain's first task then comes without it and is sent again with it
    (NEED_FUNCTION), and the links sent after it, naming it, follow it again
    the same way; a link that reaches the relay after the link before it
    finished there is held with its result. The relay does not refuse any
    of them as naming unknown tasks (nor log that)."""
    with started_federation(tmp_path) as (relay, endpoint):
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address, trace=True) as ex:
            for _ in range(3):
                assert ex.submit(inc, 0).result(DEADLINE) == 1   # its body leaves the relay with it
                chain = [ex.submit(inc, 0)]
                for _ in range(200):
                    chain.append(ex.submit(inc, chain[-1]))
                assert chain[-1].result(DEADLINE) == 201
                # sent with their dependencies' ids, before those finished (not held here for values)
                timings = [future.fedexec_timings for future in chain]
                early = sum(after["sent"] < before["done"] for before, after in zip(timings, timings[1:]))
                assert early >= 100, f"only {early} of 200 links left before the link before them finished"
            # a chain submitted about as fast as it runs: links reach the relay just after the
            # link before them finished there (before the client saw that): held there too
            chain = [ex.submit(inc, 0)]
            for _ in range(300):
                time.sleep(0.0005)
                chain.append(ex.submit(inc, chain[-1]))
            assert chain[-1].result(DEADLINE) == 301
        time.sleep(0.5)
        assert "refused user" not in relay.log.read_text(), tail(relay.log)


# -- dependencies whose results travel in chunks (over 16 MiB pickled) ----------------

def big_ones(scale):
    import numpy as np
    return np.ones(20 * 2**17) * scale   # 20 MiB of float64: its result is uploaded, not sent in one frame


def big_sum(array, plus=0):
    return float(array.sum()) + plus


def big_next(array):
    return array + 1


def spool_files():
    """The files left in the spools of this test's endpoints (none once every task is done)."""
    import glob
    import tempfile
    return sorted(glob.glob(os.path.join(tempfile.gettempdir(), "*", "spool", "*")))


def _big_results_feed_their_dependents(ex):
    first = ex.submit(big_ones, 2.0)
    dependent = ex.submit(big_sum, first, 1)
    assert dependent.result(DEADLINE) == 2.0 * 20 * 2**17 + 1
    assert first.result(DEADLINE).shape == (20 * 2**17,)   # the client still gets the large result
    chain = [ex.submit(big_ones, 1.0)]
    for _ in range(2):   # a chain of three large results
        chain.append(ex.submit(big_next, chain[-1]))
    tail_sum = ex.submit(big_sum, chain[-1])
    assert tail_sum.result(DEADLINE) == 3.0 * 20 * 2**17
    for link, value in zip(chain, (1.0, 2.0, 3.0)):
        array = link.result(DEADLINE)
        assert array.shape == (20 * 2**17,) and array[0] == value and array[-1] == value


@pytest.mark.timeout(180)
def test_a_dependency_with_a_result_over_16_mib_feeds_its_dependent_on_the_embedded_default():
    with FederatedExecutor(max_workers=2) as ex:
        _big_results_feed_their_dependents(ex)


@pytest.mark.timeout(180)
def test_a_dependency_with_a_result_over_16_mib_feeds_its_dependent_on_a_relay_and_endpoint(tmp_path):
    with started_federation(tmp_path, workers=1) as (relay, endpoint):
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            _big_results_feed_their_dependents(ex)
            # dependents that wait at the endpoint's agent (more than one pool worker busy)
            gate = ex.submit(sleep_then, 0.3, 1.0)
            firsts = [ex.submit(big_ones, gate) for _ in range(2)]
            assert ex.submit(big_sum, firsts[0], ex.submit(big_sum, firsts[1])).result(DEADLINE) == 2 * 20 * 2**17
