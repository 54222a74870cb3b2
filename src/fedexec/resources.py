"""Per-task resources: what a task asks of the node(s) it runs on.

A client says what a task needs with ``with_options(f, resources={...})``
or, for all its tasks, ``FederatedExecutor(..., resource_specification={...})``
(as in Globus Compute). :func:`resource_option` checks that spec in
``submit`` (unknown keys and bad values raise ``ValueError`` there) and turns
it into the task row's ``rs`` option, a small msgpack map of integers that
travels like the other task options: the relay checks its shape
(:func:`check_wire`, through ``protocol.task_row``) and never unpickles
anything; the endpoint places the task by it (``endpoint/placement.py``).

A spec that asks for nothing beyond the default (one core) makes no option
at all, so such tasks cost exactly what plain tasks cost.

This module imports nothing of fedexec's: ``protocol`` uses it.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from .config import ConfigError

# The wire form ("rs"): short keys, integers, defaults left out.
CORES = "c"      # cores on the node (default 1)
MEMORY = "m"     # bytes of memory
GPUS = "g"       # accelerators (GPUs) of its own on the node
NODES = "n"      # nodes (default 1); more than one: an MPI task (a block's nodes, its own)
RANKS = "r"      # MPI ranks in all (default: one per node)
WIRE_KEYS = frozenset({CORES, MEMORY, GPUS, NODES, RANKS})

MAX_CORES = 1 << 16
MAX_MEMORY = 1 << 56
MAX_GPUS = 1024
MAX_NODES = 1 << 16
MAX_RANKS = 1 << 24

#: The keys a spec may have (Globus Compute's spellings too).
SPEC_KEYS = ("cores", "memory", "gpus", "nodes", "num_nodes", "ranks_per_node", "num_ranks", "ranks")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_MEMORY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_memory(value: Any) -> int:
    """Bytes from an int, or a string like ``"4G"``, ``"512M"``, ``"1.5GiB"``
    (K/M/G/T: powers of 1024); ValueError naming the value otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"resources: memory must be a number of bytes or a string such as '4G', not {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and (match := _MEMORY.fullmatch(value)):
        number = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    else:
        raise ConfigError(f"resources: memory must be a number of bytes or a string such as '4G' (K, M, G, T), "
                         f"not {value!r}")
    if not 0 <= number <= MAX_MEMORY:
        raise ConfigError(f"resources: memory must be from 0 to {MAX_MEMORY:,} bytes, not {value!r}")
    return number


def _whole(key: str, value: Any, least: int, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
        raise ConfigError(f"resources: {key} must be a whole number from {least} to {most:,}, not {value!r}")
    return value


def resource_option(spec: Mapping[str, Any] | None) -> dict[str, int] | None:
    """The ``rs`` task option for a resource spec, checked; None when the
    spec asks for nothing (no option: the plain path, where a pool may run
    more tasks at once than its node has cores when it has more workers).
    A spec that names ``cores``, even 1, is placed by it: such a task starts
    only on a core no other placed task holds.

    Keys: ``cores`` (default 1), ``memory`` (bytes, or "4G"-style), ``gpus``,
    ``nodes`` (or ``num_nodes``), ``ranks_per_node``, ``num_ranks`` (or
    ``ranks``: ranks in all). ValueError for an unknown key or a bad value,
    naming it."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise ConfigError(f"resources must be a dict such as {{'cores': 2, 'memory': '4G'}}, not {spec!r}")
    unknown = [key for key in spec if key not in SPEC_KEYS]
    if unknown:
        raise ConfigError(f"resources: unknown key(s) {', '.join(map(repr, unknown))}; the keys are "
                         f"{', '.join(SPEC_KEYS)}")
    if "nodes" in spec and "num_nodes" in spec:
        raise ConfigError("resources: give nodes or num_nodes, not both")
    if "num_ranks" in spec and "ranks" in spec:
        raise ConfigError("resources: give num_ranks or ranks, not both")
    option: dict[str, int] = {}
    cores = _whole("cores", spec.get("cores", 1), 1, MAX_CORES)
    if "cores" in spec:
        option[CORES] = cores
    if "memory" in spec:
        memory = parse_memory(spec["memory"])
        if memory:
            option[MEMORY] = memory
    gpus = _whole("gpus", spec.get("gpus", 0), 0, MAX_GPUS)
    if gpus:
        option[GPUS] = gpus
    node_key = "num_nodes" if "num_nodes" in spec else "nodes"
    nodes = _whole(node_key, spec.get(node_key, 1), 1, MAX_NODES)
    rank_key = "ranks" if "ranks" in spec else "num_ranks"
    ranks = _whole(rank_key, spec[rank_key], 1, MAX_RANKS) if rank_key in spec else None
    if "ranks_per_node" in spec:
        per_node = _whole("ranks_per_node", spec["ranks_per_node"], 1, MAX_RANKS)
        if ranks is not None and ranks != per_node * nodes:
            raise ConfigError(f"resources: {rank_key}={ranks} does not match ranks_per_node={per_node} on "
                             f"{nodes} node(s) ({per_node * nodes} ranks)")
        ranks = per_node * nodes
    if ranks is not None and ranks < nodes:
        raise ConfigError(f"resources: {ranks} rank(s) cannot span {nodes} nodes (at least one rank per node)")
    if nodes != 1:
        option[NODES] = nodes
    if ranks is not None:
        if ranks > MAX_RANKS:
            raise ConfigError(f"resources: at most {MAX_RANKS:,} ranks, not {ranks:,}")
        option[RANKS] = ranks
    return option or None


def check_wire(value: Any) -> dict[str, int]:
    """An ``rs`` option as received, checked (ValueError otherwise): a map of
    known keys to integers in range, so that nothing a peer sends can make a
    placement loop or an allocation large."""
    limits = {CORES: (1, MAX_CORES), MEMORY: (1, MAX_MEMORY), GPUS: (1, MAX_GPUS), NODES: (2, MAX_NODES),
              RANKS: (1, MAX_RANKS)}
    if not isinstance(value, dict) or not value or not set(value) <= WIRE_KEYS:
        raise ConfigError(f"resources (rs) must be a non-empty map with keys among {', '.join(sorted(WIRE_KEYS))}")
    for key, number in value.items():
        least, most = limits[key]
        if type(number) is not int or not least <= number <= most:
            raise ConfigError(f"resources (rs): {key} must be an integer from {least} to {most}")
    if value.get(RANKS, MAX_RANKS) < value.get(NODES, 1):
        raise ConfigError("resources (rs): fewer ranks than nodes")
    return value


def nodes_of(option: Mapping[str, int] | None) -> int:
    return option.get(NODES, 1) if option else 1


def describe(option: Mapping[str, int] | None) -> str:
    """What a task asks, in words: "2 cores, 4 GiB of memory, 1 GPU"."""
    option = option or {}
    cores = option.get(CORES, 1)
    parts = [f"{cores} core{'s' if cores != 1 else ''}"]
    if option.get(MEMORY):
        parts.append(f"{format_bytes(option[MEMORY])} of memory")
    if option.get(GPUS):
        parts.append(f"{option[GPUS]} GPU{'s' if option[GPUS] != 1 else ''}")
    if option.get(NODES, 1) != 1:
        parts.append(f"{option[NODES]} nodes")
    if RANKS in option:
        parts.append(f"{option[RANKS]} MPI rank{'s' if option[RANKS] != 1 else ''}")
    return ", ".join(parts)


def format_bytes(size: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"
