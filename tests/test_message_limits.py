"""Limits on what one message may make the relay do (issue 12, review
findings): frames per message, reads from the record per RESUME, frames
referenced twice, ACKs of unknown ids, log lines per message. A real
token-mode relay with users alice and bob; bob attacks through raw sockets."""

from __future__ import annotations

import os
import time
import uuid

import pytest
import zmq

from fedexec import protocol as P

from test_access import RawClient, fedexec_cli, running_endpoint, wait_connected
from test_faults import running_relay


@pytest.fixture(scope="module")
def two_users(tmp_path_factory):
    """A token-mode relay with users alice and bob, and bob's endpoint."""
    directory = tmp_path_factory.mktemp("message-limits")
    data = directory / "relay-data"
    tokens = {name: fedexec_cli("relay", "add-user", name, "--data-dir", data).stdout.strip()
              for name in ("alice", "bob")}
    with running_relay(directory, "--auth", "token") as address, \
            running_endpoint(directory, "bob-ep", {"FEDEXEC_TOKEN": tokens["bob"]}, relay=address) as bob_ep:
        wait_connected(address, bob_ep.id, tokens["bob"], bob_ep.proc, bob_ep.log)
        yield address, tokens, bob_ep, directory / "relay.log"


def test_decode_refuses_more_frames_than_rows_can_use():
    header = P.encode(P.ACK, {"tids": []})
    assert P.decode(header + [b"x"] * (P.MAX_FRAMES - 1)).type == P.ACK
    with pytest.raises(P.ProtocolError, match=f"more than {P.MAX_FRAMES:,} frames.*MAX_FRAMES"):
        P.decode(header + [b"x"] * P.MAX_FRAMES)


def test_waiting_messages_keeps_no_more_than_a_message_may_have():
    ctx = zmq.Context()
    try:
        router = ctx.socket(zmq.ROUTER)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send_multipart([b"h"] + [b"x"] * 100_000)
        dealer.send_multipart([b"next"])
        assert router.poll(5000)
        time.sleep(0.2)
        got = list(P.waiting_messages(router, 10))
        assert [len(frames) for frames in got] == [P.MAX_FRAMES + 2, 2]   # routing id + MAX_FRAMES + 1; the next
        assert got[1][1].bytes == b"next"
        for sock in (router, dealer):
            sock.close(linger=0)
    finally:
        ctx.term()


@pytest.mark.timeout(120)
def test_a_message_of_many_tiny_frames_is_refused_and_others_are_served(two_users):
    address, tokens, bob_ep, _log = two_users
    bob = RawClient(address, tokens["bob"])
    alice = RawClient(address, tokens["alice"])
    try:
        bob.sock.send_multipart(P.encode(P.ACK, {"tids": []}) + [b"x"] * 3000)
        error = bob.expect(P.ERROR, 20)
        assert error is not None, "no answer to a message of 3,000 frames"
        assert f"more than {P.MAX_FRAMES:,} frames" in error.fields["msg"] and "MAX_FRAMES" in error.fields["msg"]
        alice.send(P.LOOKUP, {"ep": bob_ep.id})   # the relay goes on, for another user too
        reply = alice.expect(P.LOOKUP_REPLY, 20)
        assert reply is not None and "found" in reply.fields
        bob.send(P.HELLO, {"role": "client", "py": P.PYTHON_VERSION})
        assert bob.expect(P.WELCOME, 20)
    finally:
        bob.close()
        alice.close()
