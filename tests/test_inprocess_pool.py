"""The embedded default's pool runs on a thread of its endpoint agent
(endpoint/inprocess.py): no pool process, no ipc hop to one, and the
guarantees a pool process gave still hold."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from fedexec import FederatedExecutor, ShellFunction
from fedexec.errors import WorkerLost

DEADLINE = 60


def parent_and_environment() -> tuple[int, list[str]]:
    """Run in a worker: its parent's pid and the names in its environment."""
    return os.getppid(), sorted(os.environ)


def die_hard() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_then(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


def endpoint_process(ex: FederatedExecutor) -> psutil.Process:
    (colocated,) = ex._dispatcher.services.processes   # the relay and the endpoint are one process
    return psutil.Process(colocated.pid)


def cmdlines(procs: list[psutil.Process]) -> list[str]:
    lines = []
    for proc in procs:
        try:
            lines.append(" ".join(proc.cmdline()))
        except psutil.Error:
            pass
    return lines


@pytest.mark.timeout(90)
def test_the_embedded_pool_is_a_thread_of_its_endpoint_and_keeps_its_secret_from_workers():
    with FederatedExecutor(max_workers=2) as ex:
        endpoint = endpoint_process(ex)
        parent, names = ex.submit(parent_and_environment).result(DEADLINE)
        # the workers are the endpoint's own children: there is no pool process between them
        assert parent == endpoint.pid
        below = endpoint.children(recursive=True)
        assert not [line for line in cmdlines(below) if "fedexec.pool" in line], cmdlines(below)
        assert any("fedexec.worker" in line for line in cmdlines(below)), cmdlines(below)
        # the pool secret never was in any environment a task can read
        assert "FEDEXEC_POOL_SECRET" not in names
        # tasks, a shell task and a map all go through it
        assert list(ex.map(abs, range(-300, 0))) == list(range(300, 0, -1))
        assert ex.submit(ShellFunction("echo {word}"), word="hop").result(DEADLINE).stdout.strip() == "hop"


@pytest.mark.timeout(120)
def test_a_worker_killed_under_the_in_process_pool_is_replaced_and_loses_nothing_else():
    with FederatedExecutor(max_workers=2) as ex:
        before = {p.pid for p in endpoint_process(ex).children()}
        futures = [ex.submit(sleep_then, 0.01, i) for i in range(200)]
        killer = ex.submit(die_hard)
        futures += [ex.submit(sleep_then, 0.01, i) for i in range(200, 400)]
        with pytest.raises(WorkerLost):
            killer.result(DEADLINE)
        assert [f.result(DEADLINE) for f in futures] == list(range(400))
        # a fresh worker took the dead one's place, under the same endpoint process
        parent, _names = ex.submit(parent_and_environment).result(DEADLINE)
        assert parent == endpoint_process(ex).pid
        assert {p.pid for p in endpoint_process(ex).children()} - before


@pytest.mark.timeout(90)
def test_cancel_stays_truthful_with_the_in_process_pool():
    """One worker: a long task runs, the queued ones behind it can be
    cancelled; every True means the call never ran."""
    with FederatedExecutor(max_workers=1) as ex:
        running = ex.submit(sleep_then, 1.0, -1)
        queued = [ex.submit(sleep_then, 0, i) for i in range(20)]
        deadline = time.monotonic() + DEADLINE
        while not running.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert running.running()
        cancelled = [f.cancel() for f in queued]
        assert running.result(DEADLINE) == -1
        for fut, said in zip(queued, cancelled):
            if said:
                assert fut.cancelled()
            else:
                assert fut.result(DEADLINE) in range(20)
        assert any(cancelled)


@pytest.mark.timeout(90)
def test_the_endpoint_killed_takes_its_in_process_pool_and_workers_with_it():
    ex = FederatedExecutor(max_workers=2)
    try:
        assert ex.submit(abs, -1).result(DEADLINE) == 1
        endpoint = endpoint_process(ex)
        workers = [p for p in endpoint.children(recursive=True)]
        assert len(workers) >= 2
        endpoint.send_signal(signal.SIGKILL)
        _gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"workers outlived their endpoint: {cmdlines(alive)}"
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


# -- an endpoint run from the CLI with [provider] in_process = true ----------------------
def endpoint_pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getppid()   # the worker's parent: the endpoint itself, its pool being a thread


@pytest.mark.timeout(150)
def test_cli_endpoint_pools_in_process_scale_as_threads_and_a_killed_endpoint_loses_no_task(tmp_path):
    import contextlib
    import subprocess
    import sys

    from test_faults import lookup_endpoint, running_relay, stop_process, tail
    from test_providers import configured_endpoint, status_of, wait_for

    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(running_relay(tmp_path))
        config, proc, log = stack.enter_context(configured_endpoint(
            tmp_path, relay, max_workers=1, type="local", in_process=True, init_blocks=0, min_blocks=0,
            max_blocks=2, max_idletime=2.0))
        with FederatedExecutor(config.endpoint_id, relay=relay) as ex:
            futures = [ex.submit(endpoint_pid_after, 0.4) for _ in range(10)]
            peak = 0
            while not all(f.done() for f in futures):
                peak = max(peak, len(status_of("ep")["pools"]))
                time.sleep(0.1)
            assert {f.result() for f in futures} == {proc.pid}, tail(log)
            # its pool socket listens on no ipc or TCP address: only this process can reach it
            assert status_of("ep")["pool_address"].startswith("inproc://"), status_of("ep")
            assert peak == 2, f"10 tasks of 0.4 s on 1-worker blocks reached {peak} pool(s), not 2:\n{tail(log)}"
            below = psutil.Process(proc.pid).children(recursive=True)
            assert not [line for line in cmdlines(below) if "fedexec.pool" in line], cmdlines(below)
            # idle for max_idletime: both blocks (threads) are let go, and their workers end
            wait_for(lambda: status_of("ep")["blocks"] == [] and not status_of("ep")["pools"], 20,
                     "the idle in-process blocks were not let go", log)
            wait_for(lambda: not [line for line in cmdlines(psutil.Process(proc.pid).children(recursive=True))
                                  if "fedexec.worker" in line], 15, "the idle blocks' workers did not end", log)

            # kill -9 the endpoint (pool threads and all) under running tasks: a new
            # endpoint process with the same config runs every one of them
            futures = [ex.submit(endpoint_pid_after, 0.5) for _ in range(6)]
            wait_for(lambda: any(f.running() for f in futures), 30, "no task started", log)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            with open(tmp_path / "endpoint-again.log", "wb") as out:
                again = subprocess.Popen([sys.executable, "-m", "fedexec.endpoint", "--name", "ep"],
                                         env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)}, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
            try:
                lookup_endpoint(relay, config.endpoint_id, again, tmp_path / "endpoint-again.log")
                pids = [f.result(DEADLINE) for f in futures]
                assert set(pids) <= {proc.pid, again.pid} and again.pid in pids, pids
            finally:
                stop_process(again)


