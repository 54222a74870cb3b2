"""The garbage collector's settings for fedexec's own long-running services.

The relay, an endpoint agent and a pool manager each hand on thousands of
small tasks a second, and each task makes a few short-lived containers
(message rows, records). With CPython's default thresholds (a young
collection every 700 net allocations) a fan-out of 10,000 tasks made the
relay run ~230 collections, about a tenth of its CPU, and each full
collection walked every object made at import time as well.

:func:`for_service` (called once, after a service's start-up, by its
``main``) moves the objects alive then (modules, classes, functions, the
service's own structures) out of the collector's sight (``gc.freeze``: they
live as long as the process anyway), and collects the youngest generation
every ``YOUNG_THRESHOLD`` allocations instead: young garbage is mostly gone
by then, and cyclic garbage is still collected, just in larger steps (the
memory it can hold meanwhile is bounded by the threshold). User code never
runs under these settings: not in the client (a library does not change its
host program's collector) nor in workers.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000   # net allocations of container objects between young collections


def for_service() -> None:
    """Tune this process's collector for a fedexec service (see the module)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
