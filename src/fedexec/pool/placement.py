"""Which queued tasks a pool may start now, given what its node has free.

A task that asks for resources (its ``rs`` option, :mod:`fedexec.resources`)
starts only where they are free: a pool of N cores never runs tasks asking
for more than N cores in all at once, nor more memory than the node had when
the pool started, and each task asking for GPUs gets accelerators of its own
(unless the endpoint says ``accelerators_shared = true``), handed to it in
CUDA_VISIBLE_DEVICES, ROCR_VISIBLE_DEVICES and ZE_AFFINITY_MASK.

While the pool holds any such task it places *every* task this way, each
alone at an idle worker (a task without resources counts as one core), so
that plain tasks cannot crowd onto cores another task was promised; a pool
that has none (the usual case) hands out tasks in batches as before, and
this module costs it nothing.

Tasks are taken in order; one that does not fit yet keeps reserved what it
lacks (cores, memory or accelerators), so later tasks start only in what is
left beside it: no task waits for ever behind a stream of smaller ones, and
a task waiting for a GPU does not hold up tasks that need only a free core.
"""

from __future__ import annotations

import math
import os
import shlex
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

from .. import resources as R
from ..dispatch import QueuedTask

#: where a task finds the accelerators it was given (CUDA, ROCm, oneAPI Level Zero)
ACCELERATOR_VARIABLES = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")


@dataclass(frozen=True)
class Need:
    cores: int
    memory: int
    gpus: int


PLAIN = Need(1, 0, 0)


def need_of(task: QueuedTask) -> Need:
    option = task.option("rs")
    if not option:
        return PLAIN
    return Need(option.get(R.CORES, 1), option.get(R.MEMORY, 0), option.get(R.GPUS, 0))


class NodeBudget:
    """What this pool's node offers tasks, and which accelerators its running
    tasks were given."""

    def __init__(self, cores: int, memory: int, accelerators: list[str], shared: bool = False) -> None:
        self.cores = max(1, cores)
        self.memory = memory
        self.accelerators = list(accelerators)
        self.shared = shared
        self.launcher = "mpiexec"               # the endpoint's MPI launcher (its mpi_launcher)
        self.active = False                     # a task with resources is here: place every task by them
        self.devices: dict[bytes, tuple[str, ...]] = {}   # task id -> accelerators it was given

    def use_accelerators(self, accelerators: list[str], shared: bool) -> None:
        """The endpoint's ``available_accelerators`` (they replace what was found here)."""
        self.accelerators = list(accelerators)
        self.shared = shared

    def why_never(self, need: Need) -> str:
        """Why this node could never hold a task ("" when it could)."""
        lacks = []
        if need.cores > self.cores:
            lacks.append(f"{self.cores} core{'s' if self.cores != 1 else ''}")
        if need.memory > self.memory:
            lacks.append(f"{R.format_bytes(self.memory)} of memory")
        if need.gpus > len(self.accelerators):
            lacks.append(f"{len(self.accelerators)} GPU{'s' if len(self.accelerators) != 1 else ''}")
        return " and ".join(lacks)

    def plan(self, queue: Iterable[QueuedTask], running: Iterable[Iterable[QueuedTask]],
             idle_workers: int) -> list[tuple[QueuedTask, dict[str, str] | None]]:
        """The queued tasks to start now (at most ``idle_workers``), in order,
        each with the environment it runs in (its accelerators), given the
        tasks ``running`` at each busy worker (a worker runs one at a time:
        it uses what the largest of its tasks asks)."""
        free_cores, free_memory = self.cores, self.memory
        in_use: Counter[str] = Counter()
        alive = set()
        for held in running:
            needs = [need_of(task) for task in held]
            if needs:
                free_cores -= max(n.cores for n in needs)
                free_memory -= max(n.memory for n in needs)
            for task in held:
                devices = self.devices.get(task.row[0])
                if devices:
                    alive.add(task.row[0])
                    in_use.update(devices)
        if len(alive) != len(self.devices):   # forget the devices of tasks no worker holds any more
            self.devices = {tid: d for tid, d in self.devices.items() if tid in alive}
        free_gpus = [d for d in self.accelerators if not in_use[d]]
        reserved_gpus = 0
        chosen: list[tuple[QueuedTask, dict[str, str] | None]] = []
        for task in queue:
            if len(chosen) >= idle_workers or free_cores <= 0:
                break
            need = need_of(task)
            option = task.option("rs") or ()
            if R.NODES in option or R.RANKS in option:   # MPI: this node (and its others) to itself
                need = Need(self.cores, need.memory, need.gpus)
            gpus_ok = need.gpus == 0 or (self.shared and need.gpus <= len(self.accelerators)) \
                or need.gpus <= len(free_gpus) - reserved_gpus
            if need.cores <= free_cores and need.memory <= free_memory and gpus_ok:
                env = self._environment(task, need, free_gpus, in_use)
                chosen.append((task, env))
                free_cores -= need.cores
                free_memory -= need.memory
                continue
            # it waits, keeping what it lacks: later tasks use only what is left beside it
            if need.cores > free_cores:
                free_cores -= need.cores
            if need.memory > free_memory:
                free_memory -= need.memory
            if not gpus_ok:
                reserved_gpus += need.gpus
        return chosen

    def _environment(self, task: QueuedTask, need: Need, free_gpus: list[str],
                     in_use: Counter[str]) -> dict[str, str] | None:
        option = task.option("rs") or {}
        if not need.gpus and need.cores == 1 and R.RANKS not in option and R.NODES not in option:
            return None
        env = {"FEDEXEC_CORES": str(need.cores)}
        if R.RANKS in option or R.NODES in option:
            env.update(mpi_environment(self.launcher, task.option("nl") or [node_name()],
                                       option.get(R.RANKS, option.get(R.NODES, 1))))
        if need.gpus:
            if self.shared:   # the least used ones
                devices = sorted(self.accelerators, key=lambda d: in_use[d])[:need.gpus]
            else:
                devices = free_gpus[:need.gpus]
                del free_gpus[:need.gpus]
            in_use.update(devices)
            self.devices[task.row[0]] = tuple(devices)
            listed = ",".join(devices)
            env.update({name: listed for name in ACCELERATOR_VARIABLES})
            env["FEDEXEC_GPUS"] = listed
        return env


