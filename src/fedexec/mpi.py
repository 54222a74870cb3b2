"""MPI tasks: :class:`MPIFunction`, a shell command started by the endpoint's
MPI launcher on the nodes the task was given.

``ex.submit(with_options(MPIFunction("./simulate {input}"),
resources={"num_nodes": 2, "ranks_per_node": 4}), input="run.cfg")`` runs
``$FEDEXEC_MPI_LAUNCHER ./simulate run.cfg``: the endpoint gives the task 2
nodes of one block to itself (``endpoint/placement.py``) and the pool
running it sets ``FEDEXEC_MPI_LAUNCHER`` to the launcher command for them
(``srun -N 2 -n 8 --nodelist=...``, ``mpiexec -n 8 -ppn 4 -hosts ...`` or
``mpirun -np 8 --host ...``, from the endpoint's ``mpi_launcher``), beside
``FEDEXEC_NODELIST``, ``FEDEXEC_NUM_NODES``, ``FEDEXEC_NUM_RANKS`` and
``FEDEXEC_RANKS_PER_NODE``. A Python function asking for nodes or ranks
finds the same variables and can start its MPI program itself
(``subprocess.run(f"$FEDEXEC_MPI_LAUNCHER ./a.out", shell=True)``), as with
Parsl's ``$PARSL_MPI_PREFIX``.

An MPIFunction needs resources that name nodes or ranks (``nodes``,
``num_nodes``, ``ranks_per_node``, ``num_ranks``): ``submit`` refuses it
otherwise, before anything is sent.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from . import resources as R
from .config import ConfigError
from .shell import ShellFunction, ShellResult

LAUNCHER_ENV = "FEDEXEC_MPI_LAUNCHER"


class MPIFunction(ShellFunction):
    """A :class:`~fedexec.ShellFunction` whose command runs under the
    endpoint's MPI launcher on the nodes and ranks its resources ask for."""

    def command(self, kwargs: dict[str, Any]) -> str:
        return f"${LAUNCHER_ENV} {super().command(kwargs)}"

    def __call__(self, *args: Any, **kwargs: Any) -> ShellResult:
        if not os.environ.get(LAUNCHER_ENV):   # (an endpoint that does not place MPI tasks)
            raise RuntimeError(f"{self!r} ran without ${LAUNCHER_ENV}: the endpoint did not give it nodes and "
                               "ranks (submit it with resources such as {'num_nodes': 2, 'ranks_per_node': 4})")
        return super().__call__(*args, **kwargs)


def check_resources(fn: Any, option: Mapping[str, int] | None) -> None:
    """ValueError unless an MPIFunction's call asks for nodes or ranks
    (``option``: the ``rs`` option it will carry)."""
    if isinstance(fn, MPIFunction) and not (option and (R.NODES in option or R.RANKS in option)):
        raise ConfigError(f"{fn!r} needs resources that say how many nodes or ranks it runs on, e.g. "
                         "with_options(fn, resources={'num_nodes': 2, 'ranks_per_node': 4}) or the executor's "
                         "resource_specification")
