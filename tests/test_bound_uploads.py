"""An upload an endpoint makes for a task is bound to that task (issue 13,
from session 21's review): an endpoint running a user's tasks may name as a
task's result only an upload it made for that same task, never another
upload of that user (a big argument of another task, a result made for
another task), which the user's client would read as the result and then
delete. Real relay, a hostile endpoint owner's raw endpoint on loopback."""

from __future__ import annotations

import os
import pickle
import sys
import time

import cloudpickle
import pytest

from fedexec import FederatedExecutor
from fedexec import protocol as P
from fedexec.transfer import BIG_THRESHOLD, TransferLink, is_big, parse_big, task_upload_id

from test_access import RawClient
from test_client_trust import FakeEndpoint
from test_faults import running_relay, tail
from test_put import two_users

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 1024 * 1024


def size_of(data):
    return len(data)


def spooled(data_dir, bid: bytes) -> bool:
    """Whether the relay's spool holds upload ``bid`` (of any user)."""
    return any((data_dir / "spool").glob(f"*/{bid.hex()}"))


@pytest.mark.timeout(180)
def test_an_endpoint_may_name_as_a_result_only_an_upload_it_made_for_that_task(tmp_path):
    """Alice's endpoint, shared with bob, holds bob's first task (its 17 MiB
    argument is an upload of bob's) and answers the next ones: with that
    argument's upload (bob would read his own argument as the value, then
    his client's DROP deletes the argument of a task still to run); with
    an upload it made for the first task; with one it made for that very
    task (the one answer that stands). The refused ones fail at once for bob
    with an error that says why, the argument stays, and the endpoint is told."""
    tokens = two_users(tmp_path)
    data_dir = tmp_path / "relay-data"
    with running_relay(tmp_path, "--auth", "token") as address:
        held: list[bytes] = []      # [task id, its argument's reference] of the first task
        answered: list[bytes] = []
        link = TransferLink(address, token=tokens["alice"])

        def answer(row):
            if is_big(row[2]):
                held.extend((row[0], row[2]))
                return None            # held: never answered
            answered.append(row[0])
            if len(answered) == 1:     # the first task's argument
                return P.OK, held[1]
            if len(answered) == 2:     # an upload made for the first task
                return P.OK, link.upload(pickle.dumps("for another task"), task_id=held[0])
            return P.OK, link.upload(pickle.dumps("its own"), task_id=row[0])

        try:
            with FakeEndpoint(address, tokens["alice"], answer) as fake:
                owner = RawClient(address, tokens["alice"])
                owner.send(P.SHARE, {"ep": fake.id, "add_users": ["bob"]})
                assert owner.expect(P.SHARED)
                owner.close()
                bob = FederatedExecutor(fake.id, relay=address, token=tokens["bob"], data_only=False)
                try:
                    first = bob.submit(size_of, os.urandom(BIG_THRESHOLD + MiB))
                    deadline = time.monotonic() + 60
                    while not held and time.monotonic() < deadline:
                        time.sleep(0.05)
                    assert held, "the endpoint never got the task with the large argument"
                    argument = parse_big(held[1])[0]
                    assert spooled(data_dir, argument)
                    for _ in range(2):
                        with pytest.raises(Exception, match="not an upload the endpoint made for this task"):
                            bob.submit(size_of, b"small").result(60)
                    assert bob.submit(size_of, b"small").result(60) == "its own"
                    time.sleep(1.0)   # (a client's DROP of a result it fetched is a message of its own)
                    assert spooled(data_dir, argument), "bob's argument of a task still to run was deleted"
                    assert not first.done()
                finally:
                    bob.shutdown(wait=False, cancel_futures=True)
        finally:
            link.close()
        log = (tmp_path / "relay.log").read_text()
        assert log.count("not an upload the endpoint made for this task") >= 2, tail(tmp_path / "relay.log")


@pytest.mark.timeout(120)
def test_an_endpoint_cannot_upload_for_a_task_under_an_id_not_bound_to_it(tmp_path):
    """An UPLOAD for a task (``tid``) must carry an id made for that task
    (:func:`fedexec.transfer.task_upload_id`): else an endpoint could write
    into an upload of the task's user still in progress under that id."""
    tokens = two_users(tmp_path)
    with running_relay(tmp_path, "--auth", "token") as address:
        held: list[bytes] = []

        def answer(row):
            held.append(row[0])
            return None

        with FakeEndpoint(address, tokens["alice"], answer) as fake:
            owner = RawClient(address, tokens["alice"])
            owner.send(P.SHARE, {"ep": fake.id, "add_users": ["bob"]})
            assert owner.expect(P.SHARED)
            bob = FederatedExecutor(fake.id, relay=address, token=tokens["bob"], data_only=False)
            try:
                bob.submit(size_of, b"x")
                deadline = time.monotonic() + 30
                while not held and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert held
                chunk = b"y" * 100
                for bid, refused in ((os.urandom(16), True), (task_upload_id(held[0]), False)):
                    owner.send(P.UPLOAD, {"b": bid, "o": 0, "n": len(chunk), "h": os.urandom(32),
                                          "tid": held[0], "q": b"q"}, [chunk])
                    reply = owner.expect(P.UPLOADED)
                    assert reply is not None
                    if refused:
                        assert "not an id made for task" in reply.fields.get("err", ""), reply.fields
                    else:
                        assert reply.fields.get("done") and "err" not in reply.fields, reply.fields
            finally:
                owner.close()
                bob.shutdown(wait=False, cancel_futures=True)