def test_in_process_pools_are_refused_where_a_pool_needs_its_own_process():
    from fedexec.config import ConfigError, ProviderConfig

    assert ProviderConfig.from_dict({"in_process": True}).in_process is True
    for settings in ({"type": "slurm"}, {"worker_init": "module load python"}, {"python": "/opt/py/bin/python"},
                     {"address": "10.0.0.1"}):
        with pytest.raises(ConfigError, match="in_process"):
            ProviderConfig.from_dict({"in_process": True, **settings})
    with pytest.raises(ConfigError, match="in_process must be true or false"):
        ProviderConfig.from_dict({"in_process": "yes"})


def test_endpoint_configure_sets_pools_in_process_and_refuses_it_for_slurm(tmp_path):
    import subprocess
    import sys

    from fedexec.config import EndpointConfig

    def configure(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fedexec.cli", "endpoint", "configure", "ep", *args],
                              capture_output=True, text=True, timeout=60)

    done = configure("--relay", "tcp://127.0.0.1:5999")   # unset: in-process, the local provider's default
    assert done.returncode == 0, done.stderr
    provider = EndpointConfig.load("ep").provider
    assert provider.in_process is None and provider.pools_in_process is True
    done = configure("--no-pools-in-process")
    assert done.returncode == 0, done.stderr
    assert EndpointConfig.load("ep").provider.in_process is False
    assert "in_process = false" in EndpointConfig.load("ep").path.read_text()
    assert EndpointConfig.load("ep").provider.pools_in_process is False
    done = configure("--pools-in-process")
    assert done.returncode == 0, done.stderr
    assert EndpointConfig.load("ep").provider.in_process is True
    switched = configure("--provider", "slurm")   # another provider: its defaults, so in_process is off again
    provider = EndpointConfig.load("ep").provider
    assert switched.returncode == 0 and provider.in_process is None and not provider.pools_in_process, \
        switched.stderr
    refused = configure("--pools-in-process")
    assert refused.returncode != 0 and "in_process" in refused.stderr, refused.stderr
    assert EndpointConfig.load("ep").provider.type == "slurm"


def test_an_unset_in_process_means_in_process_only_where_allowed():
    """The local provider runs its pools in the endpoint's process unless
    told ``in_process = false``; a provider whose pools need a process of
    their own keeps it without being told."""
    from fedexec.config import ProviderConfig

    assert ProviderConfig.from_dict({}).in_process is None
    assert ProviderConfig.from_dict({}).pools_in_process is True
    assert ProviderConfig.from_dict({"in_process": False}).pools_in_process is False
    for settings in ({"type": "slurm"}, {"type": "manual"}, {"worker_init": "module load python"},
                     {"python": "/opt/py/bin/python"}, {"address": "10.0.0.1"}):
        provider = ProviderConfig.from_dict(settings)
        assert provider.in_process is None and provider.pools_in_process is False, settings
        assert "in_process" not in provider.to_toml(), provider.to_toml()
    assert "in_process = false" in ProviderConfig.from_dict({"in_process": False}).to_toml()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("in_process", [None, False], ids=["default", "in_process-false"])
def test_a_cli_endpoint_runs_its_pool_in_its_own_process_unless_told_not_to(tmp_path, in_process):
    """A configured local endpoint with nothing said runs its pool inside
    its own process (its workers are its children, no ``fedexec.pool``
    process); ``in_process = false`` keeps a pool process between them."""
    import contextlib

    from test_faults import running_relay, tail
    from test_providers import configured_endpoint

    settings = {} if in_process is None else {"in_process": in_process}
    with contextlib.ExitStack() as stack:
        relay = stack.enter_context(running_relay(tmp_path))
        config, proc, log = stack.enter_context(configured_endpoint(tmp_path, relay, max_workers=1, **settings))
        with FederatedExecutor(config.endpoint_id, relay=relay) as ex:
            parent = ex.submit(endpoint_pid_after, 0).result(DEADLINE)
        pools = [p.pid for p in psutil.Process(proc.pid).children() if "fedexec.pool" in " ".join(p.cmdline())]
        if in_process is None:
            assert parent == proc.pid and not pools, (parent, pools, tail(log))
        else:
            assert pools == [parent] and parent != proc.pid, (parent, pools, tail(log))
