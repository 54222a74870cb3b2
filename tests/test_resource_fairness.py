"""Per-user fairness for resource requests on a shared endpoint (issue 14,
from session 21's review): an endpoint owner decides whether other users
may ask for several nodes (``multi_node_for_others``) and caps what one
user's tasks asking for resources hold at once (``max_nodes_per_user``,
``max_cores_per_user``, ``max_gpus_per_user``). Over a cap a task waits, without holding up
another user's; a task asking more than a cap alone fails at once, naming
it; the owner's own tasks are not capped. Real relay (token mode, three
users), a configured endpoint and pools on loopback."""

from __future__ import annotations

import json
import os
import pickle
import time
import uuid

import pytest

from fedexec import FederatedExecutor, TaskRejected, with_options
from fedexec import protocol as P
from fedexec.config import EndpointConfig, ProviderConfig
from fedexec.serialize import serialize_arguments, serialize_function

from test_access import RawClient, fedexec_cli
from test_chain import _placeholder, results_of
from test_faults import running_relay
from test_resources import block_of_pools, configured_endpoint, mpi_task, wait_for_pools

DEADLINE = 60


def tokens_of(data_dir, *users: str) -> dict[str, str]:
    return {user: fedexec_cli("relay", "add-user", user, "--data-dir", data_dir).stdout.strip() for user in users}


def share(address: str, owner_token: str, endpoint_id: str, *users: str) -> None:
    owner = RawClient(address, owner_token)
    try:
        owner.send(P.SHARE, {"ep": endpoint_id, "add_users": list(users)})
        assert owner.expect(P.SHARED)
    finally:
        owner.close()


def overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


@pytest.fixture
def shared_relay(tmp_path, monkeypatch):
    """A token-mode relay with users alice (who owns the endpoints), bob
    and carol; the endpoints' configs go in a home of their own."""
    home = tmp_path / "home"
    monkeypatch.setenv("FEDEXEC_HOME", str(home))
    tokens = tokens_of(tmp_path / "relay-data", "alice", "bob", "carol")
    monkeypatch.setenv("FEDEXEC_TOKEN", tokens["alice"])   # (the tests' look-ups of alice's endpoints)
    with running_relay(tmp_path, "--auth", "token", env={**os.environ, "FEDEXEC_HOME": str(home)}) as address:
        yield address, tokens, home


@pytest.mark.timeout(120)
def test_other_users_may_ask_for_several_nodes_only_once_the_owner_allows_it(shared_relay, tmp_path):
    """By default (multi_node_for_others = false) another user's task asking
    for several nodes fails at once, naming the setting; the owner's own is
    not refused for it (here it fails only as no block has 2 nodes)."""
    address, tokens, _ = shared_relay
    with configured_endpoint(tmp_path, address, "default", base_env={**os.environ, "FEDEXEC_TOKEN": tokens["alice"]},
                             max_workers=1) as ep:
        share(address, tokens["alice"], ep.id, "bob")
        two_nodes = with_options(mpi_task, resources={"num_nodes": 2})
        with FederatedExecutor(ep.id, relay=address, token=tokens["bob"]) as bob:
            with pytest.raises(TaskRejected, match="multi_node_for_others") as refused:
                bob.submit(two_nodes, 0.1).result(DEADLINE)
            assert "its owner only" in str(refused.value) and "'bob'" in str(refused.value)
            # also when it waits at the endpoint for a task still running there (it is not sent on to
            # wait at that task's pool, where it would start without its nodes or the owner's say)
            client = RawClient(address, tokens["bob"])
            try:
                fn_hash, body = serialize_function(mpi_task)
                running, dependent = uuid.uuid4().bytes, uuid.uuid4().bytes
                blobs = P.Blobs()
                rows = [[running, fn_hash, blobs.ref(serialize_arguments(mpi_task, (2.0,), {})), blobs.ref(body),
                         P.TASK_CALL, P.PYTHON_VERSION],
                        [dependent, fn_hash, blobs.ref(pickle.dumps(((_placeholder(0),), {}))), -1, P.TASK_CALL,
                         P.PYTHON_VERSION, {"d": [running], "rs": {"n": 2}}]]
                client.send(P.SUBMIT, {"ep": ep.id, "tasks": rows}, blobs.frames)
                outcomes = results_of(client, [running, dependent], DEADLINE)
            finally:
                client.close()
            assert outcomes[running][0] == P.OK
            status, blob = outcomes[dependent]
            assert status == P.FAILED and "multi_node_for_others" in P.unpack_failure(blob)["msg"], (status, blob)
            assert bob.submit(mpi_task, 0.0).result(DEADLINE)["end"] > 0   # (his plain tasks run)
        with FederatedExecutor(ep.id, relay=address, token=tokens["alice"]) as alice:
            with pytest.raises(TaskRejected, match="nodes_per_block"):
                alice.submit(two_nodes, 0.1).result(DEADLINE)


