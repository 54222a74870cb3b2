"""FederatedExecutor against the ``concurrent.futures.Executor`` contract.

The reference is CPython's ``concurrent/futures`` (``_base.py``, ``thread.py``,
``process.py``) and what its test suite holds them to: ``submit``/``map``
semantics, ``shutdown(wait=, cancel_futures=)``, ``Future.cancel()`` meaning
"this call will not run", ``wait``/``as_completed``/callbacks/asyncio, and
remote exceptions re-raised with their own type and the remote traceback as
``__cause__`` (like ProcessPoolExecutor's ``_RemoteTraceback``).

Everything runs for real: the embedded default starts a relay and an endpoint
with worker processes on ipc sockets. Tests that do not shut their executor
down share the module's ``executor`` fixture (2 workers); the others make
their own ``FederatedExecutor(max_workers=2)`` inside ``with``.

Tasks that must stay busy for a while wait on a *gate* file instead of
sleeping, so the test decides when they end and a failing test cannot leave a
shared worker busy for long (the gate is opened in ``finally``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import decimal
import fractions
import functools
import math
import operator
import os
import pickle
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

import fedexec
from fedexec import FederatedExecutor

DEADLINE = 20.0  # upper bound for any single wait in this module


# ---------------------------------------------------------------------------
# Functions that run on the workers. Module-level ones travel by reference
# (the embedded default gives its workers this process's sys.path, README
# "Notes on functions"); the ones built inside functions travel by value.
# ---------------------------------------------------------------------------

def identity(value):
    return value


def describe_call(*args, **kwargs):
    return args, kwargs


def sleep_and_return(delay, value=None):
    time.sleep(delay)
    return value


def touch(path, value=None):
    """Record that this task ran (first thing it does), then return."""
    Path(path).touch()
    return value


def touch_then_sleep(path, delay):
    Path(path).touch()
    time.sleep(delay)
    return path


def wait_for_gate(gate, value=None, limit=15.0):
    """Block until the file ``gate`` exists (at most ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} was never opened")
        time.sleep(0.005)
    return value


def touch_after_gate(gate, path, limit=15.0):
    deadline = time.monotonic() + limit
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    Path(path).touch()


def raise_value_error(message):
    raise ValueError(message)


def inverse(x):
    return 1 / x


def uses_module_level_import(x):
    return math.sqrt(x)


def uses_import_inside(obj):
    import json

    return json.dumps(obj, sort_keys=True)


class CustomError(Exception):
    """An exception type of the caller's own (defined in this test module)."""

    def __init__(self, message, code):
        super().__init__(message, code)
        self.code = code


def raise_custom(code):
    raise CustomError("custom failure", code)


