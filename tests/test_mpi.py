"""MPI tasks on a real multi-node Slurm block (issue 14, item 5): the
project's Slurm fixture with 4 nodes on this machine (``slurm_cluster4``:
one ``slurmd -N nodeK`` each), Debian's MPICH (installed by the fixture),
and a hello-world MPI program compiled here that reports its rank, the
number of ranks and the node (``$SLURMD_NODENAME``) it ran on.

The endpoint's block is one 4-node Slurm job (one pool per node); its
launcher is ``srun --mpi=pmi2`` (MPICH's PMI-2, as NOTES.md found works)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from fedexec import FederatedExecutor, MPIFunction, with_options
from fedexec.config import ProviderConfig

from test_faults import running_relay, tail
from test_resources import configured_endpoint, wait_for_pools

pytestmark = pytest.mark.timeout(600)   # the first test to use the fixture may install Slurm and MPICH

HELLO = r"""
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int main(int argc, char **argv) {
    int rank, size;
    struct timespec now;
    MPI_Init(&argc, &argv);
    clock_gettime(CLOCK_REALTIME, &now);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const char *node = getenv("SLURMD_NODENAME");
    printf("rank %d of %d on %s at %.6f\n", rank, size, node ? node : "?", now.tv_sec + now.tv_nsec / 1e9);
    MPI_Finalize();
    return 0;
}
"""


def compile_hello(directory: Path) -> Path:
    """The hello-world MPI program, built with MPICH's mpicc."""
    source = directory / "hello.c"
    source.write_text(HELLO)
    program = directory / "hello"
    done = subprocess.run(["mpicc.mpich", "-o", str(program), str(source)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"mpicc.mpich failed:\n{done.stderr}"
    return program


def ranks_of(stdout: str) -> list[tuple[int, int, str, float]]:
    """(rank, size, node, start time) of each line the program printed."""
    found = []
    for line in stdout.splitlines():
        words = line.split()
        if len(words) == 8 and words[0] == "rank":
            found.append((int(words[1]), int(words[3]), words[5], float(words[7])))
    return sorted(found)


def python_mpi_task(program: str) -> dict:
    """A Python task asking for nodes and ranks: it starts its MPI program
    itself with the launcher it was given."""
    out = subprocess.run(f"$FEDEXEC_MPI_LAUNCHER {program}", shell=True, capture_output=True, text=True,
                         timeout=120)
    return {"stdout": out.stdout, "stderr": out.stderr, "code": out.returncode,
            **{key: os.environ.get(key) for key in ("FEDEXEC_MPI_LAUNCHER", "FEDEXEC_NODELIST")}}


def node_after(seconds: float) -> tuple[float, float, str | None]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time(), os.environ.get("SLURMD_NODENAME")


@contextlib.contextmanager
def mpi_block(tmp_path: Path, cluster):
    """A relay and an endpoint whose one block is a 4-node Slurm job, with
    its 4 pools connected; yields (endpoint id, relay address, log)."""
    home = tmp_path / "home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDEXEC_HOME", str(home))
        provider = ProviderConfig(type="slurm", partition=cluster.partition, nodes_per_block=4, init_blocks=1,
                                  min_blocks=1, max_blocks=1, address="127.0.0.1", walltime="00:20:00")
        with running_relay(tmp_path, env={**os.environ, "FEDEXEC_HOME": str(home)}) as relay, \
                configured_endpoint(tmp_path, relay, "mpi", cluster.env, max_workers=1, heartbeat_period=0.5,
                                    mpi_launcher="srun --mpi=pmi2", provider=provider) as ep:
            wait_for_pools(home / "endpoints" / "mpi" / "status.json", 4, 120, ep.log)
            yield ep.id, relay, ep.log


def test_a_two_node_mpi_task_runs_on_its_nodes_beside_single_node_tasks(tmp_path, slurm_cluster4):
    cluster = slurm_cluster4
    hello = compile_hello(tmp_path)
    with mpi_block(tmp_path, cluster) as (endpoint, relay, log):
        with FederatedExecutor(endpoint, relay=relay) as ex:
            # each rank sleeps 3 s before it starts the program: the task holds its 2 nodes that long
            mpi = with_options(MPIFunction(f"/bin/sh -c 'sleep 3; exec {hello}'", walltime=120),
                               resources={"num_nodes": 2, "ranks_per_node": 2})
            started = time.time()
            future = ex.submit(mpi)
            time.sleep(1.0)
            singles = [ex.submit(node_after, 1.0) for _ in range(4)]
            result = future.result(timeout=180)
            ended = time.time()
            others = [f.result(timeout=180) for f in singles]
            # a Python function with nodes and ranks starts its MPI program with the launcher it is given
            py = ex.submit(with_options(python_mpi_task, resources={"num_nodes": 2, "num_ranks": 4}),
                           str(hello)).result(timeout=180)
    assert result.returncode == 0, (result, tail(log))
    ranks = ranks_of(result.stdout)
    assert [r[:2] for r in ranks] == [(0, 4), (1, 4), (2, 4), (3, 4)], result.stdout + result.stderr
    nodes = {r[2] for r in ranks}
    assert len(nodes) == 2 and nodes <= {"node1", "node2", "node3", "node4"}, result.stdout
    assert result.cmd.startswith("$FEDEXEC_MPI_LAUNCHER /bin/sh -c"), result.cmd
    beside = [o for o in others if o[0] < ended and o[1] > started + 1.0]
    assert beside, f"no single-node task ran while the MPI task held its nodes: {others}"
    assert all(o[2] not in nodes for o in beside), (others, nodes)
    assert py["code"] == 0, py
    assert py["FEDEXEC_MPI_LAUNCHER"] == (f"srun --mpi=pmi2 --overlap -N 2 -n 4 --nodelist={py['FEDEXEC_NODELIST']} "
                                        "--ntasks-per-node=2")
    py_ranks = ranks_of(py["stdout"])
    assert [r[:2] for r in py_ranks] == [(0, 4), (1, 4), (2, 4), (3, 4)], py
    assert {r[2] for r in py_ranks} == set(py["FEDEXEC_NODELIST"].split(","))


def test_an_mpi_function_without_nodes_or_ranks_is_refused_in_submit(executor):
    with pytest.raises(ValueError, match="needs resources that say how many nodes or ranks"):
        executor.submit(MPIFunction("true"))
    with pytest.raises(ValueError, match="needs resources"):
        executor.submit(with_options(MPIFunction("true"), resources={"cores": 2}))
