"""Pools inside their agent's process have no thread of their own: the
agent's loop polls their sockets and steps them (endpoint/inprocess.py), so
a task crosses no thread wake-up between the agent and its pool.

The agent runs here, on a thread of the test process, beside a real relay
process; its workers are real processes. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import psutil
import pytest

from conftest import workers_of
from fedexec import FederatedExecutor
from fedexec.config import EndpointConfig, ProviderConfig
from fedexec.endpoint.agent import EndpointAgent

from test_faults import running_relay

DEADLINE = 60


def parent_pid() -> int:
    return os.getppid()


def sleep_then(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


def worker_children() -> list[psutil.Process]:
    return workers_of(os.getpid())


@contextlib.contextmanager
def agent_on_a_thread(relay: str, monkeypatch: pytest.MonkeyPatch, **provider):
    """An endpoint agent with in-process pools, run on a thread of this process
    (its workers find this module's functions on their path)."""
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__))
    config = EndpointConfig(name="stepped", relay=relay, max_workers=2, heartbeat_period=0.5,
                            provider=ProviderConfig.from_dict({"in_process": True, **provider}))
    agent = EndpointAgent(config)
    thread = threading.Thread(target=agent.run, name="test-agent", daemon=True)
    thread.start()
    try:
        # welcomed by the relay before the test's executor looks it up (which would find no such endpoint)
        deadline = time.monotonic() + DEADLINE
        while not agent.connected:
            assert thread.is_alive(), "the agent stopped before the relay welcomed it"
            assert time.monotonic() < deadline, f"the relay did not welcome the agent within {DEADLINE} s"
            time.sleep(0.02)
        yield config, agent
    finally:
        agent.stop()
        thread.join(30)
        assert not thread.is_alive(), "the agent did not stop within 30 s"


@pytest.mark.timeout(120)
def test_in_process_pools_run_on_the_agents_own_thread_and_stop_with_it(tmp_path, monkeypatch):
    with running_relay(tmp_path) as relay:
        with agent_on_a_thread(relay, monkeypatch) as (config, agent):
            with FederatedExecutor(config.endpoint_id, relay=relay) as ex:
                # the workers are this process's children: no pool process between them
                assert {f.result(DEADLINE) for f in [ex.submit(parent_pid) for _ in range(20)]} == {os.getpid()}
                assert agent.local_pools is not None and len(agent.local_pools._running) == 1
                # ... and no thread of its own runs the pool: the agent's loop steps it
                pool_threads = [t.name for t in threading.enumerate() if t.name.startswith("fedexec-pool")]
                assert pool_threads == [], pool_threads
                assert list(ex.map(abs, range(-2000, 0))) == list(range(2000, 0, -1))
                # a long task beside quick ones on the other worker: the quick ones are not held behind it
                slow = ex.submit(sleep_then, 2.0, -1)
                started = time.monotonic()
                assert [ex.submit(sleep_then, 0, i).result(DEADLINE) for i in range(50)] == list(range(50))
                assert time.monotonic() - started < 1.5
                assert slow.result(DEADLINE) == -1
                assert len(worker_children()) == 2
        # the agent stopped: its pool was finished on its thread, and the workers are gone
        _gone, alive = psutil.wait_procs(worker_children(), timeout=15)
        assert not alive, "workers outlived their in-process pool"


@pytest.mark.timeout(120)
def test_an_idle_in_process_pool_ends_off_the_agents_loop_and_a_new_one_takes_over(tmp_path, monkeypatch):
    """The idle block's pool is finished on a short thread of its own (its
    workers stopped) while the agent's loop goes on; the next task brings
    a new pool, stepped like the first."""
    with running_relay(tmp_path) as relay:
        idle_blocks_go = {"init_blocks": 1, "min_blocks": 0, "max_blocks": 1, "max_idletime": 1.0}
        with agent_on_a_thread(relay, monkeypatch, **idle_blocks_go) as (config, agent):
            with FederatedExecutor(config.endpoint_id, relay=relay) as ex:
                assert ex.submit(abs, -3).result(DEADLINE) == 3
                first = {p.pid for p in worker_children()}
                assert first
                assert agent.local_pools is not None
                deadline = time.monotonic() + 30
                while (agent.local_pools._running or worker_children()) and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert not agent.local_pools._running, "the idle in-process pool was not let go"
                assert not worker_children(), "the idle pool's workers did not end"
                assert [f.result(DEADLINE) for f in [ex.submit(abs, -i) for i in range(100)]] == list(range(100))
                assert len(agent.local_pools._running) == 1
                assert not first & {p.pid for p in worker_children()}
