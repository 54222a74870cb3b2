"""A stop that throws away no finished result: the grace a stopping part gives
the tasks running under it.

Told to stop (SIGTERM, Ctrl-C, ``fedexec endpoint stop``, the embedded
executor's shutdown, a block scaled in), a pool takes no more tasks and
gives back those no worker has started, lets its workers finish what they
run for up to a grace period, sends their results, and only then stops its
workers and says BYE (``pool/leaving.py``). An endpoint agent told to stop
does the same over its pools: it takes no more tasks, tells each pool to
stop with that grace, keeps forwarding their results to the relay until
they have left (and the relay has stored what they sent), then says BYE
(``endpoint/agent.py``). What has not finished within the grace is given
back as before: it runs again elsewhere, or after a restart (at least once).

A second signal stops at once. A part whose other end is gone (its parent
process, its relay's loop) stops at once too: nobody would read its results.
"""

from __future__ import annotations

import math
from typing import Any

from . import protocol as P

# Seconds a stopping pool lets its workers finish what they run. The same
# time a pool gave its workers before (``LocalWorkerPool.stop``), now used
# to let them finish and send; well inside ``fedexec endpoint stop``'s 15 s.
STOP_GRACE = 3.0
# More seconds an agent waits beyond the grace for its pools' last results
# and BYE, and for the relay to say it stored those results.
LEAVE_MARGIN = 1.0
# A grace asked in a STOP message longer than this is cut to it.
MAX_GRACE = 60.0
# Seconds a stopping pool still waits for workers once the grace ran out
# (they finish their current task before they read STOP): then SIGTERM.
AFTER_GRACE = 0.5


def stop_message(grace: float) -> list[Any]:
    """A STOP telling a pool to leave within ``grace`` seconds (field ``g``);
    a pool that does not know the field stops at once, as before."""
    return P.encode(P.STOP, {"g": float(grace)})


def grace_of(fields: dict[str, Any]) -> float | None:
    """The grace a STOP message asks (``g``, seconds, capped at MAX_GRACE),
    or None: stop at once (no ``g``, or not a positive finite number)."""
    value = fields.get("g")
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        return None
    return min(float(value), MAX_GRACE)
