"""A worker unmaps a task's large-argument mapping once the task's result
went (transfer.unmap_leftovers), not before it, and never leaves one
behind; a mapping a value still uses is kept (and made private, as before)."""

from __future__ import annotations

import builtins
import sys

import cloudpickle
import numpy as np
import pytest

from fedexec import FederatedExecutor

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ITEMS = 24 * 1024 * 1024 // 8   # a 24 MiB float64 array: over the 16 MiB of a large payload


def first(array):
    return float(array[0])


def plus_one(array):
    return array + 1


def keep(array):
    builtins.__dict__.setdefault("_fedexec_test_kept", []).append(array)
    return float(array[-1])


def argument_mappings() -> list[str]:
    """This worker's mappings of large-argument files (the agent's spool's ``<task>.args``)."""
    with open("/proc/self/maps") as f:
        return [line.split()[-1] for line in f if ".args" in line]


@pytest.mark.timeout(300)
def test_argument_mappings_are_unmapped_after_the_result_and_never_pile_up():
    with FederatedExecutor(max_workers=1) as ex:   # (one worker: every task runs in the same process)
        for i in range(4):
            assert ex.submit(first, np.full(ITEMS, float(i))).result(120) == float(i)
            assert ex.submit(argument_mappings).result(60) == []
            result = ex.submit(plus_one, np.full(ITEMS, float(i))).result(120)
            assert result[0] == i + 1.0 and result[-1] == i + 1.0
            del result
            assert ex.submit(argument_mappings).result(60) == []
        # a value the worker keeps keeps its (privatized) mapping, and its data
        assert ex.submit(keep, np.full(ITEMS, 5.0)).result(120) == 5.0
        assert len(ex.submit(argument_mappings).result(60)) == 1
        assert ex.submit(first, np.full(ITEMS, 6.0)).result(120) == 6.0
        assert ex.submit(lambda: float(builtins._fedexec_test_kept[0].sum())).result(60) == 5.0 * ITEMS
        assert len(ex.submit(argument_mappings).result(60)) == 1
