"""Elastic scaling: how many blocks an endpoint keeps, and which to let go.

Every tick the scaler compares the work waiting (tasks at the relay for this
endpoint, plus those here and at pools) with the workers it has or has asked
for. More work than workers: it asks the provider for enough blocks to cover
the difference, up to ``max_blocks``. A block whose pools have all been
idle for ``max_idletime`` is let go while more than ``min_blocks`` remain:
its pools are told to stop (they give back anything they hold), then its job
is cancelled. Blocks that end without a pool ever connecting (a broken
worker_init, a node that cannot reach the endpoint) make the scaler wait
longer before each next attempt, so a broken setup does not flood the
scheduler with jobs.

Scheduler commands can take seconds (a busy slurmctld), so the provider is
called from a thread of its own, one call at a time; the agent's loop only
starts calls and picks up their answers, and never waits for one (its
heartbeats and tasks keep flowing).
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import ProviderConfig
from .pools import PoolLink
from .providers import DONE, PENDING, RUNNING, Provider, ProviderError

log = logging.getLogger("fedexec.endpoint.scaling")

STOP_GRACE = 15.0        # seconds a stopped block's pools get to leave before its job is cancelled
MAX_BACKOFF = 300.0


@dataclass
class Block:
    block_id: str
    job_id: str
    submitted: float
    state: str = PENDING
    pools: set = field(default_factory=set)    # pool ids connected from it
    ever_connected: bool = False
    stopping_since: float | None = None        # when it was let go
    cancelled: bool = False                    # its job was cancelled (once is enough)
    submission: Future | None = None           # the provider call submitting it, until it answers

    def describe(self) -> dict:
        state = "submitting" if self.submission else "stopping" if self.stopping_since else self.state
        return {"id": self.block_id, "job": self.job_id, "state": state, "pools": len(self.pools)}


class BlockScaler:
    """Keeps the blocks of one endpoint in line with its load."""

    def __init__(self, config: ProviderConfig, provider: Provider, command_for: Callable[[str], str],
                 env: dict[str, str], workers_per_node: int | None) -> None:
        self.config = config
        self.provider = provider
        self.command_for = command_for          # block id -> the command that starts its pools
        self.env = env
        self.workers_per_node = workers_per_node   # None: known once a pool says
        self.blocks: dict[str, Block] = {}
        self._serial = 0
        self._failures = 0
        self._next_submit = 0.0
        self._next_status = 0.0
        self.status_interval = 0.5 if config.type == "local" else 2.0
        self.error: str | None = None           # the last provider error, for status
        # the last failed submission's error, shown (as ``error``) until a submission succeeds
        self._submit_error: str | None = None
        self._calls = ThreadPoolExecutor(1, thread_name_prefix="fedexec-provider")
        self._status_call: Future | None = None
        self._status_jobs: dict[str, Block] = {}

    # -- what the agent calls --------------------------------------------------
    def start(self) -> None:
        self._submit(self.config.init_blocks, "initial blocks")

    def tick(self, now: float, demand: int, pools: dict[bytes, PoolLink]) -> tuple[list[str], list[str]]:
        """Scale; returns ``(ended, to_stop)``: blocks whose job is over (their
        pools are gone) and blocks whose pools the agent should tell to stop."""
        self._collect_submissions(now)
        ended = self._poll_states(now)
        for block in self.blocks.values():
            block.pools = {pid for pid in block.pools if pid in pools}
        to_stop = self._scale_in(now, demand, pools)
        self._scale_out(now, demand, pools)
        self._cancel_stopped(now)
        for block_id in ended:
            del self.blocks[block_id]
        return ended, to_stop

    def pool_connected(self, pool: PoolLink) -> bool:
        """A pool said hello: False if its block is unknown or being let go."""
        block = self.blocks.get(pool.block_id)
        if block is None or block.stopping_since is not None:
            return False
        block.pools.add(pool.pool_id)
        block.ever_connected = True
        block.state = RUNNING
        self._failures = 0
        if self.workers_per_node is None:
            self.workers_per_node = pool.workers
        return True

    def shutdown(self) -> None:
        """Cancel every block (after the calls under way, submissions too)."""
        self._calls.shutdown(wait=True)
        for block in self.blocks.values():
            if block.submission is not None and block.submission.exception() is None:
                block.job_id = block.submission.result()
        live = [b.job_id for b in self.blocks.values() if b.state != DONE and b.job_id]
        try:
            self.provider.cancel(live)
        except ProviderError as exc:
            log.error("%s; blocks may be left: %s", exc, ", ".join(live))
        self.provider.close()

    def describe(self) -> list[dict]:
        return [block.describe() for block in self.blocks.values()]

    # -- inside ------------------------------------------------------------------
    def _active(self, pools: dict[bytes, PoolLink]) -> list[Block]:
        """Blocks that count: not over, not let go, not draining (a block
        whose pools all drain before its walltime is replaced at once, so the
        endpoint has no gap while it finishes)."""
        return [b for b in self.blocks.values() if b.state != DONE and b.stopping_since is None
                and not (b.ever_connected and b.pools and all(pools[p].draining for p in b.pools if p in pools))]

    def _workers_of(self, block: Block, pools: dict[bytes, PoolLink]) -> int:
        """Workers a block brings: those of its live, non-draining pools; for a
        block still starting, what a block is expected to have."""
        if block.ever_connected:
            return sum(pools[p].workers for p in block.pools if p in pools and not pools[p].draining)
        return self.config.nodes_per_block * (self.workers_per_node or 1)

    def _call(self, method: Callable[..., Any], *args: Any) -> Future:
        return self._calls.submit(method, *args)

    def _collect_submissions(self, now: float) -> None:
        for block in list(self.blocks.values()):
            call = block.submission
            if call is None or not call.done():
                continue
            block.submission = None
            try:
                block.job_id = call.result()
            except ProviderError as exc:
                del self.blocks[block.block_id]
                self._provider_failed(exc)
                self._submit_error = self.error
                continue
            if self._submit_error is not None and self.error == self._submit_error:
                self.error = None
            self._submit_error = None
            log.info("started block %s (%s job %s)", block.block_id, self.provider.label, block.job_id)

    def _poll_states(self, now: float) -> list[str]:
        """Start a status call when one is due; take its answer when it came."""
        if self._status_call is None:
            if now >= self._next_status:
                self._status_jobs = {b.job_id: b for b in self.blocks.values() if b.state != DONE and b.job_id}
                self._status_call = self._call(self.provider.status, list(self._status_jobs))
            return []
        if not self._status_call.done():
            return []
        call, jobs = self._status_call, self._status_jobs
        self._status_call = None
        self._next_status = now + self.status_interval
        try:
            states = call.result()
        except ProviderError as exc:
            self._provider_failed(exc)
            return []
        self.error = self._submit_error   # (a status call that works says nothing of submissions)
        ended = []
        for job_id, state in states.items():
            block = jobs[job_id]
            if block.block_id not in self.blocks or block.state == DONE:
                continue
            if state == DONE:
                block.state = DONE
                ended.append(block.block_id)
                if not block.ever_connected and block.stopping_since is None:
                    self._failures += 1
                    delay = min(MAX_BACKOFF, 2.0 ** self._failures)
                    self._next_submit = now + delay
                    log.error("block %s (job %s) ended before any pool connected; next block in %.0f s "
                              "(see the block's output under the endpoint's blocks directory)",
                              block.block_id, job_id, delay)
                else:
                    log.info("block %s (job %s) ended", block.block_id, job_id)
            elif state == RUNNING and block.state == PENDING:
                block.state = RUNNING
        return ended

    def _scale_in(self, now: float, demand: int, pools: dict[bytes, PoolLink]) -> list[str]:
        """Let go of blocks beyond ``min_blocks``: first blocks still waiting
        in the scheduler's queue that the work no longer needs (the running
        ones cover it), then blocks whose pools have all idled ``max_idletime``."""
        active = self._active(pools)
        spare = len(active) - self.config.min_blocks
        to_stop = []
        running = [b for b in active if b.ever_connected]
        covered = sum(self._workers_of(b, pools) for b in running) >= demand
        for block in sorted(active, key=lambda b: b.submitted, reverse=True):   # newest first
            if spare <= 0:
                break
            if not block.ever_connected:
                if covered and running and now - block.submitted >= self.config.max_idletime:
                    block.stopping_since = now
                    spare -= 1
                    log.info("block %s not needed any more: cancelling it before it starts", block.block_id)
                continue
            members = [pools[p] for p in block.pools if p in pools]
            if members and all(p.idle_since is not None and now - p.idle_since >= self.config.max_idletime
                               for p in members):
                block.stopping_since = now
                spare -= 1
                to_stop.append(block.block_id)
                log.info("block %s idle for %g s: letting it go", block.block_id, self.config.max_idletime)
        return to_stop

    def _scale_out(self, now: float, demand: int, pools: dict[bytes, PoolLink]) -> None:
        active = self._active(pools)
        missing = self.config.min_blocks - len(active)
        supply = sum(self._workers_of(b, pools) for b in active)
        if demand > supply:
            if self.workers_per_node is None:
                # how many workers a block brings is known once a pool says:
                # until then one block at a time, not max_blocks for a burst
                missing = max(missing, 0 if any(not b.ever_connected for b in active) else 1)
            else:
                per_block = self.config.nodes_per_block * self.workers_per_node
                missing = max(missing, math.ceil((demand - supply) / per_block))
        missing = min(missing, self.config.max_blocks - len(active))
        if missing > 0 and now >= self._next_submit:
            self._submit(missing, f"{demand} task(s) for {supply} worker(s)")

    def _cancel_stopped(self, now: float) -> None:
        due = [b for b in self.blocks.values() if b.stopping_since is not None and b.state != DONE and b.job_id
               and not b.cancelled and (not b.pools or now - b.stopping_since > STOP_GRACE)]
        if due:
            for block in due:
                block.cancelled = True
            self._call(self._cancel, [b.job_id for b in due])

    def _cancel(self, job_ids: list[str]) -> None:
        """In the provider's thread: a failed cancel is logged and shown in
        the status (the job ends with its walltime at the latest)."""
        try:
            self.provider.cancel(job_ids)
        except ProviderError as exc:
            self.error = str(exc)
            log.error("%s", exc)

    def _submit(self, count: int, why: str) -> None:
        for _ in range(count):
            self._serial += 1
            block_id = f"b{int(time.time())}-{self._serial}"
            block = Block(block_id, "", time.monotonic())
            block.submission = self._call(self.provider.submit, block_id, self.command_for(block_id), self.env)
            self.blocks[block_id] = block
            log.info("asking for block %s: %s", block_id, why)

    def _provider_failed(self, exc: ProviderError) -> None:
        self.error = str(exc)
        self._failures += 1
        delay = min(MAX_BACKOFF, 2.0 ** self._failures)
        self._next_submit = time.monotonic() + delay
        log.error("%s; trying again in %.0f s", exc, delay)
