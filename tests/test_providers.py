"""Providers and elastic scaling, end to end: endpoints whose pools are local
processes, Slurm batch jobs on a real single-node cluster on loopback
(``slurm_cluster.py``), or Parsl providers; blocks that scale out with the
load and in when idle; pools that drain before their job's walltime, and
jobs that end under running tasks, losing none."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import zmq

from fedexec import FederatedExecutor
from fedexec import protocol as P
from fedexec.config import ConfigError, EndpointConfig, ProviderConfig, endpoint_dir
from test_faults import free_port, lookup_endpoint, running_relay, stop_process, tail

DEADLINE = 90
HERE = Path(__file__).parent


def pool_pid_after(seconds):
    time.sleep(seconds)
    return os.getppid()   # the worker's parent: its pool


def slurm_job_after(seconds):
    time.sleep(seconds)
    return os.environ.get("SLURM_JOB_ID")


@contextlib.contextmanager
def configured_endpoint(tmp_path: Path, relay: str, env: dict[str, str] | None = None, *, name: str = "ep",
                        max_workers: int = 1, endpoint_id: str | None = None, **provider):
    """An endpoint configured in this test's fedexec home and run as
    ``python -m fedexec.endpoint --name``, connected to ``relay`` (as
    ``endpoint_id``, if given: the same endpoint started again)."""
    config = EndpointConfig(name=name, relay=relay, max_workers=max_workers, heartbeat_period=0.5,
                            provider=ProviderConfig.from_dict(provider),
                            **({"endpoint_id": endpoint_id} if endpoint_id else {}))
    config.save()
    log = tmp_path / f"endpoint-{name}.log"
    env = {**os.environ, "PYTHONPATH": str(HERE), **(env or {})}
    if "FEDEXEC_HOME" in os.environ:   # (the home it was configured in: not one an older env captured)
        env["FEDEXEC_HOME"] = os.environ["FEDEXEC_HOME"]
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedexec.endpoint", "--name", name], env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        lookup_endpoint(relay, config.endpoint_id, proc, log)
        yield config, proc, log
    finally:
        stop_process(proc)


@contextlib.contextmanager
def executor_for(config: EndpointConfig, relay: str):
    """A FederatedExecutor for the test's endpoint that, when the test
    fails, does not wait at its exit for tasks that will not finish:
    ``shutdown(wait=True)`` waits for them as long as the relay answers, so
    a test whose task never ran (a block that never came) hung there until
    its pytest timeout, hiding the real failure."""
    ex = FederatedExecutor(config.endpoint_id, relay=relay)
    try:
        yield ex
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


def result_within(future, timeout: float, what: str, log: Path, cluster=None):
    """``future.result(timeout)``, or a failure saying what was waited for:
    the endpoint's blocks and pools as it shows them, the scheduler's jobs,
    and the end of the endpoint's log."""
    try:
        return future.result(timeout)
    except TimeoutError:
        jobs = cluster.jobs() if cluster is not None else "-"
        pytest.fail(f"{what}: no result within {timeout} s; endpoint status {status_of('ep')}; "
                    f"scheduler jobs {jobs}:\n{tail(log)}")


def status_of(name: str) -> dict:
    """The endpoint's own view (status.json, rewritten each second)."""
    try:
        return json.loads((endpoint_dir(name) / "status.json").read_text())
    except (OSError, ValueError):
        return {"blocks": [], "pools": [], "workers": 0}


def wait_for(condition, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"{what} within {timeout} s" + (f":\n{tail(log)}" if log else ""))


