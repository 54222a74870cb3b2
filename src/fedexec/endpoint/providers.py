"""Providers: how an endpoint gets blocks of nodes to run its pools on.

A provider starts a *block* (one provisioning request: a local process, a
batch job) given the shell command that starts one pool, reports the state of
the blocks it started, and cancels them. Scheduling stays with the engine
that already does it: the local machine, Slurm, or any Parsl execution
provider (PBS Pro, LSF, Torque, Condor, Kubernetes, clouds).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

from ..config import ConfigError, ProviderConfig

log = logging.getLogger("fedexec.endpoint.provider")

# block states, as every provider reports them
PENDING = "pending"     # asked for, not running yet (queued at the scheduler)
RUNNING = "running"
DONE = "done"           # over: finished, cancelled, failed or gone from the scheduler's view
SCHEDULER_TIMEOUT = 60  # seconds a scheduler command may take


class ProviderError(RuntimeError):
    """A provider could not start, query or cancel a block; says which and why."""


class Provider(Protocol):
    label: str

    def submit(self, block_id: str, command: str, env: dict[str, str]) -> str:
        """Start a block running ``command`` once per node; its job id."""

    def status(self, job_ids: list[str]) -> dict[str, str]:
        """The state (PENDING, RUNNING or DONE) of each job."""

    def cancel(self, job_ids: list[str]) -> None:
        """Stop these jobs (a job already over is no error)."""

    def close(self) -> None:
        """Let go of what the provider holds (not the blocks: the endpoint cancels them first)."""


def make_provider(config: ProviderConfig, script_dir: Path, name: str,
                  workers_per_node: int = 0) -> Provider | None:
    """The provider a config names; None for ``manual`` (pools come by themselves)."""
    if config.type == "local":
        return LocalProvider(config)
    if config.type == "slurm":
        return SlurmProvider(config, script_dir, name, workers_per_node)
    if config.type == "parsl":
        return ParslProvider(config, script_dir, name)
    return None


def block_script(config: ProviderConfig, command: str, env: dict[str, str]) -> str:
    """The shell lines that start one pool: worker_init, the environment, the
    pool command (with its job's end time when there is a walltime)."""
    lines = []
    walltime = config.walltime_seconds()
    if walltime is not None:
        # the job's end, from its start (the scheduler counts from there too),
        # before worker_init, however long that takes
        lines.append(f"FEDEXEC_ENDS_AT=$(( $(date +%s) + {int(walltime)} ))")
        command += " --ends-at $FEDEXEC_ENDS_AT"
    if config.worker_init:
        lines.append(config.worker_init)
    lines.extend(f"export {key}={shlex.quote(value)}" for key, value in env.items())
    lines.append(command)
    return "\n".join(lines) + "\n"


class LocalProvider:
    """Blocks are processes on this machine, one pool each."""

    label = "local"

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.processes: dict[str, subprocess.Popen] = {}

    def submit(self, block_id: str, command: str, env: dict[str, str]) -> str:
        # the environment (the pool secret) goes to the process, not into its
        # command line for every user to see; exec: the pool is our child
        script = block_script(self.config, "exec " + command, {})
        try:
            process = subprocess.Popen(["/bin/sh", "-c", script], stdin=subprocess.DEVNULL,
                                       env={**os.environ, **env})
        except OSError as exc:
            raise ProviderError(f"could not start a local pool: {exc}") from None
        job_id = str(process.pid)
        self.processes[job_id] = process
        return job_id

    def status(self, job_ids: list[str]) -> dict[str, str]:
        states = {}
        for job_id in job_ids:
            process = self.processes.get(job_id)
            if process is not None and process.poll() is None:
                states[job_id] = RUNNING
            else:
                states[job_id] = DONE
                self.processes.pop(job_id, None)   # reaped by poll(): forgotten
        return states

    def cancel(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            process = self.processes.get(job_id)
            if process is not None and process.poll() is None:
                process.terminate()

    def close(self) -> None:
        """Wait for the pools (told to stop already), then make sure."""
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


def _run(command: list[str], what: str, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SCHEDULER_TIMEOUT,
                              stdin=subprocess.DEVNULL, env=env)
    except FileNotFoundError:
        raise ProviderError(f"{what}: {command[0]} is not installed here (is this a Slurm login node?)") from None
    except subprocess.TimeoutExpired:
        raise ProviderError(f"{what}: {command[0]} did not answer within {SCHEDULER_TIMEOUT} s") from None
    if done.returncode != 0:
        raise ProviderError(f"{what}: {' '.join(command)} exited with {done.returncode}: "
                            f"{(done.stderr or done.stdout).strip()}")
    return done.stdout


class SlurmProvider:
    """Blocks are Slurm batch jobs: ``sbatch`` to start, ``squeue`` to watch,
    ``scancel`` to stop. ``srun`` starts one pool per node of the job."""

    label = "slurm"

    def __init__(self, config: ProviderConfig, script_dir: Path, name: str, workers_per_node: int = 0) -> None:
        self.config = config
        self.script_dir = script_dir
        self.name = name
        self.workers_per_node = workers_per_node

    def script(self, block_id: str, command: str, env: dict[str, str]) -> str:
        c = self.config
        header = ["#!/bin/bash", f"#SBATCH --job-name=fedexec-{self.name}-{block_id}",
                  f"#SBATCH --nodes={c.nodes_per_block}", "#SBATCH --ntasks-per-node=1",
                  f"#SBATCH --output={self.script_dir / (block_id + '.out')}"]
        if c.walltime:
            header.append(f"#SBATCH --time={c.walltime}")
        if c.partition:
            header.append(f"#SBATCH --partition={c.partition}")
        if c.account:
            header.append(f"#SBATCH --account={c.account}")
        if c.exclusive:   # whole nodes: a pool's workers are its node's cores
            header.append("#SBATCH --exclusive")
        elif self.workers_per_node:
            header.append(f"#SBATCH --cpus-per-task={self.workers_per_node}")
        header.extend(line.strip() for line in c.scheduler_options.splitlines() if line.strip())
        # one pool per node, with every CPU the job has there (srun does not
        # inherit sbatch's CPUs per task); the step may end with pools drained
        pool = (f"srun --ntasks-per-node=1 --nodes={c.nodes_per_block} --cpus-per-task=$SLURM_CPUS_ON_NODE "
                f"--kill-on-bad-exit=0 {command}")
        return "\n".join(header) + "\n" + block_script(c, pool, env)

    def submit(self, block_id: str, command: str, env: dict[str, str]) -> str:
        path = self.script_dir / f"{block_id}.sbatch"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)  # it holds the pool secret
        with os.fdopen(fd, "w") as f:
            f.write(self.script(block_id, command, env))
        out = _run(["sbatch", "--parsable", str(path)], f"submitting block {block_id}")
        job_id = out.strip().split(";")[0]
        if not job_id.isdigit():
            raise ProviderError(f"sbatch printed {out.strip()!r}, not a job id")
        return job_id

    def status(self, job_ids: list[str]) -> dict[str, str]:
        if not job_ids:
            return {}
        # all of this user's jobs, not --jobs=...: squeue fails outright when
        # one of the ids asked for has been purged already
        out = _run(["squeue", "--noheader", "--states=all", "--format=%i %T", "--me"], "reading block states")
        seen = dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)
        states = {}
        for job_id in job_ids:
            state = seen.get(job_id)
            if state in ("PENDING", "CONFIGURING", "REQUEUED", "RESV_DEL_HOLD", "REQUEUE_HOLD", "REQUEUE_FED"):
                states[job_id] = PENDING
            elif state in ("RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                           "RESIZING"):
                states[job_id] = RUNNING
            else:  # finished, failed, cancelled, timed out, or no longer in squeue
                states[job_id] = DONE
        return states

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            _run(["scancel", *job_ids], "cancelling blocks")

    def close(self) -> None:
        pass


class ParslProvider:
    """Blocks through any Parsl execution provider (``parsl_class``, built
    with ``parsl_options``), Parsl being the engine that talks to the site's
    scheduler or cloud."""

    label = "parsl"

    def __init__(self, config: ProviderConfig, script_dir: Path, name: str) -> None:
        try:
            from parsl.jobs.states import JobState
        except ImportError:
            raise ConfigError("provider type 'parsl' needs Parsl: pip install 'fedexec[parsl]'") from None
        self.JobState = JobState
        self.config = config
        options = dict(config.parsl_options)
        if config.parsl_launcher:
            options["launcher"] = _load_class(config.parsl_launcher)()
        for key, value in (("nodes_per_block", config.nodes_per_block), ("init_blocks", 0),
                           ("min_blocks", 0), ("max_blocks", config.max_blocks)):
            options.setdefault(key, value)   # fedexec does the scaling; Parsl only starts what it is asked
        if config.walltime:
            options.setdefault("walltime", config.walltime)
        if config.worker_init:
            options.setdefault("worker_init", config.worker_init)
        cls = _load_class(config.parsl_class)
        try:
            self.provider = cls(**options)
        except TypeError as exc:
            raise ConfigError(f"[provider] parsl_options do not fit {config.parsl_class}: {exc}") from None
        self.provider.script_dir = str(script_dir)
        self.label = f"parsl:{getattr(self.provider, 'label', cls.__name__)}"
        self.name = name

    def submit(self, block_id: str, command: str, env: dict[str, str]) -> str:
        # worker_init is the Parsl provider's own; the rest goes in the command
        script = block_script(dataclasses.replace(self.config, worker_init=""), command, env)
        try:
            job_id = self.provider.submit(script, 1, job_name=f"fedexec-{self.name}-{block_id}")
        except Exception as exc:
            raise ProviderError(f"{self.label} could not start block {block_id}: {type(exc).__name__}: {exc}") \
                from None
        if job_id is None:
            raise ProviderError(f"{self.label} did not start block {block_id}")
        return str(job_id)

    def status(self, job_ids: list[str]) -> dict[str, str]:
        if not job_ids:
            return {}
        try:
            answers = self.provider.status(job_ids)
        except Exception as exc:
            raise ProviderError(f"{self.label} could not read block states: {type(exc).__name__}: {exc}") from None
        states = {}
        for job_id, status in zip(job_ids, answers):
            if status.terminal:
                states[job_id] = DONE
            elif status.state == self.JobState.RUNNING:
                states[job_id] = RUNNING
            else:
                states[job_id] = PENDING
        return states

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            try:
                self.provider.cancel(job_ids)
            except Exception as exc:
                raise ProviderError(f"{self.label} could not cancel blocks: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        pass


def _load_class(path: str) -> Any:
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"[provider] cannot load {path!r}: {exc}") from None


def pool_command(python: str, address: str, key: str, block_id: str, workers: int, drain: float,
                 parent_pid: int | None = None, log_level: str = "INFO") -> str:
    """The shell command that starts one pool (``key``: the endpoint's CURVE
    public key, for a TCP address; public, so the command line may show it)."""
    args = [python or sys.executable, "-m", "fedexec.pool", "--address", address, "--block-id", block_id,
            "--workers", str(workers), "--drain", f"{drain:g}", "--log-level", log_level]
    if key:   # as one word: a Z85 key may begin with "-", which argparse would take for an option
        args.append(f"--endpoint-key={key}")
    if parent_pid is not None:
        args += ["--parent-pid", str(parent_pid)]
    return " ".join(shlex.quote(a) for a in args)