class UnpicklableError(Exception):
    """Cannot be pickled on the worker: it holds a lock."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable_error():
    raise UnpicklableError("holds a lock")


def raise_worker_only_error(directory):
    """Raise an exception whose class lives in a module only the worker can
    import (it is written and put on sys.path here, in the worker)."""
    import importlib

    Path(directory, "worker_only_mod.py").write_text(
        "class WorkerOnlyError(Exception):\n    pass\n")
    sys.path.insert(0, directory)
    importlib.invalidate_caches()
    module = importlib.import_module("worker_only_mod")
    raise module.WorkerOnlyError("only on the worker")


def raise_chained():
    try:
        {}["missing-key"]
    except KeyError as exc:
        raise RuntimeError("outer failure") from exc


def raise_during_handling():
    try:
        raise OSError("first problem")
    except OSError:
        raise LookupError("second problem")


def raise_builtin(kind):
    """Raise a built-in exception whose constructor sets attributes."""
    if kind == "SystemExit":
        sys.exit(3)
    if kind == "StopIteration":
        raise StopIteration(5)
    if kind == "UnicodeDecodeError":
        b"ok \xff".decode("utf-8")
    if kind == "SyntaxError":
        compile("x y", "remote.py", "exec")
    if kind == "FileNotFoundError":
        open("/nonexistent-fedexec-dir/file.txt")
    if kind == "ModuleNotFoundError":
        import importlib

        importlib.import_module("no_such_module_fedexec")
    if kind == "JSONDecodeError":
        import json

        json.loads('{"bad')
    if kind == "KeyError":
        {}["missing"]
    raise AssertionError(f"unknown kind {kind}")


BUILTIN_EXCEPTION_KINDS = ["SystemExit", "StopIteration", "UnicodeDecodeError", "SyntaxError",
                           "FileNotFoundError", "ModuleNotFoundError", "JSONDecodeError", "KeyError"]

EXCEPTION_ATTRIBUTES = ("code", "value", "encoding", "object", "start", "end", "reason", "errno",
                        "strerror", "filename", "filename2", "name", "path", "msg", "doc", "pos",
                        "lineno", "colno", "offset", "text", "end_lineno", "end_offset")


def exception_fields(exc):
    """What a caller can read off an exception: type, args, str, attributes."""
    fields = {"type": type(exc), "args": exc.args, "str": str(exc)}
    for attr in EXCEPTION_ATTRIBUTES:
        if hasattr(exc, attr):
            fields[attr] = getattr(exc, attr)
    return fields


def return_a_lock():
    return threading.Lock()


def noisy(lines):
    """Write a lot of text and raw bytes to every output channel, then return."""
    for i in range(lines):
        print(f"stdout line {i} " + "x" * 100)
    sys.stdout.flush()
    sys.stdout.buffer.write(bytes(range(256)) * 256)
    sys.stdout.buffer.flush()
    for i in range(lines):
        print(f"stderr line {i} " + "y" * 100, file=sys.stderr)
    sys.stderr.buffer.write(b"\x00\xff\xfe" * 10000)
    sys.stderr.flush()
    os.write(1, b"\x00raw fd 1 write\xff\n" * 1000)
    os.write(2, b"\x00raw fd 2 write\xff\n" * 1000)
    return {"lines": lines, "payload": bytes(range(256)), "text": "ok \u2713"}


def produce(kind):
    """Build a value of the given kind (on the worker, and locally to compare)."""
    values = {
        "none": lambda: None,
        "true": lambda: True,
        "bigint": lambda: 7 ** 5000 - 1,
        "negative-bigint": lambda: -(2 ** 4096) + 3,
        "float": lambda: (1.5, -0.0, float("inf"), 1e-300),
        "complex": lambda: complex(1.25, -3),
        "str": lambda: "h\u00e9llo w\u00f6rld \U0001f600" * 100,
        "bytes": lambda: bytes(range(256)) * 16384,          # 4 MiB
        "empty-bytes": lambda: b"",
        "bytearray": lambda: bytearray(b"\x00\x01\x02" * 1000),
        "nested-dict": lambda: {
            "a": [1, 2, {"b": (3, 4, frozenset({5, 6}))}],
            "c": {"d": {"e": {"f": None, "g": [b"h", "i", 7.5]}}},
            10: {(1, 2): "tuple key"},
        },
        "set": lambda: {1, "two", (3,)},
        "list-of-tuples": lambda: [(i, str(i), i * 0.5) for i in range(1000)],
        "decimal-fraction": lambda: (decimal.Decimal("3.14159265358979323846"), fractions.Fraction(22, 7)),
    }
    return values[kind]()


RESULT_KINDS = ["none", "true", "bigint", "negative-bigint", "float", "complex", "str", "bytes",
                "empty-bytes", "bytearray", "nested-dict", "set", "list-of-tuples", "decimal-fraction"]


class Scaler:
    """A module-level class: callable instances, bound/class/static methods."""

    def __init__(self, k):
        self.k = k

    def __call__(self, x):
        return x * self.k

    def scale(self, x):
        return x * self.k

    @classmethod
    def make_and_scale(cls, k, x):
        return cls(k).scale(x)

    @staticmethod
    def static_add(a, b):
        return a + b


def _function_cases():
    """(callable, args, kwargs, expected) for every kind of callable."""
    offset = 10

    def closure(x):
        return x + offset

    def make_counter(start):
        def counter(step):
            return start + step
        return counter

    def nested_with_import_inside(obj):
        import json

        return json.loads(json.dumps(obj))

    class LocalCallable:
        def __init__(self, k):
            self.k = k

        def __call__(self, x):
            return x - self.k

        def method(self, x):
            return 2 * x + self.k

    cases = [
        ("lambda", lambda x, y=1: x * y, (6,), {"y": 7}, 42),
        ("lambda-module-level-import", lambda x: math.sqrt(x), (16,), {}, 4.0),
        ("lambda-import-inside", lambda: __import__("json").dumps([1, 2]), (), {}, "[1, 2]"),
        ("closure", closure, (5,), {}, 15),
        ("nested-from-factory", make_counter(100), (5,), {}, 105),
        ("nested-import-inside", nested_with_import_inside, ({"k": [1]},), {}, {"k": [1]}),
        ("module-function-import-inside", uses_import_inside, ({"b": 1, "a": [2]},), {}, '{"a": [2], "b": 1}'),
        ("module-function-module-level-import", uses_module_level_import, (2.25,), {}, 1.5),
        ("stdlib-function", math.sqrt, (9,), {}, 3.0),
        ("builtin-pow", pow, (2, 100), {}, 2 ** 100),
        ("builtin-pow-mod", pow, (3, 4, 5), {}, 1),
        ("builtin-abs", abs, (-7,), {}, 7),
        ("builtin-sorted-kwarg", sorted, ([3, 1, 2],), {"reverse": True}, [3, 2, 1]),
        ("builtin-type-as-callable", int, ("ff",), {"base": 16}, 255),
        ("partial-builtin", functools.partial(pow, 2), (10,), {}, 1024),
        ("partial-lambda", functools.partial(lambda a, b, c: (a, b, c), 1, c=3), (2,), {}, (1, 2, 3)),
        ("partial-module-function", functools.partial(describe_call, "p", k="v"), ("a",), {},
         (("p", "a"), {"k": "v"})),
        ("callable-instance", Scaler(3), (5,), {}, 15),
        ("callable-instance-local-class", LocalCallable(1), (5,), {}, 4),
        ("bound-method", Scaler(4).scale, (2,), {}, 8),
        ("bound-method-local-class", LocalCallable(2).method, (3,), {}, 8),
        ("bound-method-builtin-str", "a,b,c".split, (",",), {}, ["a", "b", "c"]),
        ("bound-method-builtin-dict", {"k": 1}.get, ("k",), {}, 1),
        ("classmethod", Scaler.make_and_scale, (3, 4), {}, 12),
        ("staticmethod", Scaler.static_add, (1, 2), {}, 3),
        ("operator-itemgetter", operator.itemgetter(1), ([5, 6, 7],), {}, 6),
    ]
    return [pytest.param(fn, args, kwargs, expected, id=name) for name, fn, args, kwargs, expected in cases]


# ---------------------------------------------------------------------------
# helpers for the tests themselves
# ---------------------------------------------------------------------------

def poll_until(predicate, timeout=DEADLINE, interval=0.005):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def embedded_processes(ex):
    """psutil handles of an executor's relay, endpoint and worker processes."""
    popens = list(ex._dispatcher.services.processes)
    procs = [psutil.Process(p.pid) for p in popens]
    workers = []
    for proc in procs:
        workers.extend(proc.children(recursive=True))
    return procs + workers


def assert_all_gone(procs, timeout=10.0):
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"still running: {[(p.pid, p.cmdline()) for p in alive]}"


def relay_function_count(data_dir: Path) -> int:
    """Function bodies in the durable record of a relay started from the CLI
    (the embedded default's record is in memory only: relay/memstore.py)."""
    db = data_dir / "relay.sqlite3"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT COUNT(*) FROM functions").fetchone()[0]
    finally:
        con.close()


def occupy_both_workers(executor, gate):
    """Two gated tasks, one per worker, once both are reported running."""
    blockers = [executor.submit(wait_for_gate, str(gate), f"blocker-{i}") for i in range(2)]
    assert poll_until(lambda: all(b.running() for b in blockers)), \
        f"blockers never both ran: {[b._state for b in blockers]}"
    return blockers


def run_script(tmp_path, source, *args, timeout=60):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        proc.stdout_text, proc.stderr_text = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by its pid
        proc.communicate()
        raise
    return proc


