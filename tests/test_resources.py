"""Per-task resources and GPUs (issue 14, items 3 and 4), with real processes:
a relay and configured endpoints on loopback, tasks that record when they
ran and what they were given.

There are no GPUs on the machines these tests run on: the GPU path is
exercised through the endpoint's ``available_accelerators`` setting, which
stands for what ``nvidia-smi -L`` would list, and the tasks check the
CUDA_VISIBLE_DEVICES (ROCR_VISIBLE_DEVICES, ZE_AFFINITY_MASK) they see.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedexec import FederatedExecutor, TaskRejected, with_options
from fedexec import protocol as P
from fedexec.config import EndpointConfig, usable_cores
from fedexec.resources import resource_option

from test_faults import lookup_endpoint, running_relay, stop_process, tail

CORES = usable_cores()


def ran(seconds: float) -> tuple[float, float, str, str, str, str, int]:
    """Sleep; when it ran, what accelerators it was given, and its pid."""
    start = time.time()
    time.sleep(seconds)
    env = os.environ
    return (start, time.time(), env.get("CUDA_VISIBLE_DEVICES", "-"), env.get("ROCR_VISIBLE_DEVICES", "-"),
            env.get("ZE_AFFINITY_MASK", "-"), env.get("FEDEXEC_CORES", "-"), os.getpid())


@contextlib.contextmanager
def configured_endpoint(directory: Path, address: str, name: str, base_env: dict[str, str] | None = None,
                        **settings):
    """An endpoint configured in the shared home, run as ``python -m
    fedexec.endpoint --name`` (in ``base_env``, default ours); waits until
    the relay says it is connected."""
    cfg = EndpointConfig(name=name, relay=address, **settings)
    cfg.save()
    log = directory / f"endpoint-{name}.log"
    env = {key: value for key, value in (base_env or os.environ).items()
           if key not in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")}
    env["PYTHONPATH"] = str(Path(__file__).parent)
    env["FEDEXEC_HOME"] = os.environ["FEDEXEC_HOME"]   # where its config was just saved
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedexec.endpoint", "--name", name, "--log-level", "INFO"],
                                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        lookup_endpoint(address, cfg.endpoint_id, proc, log)
        yield SimpleNamespace(id=cfg.endpoint_id, proc=proc, log=log)
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A relay and endpoints sharing one fedexec home: "cpu" (4 workers,
    more than this machine's cores), "gpu" (3 workers, accelerators 0 and 1)
    and "shared" (2 workers, accelerator 7, accelerators_shared = true)."""
    directory = tmp_path_factory.mktemp("resources")
    home = directory / "home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDEXEC_HOME", str(home))
        with running_relay(directory, env={**os.environ, "FEDEXEC_HOME": str(home)}) as address, \
                configured_endpoint(directory, address, "cpu", max_workers=4) as cpu, \
                configured_endpoint(directory, address, "gpu", max_workers=3,
                                    available_accelerators=["0", "1"]) as gpu, \
                configured_endpoint(directory, address, "shared", max_workers=2, available_accelerators=["7"],
                                    accelerators_shared=True) as shared:
            yield SimpleNamespace(address=address, home=home, cpu=cpu, gpu=gpu, shared=shared, dir=directory)


@pytest.fixture
def on(federation, monkeypatch):
    monkeypatch.setenv("FEDEXEC_HOME", str(federation.home))
    return federation


def all_workers_up(ex: FederatedExecutor, count: int, timeout: float = 60) -> None:
    """Wait until ``count`` plain tasks run at once in distinct workers (a
    worker that ran a task given accelerators is replaced by a fresh one, which
    takes a moment to start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [f.result(timeout=timeout) for f in [ex.submit(ran, 0.3) for _ in range(count)]]
        if len({r[6] for r in runs}) == count and most_at_once([(r[0], r[1], 1) for r in runs]) == count:
            return
    pytest.fail(f"{count} workers did not run tasks at once within {timeout} s")


def most_at_once(intervals: list[tuple[float, float, int]]) -> int:
    """The most cores in use at any instant, from (start, end, cores)."""
    events = sorted([(start, cores) for start, _, cores in intervals]
                    + [(end, -cores) for _, end, cores in intervals], key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, change in events:
        now += change
        most = max(most, now)
    return most


# -- refused in submit ----------------------------------------------------------


def wait_for_pools(status: Path, count: int, timeout: float, log: Path) -> None:
    """Wait until the endpoint's status file lists ``count`` pools; fail
    the test, with the endpoint's log, after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if len(json.loads(status.read_text())["pools"]) == count:
                return
        time.sleep(0.2)
    pytest.fail(f"{count} pools did not connect within {timeout:g} s:\n{tail(log)}")