# -- local provider: scaling ---------------------------------------------------------
@pytest.mark.timeout(120)
def test_local_blocks_scale_out_on_a_load_step_and_in_when_idle(tmp_path):
    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(running_relay(tmp_path))
        config, proc, log = stack.enter_context(configured_endpoint(
            tmp_path, relay, type="local", in_process=False, init_blocks=0, min_blocks=0, max_blocks=3,
            max_idletime=2.0))   # (pool processes: each block's pool has a pid of its own)
        assert status_of("ep")["blocks"] == []           # nothing asked for yet: no pools
        with executor_for(config, relay) as ex:
            peak, shown = 0, ""
            futures = [ex.submit(pool_pid_after, 0.4) for _ in range(24)]
            while not all(f.done() for f in futures):
                peak = max(peak, len(status_of("ep")["pools"]))
                if peak == 3 and not shown:   # what a person sees meanwhile
                    shown = subprocess.run([sys.executable, "-m", "fedexec.cli", "endpoint", "status", "ep"],
                                           capture_output=True, text=True, timeout=30).stdout
                time.sleep(0.1)
            pools = {f.result() for f in futures}
            assert len(pools) == 3, f"24 tasks of 0.4 s ran on {len(pools)} pool(s), not 3 blocks:\n{tail(log)}"
            assert "blocks:    3" in shown and "workers:   3" in shown and "pools:     3" in shown, shown
            # idle for max_idletime: every block is let go, its pool processes end
            wait_for(lambda: status_of("ep")["blocks"] == [] and not status_of("ep")["pools"], 20,
                     "the idle blocks were not let go", log)
            assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                           for pid in pools)
            # and the next load step starts from zero again
            assert ex.submit(pool_pid_after, 0).result(DEADLINE) not in pools
    assert "letting it go" in log.read_text()


@pytest.mark.timeout(120)
def test_a_local_pool_killed_under_its_tasks_loses_none(tmp_path):
    """SIGKILL a pool (as a node failure would): its endpoint sees it gone,
    its block ended, and runs what it held in a new block."""
    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(running_relay(tmp_path))
        config, proc, log = stack.enter_context(configured_endpoint(
            tmp_path, relay, max_workers=2, type="local", in_process=False, init_blocks=1, min_blocks=1,
            max_blocks=1))   # (a pool process, to be killed alone)
        with executor_for(config, relay) as ex:
            futures = [ex.submit(pool_pid_after, 0.5) for _ in range(8)]
            wait_for(lambda: any(f.running() for f in futures), 30, "no task started", log)
            [pool] = [p for p in psutil.Process(proc.pid).children() if "fedexec.pool" in p.cmdline()]
            pool.send_signal(signal.SIGKILL)
            pids = [f.result(DEADLINE) for f in futures]
        assert pool.pid not in pids or pids.count(pool.pid) < len(pids)
        assert len(set(pids) - {pool.pid}) == 1, pids    # the rest ran on the one new pool
    assert "ended with its job" in log.read_text() or "sent nothing" in log.read_text()


# -- Slurm -----------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_slurm_provider_runs_tasks_in_a_job_and_scales_in_to_none(tmp_path, slurm_cluster):
    cluster = slurm_cluster
    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(running_relay(tmp_path))
        config, proc, log = stack.enter_context(configured_endpoint(
            tmp_path, relay, cluster.env, max_workers=2, type="slurm", partition=cluster.partition,
            init_blocks=0, min_blocks=0, max_blocks=1, max_idletime=3.0, address="127.0.0.1",
            walltime="00:10:00"))
        assert cluster.jobs() == []
        with executor_for(config, relay) as ex:
            futures = [ex.submit(slurm_job_after, 1.0) for _ in range(4)]
            seen = wait_for(cluster.jobs, 60, "no block appeared in squeue", log)
            jobs = {f.result(DEADLINE) for f in futures}
            assert jobs == set(seen) and len(jobs) == 1, (jobs, seen)   # inside the Slurm job squeue showed
            status = status_of("ep")
            assert [b["job"] for b in status["blocks"]] == seen and status["workers"] == 2, status
        # idle: the block is let go and its job leaves squeue; none is left
        wait_for(lambda: cluster.jobs() == [], 60, "the idle block stayed in squeue", log)
        wait_for(lambda: status_of("ep")["blocks"] == [], 10, "the endpoint still lists a block", log)
    assert cluster.jobs() == []


