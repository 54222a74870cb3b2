"""Where the endpoint may send a task that asks for resources.

The endpoint sends a task asking for resources (its ``rs`` option,
:mod:`fedexec.resources`) only to a pool whose node could hold it (enough
cores, memory and accelerators in all); the pool then starts it once they
are free (``pool/placement.py``). A task that no node of the endpoint could
ever hold fails at once, saying what it asked and what the largest node has,
rather than waiting for ever. Tasks without resources never come here.

A task asking for several nodes (an MPI task) gets that many nodes of one
block to itself (:class:`MultiNode`): they are kept for it, taking no more
tasks, until they have finished what they hold; then it goes to the first
of them with the node list (task option ``nl``), from which that pool makes
the launcher command (``pool/placement.py``), and the others stay its own
until it ends. Tasks keep using the block's other nodes meanwhile.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Mapping

from .. import resources as R
from ..dispatch import QueuedTask
from .pools import PoolLink


def fits(option: Mapping[str, int], pool: PoolLink) -> bool:
    """Whether ``pool``'s node could ever hold a task asking ``option``."""
    return (option.get(R.CORES, 1) <= pool.cores and option.get(R.MEMORY, 0) <= pool.memory
            and option.get(R.GPUS, 0) <= pool.gpus)


def why_never(option: Mapping[str, int], pools: Iterable[PoolLink], nodes_per_block: int,
              endpoint: str) -> str | None:
    """Why no node of the endpoint could ever hold a task asking ``option``
    (None: one could, or no pool is connected yet to say)."""
    nodes = R.nodes_of(option)
    if nodes > nodes_per_block:
        return (f"the task asks for {R.describe(option)}, but a block of endpoint {endpoint!r} has "
                f"{nodes_per_block} node{'s' if nodes_per_block != 1 else ''} ([provider] nodes_per_block)")
    pools = list(pools)
    if not pools or any(fits(option, pool) for pool in pools):
        return None
    largest = max(pools, key=lambda pool: (pool.cores, pool.gpus, pool.memory))
    return (f"the task asks for {R.describe(option)} on a node, but no node of endpoint {endpoint!r} has that: "
            f"the largest has {largest.cores} core{'s' if largest.cores != 1 else ''}, "
            f"{R.format_bytes(largest.memory)} of memory and {largest.gpus} GPU{'s' if largest.gpus != 1 else ''}")


def several_nodes(row: list[Any]) -> bool:
    return R.NODES in row[6]["rs"]


class MultiNode:
    """Tasks asking for several nodes, and the nodes (pools) kept for them."""

    def __init__(self) -> None:
        self.waiting: deque[QueuedTask] = deque()
        self.pools: dict[bytes, bytes] = {}            # pool id -> the task it is kept for, or runs
        self.running: dict[bytes, list[bytes]] = {}    # task id -> its pools' ids
        self.placing: QueuedTask | None = None         # the task being sent (not sent back to waiting)

    def ready(self, pools: Mapping[bytes, PoolLink]) -> tuple[QueuedTask | None, list[PoolLink]]:
        """The first waiting task and its pools, once they are all free
        (lead first); (None, []) while it must wait. Keeps pools for it as
        it goes: those of the block with the most nodes not kept for others."""
        task = self.waiting[0]
        task_id = task.row[0]
        nodes = R.nodes_of(task.row[6]["rs"])
        kept = [pool for pool in pools.values() if self.pools.get(pool.pool_id) == task_id and not pool.draining]
        if len(kept) < nodes:   # (again: one it had went away)
            for pool in kept:
                del self.pools[pool.pool_id]
            blocks: dict[str, list[PoolLink]] = {}
            for pool in pools.values():
                if not pool.draining and pool.pool_id not in self.pools:
                    blocks.setdefault(pool.block_id, []).append(pool)
            block = max(blocks.values(), key=len, default=[])
            if len(block) < nodes:
                return None, []
            kept = sorted(block, key=lambda pool: len(pool.tasks))[:nodes]
            for pool in kept:
                self.pools[pool.pool_id] = task_id
        if any(pool.tasks for pool in kept):
            return None, []
        self.waiting.popleft()
        return task, sorted(kept, key=lambda pool: pool.node)

    def started(self, task_id: bytes, pools: list[PoolLink]) -> None:
        self.running[task_id] = [pool.pool_id for pool in pools]

    def release(self, task_id: bytes) -> None:
        """A task ended (ran, or was cancelled or failed while it waited):
        the nodes kept for it take other tasks again."""
        self.running.pop(task_id, None)
        for pool_id in [pool_id for pool_id, kept_for in self.pools.items() if kept_for == task_id]:
            del self.pools[pool_id]
