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


#: what the caps count, in the order of UserCaps' vectors, with their settings
CAPPED = (("cores", "max_cores_per_user"), ("GPUs", "max_gpus_per_user"), ("nodes", "max_nodes_per_user"))


class UserCaps:
    """Fairness on an endpoint shared with other users: what one user's tasks
    asking for resources may hold at once (``max_cores_per_user`` and
    ``max_gpus_per_user``: cores and GPUs, those a multi-node task asks
    for on each node times its nodes;
    ``max_nodes_per_user``: nodes of multi-node tasks; 0: no cap), and
    whether users other than the owner may ask for several nodes at all
    (``multi_node_for_others``). The owner's tasks (no ``u`` option) are
    never capped, nor are tasks asking for no resources (they never come here).

    A task over its user's cap waits, parked here apart from the queue (so
    that it neither holds up other users' tasks nor is looked at again on
    every pass), until that user's tasks release enough; a task asking more
    than a cap alone fails at once (:meth:`refusal`)."""

    def __init__(self, max_cores: int, max_gpus: int, max_nodes: int, multi_node_for_others: bool,
                 endpoint: str) -> None:
        self.limits = (max_cores, max_gpus, max_nodes)
        self.capped = any(self.limits)
        self.multi_node_for_others = multi_node_for_others
        self.endpoint = endpoint
        self.held: dict[bytes, tuple[str, tuple[int, int, int]]] = {}   # task id -> (user, what it holds)
        self.use: dict[str, list[int]] = {}                 # user -> what their placed tasks hold (as limits)
        self.parked: dict[str, deque[QueuedTask]] = {}      # user -> their tasks waiting for room, in order
        self.ready: list[QueuedTask] = []                   # parked tasks that fit again, to be queued again

    @staticmethod
    def _ask(row: list[Any]) -> tuple[str, tuple[int, int, int]]:
        """(user, (cores, GPUs, nodes)) a task counts for; user "" is the owner's."""
        option = row[6]["rs"]
        nodes = R.nodes_of(option)
        if nodes > 1:   # (whole nodes; the cores and GPUs it asks for on each count too, so caps on those hold)
            want = (option.get(R.CORES, 0) * nodes, option.get(R.GPUS, 0) * nodes, nodes)
        else:
            want = (option.get(R.CORES, 1), option.get(R.GPUS, 0), 0)
        return row[6].get("u") or "", want

    def refusal(self, row: list[Any]) -> str | None:
        """Why a task may never run here under these caps (None: it may)."""
        user, want = self._ask(row)
        if not user:
            return None
        if want[2] and not self.multi_node_for_others:
            return (f"endpoint {self.endpoint!r} runs tasks asking for several nodes for its owner only; the task "
                    f"of user {user!r} asks for {want[2]} nodes (its owner may allow them: multi_node_for_others)")
        for asked, limit, (what, setting) in zip(want, self.limits, CAPPED):
            if limit and asked > limit:
                return (f"the task asks for {asked} {what}, more than the {limit} one user's tasks may hold at "
                        f"once on endpoint {self.endpoint!r} ({setting})")
        return None

    def _within(self, use: Iterable[int], want: Iterable[int]) -> bool:
        """Whether ``want`` beside ``use`` (cores, GPUs, nodes) is within every cap."""
        return all(not limit or used + asked <= limit for used, asked, limit in zip(use, want, self.limits))

    def allows(self, row: list[Any]) -> bool:
        """Whether a task may be placed now: within its user's caps beside
        what their placed tasks hold."""
        if not self.capped:
            return True
        user, want = self._ask(row)
        return not user or self._within(self.use.get(user, (0, 0, 0)), want)

    def park(self, task: QueuedTask) -> None:
        self.parked.setdefault(self._ask(task.row)[0], deque()).append(task)

    def hold(self, row: list[Any]) -> None:
        """A task was placed (sent to a pool, or its nodes given it): it holds its share until :meth:`release`."""
        if not self.capped:   # (no caps: nothing to count)
            return
        user, want = self._ask(row)
        if user and row[0] not in self.held:
            self.held[row[0]] = (user, want)
            use = self.use.setdefault(user, [0, 0, 0])
            for k, asked in enumerate(want):
                use[k] += asked

    def release(self, task_id: bytes) -> None:
        """A task ended, or went back to the queue: its share is free again.
        The tasks of its user parked here that now fit go to ``ready``, in
        order, for the agent to queue again (each counts once it is placed)."""
        entry = self.held.pop(task_id, None)
        if entry is None:
            return
        user, want = entry
        use = self.use[user]
        for k, asked in enumerate(want):
            use[k] -= asked
        parked = self.parked.get(user)
        promised = list(use)   # (with the parked tasks let go so far)
        while parked:
            asked = self._ask(parked[0].row)[1]
            if not self._within(promised, asked):
                break
            self.ready.append(parked.popleft())
            for k, more in enumerate(asked):
                promised[k] += more
        if not parked:
            self.parked.pop(user, None)
        if not any(use):
            del self.use[user]

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
