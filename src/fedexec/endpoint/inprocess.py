"""Pools inside the agent's process, driven by the agent's own loop.

A local pool is otherwise a process of its own between the agent and its
workers, so every task crosses two more ZeroMQ ipc hops (agent -> pool and
back), each about three thread wake-ups through the two processes' I/O
threads. With ``[provider] in_process`` (the embedded default sets it:
its pool runs on the agent's machine and dies with it anyway), each pool
runs here instead: the same ``PoolManager``, linked to the agent by a
link in memory (memlink.py: a message is a list handed over, with no
ZeroMQ send, receive or wake-up signal). Nothing else changes: the pool
says HELLO with the pool secret, and the agent treats it as any other
pool; its workers are still processes of their own (``pool/workers.py``).

The pools have no thread of their own: the agent's loop polls their
sockets with its own and steps them (:meth:`InProcessProvider.step`) after
each of its turns. A task then goes from the relay to a worker, and its
result back, with no thread wake-up and no handing over of the interpreter
lock between the agent and its pool (a pool on a thread of its own cost
two of each per task, and the agent blocked on its sends to it). A pool
that ends while the agent runs (stopped, or drained) is finished on a
short thread of its own, which then alone owns its sockets: stopping its
workers can take seconds that the agent's loop does not wait.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Callable

import zmq

from .. import protocol as P
from ..memlink import MemoryEnd
from .providers import DONE, RUNNING

if TYPE_CHECKING:
    from ..pool.manager import PoolManager

log = logging.getLogger("fedexec.endpoint")

JOIN_TIMEOUT = 15.0   # seconds close() waits for a pool finishing on a thread of its own


class InProcessProvider:
    """Blocks are ``PoolManager`` objects in this process (one pool each),
    stepped by the agent's loop: :meth:`submit` may be called from any
    thread (the scaler's); :meth:`wait_ms`, :meth:`step` and :meth:`close`
    from the agent's loop only, which alone touches the pools' sockets."""

    label = "in-process"

    def __init__(self, context: zmq.Context, address: str, secret: str, workers: int,
                 link: Callable[[bytes], MemoryEnd] | None = None) -> None:
        self.context = context    # the agent's: inproc:// works only within one context
        self.address = address    # the agent's inproc:// pool address
        self.link = link          # the agent's: a pool's end of a link in memory to it, by pool id
        self.secret = secret
        self.workers = workers    # 0: the node's cores
        self._lock = threading.Lock()   # guards the three collections below (submit runs on the scaler's thread)
        self._new: list[tuple[str, "PoolManager"]] = []           # submitted, not yet begun by the agent's loop
        self._running: dict[str, "PoolManager"] = {}              # job id -> a pool the agent's loop steps
        self._finishing: dict[str, threading.Thread] = {}         # job id -> the thread finishing that pool
        self._serial = 0

    # -- the provider interface (providers.py) ---------------------------------
    def submit(self, block_id: str, command: str, env: dict[str, str]) -> str:
        """Make a pool for the agent's loop to start (``command`` and ``env``, for a process, are not used)."""
        from ..pool.manager import PoolManager, new_pool_id   # (loaded only when a pool runs here)

        manager = PoolManager(self.address, pool_id=new_pool_id(),
                              block_id=block_id, workers=self.workers, secret=self.secret, context=self.context)
        with self._lock:
            self._serial += 1
            job_id = f"thread-{self._serial}"
            self._new.append((job_id, manager))
        return job_id

    def status(self, job_ids: list[str]) -> dict[str, str]:
        states = {}
        with self._lock:
            for job_id in job_ids:
                thread = self._finishing.get(job_id)
                if job_id in self._running or any(j == job_id for j, _ in self._new) or (
                        thread is not None and thread.is_alive()):
                    states[job_id] = RUNNING
                else:
                    states[job_id] = DONE
                    self._finishing.pop(job_id, None)
        return states

    def cancel(self, job_ids: list[str]) -> None:
        """Tell those pools to stop (the agent's loop finishes them)."""
        with self._lock:
            managers = [m for j, m in self._new if j in job_ids] + [
                self._running[j] for j in job_ids if j in self._running]
        for manager in managers:
            manager.stop()

    def runs(self, pool_id: bytes) -> bool:
        """Whether the pool of this id is one this provider steps (in the
        agent's loop: its silence is the loop's own, never the pool's)."""
        with self._lock:
            return any(manager.pool_id == pool_id for manager in self._running.values())

    # -- driven by the agent's loop ---------------------------------------------
    def wait_ms(self, default: int) -> int:
        """How long the agent's poll may wait for the pools' sake."""
        if self._new or any(isinstance(m.endpoint, MemoryEnd) and m.endpoint.inbox for m in self._running.values()):
            return 0
        return min([default, *(manager.wait_ms() for manager in self._running.values())])

    def step_results(self, poller: zmq.Poller, events: dict) -> bool:
        """Before the agent's turn: step the pools whose workers wrote, so
        that the results they send reach the agent in this same turn (not
        one more time round its loop). True when any pool was stepped."""
        stepped = False
        for job_id, manager in list(self._running.items()):
            if manager.workers_ready(events):
                self._step(job_id, manager, poller, True)
                stepped = True
        return stepped

    def step(self, poller: zmq.Poller, events: dict, workers_read: bool = False) -> None:
        """After the agent's turn: start new pools, and give each running one
        a turn: what is ready on its sockets (its endpoint socket checked
        afresh: the agent may have sent to it during this turn; its workers'
        socket only if :meth:`step_results` did not read it already,
        ``workers_read``), timers, results to send."""
        if self._new:
            self._begin_new(poller)
        for job_id, manager in list(self._running.items()):
            self._step(job_id, manager, poller, not workers_read and manager.workers_ready(events))

    def close(self) -> None:
        """Finish every pool (told to stop already) here, and wait for those finishing."""
        with self._lock:
            new, self._new = self._new, []
            running, self._running = dict(self._running), {}
            finishing = list(self._finishing.values())
        for _job_id, manager in new:
            self._finish(manager)
        for manager in running.values():
            manager.stop()
            self._finish(manager)
        for thread in finishing:
            thread.join(JOIN_TIMEOUT)
        with self._lock:
            self._finishing.clear()

    # -- inside ---------------------------------------------------------------------
    def _begin_new(self, poller: zmq.Poller) -> None:
        # a pool stays among the new until it is among the running: the
        # scaler asks status() from the provider's thread, and a pool whose
        # workers are starting (begin() takes a while) is not ended
        with self._lock:
            new = list(self._new)
        for entry in new:
            job_id, manager = entry
            try:
                if self.link is not None:
                    manager.use_link(self.link(manager.pool_id))
                manager.begin()
            except Exception:
                log.exception("the in-process pool could not start")
                with self._lock:
                    self._new.remove(entry)
                self._finish(manager)
                continue
            poller.register(manager.worker_sock, zmq.POLLIN)
            if manager.links.wanted:   # (its workers' own channels: framelink.py)
                poller.register(manager.links.fileno(), zmq.POLLIN)
            if not isinstance(manager.endpoint, MemoryEnd):   # (one in memory: looked at every turn)
                poller.register(manager.endpoint, zmq.POLLIN)
            with self._lock:
                self._new.remove(entry)
                self._running[job_id] = manager

    def _step(self, job_id: str, manager: "PoolManager", poller: zmq.Poller, workers_ready: bool) -> None:
        try:
            ongoing = not manager.stopping and manager.step(
                workers_ready, bool(manager.endpoint.getsockopt(P.EVENTS) & P.POLLIN))
        except Exception:   # a pool that fails ends its block, as a pool process exiting would
            log.exception("the in-process pool failed")
            ongoing = False
        if not ongoing:
            self._end(job_id, manager, poller)

    def _end(self, job_id: str, manager: "PoolManager", poller: zmq.Poller) -> None:
        """Take a pool off the agent's loop and finish it on a thread of its own."""
        poller.unregister(manager.worker_sock)
        if manager.links.wanted:
            poller.unregister(manager.links.fileno())
        if not isinstance(manager.endpoint, MemoryEnd):
            poller.unregister(manager.endpoint)
        thread = threading.Thread(target=self._finish, args=(manager,), name=f"fedexec-pool-{job_id}-end",
                                  daemon=True)
        thread.start()   # (before it leaves the running: status() never sees it in neither, not started)
        with self._lock:
            del self._running[job_id]
            self._finishing[job_id] = thread

    @staticmethod
    def _finish(manager: "PoolManager") -> None:
        try:
            manager.finish()
        except Exception:
            log.exception("the in-process pool did not stop cleanly")