def node_name() -> str:
    """This node's name as the scheduler knows it (Slurm's, in a job)."""
    return os.environ.get("SLURMD_NODENAME") or os.uname().nodename


def mpi_environment(launcher: str, nodes: list[str], ranks: int) -> dict[str, str]:
    """What an MPI task finds in its environment: ``$FEDEXEC_MPI_LAUNCHER``,
    the command prefix that starts ``ranks`` ranks over ``nodes`` with the
    endpoint's launcher (``srun --overlap -N 2 -n 4 --nodelist=a,b``, ``mpiexec -n 4
    -ppn 2 -hosts a,b``, ``mpirun -np 4 --host a:2,b:2``; extra words of the
    configured launcher, e.g. ``srun --mpi=pmi2``, are kept), the node list
    and counts."""
    words = shlex.split(launcher) or ["mpiexec"]
    kind = os.path.basename(words[0])
    count = len(nodes)
    per_node = math.ceil(ranks / count)
    listed = ",".join(nodes)
    if kind.startswith("srun"):
        # --overlap: the pools' own step holds every CPU of the job's nodes
        words += ["--overlap", "-N", str(count), "-n", str(ranks), f"--nodelist={listed}"]
        if ranks == per_node * count:   # (else srun warns about the pools' step's --ntasks-per-node=1)
            words.append(f"--ntasks-per-node={per_node}")
    elif kind.startswith("mpirun"):
        words += ["-np", str(ranks), "--host", ",".join(f"{node}:{per_node}" for node in nodes)]
    else:   # mpiexec (MPICH's hydra, Intel MPI), or a command taking its options
        words += ["-n", str(ranks), "-ppn", str(per_node), "-hosts", listed]
    return {"FEDEXEC_MPI_LAUNCHER": " ".join(shlex.quote(w) for w in words), "FEDEXEC_NODELIST": listed,
            "FEDEXEC_NUM_NODES": str(count), "FEDEXEC_NUM_RANKS": str(ranks),
            "FEDEXEC_RANKS_PER_NODE": str(per_node)}


def has_resources(row: list[Any]) -> bool:
    return len(row) == 7 and "rs" in row[6]
