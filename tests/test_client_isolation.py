"""What one user of a relay can do to another through the Client API
(INSPECT, relay/inspect.py): flood its questions, read the counts of a
shared endpoint, delete functions. Real relays, endpoints and clients on
loopback, several users."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from fedexec import protocol as P
from fedexec.relay import inspect as relay_inspect

from test_access import RawClient, fedexec_cli
from test_faults import running_relay

FLOODERS = ("bob", "carol", "dave", "erin", "frank")


@pytest.mark.timeout(120)
def test_flooding_users_never_slow_another_users_questions(tmp_path):
    """Review finding 2: five users asking as fast as they can (each past
    their own budget, together past the relay's shared one) for three
    seconds; alice's questions meanwhile are all answered, none busy."""
    data = tmp_path / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", *FLOODERS)}
    with running_relay(tmp_path, "--auth", "token") as address:
        stop = threading.Event()
        busy_seen = {name: 0 for name in FLOODERS}

        def flood(name: str) -> None:
            raw = RawClient(address, tokens[name])
            try:
                q = 0
                while not stop.is_set():
                    for _ in range(20):
                        q += 1
                        raw.send(P.INSPECT, {"op": "tasks", "q": q, "tids": [uuid.uuid4().bytes]})
                    for _ in range(20):
                        answer = raw.expect(P.INSPECTED, 5)
                        if answer is not None and answer.fields.get("busy"):
                            busy_seen[name] += 1
            finally:
                raw.close()

        threads = [threading.Thread(target=flood, args=(name,)) for name in FLOODERS]
        for thread in threads:
            thread.start()
        alice = RawClient(address, tokens["alice"])
        try:
            time.sleep(0.5)
            answers = []
            for q in range(relay_inspect.QUERY_FLOOR * 2):   # at her floor, each second: 2 s of questions
                alice.send(P.INSPECT, {"op": "endpoints", "q": q})
                answers.append(alice.expect(P.INSPECTED, 10))
                time.sleep(1.0 / relay_inspect.QUERY_FLOOR)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
            alice.close()
        assert all(answer is not None for answer in answers)
        busy = [answer.fields for answer in answers if answer.fields.get("busy")]
        assert busy == [], f"{len(busy)} of alice's {len(answers)} questions were answered busy"
        assert all(count > 0 for count in busy_seen.values()), busy_seen   # the flooders were held back


@pytest.mark.timeout(180)
def test_a_shared_endpoint_shows_each_user_their_own_counts_only(tmp_path):
    """Review finding 11, first part: alice shares her endpoint with bob and
    runs tasks on it; bob's endpoint rows (Client API, dashboard API,
    /metrics) count none of them and show no numbers that add up every
    user's work there; his own task on it he sees; alice, the owner, sees all."""
    from fedexec import Client, FederatedExecutor
    from fedexec.relay.query import lookup_endpoint, share_endpoint

    from test_access import running_endpoint, slow_value, wait_connected
    from test_dashboard import api, cli_relay, get, wait_for

    data = tmp_path / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "bob")}
    with cli_relay(tmp_path, "--auth", "token") as (address, url, _):
        with running_endpoint(tmp_path, "alice-shared", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address,
                              max_workers=1) as ep:
            wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
            share_endpoint(address, ep.id, add_users=["bob"], token=tokens["alice"])
            with FederatedExecutor(ep.id, relay=address, token=tokens["alice"]) as alice_ex, \
                    Client(relay=address, token=tokens["alice"]) as alice, \
                    Client(relay=address, token=tokens["bob"]) as bob:
                futures = [alice_ex.submit(slow_value, 4.0, i) for i in range(3)]
                # (all three counted once all three reached the relay: her executor sends them in
                # one batch or more, so the first answer may come between two)
                owner = wait_for("alice's tasks counted for her",
                                 lambda: (s := alice.get_endpoint_status(ep.id))["running"] >= 1
                                 and s["running"] + s["queued"] == 3 and s)
                assert owner["workers"] is not None and owner["idle_workers"] is not None   # (hers: all of it)
                mine = bob.get_endpoint_status(ep.id)
                assert mine["status"] == "online" and mine["running"] == 0 and mine["queued"] == 0, mine
                assert mine["workers"] is None and mine["idle_workers"] is None and mine["blocks"] is None, mine
                assert [e for e in bob.list_endpoints() if e["id"] == ep.id][0]["running"] == 0
                # the dashboard's rows and /metrics, as each of them sees them
                row = wait_for("alice's dashboard row counting her tasks",
                               lambda: [e for e in api(url, tokens["alice"], "endpoints")["endpoints"]
                                        if e["id"] == ep.id and e["at_endpoint"] >= 1])[0]
                assert row["busy_workers"] is not None and row["queued_at_endpoint"] is not None
                bobs = [e for e in api(url, tokens["bob"], "endpoints")["endpoints"] if e["id"] == ep.id]
                assert len(bobs) == 1 and bobs[0]["status"] == "online"
                assert bobs[0]["at_endpoint"] == 0 and bobs[0]["queued_at_relay"] == 0, bobs[0]
                assert bobs[0]["busy_workers"] is None and bobs[0]["idle_workers"] is None
                assert bobs[0]["queued_at_endpoint"] is None and bobs[0]["blocks"] == []
                status, _, metrics = get(url, "/metrics", tokens["bob"])
                assert status == 200 and b"fedexec_workers{" not in metrics
                # nor the LOOKUP every executor sends when it starts (review s24, finding 1)
                looked = lookup_endpoint(address, ep.id, token=tokens["bob"])
                assert looked["status"] == "connected" and not looked["yours"], looked
                assert not {"queued", "running", "last_seen"} & set(looked), looked
                assert lookup_endpoint(address, ep.id, token=tokens["alice"])["running"] >= 1
                assert f'fedexec_endpoint_tasks{{endpoint="{ep.id}"'.encode() in metrics
                # bob's own task there: he sees it counted (queued or sent), alice's still not
                with FederatedExecutor(ep.id, relay=address, token=tokens["bob"]) as bob_ex:
                    his = bob_ex.submit(slow_value, 0.1, "bob's")
                    seen = wait_for("bob's own task counted for him",
                                    lambda: (s := bob.get_endpoint_status(ep.id))["running"] + s["queued"] >= 1 and s)
                    assert seen["running"] + seen["queued"] == 1, seen
                    assert his.result(60) == "bob's"
                assert [f.result(60) for f in futures] == [0, 1, 2]


