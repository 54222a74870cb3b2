"""The wire protocol at the relay's edge: versioned msgpack envelopes; anything
else is refused with an error reply and the relay keeps serving."""

from __future__ import annotations

import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from fedexec import protocol as P
from fedexec.auth import connect_plainly
from fedexec.relay.query import lookup_endpoint
from test_faults import free_port, stop_process


@pytest.fixture
def relay(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "fedexec.relay", "--address", address,
                             "--data-dir", str(tmp_path / "relay"), "--log-level", "WARNING"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                lookup_endpoint(address, "00000000-0000-0000-0000-000000000000", timeout=0.5)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "relay did not come up"
        yield address, proc
    finally:
        stop_process(proc)


def test_roundtrip_and_version_check():
    frames = P.encode(P.SUBMIT, {"ep": "x", "tasks": []}, [b"blob"])
    msg = P.decode(frames)
    assert (msg.type, msg.fields, msg.blobs) == (P.SUBMIT, {"ep": "x", "tasks": []}, [b"blob"])
    wrong = msgpack.packb({"v": P.PROTOCOL_VERSION + 1, "t": P.SUBMIT})
    with pytest.raises(P.ProtocolError, match="protocol version"):
        P.decode([wrong])
    for bad in ([], [b"\xc1"], [msgpack.packb([1, 2])], [msgpack.packb({"v": P.PROTOCOL_VERSION})]):
        with pytest.raises(P.ProtocolError):
            P.decode(bad)


BAD_MESSAGES = [
    [b""],
    [b"\xc1garbage"],
    [msgpack.packb({"v": P.PROTOCOL_VERSION + 7, "t": P.HELLO, "role": "client"})],
    [msgpack.packb({"v": P.PROTOCOL_VERSION, "t": "no-such-type"})],
    [msgpack.packb({"v": P.PROTOCOL_VERSION, "t": P.SUBMIT})],                                   # no fields
    [msgpack.packb({"v": P.PROTOCOL_VERSION, "t": P.SUBMIT, "ep": "e", "tasks": [[1, 2]]})],      # short row
    [msgpack.packb({"v": P.PROTOCOL_VERSION, "t": P.SUBMIT, "ep": "e",
                    "tasks": [[b"x" * 16, b"h" * 32, 5, 9, 0, "3.11"]]})],                          # bad blob index
    [msgpack.packb({"v": P.PROTOCOL_VERSION, "t": P.CREDIT, "n": 5})],                           # not an endpoint
    [msgpack.packb({"v": P.PROTOCOL_VERSION, "t": P.CANCEL, "tids": "nope"})],
    [msgpack.packb({"v": P.PROTOCOL_VERSION, "t": P.RESULTS, "rows": [[b"t", 0, 0]]})],          # not an endpoint
    # valid msgpack, absurd values: must be refused before they reach state or SQLite
    [msgpack.packb({"v": P.PROTOCOL_VERSION, "t": P.HELLO, "role": "endpoint", "id": "not-a-uuid",
                    "name": "x", "py": "3.11", "workers": 2, "capacity": 2})],
    [msgpack.packb({"v": P.PROTOCOL_VERSION, "t": P.HELLO, "role": "endpoint",
                    "id": "00000000-0000-0000-0000-000000000001", "name": "x", "py": "3.11",
                    "workers": float("inf"), "capacity": 2})],
    [msgpack.packb({"v": P.PROTOCOL_VERSION, "t": P.HELLO, "role": "nobody"})],
    [msgpack.packb({"v": P.PROTOCOL_VERSION, "t": P.LOOKUP, "ep": {"a": 1}})],
]


@pytest.mark.timeout(60)
def test_relay_refuses_absurd_values_from_an_endpoint(relay):
    """An endpoint-shaped connection sending out-of-range numbers is refused
    and the relay keeps its record consistent (flushes still succeed)."""
    import uuid

    address, proc = relay
    endpoint_id = str(uuid.uuid4())
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, P.new_endpoint_routing_id())
    connect_plainly(sock, address)
    hello = {"role": "endpoint", "id": endpoint_id, "name": "e", "py": P.PYTHON_VERSION, "capacity": 1}
    try:
        for fields in ({**hello, "workers": 2 ** 63}, {**hello, "workers": 1, "hb": float("nan")}):
            sock.send_multipart(P.encode(P.HELLO, fields))
            assert sock.poll(5000) and P.decode(sock.recv_multipart()).type == P.ERROR
        assert lookup_endpoint(address, endpoint_id, timeout=5) is None  # nothing was registered
        sock.send_multipart(P.encode(P.HELLO, {**hello, "workers": 1}))
        assert sock.poll(5000) and P.decode(sock.recv_multipart()).type == P.WELCOME
        for bad in ({"n": float("inf")}, {"n": -1}, {"n": 2 ** 40}):
            sock.send_multipart(P.encode(P.CREDIT, bad))
            assert sock.poll(5000) and P.decode(sock.recv_multipart()).type == P.ERROR
        sock.send_multipart(P.encode(P.RESULTS, {"rows": [[b"t" * 16, {"x": 1}, 0]], "credit": 1}, [b""]))
        assert sock.poll(5000) and P.decode(sock.recv_multipart()).type == P.ERROR
        assert proc.poll() is None
        assert lookup_endpoint(address, endpoint_id, timeout=5)["status"] == "connected"
    finally:
        sock.close()


@pytest.mark.timeout(60)
def test_relay_refuses_malformed_messages_and_keeps_serving(relay):
    address, proc = relay
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    connect_plainly(sock, address)
    try:
        for frames in BAD_MESSAGES:
            sock.send_multipart(frames)
            assert sock.poll(5000), f"no reply to {frames!r}"
            reply = P.decode(sock.recv_multipart())
            assert reply.type == P.ERROR and reply.fields["msg"], frames
        assert proc.poll() is None
        # and it still answers a well-formed question
        assert lookup_endpoint(address, "00000000-0000-0000-0000-000000000000", timeout=5) is None
    finally:
        sock.close()