@contextlib.contextmanager
def block_of_pools(directory: Path, home: Path, endpoint: str, log: Path, nodes: int = 4):
    """``nodes`` pools of one block ("block-1") of endpoint ``endpoint``
    (provider manual), started by hand, one worker each, each named as
    Slurm names a node (node1, node2, ...); waits until all are connected,
    and stops them after."""
    info = json.loads((home / "endpoints" / endpoint / "pools.json").read_text())
    pools = []
    try:
        for k in range(1, nodes + 1):
            with open(directory / f"pool-{endpoint}-node{k}.log", "wb") as out:
                pools.append(subprocess.Popen(
                    [sys.executable, "-m", "fedexec.pool", "--address", info["address"], "--block-id", "block-1",
                     "--workers", "1", f"--endpoint-key={info['key']}"], stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, env={**os.environ, "FEDEXEC_POOL_SECRET": info["secret"],
                                                   "SLURMD_NODENAME": f"node{k}",
                                                   "PYTHONPATH": str(Path(__file__).parent)}))
        wait_for_pools(home / "endpoints" / endpoint / "status.json", nodes, 60, log)
        yield
    finally:
        for proc in pools:
            stop_process(proc)

def test_unknown_keys_and_bad_values_are_refused_in_submit(executor):
    with pytest.raises(ValueError, match="unknown key.*'cpus'"):
        executor.submit(with_options(ran, resources={"cpus": 2}), 0)
    with pytest.raises(ValueError, match="memory.*'4X'"):
        executor.submit(with_options(ran, resources={"memory": "4X"}), 0)
    with pytest.raises(ValueError, match="cores must be a whole number"):
        executor.submit(with_options(ran, resources={"cores": 0}), 0)
    with pytest.raises(ValueError, match="num_ranks=5 does not match ranks_per_node=2"):
        executor.submit(with_options(ran, resources={"num_nodes": 2, "ranks_per_node": 2, "num_ranks": 5}), 0)
    with pytest.raises(ValueError, match="unknown key"):
        executor.resource_specification = {"gpu": 1}
    with pytest.raises(ValueError, match="unknown key.*'bogus'"):
        FederatedExecutor(resource_specification={"bogus": 1})   # before anything is started
    # the executor still works, and the default spec asks for nothing extra
    assert executor.submit(pow, 2, 5).result(timeout=30) == 32
    assert resource_option({}) is None and resource_option(None) is None
    assert resource_option({"cores": 1}) == {"c": 1}   # asked for: placed by it
    assert resource_option({"num_nodes": 2, "ranks_per_node": 3, "memory": "1.5G"}) == {
        "n": 2, "r": 6, "m": 3 * 1024 ** 3 // 2}


def test_a_forged_option_is_refused_on_the_wire():
    row = [b"t" * 16, b"h" * 32, b"", -1, P.TASK_CALL, P.PYTHON_VERSION]
    for options, words in (({"rs": {"c": 0}}, "c must be an integer"), ({"rs": {"x": 1}}, "keys among"),
                           ({"rs": {"n": 3, "r": 2}}, "fewer ranks than nodes"),
                           ({"env": {"CUDA_VISIBLE_DEVICES": "1"}}, "keys among")):
        with pytest.raises(P.ProtocolError, match=words):
            P.task_row([*row, options])
    P.task_row([*row, {"rs": {"c": 2, "g": 1, "m": 10}}])


# -- placement ----------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_placement_by_cores_never_oversubscribes(on):
    """4 workers on a node of CORES cores: tasks asking 1 core and all of
    them, and plain tasks, never use more than CORES cores at once."""
    with FederatedExecutor(on.cpu.id, relay=on.address) as ex:
        ones = [ex.submit(with_options(ran, resources={"cores": 1}), 0.4) for _ in range(4)]
        alls = [ex.submit(with_options(ran, resources={"cores": CORES}), 0.4) for _ in range(2)]
        plain = [ex.submit(ran, 0.4) for _ in range(2)]
        results = {"ones": [f.result(timeout=120) for f in ones], "alls": [f.result(timeout=120) for f in alls],
                   "plain": [f.result(timeout=120) for f in plain]}
    intervals = ([(r[0], r[1], 1) for r in results["ones"] + results["plain"]]
                 + [(r[0], r[1], CORES) for r in results["alls"]])
    assert most_at_once(intervals) <= CORES, intervals
    assert {r[5] for r in results["alls"]} == {str(CORES)}
    if CORES >= 2:   # not just one at a time: 1-core tasks did share the node
        assert most_at_once([(r[0], r[1], 1) for r in results["ones"]]) >= 2, results["ones"]


@pytest.mark.timeout(120)
def test_an_impossible_request_fails_at_once_naming_it(on):
    with FederatedExecutor(on.gpu.id, relay=on.address) as ex:
        started = time.monotonic()
        cases = [({"cores": CORES + 1}, [f"{CORES + 1} cores", f"the largest has {CORES} core"]),
                 ({"gpus": 3}, ["3 GPUs", "2 GPUs"]),
                 ({"memory": "64T"}, ["64 TiB of memory", "of memory"]),
                 ({"nodes": 2}, ["2 nodes", "has 1 node"])]
        futures = [ex.submit(with_options(ran, resources=spec), 0) for spec, _ in cases]
        for future, (spec, words) in zip(futures, cases):
            with pytest.raises(TaskRejected) as caught:
                future.result(timeout=20)
            for word in words:
                assert word in str(caught.value), (spec, str(caught.value))
        assert time.monotonic() - started < 10
        # what fits still runs there
        assert ex.submit(with_options(ran, resources={"gpus": 2}), 0).result(timeout=30)[2] == "0,1"


# -- GPUs ---------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_concurrent_gpu_tasks_get_their_own_accelerator_and_a_third_waits(on):
    assert CORES >= 2, f"two GPU tasks (1 core each) running at once needs 2 usable cores; this machine has {CORES}"
    with FederatedExecutor(on.gpu.id, relay=on.address) as ex:
        gpu = with_options(ran, resources={"gpus": 1})
        futures = [ex.submit(gpu, 1.5) for _ in range(3)]
        plain = ex.submit(ran, 0.2).result(timeout=60)
        results = sorted((f.result(timeout=60) for f in futures), key=lambda r: r[0])
    for start, end, cuda, rocr, ze, cores, _ in results:
        assert cuda in ("0", "1") and rocr == cuda and ze == cuda, results
    first, second, third = results
    assert first[0] < second[1] and second[0] < first[1], "the first two ran at once"
    assert first[2] != second[2], "two GPU tasks running at once were given the same accelerator"
    assert third[0] >= min(first[1], second[1]) - 0.05, "the third started before an accelerator was free"
    assert plain[2] == "-", "a task that asked for no GPU was given one"


@pytest.mark.timeout(120)
def test_a_task_waits_for_an_accelerator_even_with_cores_free(on):
    """Two GPUs: a task asking both, then one asking one GPU (a core is
    free for it): the second starts only once the first has ended."""
    with FederatedExecutor(on.gpu.id, relay=on.address) as ex:
        all_workers_up(ex, 2)
        both = ex.submit(with_options(ran, resources={"gpus": 2}), 2.5)
        time.sleep(0.3)
        one = ex.submit(with_options(ran, resources={"gpus": 1}), 0)
        plain = ex.submit(ran, 0)
        first, second, other = both.result(timeout=60), one.result(timeout=60), plain.result(timeout=60)
    assert first[2] == "0,1" and second[2] in ("0", "1")
    assert second[0] >= first[1] - 0.05, (first, second)
    if CORES >= 2:
        assert other[0] < first[1], "a plain task waited though a core was free"


# -- several nodes (MPI) -------------------------------------------------------------

def mpi_task(seconds: float) -> dict:
    start = time.time()
    time.sleep(seconds)
    keys = ("FEDEXEC_MPI_LAUNCHER", "FEDEXEC_NODELIST", "FEDEXEC_NUM_NODES", "FEDEXEC_NUM_RANKS", "SLURMD_NODENAME")
    return {"start": start, "end": time.time(), **{key: os.environ.get(key) for key in keys}}


@pytest.mark.timeout(180)
def test_a_two_node_task_gets_two_nodes_of_a_block_and_others_use_the_rest(on):
    """A block of 4 nodes (4 pools started by hand, provider manual, each
    named as Slurm names a node): a task asking for 2 nodes and 4 ranks
    gets 2 of them to itself, with the launcher and node list in its
    environment; single-node tasks run on the other 2 meanwhile."""
    from fedexec.config import ProviderConfig

    provider = ProviderConfig(type="manual", nodes_per_block=4, address="127.0.0.1", min_blocks=0, init_blocks=0)
    with configured_endpoint(on.dir, on.address, "mpi", max_workers=1, provider=provider) as ep:
        with block_of_pools(on.dir, on.home, "mpi", ep.log):
            with FederatedExecutor(ep.id, relay=on.address) as ex:
                # a task asking for all 4 nodes waits (one is busy), keeping the other 3 for itself; once it
                # is cancelled those 3 take other tasks again at once, not only after the busy one ends
                blocker = ex.submit(mpi_task, 6.0)
                time.sleep(0.5)
                whole = ex.submit(with_options(mpi_task, resources={"num_nodes": 4}), 0.1)
                time.sleep(1.0)
                assert whole.cancel() and whole.cancelled()
                after = [ex.submit(mpi_task, 0.2) for _ in range(3)]
                done = [f.result(timeout=60) for f in after]
                assert len(done) == 3 and not blocker.done(), \
                    "the nodes kept for a cancelled multi-node task took no other task until the busy one ended"
                blocker.result(timeout=60)
                big = ex.submit(with_options(mpi_task, resources={"num_nodes": 2, "ranks_per_node": 2}), 3.0)
                time.sleep(0.5)
                singles = [ex.submit(mpi_task, 0.5) for _ in range(4)]
                mpi = big.result(timeout=60)
                others = [f.result(timeout=60) for f in singles]
    nodes = mpi["FEDEXEC_NODELIST"].split(",")
    assert len(nodes) == 2 and set(nodes) <= {"node1", "node2", "node3", "node4"}, mpi
    assert mpi["SLURMD_NODENAME"] == nodes[0]
    assert mpi["FEDEXEC_MPI_LAUNCHER"] == f"mpiexec -n 4 -ppn 2 -hosts {mpi['FEDEXEC_NODELIST']}", mpi
    assert (mpi["FEDEXEC_NUM_NODES"], mpi["FEDEXEC_NUM_RANKS"]) == ("2", "4")
    beside = [o for o in others if o["start"] < mpi["end"] and o["end"] > mpi["start"]]
    assert beside, "no single-node task ran while the 2-node task did"
    for other in beside:
        assert other["SLURMD_NODENAME"] not in nodes, (other, nodes)
    assert {o["FEDEXEC_MPI_LAUNCHER"] for o in others} == {None}


@pytest.mark.timeout(120)
def test_with_accelerators_shared_concurrent_tasks_may_be_given_the_same_one(on):
    with FederatedExecutor(on.shared.id, relay=on.address) as ex:
        gpu = with_options(ran, resources={"gpus": 1})
        first, second = [f.result(timeout=60) for f in [ex.submit(gpu, 1.5), ex.submit(gpu, 1.5)]]
    assert first[2] == second[2] == "7"
    if CORES >= 2:
        assert first[0] < second[1] and second[0] < first[1], "they did not run at once"


def test_configure_takes_available_accelerators_and_they_load_back(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fedexec.cli", "endpoint", "configure", "g", "--available-accelerators",
                           "0,1, 2", "--accelerators-shared", "--mpi-launcher", "srun --mpi=pmi2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    config = EndpointConfig.load("g")
    assert (config.available_accelerators, config.accelerators_shared, config.mpi_launcher) == (
        ["0", "1", "2"], True, "srun --mpi=pmi2")
    bad = subprocess.run([sys.executable, "-m", "fedexec.cli", "endpoint", "configure", "g",
                          "--available-accelerators", "0,0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "names a device twice" in bad.stderr, bad.stderr


@pytest.mark.timeout(180)
def test_a_restarted_relay_sends_tasks_on_with_their_resources_and_walltime(tmp_path, monkeypatch):
    """Tasks accepted while their endpoint is away; the relay is killed
    (SIGKILL) and started again from its record: the tasks still carry the
    resources (the pool gives the task its cores: FEDEXEC_CORES) and the
    walltime (it is stopped) they were submitted with."""
    from fedexec import TaskTimeout
    from test_durability import Endpoint, Relay

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))   # (the endpoint loads ran() from here)
    relay = Relay(tmp_path)
    relay.start()
    endpoint = Endpoint(tmp_path, relay)
    try:
        endpoint.start()
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            endpoint.stop()
            sized = ex.submit(with_options(ran, resources={"cores": CORES, "memory": "1M"}), 0)
            walled = ex.submit(with_options(ran, timeout=1.0), 30)
            time.sleep(1.5)   # accepted: in the relay's record
            relay.kill()
            relay.start()
            endpoint.start()
            assert sized.result(timeout=90)[5] == str(CORES), tail(relay.log)
            with pytest.raises(TaskTimeout):
                walled.result(timeout=90)
    finally:
        endpoint.stop()
        relay.stop()


@pytest.mark.timeout(120)
def test_the_worker_that_ran_a_gpu_task_is_replaced_before_other_tasks(on):
    """A process that loaded a GPU library keeps the devices it saw first:
    the worker that ran a task given accelerators runs nothing after it."""
    import psutil

    with FederatedExecutor(on.gpu.id, relay=on.address) as ex:
        gpu_pid = ex.submit(with_options(ran, resources={"gpus": 1}), 0).result(timeout=60)[6]
        later = [ex.submit(ran, 0.05).result(timeout=60)[6] for _ in range(6)]
        deadline = time.monotonic() + 20
        while psutil.pid_exists(gpu_pid) and psutil.Process(gpu_pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the GPU task's worker is still running"
            time.sleep(0.1)
    assert gpu_pid not in later