def leftover_children_of(pid):
    """Processes (the embedded relay/endpoint) still watching ``pid``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "--parent-pid" in cmd and cmd[cmd.index("--parent-pid") + 1:][:1] == [str(pid)]:
            found.append(proc)
    return found


# ---------------------------------------------------------------------------
# submit
# ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_submit_returns_a_standard_future(executor):
    fut = executor.submit(pow, 2, 10)
    # a Future subclass whose cancel() asks the endpoint (see fedexec.executor.TaskFuture)
    assert isinstance(fut, cf.Future)
    assert fut.result(DEADLINE) == 1024
    assert fut.done() and not fut.running() and not fut.cancelled()
    assert fut.exception() is None


def test_submit_passes_positional_and_keyword_arguments(executor):
    fut = executor.submit(describe_call, 1, "two", [3], four=4, five={"5": 5})
    assert fut.result(DEADLINE) == ((1, "two", [3]), {"four": 4, "five": {"5": 5}})
    assert executor.submit(int, "ff", base=16).result(DEADLINE) == 255
    assert executor.submit(describe_call).result(DEADLINE) == ((), {})


def test_submit_accepts_a_keyword_argument_named_fn(executor):
    # submit(fn, /, *args, **kwargs): "fn" (and "self") go to the function
    fut = executor.submit(describe_call, 1, fn="the fn kwarg", self="the self kwarg")
    assert fut.result(DEADLINE) == ((1,), {"fn": "the fn kwarg", "self": "the self kwarg"})
    assert executor.submit(dict, fn=1, a=2).result(DEADLINE) == {"fn": 1, "a": 2}
    with pytest.raises(TypeError):
        executor.submit(fn=abs)  # fn itself is positional-only


@pytest.mark.parametrize("kind", RESULT_KINDS)
def test_results_of_various_types(executor, kind):
    value = executor.submit(produce, kind).result(DEADLINE)
    expected = produce(kind)
    assert type(value) is type(expected)
    assert value == expected


def test_arguments_of_various_types_round_trip(executor):
    for kind in RESULT_KINDS:
        value = produce(kind)
        assert executor.submit(identity, value).result(DEADLINE) == value, kind


# ---------------------------------------------------------------------------
# map
# ---------------------------------------------------------------------------

def test_map_preserves_order_with_tasks_of_different_durations(executor):
    delays = [0.4, 0.0, 0.2, 0.0, 0.1, 0.0]
    values = ["a", "b", "c", "d", "e", "f"]
    assert list(executor.map(sleep_and_return, delays, values)) == values


def test_map_with_several_iterables_stops_at_the_shortest(executor):
    assert list(executor.map(pow, [2, 3, 4, 5], [5, 6, 7])) == [32, 729, 16384]
    assert list(executor.map(pow, [2, 3, 4], [1, 2, 3, 4, 5], [100, 100, 100, 100])) == [2, 9, 64]


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_with_an_infinite_iterable_and_a_finite_one(executor, chunksize):
    import itertools

    assert list(executor.map(pow, itertools.count(2), [1, 2, 3], chunksize=chunksize)) == [2, 9, 64]


@pytest.mark.parametrize("chunksize", [2, 3, 7, 100])
def test_map_chunksize_gives_the_same_results(executor, chunksize):
    xs, ys = list(range(-50, 50)), list(range(37))
    expected = list(map(describe_call, xs, ys))
    assert list(executor.map(describe_call, xs, ys)) == expected
    assert list(executor.map(describe_call, xs, ys, chunksize=chunksize)) == expected
    assert list(executor.map(abs, xs, chunksize=chunksize)) == list(map(abs, xs))


@pytest.mark.parametrize("chunksize", [0, -1])
def test_map_chunksize_below_one_raises_value_error(executor, chunksize):
    with pytest.raises(ValueError):
        executor.map(abs, [1, 2, 3], chunksize=chunksize)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_timeout_raises_timeout_error_for_a_slow_task(executor, tmp_path, chunksize):
    gate = tmp_path / "gate"
    try:
        start = time.monotonic()
        results = executor.map(wait_for_gate, [str(gate)], ["slow"], timeout=0.5, chunksize=chunksize)
        with pytest.raises(TimeoutError):
            next(results)
        elapsed = time.monotonic() - start
        assert 0.4 <= elapsed < 3.0, elapsed
    finally:
        gate.touch()


def test_map_with_a_timeout_that_is_long_enough(executor):
    assert list(executor.map(abs, range(-5, 5), timeout=DEADLINE)) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    assert list(executor.map(abs, range(-5, 5), timeout=DEADLINE, chunksize=3)) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_raises_a_task_exception_when_the_iterator_reaches_it(executor, chunksize):
    results = executor.map(inverse, [1, 2, 0, 4], chunksize=chunksize)
    assert next(results) == 1.0
    assert next(results) == 0.5
    with pytest.raises(ZeroDivisionError):
        next(results)


@pytest.mark.parametrize("chunksize", [1, 5])
def test_map_over_empty_iterables(executor, chunksize):
    assert list(executor.map(abs, [], chunksize=chunksize)) == []
    assert list(executor.map(pow, [], [1, 2], chunksize=chunksize)) == []
    assert list(executor.map(pow, iter(()), chunksize=chunksize)) == []


def test_map_with_an_unpicklable_item_raises_at_that_item_only(executor):
    items = [1, 2, threading.Lock(), 4]
    results = executor.map(identity, items)
    assert next(results) == 1
    assert next(results) == 2
    with pytest.raises(fedexec.SerializationError, match="lock"):
        next(results)


@pytest.mark.timeout(60)
def test_abandoning_a_map_cancels_what_has_not_started_without_waiting(executor, tmp_path):
    gate, open_gate = tmp_path / "gate", tmp_path / "open"
    open_gate.touch()
    marks = [tmp_path / f"late-{i}" for i in range(200)]
    gates = [str(open_gate)] + [str(gate)] * (len(marks) - 1)
    results = executor.map(touch_after_gate, gates, [str(m) for m in marks])
    try:
        assert next(results) is None  # started: closing it now cancels the rest
        start = time.monotonic()
        results.close()
        assert time.monotonic() - start < 2.0
    finally:
        gate.touch()
    assert executor.submit(abs, -1).result(DEADLINE) == 1  # everything before it is settled
    ran = sum(m.exists() for m in marks)
    assert ran < len(marks) // 2, f"{ran} of {len(marks)} tasks ran after the map was abandoned"


def test_map_submits_everything_before_the_first_result_is_asked_for(executor, tmp_path):
    paths = [tmp_path / f"m{i}" for i in range(6)]
    results = executor.map(touch, paths, range(6))  # not iterated yet
    assert poll_until(lambda: all(p.exists() for p in paths)), "map did not submit eagerly"
    assert list(results) == list(range(6))


# ---------------------------------------------------------------------------
# shutdown (each test owns its executor)
# ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_shutdown_wait_true_waits_for_running_and_queued_tasks():
    with FederatedExecutor(max_workers=2) as ex:
        procs = embedded_processes(ex)
        futures = [ex.submit(sleep_and_return, 0.4, i) for i in range(4)]
        assert poll_until(futures[0].running)
        start = time.monotonic()
        ex.shutdown(wait=True)
        elapsed = time.monotonic() - start
        assert all(f.done() for f in futures)
        assert [f.result(0) for f in futures] == [0, 1, 2, 3]
        assert elapsed >= 0.3, elapsed  # the queued pair still had to run
        # and the embedded relay, endpoint and workers are gone once it returns
        assert_all_gone(procs, timeout=2.0)


@pytest.mark.timeout(60)
def test_shutdown_wait_false_returns_fast_and_submitted_futures_still_complete(tmp_path):
    gate = tmp_path / "gate"
    with FederatedExecutor(max_workers=2) as ex:
        procs = embedded_processes(ex)
        try:
            running = ex.submit(wait_for_gate, str(gate), "released")
            assert poll_until(running.running)
            queued = [ex.submit(sleep_and_return, 0.05, i) for i in range(4)]
            start = time.monotonic()
            ex.shutdown(wait=False)
            assert time.monotonic() - start < 0.5
            assert not running.done()
            with pytest.raises(RuntimeError):
                ex.submit(abs, 1)
        finally:
            gate.touch()
        assert running.result(DEADLINE) == "released"
        assert [f.result(DEADLINE) for f in queued] == [0, 1, 2, 3]
    assert_all_gone(procs)


@pytest.mark.timeout(60)
def test_shutdown_cancel_futures_cancels_tasks_not_yet_started(tmp_path):
    with FederatedExecutor(max_workers=2) as ex:
        procs = embedded_processes(ex)
        blockers = [ex.submit(sleep_and_return, 1.0, f"blocker-{i}") for i in range(2)]
        assert poll_until(lambda: all(b.running() for b in blockers))
        queued = [ex.submit(touch, str(tmp_path / f"queued-{i}"), i) for i in range(12)]
        time.sleep(0.2)  # let some of them reach the relay and the endpoint's prefetch queue
        ex.shutdown(wait=True, cancel_futures=True)
        everything = blockers + queued
        assert all(f.done() for f in everything), "futures left pending after shutdown(wait=True)"
        assert [b.result(0) for b in blockers] == ["blocker-0", "blocker-1"]
        cancelled = [f for f in queued if f.cancelled()]
        assert cancelled, "cancel_futures=True cancelled nothing"
        # the workers were busy for a second: nothing queued could have started
        assert len(cancelled) == len(queued)
        for i, f in enumerate(queued):
            with pytest.raises(cf.CancelledError):
                f.result(0)
            assert not (tmp_path / f"queued-{i}").exists(), f"cancelled task {i} ran"
    assert_all_gone(procs)


@pytest.mark.timeout(60)
def test_submit_after_shutdown_raises_and_shutdown_twice_is_fine():
    ex = FederatedExecutor(max_workers=2)
    try:
        assert ex.submit(abs, -3).result(DEADLINE) == 3
    finally:
        ex.shutdown()
    ex.shutdown()
    ex.shutdown(wait=False)
    ex.shutdown(wait=True, cancel_futures=True)
    with pytest.raises(RuntimeError):
        ex.submit(abs, -1)
    with pytest.raises(RuntimeError):
        ex.map(abs, [1, 2])


@pytest.mark.timeout(60)
def test_context_manager_returns_the_executor_and_shuts_it_down_on_exit():
    with FederatedExecutor(max_workers=2) as ex:
        assert isinstance(ex, FederatedExecutor) and isinstance(ex, cf.Executor)
        fut = ex.submit(sleep_and_return, 0.3, "finished")
        assert poll_until(lambda: len(embedded_processes(ex)) >= 3, timeout=10)  # relay and endpoint (colocated.py), 2 workers
        procs = embedded_processes(ex)
    # __exit__ is shutdown(wait=True): the task finished, nothing is running
    assert fut.done() and fut.result(0) == "finished"
    with pytest.raises(RuntimeError):
        ex.submit(abs, 1)
    assert_all_gone(procs, timeout=2.0)


@pytest.mark.timeout(60)
def test_context_manager_shuts_down_when_the_body_raises():
    with pytest.raises(KeyError):
        with FederatedExecutor(max_workers=2) as ex:
            procs = embedded_processes(ex)
            fut = ex.submit(sleep_and_return, 0.2, "done")
            raise KeyError("body failed")
    assert fut.result(0) == "done"
    with pytest.raises(RuntimeError):
        ex.submit(abs, 1)
    assert_all_gone(procs, timeout=2.0)


# ---------------------------------------------------------------------------
# Future.cancel()
# ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_cancel_a_task_queued_behind_busy_workers(executor, tmp_path):
    gate = tmp_path / "gate"
    try:
        blockers = occupy_both_workers(executor, gate)
        victims = [executor.submit(touch, str(tmp_path / f"victim-{i}"), i) for i in range(6)]
        callback_calls = []
        for v in victims:
            v.add_done_callback(callback_calls.append)
        time.sleep(0.3)  # some reach the endpoint's prefetch queue, the rest wait on the relay
        assert not any(v.running() or v.done() for v in victims)
        assert [v.cancel() for v in victims] == [True] * 6
        assert all(v.cancelled() and v.done() and not v.running() for v in victims)
        assert callback_calls == victims  # each callback once, at cancel()
        assert all(v.cancel() for v in victims)  # cancelling again still says True
        for v in victims:
            with pytest.raises(cf.CancelledError):
                v.result(0)
            with pytest.raises(cf.CancelledError):
                v.exception(0)
        done, not_done = cf.wait(victims, timeout=DEADLINE)
        assert not not_done
    finally:
        gate.touch()
    assert sorted(b.result(DEADLINE) for b in blockers) == ["blocker-0", "blocker-1"]
    # Tasks submitted after the victims run after them (FIFO); once these two
    # have run, a victim that was not really cancelled would have run too.
    followers = [executor.submit(touch_then_sleep, str(tmp_path / f"follower-{i}"), 0.2) for i in range(2)]
    cf.wait(followers, timeout=DEADLINE)
    assert all((tmp_path / f"follower-{i}").exists() for i in range(2))
    ran = [i for i in range(6) if (tmp_path / f"victim-{i}").exists()]
    assert ran == [], f"cancelled tasks ran: {ran}"
    assert callback_calls == victims


def test_cancel_a_finished_future_returns_false(executor):
    fut = executor.submit(pow, 3, 3)
    assert fut.result(DEADLINE) == 27
    assert fut.cancel() is False
    assert not fut.cancelled()
    assert fut.result(0) == 27

    failed = executor.submit(raise_value_error, "x")
    failed.exception(DEADLINE)
    assert failed.cancel() is False
    assert not failed.cancelled()


@pytest.mark.timeout(60)
def test_cancel_a_running_task_returns_false(executor, tmp_path):
    gate = tmp_path / "gate"
    try:
        fut = executor.submit(wait_for_gate, str(gate), "kept running")
        assert poll_until(fut.running), "the task never reported running"
        assert fut.cancel() is False
        assert fut.running() and not fut.cancelled() and not fut.done()
        with pytest.raises(TimeoutError):
            fut.result(timeout=0.05)
    finally:
        gate.touch()
    assert fut.result(DEADLINE) == "kept running"
    assert not fut.running() and not fut.cancelled()


@pytest.mark.timeout(60)
def test_cancel_returning_true_means_the_task_never_runs_even_under_churn(tmp_path):
    """The contract of Future.cancel(): True only if the call will not run.

    Cancel tasks while they stream through two workers; every task whose
    cancel() said True must not have run.
    """
    marks = tmp_path / "marks"
    marks.mkdir()
    with FederatedExecutor(max_workers=2) as ex:
        futures = [ex.submit(touch_then_sleep, str(marks / str(i)), 0.005) for i in range(300)]
        cancelled = []
        for i, fut in enumerate(futures):
            time.sleep(0.002)
            if fut.cancel():
                cancelled.append(i)
    # shutdown(wait=True) returned: every task that ran has finished
    assert cancelled, "nothing was cancelled; the test proves nothing"
    assert all(f.done() for f in futures)
    for i, fut in enumerate(futures):
        if i not in cancelled:
            assert fut.result(0) == str(marks / str(i))
    ran_anyway = [i for i in cancelled if (marks / str(i)).exists()]
    assert ran_anyway == [], (
        f"{len(ran_anyway)} of {len(cancelled)} futures whose cancel() returned True ran anyway: "
        f"{ran_anyway[:20]}")


# ---------------------------------------------------------------------------
# wait, as_completed, callbacks, asyncio
# ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_wait_first_completed(executor, tmp_path):
    gate = tmp_path / "gate"
    try:
        slow = executor.submit(wait_for_gate, str(gate), "slow")
        fast = executor.submit(abs, -1)
        done, not_done = cf.wait([slow, fast], timeout=DEADLINE, return_when=cf.FIRST_COMPLETED)
        assert done == {fast} and not_done == {slow}
    finally:
        gate.touch()
    assert slow.result(DEADLINE) == "slow"


def test_wait_all_completed(executor):
    futures = [executor.submit(sleep_and_return, d, i) for i, d in enumerate([0.3, 0.0, 0.1, 0.2])]
    done, not_done = cf.wait(futures, timeout=DEADLINE, return_when=cf.ALL_COMPLETED)
    assert done == set(futures) and not_done == set()
    assert [f.result(0) for f in futures] == [0, 1, 2, 3]


@pytest.mark.timeout(60)
def test_wait_first_exception(executor, tmp_path):
    gate = tmp_path / "gate"
    try:
        slow = executor.submit(wait_for_gate, str(gate), "slow")
        ok = executor.submit(abs, -2)
        assert ok.result(DEADLINE) == 2
        failing = executor.submit(raise_value_error, "first exception")
        done, not_done = cf.wait([slow, ok, failing], timeout=DEADLINE, return_when=cf.FIRST_EXCEPTION)
        assert done == {ok, failing} and not_done == {slow}
        assert isinstance(failing.exception(0), ValueError)
    finally:
        gate.touch()
    assert slow.result(DEADLINE) == "slow"
    # with no exception at all, FIRST_EXCEPTION waits for everything
    futures = [executor.submit(sleep_and_return, d, d) for d in (0.2, 0.0)]
    done, not_done = cf.wait(futures, timeout=DEADLINE, return_when=cf.FIRST_EXCEPTION)
    assert done == set(futures) and not_done == set()


def test_as_completed_yields_every_future_in_completion_order(executor):
    futures = [executor.submit(sleep_and_return, d, i) for i, d in enumerate([0.8, 0.0, 0.3])]
    order = list(cf.as_completed(futures, timeout=DEADLINE))
    assert set(order) == set(futures) and len(order) == 3
    assert [f.result(0) for f in order] == [1, 2, 0]


@pytest.mark.timeout(60)
def test_as_completed_timeout_raises_timeout_error(executor, tmp_path):
    gate = tmp_path / "gate"
    seen = []
    try:
        quick = executor.submit(abs, -5)
        assert quick.result(DEADLINE) == 5
        slow = executor.submit(wait_for_gate, str(gate), "slow")
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            for fut in cf.as_completed([slow, quick], timeout=0.3):
                seen.append(fut)
        assert 0.25 <= time.monotonic() - start < 3.0
        assert seen == [quick]
    finally:
        gate.touch()
    assert slow.result(DEADLINE) == "slow"


@pytest.mark.timeout(60)
def test_add_done_callback_is_called_once_with_the_future(executor, tmp_path):
    gate = tmp_path / "gate"
    calls = []
    called = threading.Event()

    def callback(f):
        calls.append(f)
        called.set()

    try:
        fut = executor.submit(wait_for_gate, str(gate), "value")
        fut.add_done_callback(callback)
        time.sleep(0.1)
        assert calls == []  # not before the task is done
    finally:
        gate.touch()
    assert called.wait(DEADLINE)
    assert fut.result(0) == "value"
    time.sleep(0.3)
    assert calls == [fut]

    # added after completion: called at once, in the calling thread
    late_calls = []
    fut.add_done_callback(lambda f: late_calls.append((f, threading.current_thread())))
    assert late_calls == [(fut, threading.current_thread())]

    # also for a failed future, and only once
    failed_calls = []
    failed = executor.submit(raise_value_error, "cb")
    failed.add_done_callback(failed_calls.append)
    failed.exception(DEADLINE)
    assert poll_until(lambda: failed_calls == [failed])
    time.sleep(0.2)
    assert failed_calls == [failed]


@pytest.mark.timeout(60)
def test_asyncio_wrap_future_and_run_in_executor(executor):
    async def main():
        futures = [asyncio.wrap_future(executor.submit(pow, 2, i)) for i in range(10)]
        powers = await asyncio.gather(*futures)
        loop = asyncio.get_running_loop()
        via_loop = await loop.run_in_executor(executor, sleep_and_return, 0.05, "loop")
        with pytest.raises(ValueError, match="async failure"):
            await asyncio.wrap_future(executor.submit(raise_value_error, "async failure"))
        slow = asyncio.wrap_future(executor.submit(sleep_and_return, 0.3, "late"))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(slow), timeout=0.05)
        return powers, via_loop, await slow

    powers, via_loop, late = asyncio.run(main())
    assert powers == [2 ** i for i in range(10)]
    assert via_loop == "loop"
    assert late == "late"


# ---------------------------------------------------------------------------
# exceptions
# ---------------------------------------------------------------------------

def test_remote_value_error_is_raised_with_its_type_and_remote_traceback(executor):
    fut = executor.submit(raise_value_error, "bad input 42")
    with pytest.raises(ValueError, match="bad input 42") as excinfo:
        fut.result(DEADLINE)
    exc = fut.exception(0)
    assert type(exc) is ValueError
    assert exc is excinfo.value
    assert exc.args == ("bad input 42",)
    # like ProcessPoolExecutor: the remote traceback text is the __cause__
    cause = exc.__cause__
    assert cause is not None
    text = str(cause)
    assert "Traceback (most recent call last)" in text
    assert "raise_value_error" in text
    assert "ValueError: bad input 42" in text


def test_custom_exception_class_of_the_caller_keeps_its_type(executor):
    fut = executor.submit(raise_custom, 7)
    with pytest.raises(CustomError) as excinfo:
        fut.result(DEADLINE)
    exc = excinfo.value
    assert type(exc) is CustomError
    assert exc.code == 7
    assert exc.args == ("custom failure", 7)
    assert "raise_custom" in str(exc.__cause__)


def test_exception_class_defined_inside_a_test_keeps_its_type(executor):
    class LocalError(Exception):
        pass

    def raise_local():
        raise LocalError("local failure")

    exc = executor.submit(raise_local).exception(DEADLINE)
    assert type(exc) is LocalError
    assert exc.args == ("local failure",)
    assert "raise_local" in str(exc.__cause__)


def test_exception_that_cannot_be_pickled_arrives_as_remote_execution_error(executor):
    exc = executor.submit(raise_unpicklable_error).exception(DEADLINE)
    assert isinstance(exc, fedexec.RemoteExecutionError)
    assert exc.type_name.endswith("UnpicklableError")
    assert "holds a lock" in str(exc)
    assert "raise_unpicklable_error" in exc.remote_traceback


def test_exception_type_missing_here_arrives_as_remote_execution_error(executor, tmp_path):
    workdir = tmp_path / "worker-only"
    workdir.mkdir()
    exc = executor.submit(raise_worker_only_error, str(workdir)).exception(DEADLINE)
    assert isinstance(exc, fedexec.RemoteExecutionError)
    assert exc.type_name == "worker_only_mod.WorkerOnlyError"
    assert "only on the worker" in str(exc)
    assert "raise_worker_only_error" in exc.remote_traceback


def test_chained_exceptions_keep_the_chain_in_the_remote_traceback(executor):
    exc = executor.submit(raise_chained).exception(DEADLINE)
    assert type(exc) is RuntimeError and exc.args == ("outer failure",)
    text = str(exc.__cause__)
    assert "KeyError: 'missing-key'" in text
    assert "direct cause of the following exception" in text
    assert "RuntimeError: outer failure" in text

    exc = executor.submit(raise_during_handling).exception(DEADLINE)
    assert type(exc) is LookupError
    text = str(exc.__cause__)
    assert "OSError: first problem" in text
    assert "During handling of the above exception" in text


def test_system_exit_in_a_task_is_raised_by_result(executor):
    fut = executor.submit(sys.exit, 3)
    with pytest.raises(SystemExit):
        fut.result(DEADLINE)
    assert type(fut.exception(0)) is SystemExit
    assert executor.submit(abs, -9).result(DEADLINE) == 9  # the endpoint goes on


@pytest.mark.parametrize("kind", BUILTIN_EXCEPTION_KINDS)
def test_builtin_exceptions_keep_their_attributes(executor, kind):
    """ProcessPoolExecutor pickles exceptions with their own __reduce__, so
    SystemExit.code, StopIteration.value, UnicodeDecodeError.reason,
    SyntaxError.lineno ... arrive intact; so must they here."""
    try:
        raise_builtin(kind)
    except BaseException as exc:  # SystemExit too
        expected = exception_fields(exc)
    remote = executor.submit(raise_builtin, kind).exception(DEADLINE)
    assert exception_fields(remote) == expected


def test_unpicklable_argument_or_result_fails_only_that_task(executor):
    bad_arg = executor.submit(identity, threading.Lock())
    exc = bad_arg.exception(DEADLINE)
    assert isinstance(exc, pickle.PicklingError) and isinstance(exc, fedexec.SerializationError)
    assert "lock" in str(exc)

    bad_result = executor.submit(return_a_lock)
    exc = bad_result.exception(DEADLINE)
    assert isinstance(exc, pickle.PicklingError)
    assert "lock" in str(exc)

    assert executor.submit(abs, -4).result(DEADLINE) == 4


@pytest.mark.timeout(60)
def test_function_the_endpoint_cannot_load_fails_every_task_with_the_cause(executor, tmp_path, monkeypatch):
    """A module importable here but not on the endpoint (added to sys.path
    after the executor started): each task fails with DeserializationError
    naming the missing module, however often the function is sent."""
    assert executor.submit(abs, -1).result(DEADLINE) == 1  # the executor is up
    (tmp_path / "client_only_mod.py").write_text("def plus_one(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import client_only_mod

    try:
        for i in range(4):  # twice on each of the two workers
            exc = executor.submit(client_only_mod.plus_one, i).exception(DEADLINE)
            assert isinstance(exc, fedexec.DeserializationError), (i, exc)
            assert "client_only_mod" in str(exc), (i, str(exc))
    finally:
        sys.modules.pop("client_only_mod", None)
    assert executor.submit(abs, -2).result(DEADLINE) == 2


# ---------------------------------------------------------------------------
# kinds of functions
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fn, args, kwargs, expected", _function_cases())
def test_kinds_of_callables(executor, fn, args, kwargs, expected):
    assert executor.submit(fn, *args, **kwargs).result(DEADLINE) == expected


def test_kinds_of_callables_through_map(executor):
    offset = 3
    assert list(executor.map(lambda x: x + offset, range(5))) == [3, 4, 5, 6, 7]
    assert list(executor.map(functools.partial(pow, 2), range(5), chunksize=2)) == [1, 2, 4, 8, 16]
    assert list(executor.map(Scaler(10).scale, [1, 2])) == [10, 20]


@pytest.mark.timeout(90)
def test_functions_defined_in_main_run_by_value(tmp_path):
    proc = run_script(tmp_path, """
        import sys
        from fedexec import FederatedExecutor

        OFFSET = 100

        def add_offset(x):
            return x + OFFSET

        class Multiplier:
            def __init__(self, k):
                self.k = k

            def __call__(self, x):
                return x * self.k

        class MainError(Exception):
            pass

        def fail():
            raise MainError("from main")

        if __name__ == "__main__":
            with FederatedExecutor(max_workers=2) as ex:
                print("SUBMIT", ex.submit(add_offset, 1).result(30))
                print("MAP", list(ex.map(add_offset, range(3), timeout=30)))
                print("CALLABLE", ex.submit(Multiplier(3), 5).result(30))
                exc = ex.submit(fail).exception(30)
                print("EXC", type(exc) is MainError, exc)
            print("MODULE", add_offset.__module__)
    """)
    assert proc.returncode == 0, proc.stderr_text
    lines = [line for line in proc.stdout_text.splitlines()
             if line.split(" ")[0] in {"SUBMIT", "MAP", "CALLABLE", "EXC", "MODULE"}]
    assert lines == [
        "SUBMIT 101",
        "MAP [100, 101, 102]",
        "CALLABLE 15",
        "EXC True from main",
        "MODULE __main__",
    ], proc.stdout_text + proc.stderr_text
    assert leftover_children_of(proc.pid) == []


@pytest.mark.timeout(90)
def test_program_exit_without_shutdown_finishes_submitted_tasks(tmp_path):
    """As with the standard executors, interpreter exit waits for work already
    submitted (and stops the embedded services)."""
    outputs = [tmp_path / f"out-{i}" for i in range(3)]
    proc = run_script(tmp_path, """
        import sys
        import time
        from pathlib import Path
        from fedexec import FederatedExecutor

        def slow_write(path):
            time.sleep(0.5)
            Path(path).write_text("done")
            return path

        ex = FederatedExecutor(max_workers=2)
        futures = [ex.submit(slow_write, p) for p in sys.argv[1:]]
        print("SUBMITTED", len(futures), flush=True)
        # no shutdown(), no result(): exiting must still finish them
    """, *outputs)
    assert proc.returncode == 0, proc.stderr_text
    assert "SUBMITTED 3" in proc.stdout_text
    assert [p.read_text() if p.exists() else None for p in outputs] == ["done"] * 3
    assert poll_until(lambda: leftover_children_of(proc.pid) == [], timeout=10)


# ---------------------------------------------------------------------------
# registration, threads, output
# ---------------------------------------------------------------------------

def test_a_function_is_registered_once_and_kept_while_its_tasks_run(tmp_path):
    """A body is stored once however many tasks use it, and kept while any of
    them is unfinished (and a grace after); identical pickles are one function.
    (On a relay and endpoint from the CLI: their record is the one on disk.)"""
    from test_access import fedexec_cli, running_endpoint, wait_connected
    from test_faults import running_relay

    data_dir = tmp_path / "relay-data"
    token = fedexec_cli("relay", "add-user", "alice", "--data-dir", data_dir).stdout.strip()
    with running_relay(tmp_path, "--auth", "token") as address, \
            running_endpoint(tmp_path, "two", {"FEDEXEC_TOKEN": token}, relay=address, max_workers=2) as ep:
        wait_connected(address, ep.id, token, ep.proc, ep.log)
        with FederatedExecutor(ep.id, relay=address, token=token) as executor:
            functions_are_registered_once(executor, tmp_path, lambda: relay_function_count(data_dir))


def functions_are_registered_once(executor, tmp_path, relay_function_count):
    def make_adder(n):
        def add(x):
            return x + n
        return add

    gate = tmp_path / "gate"
    try:
        blockers = occupy_both_workers(executor, gate)   # the tasks below wait while these run
        time.sleep(0.2)   # (the relay's record is written that late at most)
        with_blockers = relay_function_count()
        add_one, add_two, same_as_add_one = make_adder(1), make_adder(2), make_adder(1)
        triple = lambda x: 3 * x  # noqa: E731
        futures = [executor.submit(add_one, i) for i in range(50)]
        futures += [executor.submit(add_two, 1) for _ in range(10)] + [executor.submit(triple, 2) for _ in range(10)]
        futures.append(executor.submit(same_as_add_one, 5))   # registered by content: the same as add_one
        assert poll_until(lambda: relay_function_count() == with_blockers + 3), \
            f"{relay_function_count()} bodies stored, expected {with_blockers + 3}"
        assert not any(f.done() for f in futures)
    finally:
        gate.touch()
    assert [f.result(DEADLINE) for f in futures] == [i + 1 for i in range(50)] + [3] * 10 + [6] * 10 + [6]
    assert [b.result(DEADLINE) for b in blockers] == ["blocker-0", "blocker-1"]
    # kept for a grace after their last task (relay --function-grace, 300 s by default), so
    # the next call of a warm function needs no resend; test_limits sees them go
    time.sleep(0.5)
    assert relay_function_count() == with_blockers + 3
    assert executor.submit(add_one, 1).result(DEADLINE) == 2


@pytest.mark.timeout(90)
def test_submit_from_four_threads_at_once(executor):
    per_thread = 500
    barrier = threading.Barrier(4)
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def client(t):
        try:
            offset = t * 100_000

            def tagged(i):
                return (t, i + offset)

            barrier.wait(DEADLINE)
            futures = [executor.submit(pow, i, 2) if i % 2 else executor.submit(tagged, i)
                       for i in range(per_thread)]
            results[t] = [f.result(60) for f in futures]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(80)
    assert not any(thread.is_alive() for thread in threads), "a submitting thread hung"
    assert errors == []
    for t in range(4):
        expected = [i ** 2 if i % 2 else (t, i + t * 100_000) for i in range(per_thread)]
        assert results[t] == expected, f"thread {t}"


@pytest.mark.timeout(60)
def test_function_output_does_not_corrupt_the_protocol(executor):
    expected = {"lines": 3000, "payload": bytes(range(256)), "text": "ok \u2713"}
    futures = [executor.submit(noisy, 3000) for _ in range(4)]  # on both workers
    assert [f.result(DEADLINE) for f in futures] == [expected] * 4
    assert list(executor.map(abs, range(-3, 3))) == [3, 2, 1, 0, 1, 2]


# ---------------------------------------------------------------------------
# The rest of the contract (issue 16, item 1): FederatedExecutor(4),
# initializer/initargs, map holding no yielded result, BaseExceptions around
# a result's pickling on either side.
# ---------------------------------------------------------------------------

_initialized_with = None   # set in a worker by record_initializer


def record_initializer(path, value):
    """An initializer: note this worker's pid in ``path`` and keep ``value``."""
    global _initialized_with
    with open(path, "a") as out:
        out.write(f"{os.getpid()}\n")
    _initialized_with = value


