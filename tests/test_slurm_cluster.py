"""The private Slurm test cluster (tests/slurm_cluster.py) works as a real one:
batch jobs run, squeue/scancel see and cancel them, srun starts one process
per node inside a job, and stopping a cluster leaves no job process behind.

Not tested here, only measured: a job past --time=1 is killed 60-90 s after it
starts (slurmctld checks time limits every 30 s, a fixed period), too slow
for this suite."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from slurm_cluster import SlurmCluster

# The first test to use the session fixture pays for installing Slurm (apt) too.
pytestmark = pytest.mark.timeout(600)


def wait_for(cond, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_running(cluster: SlurmCluster, job_id: str, timeout: float = 30) -> float:
    """Seconds until the job is RUNNING."""
    t0 = time.monotonic()
    wait_for(lambda: cluster.job_state(job_id) == "RUNNING", timeout, f"job {job_id} to run")
    return time.monotonic() - t0


def test_cluster_is_up(slurm_cluster):
    assert slurm_cluster.node_state() == "idle"
    out = subprocess.run(["sinfo", "-h", "-o", "%P %a %D %T"], env=slurm_cluster.env, capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == [f"{slurm_cluster.partition}*", "up", "1", "idle"]
    assert slurm_cluster.jobs() == []
    print(f"\ntimings: {slurm_cluster.timings}")


def test_batch_job_writes_a_file(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    t0 = time.monotonic()
    job = slurm_cluster.submit(f"#!/bin/sh\necho \"hello from $SLURM_JOB_ID on $(hostname)\" > {out}\n")
    slurm_cluster.wait_job_gone(job, timeout=60)
    print(f"\nsbatch to job done: {time.monotonic() - t0:.2f} s")
    assert out.read_text() == f"hello from {job} on {slurm_cluster.hostname}\n"
    info = slurm_cluster.job_info(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0"


def test_squeue_shows_a_running_job_and_scancel_removes_it(slurm_cluster):
    t0 = time.monotonic()
    job = slurm_cluster.submit("#!/bin/sh\nsleep 300\n", "--job-name=sleeper")
    to_running = wait_running(slurm_cluster, job)
    print(f"\nsbatch to RUNNING: {time.monotonic() - t0:.2f} s (polling: {to_running:.2f} s)")
    assert job in slurm_cluster.jobs()
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], env=slurm_cluster.env, capture_output=True,
                         text=True, check=True).stdout
    assert f"{job} sleeper RUNNING" in out
    t1 = time.monotonic()
    subprocess.run(["scancel", job], env=slurm_cluster.env, check=True)
    slurm_cluster.wait_job_gone(job, timeout=30)
    print(f"scancel to gone from squeue: {time.monotonic() - t1:.2f} s")
    assert slurm_cluster.job_state(job) == "CANCELLED"
    slurm_cluster.wait_idle(timeout=30)


def test_srun_starts_one_process_per_node_inside_a_batch_job(slurm_cluster, tmp_path):
    out = tmp_path / "srun.out"
    code = ("import os, socket; print(os.environ['SLURM_PROCID'], os.environ['SLURM_NNODES'], "
            "os.environ['SLURM_JOB_ID'], socket.gethostname())")
    script = (
        "#!/bin/sh\n"
        "#SBATCH --nodes=1\n"
        f"srun --ntasks-per-node=1 {sys.executable} -c \"{code}\"\n"
    )
    job = slurm_cluster.submit(script, f"--output={out}")
    slurm_cluster.wait_job_gone(job, timeout=60)
    assert slurm_cluster.job_info(job)["ExitCode"] == "0:0", out.read_text()
    assert out.read_text().split() == ["0", "1", job, slurm_cluster.hostname]


def test_a_second_cluster_runs_beside_and_leaves_no_process_after_stop(slurm_cluster, tmp_path):
    pidfile = tmp_path / "pid"
    other = SlurmCluster()
    with other:
        assert other.conf != slurm_cluster.conf
        # a job that leaves a background child behind, and never ends by itself
        job = other.submit(f"#!/bin/sh\nsleep 500 &\necho $! > {pidfile}\nsleep 500\n")
        wait_running(other, job)
        pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "the job's pid"))
        assert psutil.pid_exists(pid)
        assert other.jobs() == [job] and slurm_cluster.jobs() == []  # the clusters do not see each other
        daemons = [p.pid for p in (other._slurmctld, other._slurmd, other._munged) if p is not None]
    assert other.dir is None
    for p in [pid, *daemons]:
        try:
            assert psutil.Process(p).status() == psutil.STATUS_ZOMBIE, f"pid {p} still alive"
        except psutil.NoSuchProcess:
            pass
    # the session's cluster is untouched
    assert slurm_cluster.node_state() == "idle"
    job = slurm_cluster.submit("#!/bin/sh\ntrue\n")
    slurm_cluster.wait_job_gone(job, timeout=60)
    assert slurm_cluster.job_state(job) == "COMPLETED"
