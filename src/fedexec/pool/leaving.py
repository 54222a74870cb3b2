"""A pool that stops without throwing away the results of its running tasks.

Told to stop with a grace (a STOP from its endpoint with ``g``, or SIGTERM /
SIGINT to a pool process: ``stopgrace.STOP_GRACE``), a pool *leaves*: it
drains (``PoolManager._start_draining``: no more tasks, those queued here
go back to the endpoint at once), asks its workers' control threads for the
tasks they hold and have not started (they go back too, ``stealing.py``),
and goes on stepping while its workers finish what they run, sending their
results. Once it holds nothing it finishes as a drained pool does
(``PoolManager.step`` returns False); once the grace has run out it
finishes anyway, giving back what still runs (at least once, as before),
and waits only ``AFTER_GRACE`` more for its workers.

A second signal, or a STOP without a grace, stops at once (a second STOP
with a grace only brings the end forward, if it is sooner). The signal
handler only takes note: the leaving begins in the pool's next turn, never
inside a send the signal interrupted.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import TYPE_CHECKING, Any

from ..stopgrace import AFTER_GRACE, STOP_GRACE

if TYPE_CHECKING:
    from .workers import LocalWorkerPool

log = logging.getLogger("fedexec.pool")


class PoolLeaving:
    """Mixed into ``PoolManager``: its graceful stop."""

    pool: "LocalWorkerPool | None"
    pool_id: bytes
    draining: bool
    stopping: bool
    held: set[bytes]

    if TYPE_CHECKING:   # (the pool manager's and its work stealing's)
        def _start_draining(self) -> None: ...
        def _recall(self, slot: Any, task_ids: Any, cancel: bool) -> list[bytes]: ...

    def _init_leaving(self) -> None:
        self.leave_asked: float | None = None   # a grace asked (by a STOP, or a signal), not begun yet
        self.leave_by: float | None = None      # time.monotonic() by which the pool stops, leaving
        self.left_late = False                  # the grace ran out with tasks still running

    def ask_to_leave(self, grace: float, *, again_stops: bool = False) -> None:
        """Leave within ``grace`` seconds (from the next turn on). Asked
        again while leaving: at once with ``again_stops`` (a second signal),
        else by the sooner of the two ends (a STOP from the endpoint after
        a SIGINT that reached the pool too: Ctrl-C goes to the whole
        process group)."""
        if self.leave_by is not None:
            if again_stops:
                self.stopping = True
            else:
                self.leave_by = min(self.leave_by, time.monotonic() + grace)
        elif self.leave_asked is not None:
            if again_stops:
                self.stopping = True
            else:
                self.leave_asked = min(self.leave_asked, grace)
        else:
            self.leave_asked = grace

    def _on_stop_signal(self, *_: Any) -> None:
        """SIGTERM / SIGINT of a pool process: leave within STOP_GRACE; a
        second one: stop at once."""
        self.ask_to_leave(STOP_GRACE, again_stops=True)

    def _install_stop_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)

    def _leave_turn(self, now: float) -> bool:
        """Part of the pool's turn while leaving (or asked to): False once it
        should finish (the grace ran out)."""
        if self.leave_asked is not None and self.leave_by is None:
            grace, self.leave_asked = self.leave_asked, None
            self.leave_by = now + grace
            log.info("pool %s stopping: its workers have %g s to finish what they run", self.pool_id.decode(),
                     grace)
            if not self.draining:
                self._start_draining()
            self._recall_unstarted()
        if self.leave_by is not None and now >= self.leave_by:
            if self.held:
                self.left_late = True
                log.warning("pool %s: %d task(s) still running after the stop's grace; they are given back",
                            self.pool_id.decode(), len(self.held))
            return False
        return True

    def _recall_unstarted(self) -> None:
        """Ask each worker for the tasks it holds and has not started: they
        go back to the endpoint (``_on_recalled``, draining) instead of
        holding up the stop. Workers without a control thread, in a sandbox
        (their arguments are in its own task root) or asked already run
        what they hold."""
        pool = self.pool
        if pool is None or pool.sandbox != "none":
            return
        for slot in pool.slots.values():
            if slot.control and len(slot.tasks) > 1 and not slot.recalled_at:
                slot.recalled_at = time.monotonic()
                self._recall(slot, list(slot.tasks), cancel=False)

    def _worker_stop_timeout(self, default: float) -> float:
        """How long the pool's stop waits for its workers before SIGTERM:
        ``default``, or, once the pool began leaving (its workers had their
        grace, or were let go at once by a second signal), AFTER_GRACE."""
        return AFTER_GRACE if self.leave_by is not None else default
