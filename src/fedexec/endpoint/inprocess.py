"""Pools inside the agent's process: a provider whose blocks are threads.

A local pool is otherwise a process of its own between the agent and its
workers, so every task crosses two more ZeroMQ ipc hops (agent -> pool and
back), each about three thread wake-ups through the two processes' I/O
threads. With ``[provider] in_process`` (the embedded default sets it:
its pool runs on the agent's machine and dies with it anyway), each pool
runs here instead: the same
``PoolManager``, on a thread of the agent's process, connected to the
agent's pool socket over ``inproc://`` (no I/O thread, no syscall beyond
the peer's wake-up). Nothing else changes: the pool says HELLO with the
pool secret, and the agent treats it as any other pool; its workers are
still processes of their own (``pool/workers.py``).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import zmq

from .providers import DONE, RUNNING

if TYPE_CHECKING:
    from ..pool.manager import PoolManager

log = logging.getLogger("fedexec.endpoint")

JOIN_TIMEOUT = 15.0   # seconds close() waits for a pool thread told to stop


class InProcessProvider:
    """Blocks are ``PoolManager`` threads in this process (one pool each)."""

    label = "in-process"

    def __init__(self, context: zmq.Context, address: str, secret: str, workers: int) -> None:
        self.context = context    # the agent's: inproc:// works only within one context
        self.address = address    # the agent's inproc:// pool address
        self.secret = secret
        self.workers = workers    # 0: the node's cores
        self.pools: dict[str, tuple[threading.Thread, "PoolManager"]] = {}
        self._serial = 0

    def submit(self, block_id: str, command: str, env: dict[str, str]) -> str:
        """Start a pool thread (``command`` and ``env``, for a process, are not used)."""
        from ..pool.manager import PoolManager, new_pool_id   # (loaded only when a pool runs here)

        manager = PoolManager(self.address, pool_id=new_pool_id(),
                              block_id=block_id, workers=self.workers, secret=self.secret, context=self.context)
        self._serial += 1
        job_id = f"thread-{self._serial}"
        thread = threading.Thread(target=self._run, args=(manager,), name=f"fedexec-pool-{job_id}", daemon=True)
        self.pools[job_id] = (thread, manager)
        thread.start()
        return job_id

    @staticmethod
    def _run(manager: "PoolManager") -> None:
        try:
            manager.run()
        except Exception:   # a pool that fails ends its block, as a pool process exiting would
            log.exception("the in-process pool failed")

    def status(self, job_ids: list[str]) -> dict[str, str]:
        states = {}
        for job_id in job_ids:
            entry = self.pools.get(job_id)
            if entry is not None and entry[0].is_alive():
                states[job_id] = RUNNING
            else:
                states[job_id] = DONE
                self.pools.pop(job_id, None)
        return states

    def cancel(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            entry = self.pools.get(job_id)
            if entry is not None:
                entry[1].stop()

    def close(self) -> None:
        """Wait for the pool threads (told to stop already), then tell them again."""
        for thread, manager in self.pools.values():
            manager.stop()
            thread.join(JOIN_TIMEOUT)
        self.pools.clear()