def initialized_value(delay=0.0):
    time.sleep(delay)
    return _initialized_with, os.getpid()


def failing_initializer():
    raise ValueError("no database at /nowhere")


class ProgressBar:
    """Stands in for tqdm in tqdm.contrib.concurrent's process_map: its
    executor is built with max_workers, initializer=ProgressBar.set_lock
    and initargs=(a multiprocessing lock,), then map with a chunksize."""

    lock = None

    @classmethod
    def set_lock(cls, lock):
        cls.lock = lock


def uses_the_lock(x):
    with ProgressBar.lock:
        return x * x


def process_map_style(fn, items, *, max_workers, executor_class, chunksize=1):
    import multiprocessing

    lock = multiprocessing.RLock()
    with executor_class(max_workers=max_workers, initializer=ProgressBar.set_lock, initargs=(lock,)) as ex:
        return list(ex.map(fn, items, chunksize=chunksize))


class Dummy:
    """A result whose liveness a weak reference can watch."""

    def __init__(self, value):
        self.value = value


def make_dummy(value):
    return Dummy(value)


class ExitWhilePickled:
    """A result whose pickling raises SystemExit (on the worker)."""

    def __reduce__(self):
        raise SystemExit(3)


def exit_while_pickled():
    return ExitWhilePickled()


