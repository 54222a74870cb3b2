"""The functions the benchmarks run, in an importable module so that every
system (fedexec, ProcessPoolExecutor, Parsl, Dask) sends them by reference,
not by value. run_all.py puts this directory on PYTHONPATH for its children
and everything they start."""

from __future__ import annotations

import time
from typing import Any


def noop(x: Any = None) -> None:
    return None


def identity(x: Any) -> Any:
    return x


def sleep_task(seconds: float) -> float:
    if seconds > 0:
        time.sleep(seconds)
    return seconds


def memo_task(key: Any) -> Any:
    """The 1 ms function of the memoization benchmark."""
    time.sleep(0.001)
    return key


def gather(*values: Any) -> int:
    """The fan-in of the graphs benchmark: how many values it was given."""
    return len(values)