@pytest.mark.timeout(240)
def test_a_user_over_a_cap_waits_without_holding_up_another_and_a_request_over_it_fails(shared_relay, tmp_path):
    """A block of 4 one-worker nodes; other users may hold 2 nodes and 1 core
    each at once. Bob's second 2-node task waits for his first to end, while
    carol's runs beside his first on the other 2 nodes; bob's 3-node task
    fails at once naming max_nodes_per_user. Likewise with cores: bob's
    second 1-core task waits for his first, carol's runs beside it, and
    bob's 2-core task fails at once naming max_cores_per_user."""
    address, tokens, home = shared_relay
    provider = ProviderConfig(type="manual", nodes_per_block=4, address="127.0.0.1", min_blocks=0, init_blocks=0)
    with configured_endpoint(tmp_path, address, "caps", base_env={**os.environ, "FEDEXEC_TOKEN": tokens["alice"]},
                             max_workers=1, provider=provider, multi_node_for_others=True, max_nodes_per_user=2,
                             max_cores_per_user=1) as ep:
        assert EndpointConfig.load("caps").max_nodes_per_user == 2
        share(address, tokens["alice"], ep.id, "bob", "carol")
        with block_of_pools(tmp_path, home, "caps", ep.log), \
                FederatedExecutor(ep.id, relay=address, token=tokens["bob"]) as bob, \
                FederatedExecutor(ep.id, relay=address, token=tokens["carol"]) as carol:
            two_nodes = with_options(mpi_task, resources={"num_nodes": 2})
            with pytest.raises(TaskRejected, match="max_nodes_per_user"):
                bob.submit(with_options(mpi_task, resources={"num_nodes": 3}), 0.1).result(DEADLINE)
            with pytest.raises(TaskRejected, match="max_cores_per_user"):
                bob.submit(with_options(mpi_task, resources={"cores": 2}), 0.1).result(DEADLINE)

            # (long enough for carol's to start meanwhile: a pool's one worker that ran another user's
            # task is replaced by a fresh process first, which takes seconds on a loaded machine)
            first, second = bob.submit(two_nodes, 6.0), bob.submit(two_nodes, 0.5)
            time.sleep(0.5)
            hers = carol.submit(two_nodes, 1.0)
            first, second, hers = (f.result(DEADLINE) for f in (first, second, hers))
            assert not overlap(first, second), "bob's second 2-node task ran while his first held his 2 nodes"
            assert overlap(first, hers), "carol's 2-node task waited behind bob's, with 2 nodes free"

            one_core = with_options(mpi_task, resources={"memory": "1M"})   # (1 core, asking resources)
            first, second = bob.submit(one_core, 6.0), bob.submit(one_core, 0.5)
            third = bob.submit(one_core, 0.5)
            time.sleep(0.5)
            hers = carol.submit(one_core, 1.0)
            assert third.cancel() and third.cancelled(), "a task waiting for its user's share could not be cancelled"
            first, second, hers = (f.result(DEADLINE) for f in (first, second, hers))
            assert not overlap(first, second), "bob's second task ran while his first held his 1 core"
            assert overlap(first, hers), "carol's task waited behind bob's, with nodes free"


@pytest.mark.timeout(180)
def test_a_user_over_the_gpu_cap_waits_while_another_gets_the_other_gpu(shared_relay, tmp_path):
    """Two accelerators, at most 1 per other user: bob's second GPU task waits
    for his first, carol's runs beside it on the other one, and bob's task
    asking for 2 fails at once naming max_gpus_per_user. The owner is not
    capped: alice's task asking for both runs."""
    from test_resources import ran

    address, tokens, _ = shared_relay
    with configured_endpoint(tmp_path, address, "gpus", base_env={**os.environ, "FEDEXEC_TOKEN": tokens["alice"]},
                             max_workers=3, available_accelerators=["0", "1"], max_gpus_per_user=1) as ep:
        share(address, tokens["alice"], ep.id, "bob", "carol")
        one, two = with_options(ran, resources={"gpus": 1}), with_options(ran, resources={"gpus": 2})
        with FederatedExecutor(ep.id, relay=address, token=tokens["bob"]) as bob, \
                FederatedExecutor(ep.id, relay=address, token=tokens["carol"]) as carol, \
                FederatedExecutor(ep.id, relay=address, token=tokens["alice"]) as alice:
            with pytest.raises(TaskRejected, match="max_gpus_per_user"):
                bob.submit(two, 0.1).result(DEADLINE)
            assert sorted(alice.submit(two, 0.1).result(DEADLINE)[2].split(",")) == ["0", "1"]
            first, second = bob.submit(one, 6.0), bob.submit(one, 0.5)
            time.sleep(0.5)
            hers = carol.submit(one, 1.0)
            first, second, hers = (f.result(DEADLINE) for f in (first, second, hers))
    as_interval = {"start": 0, "end": 1}
    first, second, hers = ({**as_interval, "start": r[0], "end": r[1], "gpu": r[2]} for r in (first, second, hers))
    assert not overlap(first, second), "bob's second GPU task ran while his first held his one GPU"
    assert overlap(first, hers), "carol's GPU task waited behind bob's, with a GPU free"
    assert first["gpu"] != hers["gpu"], (first, hers)


