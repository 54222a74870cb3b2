"""Rows are checked at every hop on a fast path for the common row (no
options, no trace) and the full check for the rest; what the fast path
takes must be exactly what the full check takes. And the relay checks a
client's Python version once per version per SUBMIT, not once per row:
a message mixing versions still has each row answered by its own version.
Unit checks of protocol.py, then a real relay on loopback with a raw client
and a raw endpoint."""

from __future__ import annotations

import os
import time
import uuid

import pytest
import zmq

from fedexec import protocol as P
from fedexec.auth import connect_plainly

from test_faults import running_relay

GOOD_TASK = [b"t" * 16, b"h" * 32, b"args", -1, P.TASK_CALL, P.PYTHON_VERSION]
GOOD_RESULT = [b"t" * 16, P.OK, b"value"]


class _Bytes(bytes):
    """A bytes subclass: the full check (isinstance) takes it."""


@pytest.mark.parametrize("field, value, message", [
    (0, b"t" * 15, "task id must be 16 bytes"),
    (0, "t" * 16, "task id must be 16 bytes"),
    (1, b"h" * 31, "function hash must be 32 bytes"),
    (1, None, "function hash must be 32 bytes"),
    (2, 1.5, "payload references"),
    (3, None, "payload references"),
    (4, 7, "unknown task kind"),
    (4, [0], "unknown task kind"),    # (unhashable: a ProtocolError, never a TypeError)
    (5, "3" * 17, "python version"),
    (5, 3.12, "python version"),
])
def test_a_task_row_with_one_bad_field_is_refused_naming_it(field, value, message):
    row = list(GOOD_TASK)
    row[field] = value
    with pytest.raises(P.ProtocolError, match=message):
        P.task_row(row)


def test_task_rows_the_fast_path_passes_on_are_checked_in_full():
    assert P.task_row(list(GOOD_TASK)) == GOOD_TASK
    assert P.task_row([_Bytes(b"t" * 16), *GOOD_TASK[1:]])[0] == b"t" * 16   # (as before: isinstance)
    assert P.task_row([*GOOD_TASK[:2], 3, 4, P.TASK_CHUNK, "3.12"])[2] == 3    # frame indexes
    with pytest.raises(P.ProtocolError, match="6 or 7 fields"):
        P.task_row(GOOD_TASK[:5])
    with pytest.raises(P.ProtocolError, match="6 or 7 fields"):
        P.task_row(tuple(GOOD_TASK))
    with pytest.raises(P.ProtocolError, match="max_retries"):
        P.task_row([*GOOD_TASK, {"r": -1}])
    with pytest.raises(P.ProtocolError, match="task options"):
        P.task_row([*GOOD_TASK, {"zz": 1}])
    with pytest.raises(P.ProtocolError, match="task id must be 16 bytes"):   # options, and a bad field
        P.task_row([b"short", *GOOD_TASK[1:], {"r": 1}])
    with pytest.raises(P.ProtocolError, match="trace"):   # a trace longer than this hop takes
        P.task_row([*GOOD_TASK, {"tr": [1.0, 2.0, 3.0]}], P.TRACE_AT_RELAY)


@pytest.mark.parametrize("row", [
    [b"t" * 16, 9, b"v"],
    [b"t" * 16, [0], b"v"],      # unhashable status: a ProtocolError, never a TypeError
    [b"t" * 16, None, b"v"],
    ["t" * 16, P.OK, b"v"],
    [b"t" * 16, P.OK, 1.5],
    [b"t" * 16, P.OK],
    (b"t" * 16, P.OK, b"v"),
    [b"t" * 16, P.OK, b"v", "not a trace"],
    [b"t" * 16, P.OK, b"v", [1.0] * (len(P.TRACE_STAGES) + 1)],
])
def test_a_bad_result_row_is_refused(row):
    with pytest.raises(P.ProtocolError):
        P.result_row(row)


def test_result_rows_the_fast_path_passes_on_are_checked_in_full():
    assert P.result_row(list(GOOD_RESULT)) == tuple(GOOD_RESULT)
    assert P.result_row([b"t" * 16, P.CANCELLED, 0]) == (b"t" * 16, P.CANCELLED, 0)
    assert P.result_row([_Bytes(b"t" * 16), P.FAILED, b""])[1] == P.FAILED
    assert P.result_row([*GOOD_RESULT, [1.0, 2.0]])[0] == b"t" * 16


