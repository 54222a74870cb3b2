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
