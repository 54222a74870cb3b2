"""Where the endpoint may send a task that asks for resources.

The endpoint sends a task asking for resources (its ``rs`` option,
:mod:`fedexec.resources`) only to a pool whose node could hold it (enough
cores, memory and accelerators in all); the pool then starts it once they
are free (``pool/placement.py``). A task that no node of the endpoint could
ever hold fails at once, saying what it asked and what the largest node has,
rather than waiting for ever. Tasks without resources never come here.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from .. import resources as R
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
