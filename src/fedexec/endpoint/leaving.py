"""An endpoint agent that stops without throwing away the results of the
tasks running at its pools.

Told to stop (SIGTERM, Ctrl-C, ``fedexec endpoint stop``; in the embedded
default, its process's SIGTERM: ``colocated.py``), the agent *leaves*: it
takes no more tasks (its pools count as draining, so it grants the relay
no credit and hands them nothing, and it starts no block), tells each pool
to stop within ``stopgrace.STOP_GRACE`` (``pool/leaving.py``: a pool gives
back what no worker started, lets its workers finish, and sends their
results), and keeps its loop running, forwarding those results to the
relay, until every pool has said BYE and the relay has stored what was
sent (or the grace and ``LEAVE_MARGIN`` have run out). Then it stops as
before: it flushes, says BYE (the relay queues again what it still held
for a later start), stops what is left.

This matters most for pools stepped by the agent's own loop (in-process
pools, the embedded default's): they stop when the loop stops, so before,
what their workers were running was given back and ran again after a
restart (a durable relay), or was lost (the embedded default).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .. import protocol as P
from ..stopgrace import LEAVE_MARGIN, STOP_GRACE, stop_message

if TYPE_CHECKING:
    from .pools import PoolLink

log = logging.getLogger("fedexec.endpoint")


class AgentLeaving:
    """Mixed into ``EndpointAgent``: its graceful stop."""

    pools: "dict[bytes, PoolLink]"
    unstored: dict[bytes, Any]
    connected: bool
    stopping: bool

    if TYPE_CHECKING:   # (the agent's)
        def _send_pool(self, pool_id: bytes, frames: list[Any]) -> bool: ...

    def _init_leaving(self) -> None:
        self.leave_asked = False                # asked to stop gracefully, not begun yet
        self.leaving_by: float | None = None    # time.monotonic() by which the agent stops, leaving

    def stop(self, *_: Any) -> None:
        """Stop gracefully (a signal handler: the leaving begins in the
        loop's next turn); asked again, stop at once."""
        if self.leave_asked:
            self.stopping = True
        self.leave_asked = True

    def stop_now(self) -> None:
        """Stop at once: nobody would read the results (the relay's loop in
        this process has ended)."""
        self.stopping = True

    @property
    def leaving(self) -> bool:
        return self.leaving_by is not None

    def _leave_turn(self, now: float) -> None:
        """Part of the loop's turn once asked to stop: begin leaving, and
        stop (``self.stopping``) once the pools are gone and the relay has
        what they sent, or the time is up."""
        if self.leaving_by is None:
            self.leaving_by = now + STOP_GRACE + LEAVE_MARGIN
            running = sum(len(pool.started) for pool in self.pools.values())
            log.info("endpoint stopping: %d pool(s) have %g s to finish the %d task(s) they run", len(self.pools),
                     STOP_GRACE, running)
            stop = stop_message(STOP_GRACE)
            for pool in self.pools.values():
                pool.draining = True
                self._send_pool(pool.pool_id, stop)
        if now >= self.leaving_by:
            if self.pools:
                log.warning("endpoint stopping: %d pool(s) still running tasks after %g s; those tasks are given "
                            "back", len(self.pools), STOP_GRACE + LEAVE_MARGIN)
            self.stopping = True
        elif not self.pools and (not self.unstored or not self.connected):
            self.stopping = True

    def _refuse_pool_leaving(self, pool_id: bytes) -> None:
        """A pool introducing itself while this agent leaves: it is told to stop."""
        self._send_pool(pool_id, P.encode(P.STOP))

