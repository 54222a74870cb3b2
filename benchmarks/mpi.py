"""Time from submit to all ranks started for a 2-node MPI task (issue 14,
"Measured"), on the project's Slurm fixture with 4 nodes on this machine
(tests/slurm_cluster.py, one slurmd per node) and Debian's MPICH, with the
endpoint's block (one 4-node job, a pool per node) already up.

Side by side, alternating run by run:

* fedexec: ``ex.submit(with_options(MPIFunction(hello), resources={"num_nodes": 2,
  "ranks_per_node": 2}))`` through a relay and the endpoint; time from just
  before submit to the latest rank's ``MPI_Init`` return (each rank prints
  its wall clock), and to the result back at the client;
* srun into the same job: ``srun --jobid=<block> --overlap --mpi=pmi2 -N 2
  -n 4 hello`` run from this process, timed the same way: what launching the
  same program in the same allocation costs without fedexec.

    python benchmarks/mpi.py [--runs 10]

Writes benchmarks/results/mpi-<date>.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    ns = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="fedexec-mpi-bench-"))
    os.environ["FEDEXEC_HOME"] = str(directory / "home")

    from slurm_cluster import SlurmCluster, ensure_installed, ensure_mpich
    from test_mpi import compile_hello, mpi_block, ranks_of
    from fedexec import FederatedExecutor, MPIFunction, with_options

    ensure_installed()
    ensure_mpich()
    hello = compile_hello(directory)
    rows: dict[str, list[float]] = {"fedexec: submit -> all ranks started": [],
                                    "fedexec: submit -> result at the client": [],
                                    "srun into the block's job: start -> all ranks started": [],
                                    "srun into the block's job: start -> srun exits": []}
    with SlurmCluster(nodes=4) as cluster, mpi_block(directory, cluster) as (endpoint, relay, log):
        [job] = cluster.jobs()
        task = with_options(MPIFunction(str(hello)), resources={"num_nodes": 2, "ranks_per_node": 2})
        with FederatedExecutor(endpoint, relay=relay) as ex:
            ex.submit(task).result(timeout=120)   # warm: function registered, workers up
            for _ in range(ns.runs):
                start = time.time()
                result = ex.submit(task).result(timeout=120)
                done = time.time()
                ranks = ranks_of(result.stdout)
                assert len(ranks) == 4 and len({r[2] for r in ranks}) == 2, result
                rows["fedexec: submit -> all ranks started"].append(max(r[3] for r in ranks) - start)
                rows["fedexec: submit -> result at the client"].append(done - start)
                start = time.time()
                out = subprocess.run(["srun", f"--jobid={job}", "--overlap", "--mpi=pmi2", "-N", "2", "-n", "4",
                                      str(hello)], env=cluster.env, capture_output=True, text=True, timeout=120)
                done = time.time()
                ranks = ranks_of(out.stdout)
                assert len(ranks) == 4, out.stderr
                rows["srun into the block's job: start -> all ranks started"].append(max(r[3] for r in ranks) - start)
                rows["srun into the block's job: start -> srun exits"].append(done - start)
    lines = [f"# 2-node MPI task: submit to all ranks started ({datetime.date.today()})", "",
             f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}; Slurm fixture with 4 "
             f"nodes on this one machine (tests/slurm_cluster.py), MPICH (Debian), `srun --mpi=pmi2`; the "
             f"endpoint's block (one 4-node job, one pool per node, 1 worker each) up before the first run; "
             f"a warm-up task first; {ns.runs} runs each, alternating; seconds.", "",
             "| measurement | median | min | max |", "|---|---|---|---|"]
    for name, values in rows.items():
        lines.append(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
    lines += ["", "The machine's 2 cores are shared with other work: medians, read side by side."]
    text = "\n".join(lines) + "\n"
    print(text)
    out_path = HERE / "results" / f"mpi-{datetime.date.today()}.md"
    out_path.write_text(text)
    print(f"saved {out_path}")


if __name__ == "__main__":
    main()
