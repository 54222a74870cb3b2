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


class UserCaps:
    """Fairness on an endpoint shared with other users: what one user's tasks
    asking for resources may hold at once (``max_cores_per_user``: cores of
    single-node tasks; ``max_nodes_per_user``: nodes of multi-node tasks),
    and whether users other than the owner may ask for several nodes at all
    (``multi_node_for_others``). The owner's tasks (no ``u`` option) are
    never capped, nor are tasks asking for no resources (they never come here).

    A task over its user's cap waits, parked here apart from the queue (so
    that it neither holds up other users' tasks nor is looked at again on
    every pass), until that user's tasks release enough; a task asking more
    than a cap alone fails at once (:meth:`refusal`)."""

    def __init__(self, max_cores: int, max_nodes: int, multi_node_for_others: bool, endpoint: str) -> None:
        self.max_cores, self.max_nodes = max_cores, max_nodes
        self.multi_node_for_others = multi_node_for_others
        self.endpoint = endpoint
        self.held: dict[bytes, tuple[str, int, int]] = {}   # task id -> (user, cores, nodes) it holds
        self.cores: dict[str, int] = {}                     # user -> cores their placed tasks hold
        self.nodes: dict[str, int] = {}                     # user -> nodes their multi-node tasks hold
        self.parked: dict[str, deque[QueuedTask]] = {}      # user -> their tasks waiting for room, in order
        self.ready: list[QueuedTask] = []                   # parked tasks that fit again, to be queued again

    @staticmethod
    def _ask(row: list[Any]) -> tuple[str, int, int]:
        """(user, cores, nodes) a task counts for; user "" is the owner's."""
        option = row[6]["rs"]
        nodes = R.nodes_of(option)
        return row[6].get("u") or "", (0 if nodes > 1 else option.get(R.CORES, 1)), (nodes if nodes > 1 else 0)

    def refusal(self, row: list[Any]) -> str | None:
        """Why a task may never run here under these caps (None: it may)."""
        user, cores, nodes = self._ask(row)
        if not user:
            return None
        if nodes and not self.multi_node_for_others:
            return (f"endpoint {self.endpoint!r} runs tasks asking for several nodes for its owner only; the task "
                    f"of user {user!r} asks for {nodes} nodes (its owner may allow them: multi_node_for_others)")
        if self.max_nodes and nodes > self.max_nodes:
            return (f"the task asks for {nodes} nodes, more than the {self.max_nodes} one user may hold at once "
                    f"on endpoint {self.endpoint!r} (max_nodes_per_user)")
        if self.max_cores and cores > self.max_cores:
            return (f"the task asks for {cores} cores, more than the {self.max_cores} one user's tasks may hold "
                    f"at once on endpoint {self.endpoint!r} (max_cores_per_user)")
        return None

    def allows(self, row: list[Any]) -> bool:
        """Whether a task may be placed now: within its user's caps beside
        what their placed tasks hold."""
        if not (self.max_cores or self.max_nodes):
            return True
        user, cores, nodes = self._ask(row)
        if not user:
            return True
        return not (self.max_cores and self.cores.get(user, 0) + cores > self.max_cores
                    or self.max_nodes and self.nodes.get(user, 0) + nodes > self.max_nodes)

    def park(self, task: QueuedTask) -> None:
        self.parked.setdefault(self._ask(task.row)[0], deque()).append(task)

    def hold(self, row: list[Any]) -> None:
        """A task was placed (sent to a pool, or its nodes given it): it holds its share until :meth:`release`."""
        if not (self.max_cores or self.max_nodes):   # (no caps: nothing to count)
            return
        user, cores, nodes = self._ask(row)
        if user and row[0] not in self.held:
            self.held[row[0]] = (user, cores, nodes)
            self.cores[user] = self.cores.get(user, 0) + cores
            self.nodes[user] = self.nodes.get(user, 0) + nodes

    def release(self, task_id: bytes) -> None:
        """A task ended, or went back to the queue: its share is free again.
        The tasks of its user parked here that now fit go to ``ready``, in
        order, for the agent to queue again (each counts once it is placed)."""
        entry = self.held.pop(task_id, None)
        if entry is None:
            return
        user, cores, nodes = entry
        self.cores[user] -= cores
        self.nodes[user] -= nodes
        free_cores = self.max_cores - self.cores[user] if self.max_cores else None
        free_nodes = self.max_nodes - self.nodes[user] if self.max_nodes else None
        if not self.cores[user] and not self.nodes[user]:
            del self.cores[user], self.nodes[user]
        parked = self.parked.get(user)
        back = self.ready
        while parked:
            _, want_cores, want_nodes = self._ask(parked[0].row)
            if (free_cores is not None and want_cores > free_cores
                    or free_nodes is not None and want_nodes > free_nodes):
                break
            back.append(parked.popleft())
            if free_cores is not None:
                free_cores -= want_cores
            if free_nodes is not None:
                free_nodes -= want_nodes
        if not parked:
            self.parked.pop(user, None)

    def take_out(self, task_ids: set[bytes]) -> list[QueuedTask]:
        """Parked (or ready) tasks among ``task_ids`` (cancelled), taken out."""
        out = [task for task in self.ready if task.row[0] in task_ids]
        if out:
            self.ready = [task for task in self.ready if task.row[0] not in task_ids]
        for user, parked in list(self.parked.items()):
            keep = deque(task for task in parked if task.row[0] not in task_ids)
            if len(keep) != len(parked):
                out.extend(task for task in parked if task.row[0] in task_ids)
                if keep:
                    self.parked[user] = keep
                else:
                    del self.parked[user]
        return out

    def parked_count(self) -> int:
        return sum(len(parked) for parked in self.parked.values()) + len(self.ready)