def _raise_base_exception(kind):
    raise {"exit": SystemExit, "interrupt": KeyboardInterrupt}[kind]("raised while unpickled")


class RaisesWhenUnpickled:
    """A result that pickles fine on the worker but raises a BaseException
    while it is unpickled in the client."""

    def __init__(self, kind):
        self.kind = kind

    def __reduce__(self):
        return _raise_base_exception, (self.kind,)


def raises_when_unpickled(kind):
    return RaisesWhenUnpickled(kind)


@pytest.mark.timeout(120)
def test_an_int_first_argument_is_max_workers_as_in_process_pool_executor():
    with FederatedExecutor(3) as ex:
        assert ex._max_workers == 3
        assert ex.submit(pow, 2, 5).result(DEADLINE) == 32
    with pytest.raises(ValueError, match="given twice"):
        FederatedExecutor(2, max_workers=2)
    with pytest.raises(ValueError, match="greater than 0"):
        FederatedExecutor(0)


@pytest.mark.timeout(120)
def test_initializer_runs_once_in_each_worker_before_its_first_task(tmp_path):
    ran = tmp_path / "initialized"
    with FederatedExecutor(max_workers=2, initializer=record_initializer, initargs=(str(ran), "ready")) as ex:
        # two slow tasks at once: both workers take one
        results = [f.result(DEADLINE) for f in [ex.submit(initialized_value, 0.5) for _ in range(2)]]
        results += list(ex.map(initialized_value, [0.0] * 20))
        results += list(ex.map(initialized_value, [0.0] * 20, chunksize=5))
    assert {value for value, _ in results} == {"ready"}, "a task ran before its worker's initializer"
    initialized = ran.read_text().split()
    assert sorted(initialized) == sorted(set(initialized)), f"an initializer ran twice in a worker: {initialized}"
    assert {str(pid) for _, pid in results} == set(initialized)
    assert len(initialized) == 2