# -- the relay: one version check per version per message ---------------------------

OTHER_PYTHON = "3.99"   # the fake endpoint's: what its tasks must be pickled with
DEADLINE = 30


def _hello_endpoint(ctx: zmq.Context, address: str, python: str = OTHER_PYTHON) -> tuple[zmq.Socket, str]:
    """A raw endpoint on ``python`` (default ``OTHER_PYTHON``), welcomed by the relay."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"E" + os.urandom(16))
    connect_plainly(sock, address)
    endpoint_id = str(uuid.uuid4())
    sock.send_multipart(P.encode(P.HELLO, {
        "role": "endpoint", "id": endpoint_id, "name": "other-python", "py": python, "workers": 1,
        "capacity": 1000, "hb": 60.0, "hbm": 100, "holding": []}))
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if sock.poll(200) and P.decode(sock.recv_multipart()).type == P.WELCOME:
            return sock, endpoint_id
    pytest.fail("the relay did not welcome the raw endpoint")


@pytest.mark.timeout(120)
def test_a_submit_mixing_python_versions_has_each_row_answered_by_its_own(tmp_path):
    """40 tasks in one SUBMIT, alternating between the endpoint's Python and
    another: the 20 on the endpoint's version are accepted and handed to it,
    each of the 20 others fails with a VERSION error naming both versions,
    whatever the order (the relay remembers a version that passed, never
    one that failed)."""
    ctx = zmq.Context()
    try:
        with running_relay(tmp_path) as address:
            endpoint, endpoint_id = _hello_endpoint(ctx, address)
            client = ctx.socket(zmq.DEALER)
            client.setsockopt(zmq.LINGER, 0)
            connect_plainly(client, address)
            client.send_multipart(P.encode(P.HELLO, {"role": "client", "py": P.PYTHON_VERSION}))
            body = b"function body"
            fn_hash = P.content_hash(body)
            rows, wrong, right = [], set(), set()
            for i in range(40):
                task_id = os.urandom(16)
                python = OTHER_PYTHON if i % 2 else ("3.98" if i % 4 == 0 else P.PYTHON_VERSION)
                (right if python == OTHER_PYTHON else wrong).add(task_id)
                rows.append([task_id, fn_hash, b"args %d" % i, 0 if i == 1 else -1, P.TASK_CALL, python])
            client.send_multipart(P.encode(P.SUBMIT, {"ep": endpoint_id, "tasks": rows}, [body]))
            accepted: set[bytes] = set()
            refused: dict[bytes, dict] = {}
            handed: set[bytes] = set()
            deadline = time.monotonic() + DEADLINE
            while (accepted != right or set(refused) != wrong or handed != right) and time.monotonic() < deadline:
                for sock in (client, endpoint):
                    if not sock.poll(100):
                        continue
                    msg = P.decode(sock.recv_multipart())
                    if msg.type == P.ACCEPTED:
                        accepted.update(msg.fields["tids"])
                    elif msg.type == P.RESULTS:
                        for task_id, status, ref in (row[:3] for row in msg.fields["rows"]):
                            assert status == P.FAILED, (task_id.hex(), status)
                            refused[task_id] = P.unpack_failure(P.blob(msg.blobs, ref))
                    elif msg.type == P.TASKS:
                        handed.update(row[0] for row in msg.fields["tasks"])
                        assert all(row[5] == OTHER_PYTHON for row in msg.fields["tasks"])
            assert accepted == right, f"{len(accepted)} of {len(right)} accepted"
            assert handed == right, f"{len(handed)} of {len(right)} reached the endpoint"
            assert set(refused) == wrong, f"{len(refused)} of {len(wrong)} refused"
            for failure in refused.values():
                assert failure["kind"] == P.VERSION, failure
                assert OTHER_PYTHON in failure["msg"] and "other-python" in failure["msg"], failure
            client.close(linger=0)
            endpoint.close(linger=0)
    finally:
        ctx.term()
