"""A worker keeps memory its task freed for its next task (no page faults
for a large value made again) and gives it back once idle
(worker/warmheap.py); FEDEXEC_WARM_HEAP=off leaves malloc as it was."""

from __future__ import annotations

import os
import resource
import sys
import time

import cloudpickle
import numpy as np
import psutil
import pytest

from fedexec import FederatedExecutor

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ITEMS = 200 * 1024 * 1024 // 8   # a 200 MiB array


def faults_to_make(items: int) -> int:
    """Page faults this process takes to make (and write) an array of ``items`` floats."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    array = np.ones(items)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del array
    return after - before


@pytest.mark.timeout(120)
def test_freed_memory_serves_the_next_task_and_goes_back_when_idle():
    with FederatedExecutor(max_workers=1) as ex:
        pid = ex.submit(os.getpid).result(60)
        worker = psutil.Process(pid)
        first = ex.submit(faults_to_make, ITEMS).result(60)
        again = [ex.submit(faults_to_make, ITEMS).result(60) for _ in range(3)]
        assert first > 50, f"a fresh 200 MiB array took only {first} page faults"
        assert max(again) < 10, f"the worker's freed memory was not reused: {again} page faults"
        held = worker.memory_info().rss
        assert held > 150 * 1024 * 1024, f"the worker did not keep the freed memory ({held} bytes resident)"
        deadline = time.monotonic() + 20
        while worker.memory_info().rss > held - 150 * 1024 * 1024:
            assert time.monotonic() < deadline, "an idle worker kept the freed memory"
            time.sleep(0.1)


@pytest.mark.timeout(120)
def test_off_leaves_malloc_as_it_was(monkeypatch):
    monkeypatch.setenv("FEDEXEC_WARM_HEAP", "off")
    with FederatedExecutor(max_workers=1) as ex:
        again = [ex.submit(faults_to_make, ITEMS).result(60) for _ in range(3)]
        assert min(again) > 50, f"with FEDEXEC_WARM_HEAP=off, freed memory was still reused: {again}"


def test_off_unless_the_environment_turns_it_on(monkeypatch):
    """Outside the embedded default (whose colocated process sets it for its workers) a worker
    may serve several users' tasks: it keeps nothing unless told to."""
    from fedexec.worker.warmheap import ENV, WarmHeap

    monkeypatch.delenv(ENV, raising=False)
    assert not WarmHeap().enabled


def make_and_drop(items: int) -> int:
    array = np.ones(items)
    del array
    return os.getpid()


@pytest.mark.timeout(120)
def test_a_busy_worker_gives_back_what_is_over_its_cap(monkeypatch):
    """Never idle, a worker still keeps no more free memory than its cap
    (FEDEXEC_WARM_HEAP_CAP here; by default its share of the memory available)."""
    monkeypatch.setenv("FEDEXEC_WARM_HEAP_CAP", str(50 * 1024 * 1024))
    with FederatedExecutor(max_workers=1) as ex:
        worker = psutil.Process(ex.submit(make_and_drop, ITEMS).result(60))
        deadline = time.monotonic() + 20
        while worker.memory_info().rss > 120 * 1024 * 1024:   # 200 MiB freed, 50 MiB may stay
            assert time.monotonic() < deadline, f"a busy worker kept {worker.memory_info().rss} bytes"
            ex.submit(time.sleep, 0.05).result(60)   # busy: never 3 polls idle in a row