@pytest.mark.timeout(300)
def test_slurm_walltime_drain_loses_no_task(tmp_path, slurm_cluster):
    """A one-minute job whose pool drains 45 s before the end: it takes no
    task after 15 s, gives back what no worker started, finishes what its
    workers hold and exits; a second block, started as the first began to
    drain, runs the rest. None lost, none failed."""
    cluster = slurm_cluster
    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(running_relay(tmp_path))
        config, proc, log = stack.enter_context(configured_endpoint(
            tmp_path, relay, cluster.env, max_workers=2, type="slurm", partition=cluster.partition,
            init_blocks=1, min_blocks=0, max_blocks=1, max_idletime=2.0, address="127.0.0.1",
            walltime="00:01:00", drain=45.0))
        with executor_for(config, relay) as ex:
            futures = [ex.submit(slurm_job_after, 1.0) for _ in range(40)]
            jobs = [f.result(150) for f in futures]
        assert all(jobs), jobs
        assert len(set(jobs)) >= 2, f"all ran in job {set(jobs)}: the first block did not drain:\n{tail(log)}"
        first = jobs[0]
        assert jobs.count(first) < len(jobs)
        text = log.read_text()
        assert "draining" in text, tail(log)
        wait_for(lambda: cluster.jobs() == [], 90, "blocks stayed in squeue", log)


@pytest.mark.timeout(300)
def test_a_slurm_job_cancelled_under_a_running_task_loses_it_not(tmp_path, slurm_cluster):
    """The scheduler ends a block's job while a task runs in it (scancel, as
    a preemption or a walltime kill would): the pool gives the task back as
    it stops; it runs again in a new block."""
    cluster = slurm_cluster
    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(running_relay(tmp_path))
        config, proc, log = stack.enter_context(configured_endpoint(
            tmp_path, relay, cluster.env, max_workers=1, type="slurm", partition=cluster.partition,
            init_blocks=1, min_blocks=1, max_blocks=1, address="127.0.0.1"))
        with executor_for(config, relay) as ex:
            future = ex.submit(slurm_job_after, 4.0)
            wait_for(future.running, 60, "the task did not start", log)
            [first] = cluster.jobs()
            subprocess.run(["scancel", first], env=cluster.env, check=True, timeout=30)
            job = future.result(DEADLINE)
        assert job is not None and job != first, (job, first)
    wait_for(lambda: cluster.jobs() == [], 60, "blocks stayed in squeue")


# -- Parsl ------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_parsl_local_provider(tmp_path):
    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(running_relay(tmp_path))
        config, proc, log = stack.enter_context(configured_endpoint(
            tmp_path, relay, max_workers=2, type="parsl", parsl_class="parsl.providers.LocalProvider",
            init_blocks=1, min_blocks=0, max_blocks=1, max_idletime=2.0))
        with executor_for(config, relay) as ex:
            assert ex.submit(pow, 2, 10).result(DEADLINE) == 1024
            assert sorted(ex.map(abs, range(-20, 0))) == list(range(1, 21))
        wait_for(lambda: status_of("ep")["blocks"] == [], 30, "the Parsl block was not let go", log)


@pytest.mark.timeout(300)
def test_parsl_slurm_provider(tmp_path, slurm_cluster):
    cluster = slurm_cluster
    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(running_relay(tmp_path))
        config, proc, log = stack.enter_context(configured_endpoint(
            tmp_path, relay, cluster.env, max_workers=1, type="parsl", parsl_class="parsl.providers.SlurmProvider",
            parsl_options={"partition": cluster.partition, "exclusive": False}, walltime="00:10:00",
            init_blocks=0, min_blocks=0, max_blocks=1, max_idletime=2.0, address="127.0.0.1"))
        with executor_for(config, relay) as ex:
            future = ex.submit(slurm_job_after, 0.5)
            seen = wait_for(cluster.jobs, 60, "no Parsl block appeared in squeue", log)
            assert result_within(future, DEADLINE, "the task in the Parsl block", log, cluster) in seen
        wait_for(lambda: cluster.jobs() == [], 60, "the Parsl block stayed in squeue", log)


