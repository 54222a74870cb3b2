"""TaskFuture is made without Future.__init__ (a lighter condition:
dispatcher._FutureCondition); it must hold exactly the standard future's
state and behave as one: result() with and without a timeout, from other
threads, wait(), as_completed(), callbacks, cancel()."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import threading
import time

import pytest

from fedexec.dispatcher import TaskFuture, _FutureCondition


def _future() -> TaskFuture:
    return TaskFuture(None, b"\0" * 16)   # (no dispatcher: never sent, so cancel() is local)


def test_a_task_future_has_the_standard_futures_state():
    plain, ours = cf.Future(), _future()
    assert set(vars(plain)) <= set(vars(ours)), "Future.__init__ sets state TaskFuture.__init__ does not"
    for name in vars(plain):
        if name != "_condition":
            assert getattr(ours, name) == getattr(plain, name), name
    assert isinstance(ours._condition, threading.Condition)


def test_its_condition_keeps_no_bound_methods_per_future():
    condition = _FutureCondition()
    # (its deque of waiters is made on the first wait: a future nobody waits on holds none)
    assert set(vars(condition)) == {"_lock"}
    before = _bound_methods_of_rlocks()
    kept = [_future() for _ in range(1000)]
    made = _bound_methods_of_rlocks() - before
    # (counted as what these 1,000 futures added: the process's other threads' and tests'
    # conditions hold some of their own, 125 in one CI worker)
    assert made < 100   # the standard condition: 5 bound methods of its lock per future, 5,000 here
    del kept


def _bound_methods_of_rlocks() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o).__name__ == "builtin_function_or_method"
               and getattr(o, "__self__", None).__class__.__name__ == "RLock")


def test_it_behaves_as_a_future_across_threads():
    future = _future()
    with pytest.raises(cf.TimeoutError):
        future.result(timeout=0.05)   # waits (releases and restores the re-entrant lock), times out
    got, called = [], []
    future.add_done_callback(lambda f: called.append(f.result()))
    readers = [threading.Thread(target=lambda: got.append(future.result(timeout=10))) for _ in range(4)]
    for reader in readers:
        reader.start()
    time.sleep(0.05)
    assert future.set_running_or_notify_cancel()
    future.set_result(42)
    for reader in readers:
        reader.join(10)
    assert got == [42] * 4 and called == [42]

    others = [_future() for _ in range(3)]
    threading.Timer(0.05, lambda: others[1].set_exception(ValueError("x"))).start()
    done, not_done = cf.wait(others, timeout=10, return_when=cf.FIRST_EXCEPTION)
    assert done == {others[1]} and len(not_done) == 2
    threading.Timer(0.05, lambda: others[0].set_result(1)).start()
    assert next(cf.as_completed([others[0]], timeout=10)) is others[0]
    assert others[2].cancel() and others[2].cancelled()   # not sent: cancelled here (re-entering its lock)
    with pytest.raises(cf.CancelledError):
        others[2].result(timeout=1)