@pytest.mark.timeout(180)
def test_tasks_waiting_over_their_users_cap_do_not_make_the_endpoint_start_blocks(shared_relay, tmp_path):
    """Blocks of one worker, up to 3: bob's 4 tasks asking for a core each,
    with a cap of 1 core per user, run one after another on the first block;
    the 3 waiting for his share start no block (more blocks would not run
    them sooner, and would cost the endpoint's owner)."""
    address, tokens, home = shared_relay
    provider = ProviderConfig(type="local", init_blocks=1, min_blocks=1, max_blocks=3)
    with configured_endpoint(tmp_path, address, "scaling", base_env={**os.environ, "FEDEXEC_TOKEN": tokens["alice"]},
                             max_workers=1, provider=provider, max_cores_per_user=1) as ep:
        share(address, tokens["alice"], ep.id, "bob")
        one_core = with_options(mpi_task, resources={"memory": "1M"})
        status = home / "endpoints" / "scaling" / "status.json"
        wait_for_pools(status, 1, 60, ep.log)   # (tasks that came before any pool did would start blocks)
        with FederatedExecutor(ep.id, relay=address, token=tokens["bob"]) as bob:
            runs = [f.result(DEADLINE) for f in [bob.submit(one_core, 1.5) for _ in range(4)]]
            blocks = json.loads(status.read_text())["blocks"]
    assert all(not overlap(a, b) for k, a in enumerate(runs) for b in runs[k + 1:]), runs
    assert len(blocks) == 1, blocks


def test_configure_takes_the_caps_and_refuses_a_negative_one(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDEXEC_HOME", str(tmp_path / "home"))
    fedexec_cli("endpoint", "configure", "c", "--multi-node-for-others", "--max-nodes-per-user", "2",
                "--max-cores-per-user", "8", "--max-gpus-per-user", "1")
    config = EndpointConfig.load("c")
    assert (config.multi_node_for_others, config.max_nodes_per_user, config.max_cores_per_user,
            config.max_gpus_per_user) == (True, 2, 8, 1)
    bad = fedexec_cli("endpoint", "configure", "c", "--max-cores-per-user", "-1", check=False)
    assert bad.returncode != 0 and "max_cores_per_user must be >= 0" in bad.stderr, bad.stderr
    assert EndpointConfig.load("c").max_cores_per_user == 8


@pytest.mark.timeout(150)
def test_many_tasks_parked_over_one_users_cap_do_not_lock_another_user_out(shared_relay, tmp_path):
    """Bob floods a shared endpoint (3 workers, max_cores_per_user = 1) with
    40 one-core tasks: those over his cap wait at the endpoint, and none of
    them stops the credit that brings carol's task from the relay's queue
    behind his, so hers starts while his still wait (before, parked tasks past
    the endpoint's capacity counted as occupying it: she waited ~15 s with 2
    of 3 workers idle). From session 22's review."""
    address, tokens, home = shared_relay
    with configured_endpoint(tmp_path, address, "flooded", base_env={**os.environ, "FEDEXEC_TOKEN": tokens["alice"]},
                             max_workers=3, max_cores_per_user=1) as endpoint:
        share(address, tokens["alice"], endpoint.id, "bob", "carol")
        one_core = with_options(mpi_task, resources={"memory": "1M"})
        with FederatedExecutor(endpoint.id, relay=address, token=tokens["bob"]) as bob, \
                FederatedExecutor(endpoint.id, relay=address, token=tokens["carol"]) as carol:
            bobs = [bob.submit(one_core, 0.5) for _ in range(40)]
            time.sleep(1.5)
            submitted = time.time()
            hers = carol.submit(one_core, 0.1).result(120)
            waited = hers["start"] - submitted
            left = sum(1 for future in bobs if not future.done())
            assert waited < 5.0 and left > 0, f"carol's task started {waited:.1f} s after it was submitted, " \
                                             f"with {left} of bob's still to run"
            assert all(future.result(120)["start"] for future in bobs)


@pytest.mark.timeout(120)
def test_a_multi_node_task_counts_its_gpus_on_every_node_against_the_cap(shared_relay, tmp_path):
    """With multi-node tasks allowed to others and max_gpus_per_user = 1, a
    2-node task asking for 1 GPU per node asks for 2 GPUs, and fails at once
    naming the cap (before, a multi-node task counted only as nodes: its GPUs
    and cores went past the caps; from session 22's review)."""
    address, tokens, _ = shared_relay
    with configured_endpoint(tmp_path, address, "gpus", base_env={**os.environ, "FEDEXEC_TOKEN": tokens["alice"]},
                             max_workers=1, multi_node_for_others=True, max_gpus_per_user=1) as ep:
        share(address, tokens["alice"], ep.id, "bob")
        with FederatedExecutor(ep.id, relay=address, token=tokens["bob"]) as bob:
            with pytest.raises(TaskRejected, match="max_gpus_per_user") as refused:
                bob.submit(with_options(mpi_task, resources={"num_nodes": 2, "gpus": 1}), 0.1).result(DEADLINE)
            assert "asks for 2 GPUs" in str(refused.value), refused.value