def double(x):
    return 2 * x


@pytest.mark.timeout(180)
def test_delete_function_by_its_owner_only_and_submitted_tasks_run_on(tmp_path):
    from fedexec import Client

    from test_access import running_endpoint, slow_value, wait_connected

    data = tmp_path / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "bob")}
    with running_relay(tmp_path, "--auth", "token") as address:
        with running_endpoint(tmp_path, "alice-ep", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address) as ep:
            wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
            with Client(relay=address, token=tokens["alice"]) as alice, \
                    Client(relay=address, token=tokens["bob"]) as bob:
                slow = alice.register_function(slow_value, public=True)
                mine = alice.register_function(double)
                running = alice.run(2.0, "ran on", endpoint_id=ep.id, function_id=slow)
                # not bob's to delete, public or not: answered as an unknown id, and both stay
                assert bob.delete_function(slow) is False and bob.delete_function(mine) is False
                assert bob.get_function(slow)["function_name"] == "slow_value"
                assert alice.get_function(mine)["function_name"] == "double"
                assert alice.delete_function(slow) is True
                assert alice.delete_function(slow) is False
                for who in (alice, bob):
                    with pytest.raises(LookupError):
                        who.get_function(slow)
                with pytest.raises(LookupError):   # new tasks with it are refused, from this client too
                    alice.run(0.0, "again", endpoint_id=ep.id, function_id=slow)
                # the task submitted before runs on
                deadline = time.monotonic() + 60
                while (info := alice.get_task(running))["pending"] and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert info["status"] == "success" and info["result"] == "ran on"
                assert alice.get_function(mine)["function_name"] == "double"   # her other one stays
                with pytest.raises(ValueError, match="not a function id"):
                    alice.delete_function("nope")