@pytest.mark.timeout(120)
def test_a_failing_initializer_fails_the_tasks_with_a_broken_executor_naming_it():
    with FederatedExecutor(max_workers=1, initializer=failing_initializer) as ex:
        futures = [ex.submit(pow, 2, i) for i in range(3)] + [ex.submit(initialized_value)]
        for future in futures:
            error = future.exception(DEADLINE)
            assert isinstance(error, fedexec.InitializerFailed) and isinstance(error, cf.BrokenExecutor)
            assert isinstance(error, fedexec.FedexecError)
            assert "failing_initializer()" in str(error) and "no database at /nowhere" in str(error)
            assert error.initializer == "failing_initializer"
        with pytest.raises(cf.BrokenExecutor):
            list(ex.map(abs, [-1, -2], chunksize=2))


@pytest.mark.timeout(60)
def test_an_initializer_or_initargs_that_cannot_travel_fail_at_construction():
    with pytest.raises(TypeError, match="initializer must be a callable"):
        FederatedExecutor(max_workers=1, initializer="not callable")
    generator = (i for i in range(3))
    with pytest.raises(fedexec.SerializationError, match="initializer record_initializer"):
        FederatedExecutor(max_workers=1, initializer=record_initializer, initargs=(generator, 1))


@pytest.mark.timeout(120)
def test_process_map_style_code_with_max_workers_initializer_and_a_lock_runs():
    """tqdm.contrib.concurrent.process_map's way of using its executor class;
    the lock among the initargs arrives in each worker as a lock of its own."""
    for chunksize in (1, 4):
        assert process_map_style(uses_the_lock, range(10), max_workers=2, executor_class=FederatedExecutor,
                                 chunksize=chunksize) == [x * x for x in range(10)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunksize", [1, 3])
def test_the_map_iterator_keeps_no_reference_to_a_yielded_result(executor, chunksize):
    """CPython's test_free_reference: once the caller drops a result the
    iterator has yielded, nothing of the iterator keeps it alive."""
    import gc
    import weakref

    for obj in executor.map(make_dummy, range(9), chunksize=chunksize):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None, "the map iterator still holds a result it yielded"


@pytest.mark.timeout(60)
def test_a_system_exit_while_a_result_is_pickled_fails_its_future_and_the_worker_lives_on():
    with FederatedExecutor(max_workers=1) as ex:
        before = ex.submit(os.getpid).result(DEADLINE)
        future = ex.submit(exit_while_pickled)
        error = future.exception(DEADLINE)
        assert type(error) is SystemExit and error.code == 3
        assert ex.submit(os.getpid).result(DEADLINE) == before, "the worker did not live on"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["exit", "interrupt"])
def test_a_base_exception_while_a_result_is_unpickled_here_fails_only_that_future(executor, kind):
    others = [executor.submit(pow, 2, i) for i in range(5)]
    future = executor.submit(raises_when_unpickled, kind)
    error = future.exception(DEADLINE)
    assert isinstance(error, fedexec.DeserializationError), f"got {error!r}"
    assert type(error.__cause__) is {"exit": SystemExit, "interrupt": KeyboardInterrupt}[kind]
    assert "raised while unpickled" in str(error)
    assert [f.result(DEADLINE) for f in others] == [2 ** i for i in range(5)]
    assert executor._dispatcher.is_alive(), "the background thread stopped"
    assert executor.submit(pow, 3, 2).result(DEADLINE) == 9