# -- pools started by hand, and who may be one ---------------------------------------------
@pytest.mark.timeout(120)
def test_manual_pools_connect_with_the_secret_and_others_are_refused(tmp_path):
    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(running_relay(tmp_path))
        config, proc, log = stack.enter_context(configured_endpoint(
            tmp_path, relay, type="manual", address="127.0.0.1", min_blocks=0, init_blocks=0))
        pools = json.loads((endpoint_dir("ep") / "pools.json").read_text())
        assert oct((endpoint_dir("ep") / "pools.json").stat().st_mode & 0o777) == "0o600"
        ctx = zmq.Context()
        # without the endpoint's key: no handshake, no answer at all
        plain = ctx.socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(pools["address"])
        plain.send_multipart(P.encode(P.HELLO, {"role": "pool", "secret": pools["secret"], "workers": 1000}))
        assert not plain.poll(3000)
        # with the key (it is public) but not the secret: refused
        stranger = ctx.socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        public, secret_key = zmq.curve_keypair()
        stranger.curve_serverkey, stranger.curve_publickey, stranger.curve_secretkey = \
            pools["key"].encode(), public, secret_key
        stranger.connect(pools["address"])
        stranger.send_multipart(P.encode(P.HELLO, {"role": "pool", "secret": "guess", "workers": 1000}))
        assert stranger.poll(10_000)
        assert P.decode(stranger.recv_multipart()).type == P.ERROR
        plain.close()
        stranger.close()
        ctx.term()
        missing_key = subprocess.run([sys.executable, "-m", "fedexec.pool", "--address", pools["address"]],
                                     capture_output=True, text=True, timeout=60)
        assert missing_key.returncode != 0 and "needs --endpoint-key" in missing_key.stderr
        pool = subprocess.Popen([sys.executable, "-m", "fedexec.pool", "--address", pools["address"],
                                 f"--endpoint-key={pools['key']}", "--workers", "2"],
                                env={**os.environ, "FEDEXEC_POOL_SECRET": pools["secret"], "PYTHONPATH": str(HERE)},
                                stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(stop_process, pool)
        with executor_for(config, relay) as ex:
            assert ex.submit(pool_pid_after, 0).result(DEADLINE) == pool.pid
            wait_for(lambda: status_of("ep")["workers"] == 2, 5, "the status does not show the pool's workers")
        assert "wrong or missing pool secret" in log.read_text()


# -- bad configuration -----------------------------------------------------------------------
@pytest.mark.parametrize("provider, message", [
    ({"type": "pbs"}, "type must be one of local, slurm, parsl, manual"),
    ({"type": "slurm", "min_blocks": 3, "max_blocks": 2}, "min_blocks <= max_blocks"),
    ({"type": "slurm", "walltime": "ten minutes"}, "is not a time limit"),
    ({"type": "slurm", "walltime": "00:01:00", "drain": 60}, "drain (60 s) must be shorter than the walltime"),
    ({"type": "parsl"}, "needs parsl_class"),
    ({"type": "slurm", "max_blocks": "2"}, "max_blocks must be a whole number"),
    ({"type": "slurm", "partiton": "debug"}, "unknown setting(s) partiton"),
    ({"type": "local", "nodes_per_block": 2}, "nodes_per_block must be 1 for the local provider"),
])
def test_bad_provider_settings_are_named(provider, message):
    with pytest.raises(ConfigError, match=None) as info:
        ProviderConfig.from_dict(provider)
    assert message in str(info.value)


def test_a_parsl_class_that_does_not_exist_fails_the_endpoint_start(tmp_path):
    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(running_relay(tmp_path))
        config = EndpointConfig(name="bad", relay=relay, provider=ProviderConfig.from_dict(
            {"type": "parsl", "parsl_class": "parsl.providers.NoSuchProvider"}))
        config.save()
        done = subprocess.run([sys.executable, "-m", "fedexec.endpoint", "--name", "bad"], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode != 0
        assert "cannot load 'parsl.providers.NoSuchProvider'" in done.stderr, done.stderr


def test_configure_writes_a_slurm_provider_that_loads_back():
    done = subprocess.run([sys.executable, "-m", "fedexec.cli", "endpoint", "configure", "hpc", "--provider", "slurm",
                           "--partition", "debug", "--account", "proj1", "--walltime", "01:00:00",
                           "--max-blocks", "4", "--nodes-per-block", "2", "--worker-init", "module load python"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    provider = EndpointConfig.load("hpc").provider
    assert (provider.type, provider.partition, provider.account, provider.walltime, provider.max_blocks,
            provider.nodes_per_block, provider.worker_init, provider.min_blocks) == \
        ("slurm", "debug", "proj1", "01:00:00", 4, 2, "module load python", 0)
    done = subprocess.run([sys.executable, "-m", "fedexec.cli", "endpoint", "configure", "hpc", "--min-blocks", "9"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "min_blocks <= max_blocks" in done.stderr
    assert EndpointConfig.load("hpc").provider.min_blocks == 0   # the bad change was not saved


@pytest.mark.timeout(300)
def test_a_slow_scheduler_does_not_stall_the_endpoint(tmp_path, slurm_cluster):
    """sbatch that takes 12 s (a busy slurmctld): the endpoint keeps its
    heartbeats and its status going meanwhile (the relay would otherwise
    drop it after 3 missed beats), shows the block as submitting, and runs
    the task once the job exists."""
    cluster = slurm_cluster
    slow = tmp_path / "slow-bin"
    slow.mkdir()
    real = subprocess.run(["which", "sbatch"], capture_output=True, text=True, env=cluster.env).stdout.strip()
    (slow / "sbatch").write_text(f"#!/bin/sh\nsleep 12\nexec {real} \"$@\"\n")
    (slow / "sbatch").chmod(0o755)
    env = {**cluster.env, "PATH": f"{slow}:{cluster.env['PATH']}"}
    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(running_relay(tmp_path))
        config, proc, log = stack.enter_context(configured_endpoint(
            tmp_path, relay, env, max_workers=1, type="slurm", partition=cluster.partition,
            init_blocks=1, min_blocks=1, max_blocks=1, address="127.0.0.1"))
        with executor_for(config, relay) as ex:
            future = ex.submit(slurm_job_after, 0)
            wait_for(lambda: [b["state"] for b in status_of("ep")["blocks"]] == ["submitting"], 10,
                     "the block was not shown as submitting", log)
            time.sleep(8)   # past the relay's limit for a silent endpoint (3 beats of 0.5 s + 1 s)
            assert status_of("ep")["time"] > time.time() - 3, "the endpoint stopped writing its status"
            assert future.result(DEADLINE) is not None   # it ran inside the Slurm job
        assert "missed its heartbeats" not in (tmp_path / "relay.log").read_text()
    wait_for(lambda: cluster.jobs() == [], 60, "blocks stayed in squeue")


@pytest.mark.timeout(60)
def test_a_pool_command_takes_an_endpoint_key_that_begins_with_a_dash(tmp_path):
    """Z85 keys may begin with "-" (1 in 85): the command a provider runs must
    still hand the key to the pool, not leave argparse to read it as an
    option (a CI run saw every block of the Parsl provider exit that way)."""
    from fedexec.endpoint.providers import pool_command

    key = "-" + "a" * 39
    command = pool_command(sys.executable, f"tcp://127.0.0.1:{free_port()}", key, "b-test", 1, 1.0,
                           parent_pid=os.getpid(), log_level="INFO")
    proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)
    try:
        proc.wait(3)   # a refused command line exits at once; a pool waits for its endpoint
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert "expected one argument" not in err and "--endpoint-key must be" not in err, err


@pytest.mark.timeout(240)
def test_a_failing_submission_stays_in_the_status_until_one_succeeds(tmp_path, slurm_cluster):
    """sbatch refuses every block (no such partition): the endpoint's status
    shows the error at every read, not only for the moment between its
    submission and its next status poll."""
    cluster = slurm_cluster
    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(running_relay(tmp_path))
        config, proc, log = stack.enter_context(configured_endpoint(
            tmp_path, relay, cluster.env, max_workers=1, type="slurm", partition="no-such-partition",
            init_blocks=1, min_blocks=1, max_blocks=1, address="127.0.0.1", walltime="00:05:00"))
        first = wait_for(lambda: status_of("ep").get("provider_error"), 60, "no provider error in the status", log)
        assert "no-such-partition" in first or "partition" in first.lower(), first
        seen = []
        deadline = time.monotonic() + 8   # several status polls (each second) and submission retries
        while time.monotonic() < deadline:
            status = status_of("ep")
            if "provider_error" in status:   # (not a read that failed: status_of's default has no such key)
                seen.append(status["provider_error"])
            time.sleep(0.25)
        assert len(seen) > 10
        assert all(seen), f"the error left the status between submissions: {seen}"
