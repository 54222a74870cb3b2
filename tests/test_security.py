"""The relay is a gate, not a runtime: it never unpickles user data."""

from __future__ import annotations

import ast
import pickle
import uuid
from pathlib import Path

import pytest
import zmq

import fedexec.relay
from fedexec import protocol as P
from fedexec.auth import connect_plainly

from test_faults import running_relay

RELAY_SOURCES = sorted(Path(fedexec.relay.__file__).parent.glob("*.py"))


class LeavesAMark:
    """Unpickling this creates a file: proof that someone unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# The one pickle module relay code may import: the dashboard reads an
# exception's type and message from a failed task's pickle by walking its
# opcodes (pickletools.genops), which builds no object and runs no code; any
# other use of pickletools (dis, optimize) or of another pickle module fails.
OPCODES_ONLY = {"pickletools": {"genops"}}


def test_relay_code_has_no_way_to_unpickle():
    assert RELAY_SOURCES
    for path in RELAY_SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and [a.name for a in node.names] == ["pickletools"]:
                used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                        and isinstance(n.value, ast.Name) and n.value.id == "pickletools"}
                assert used <= OPCODES_ONLY["pickletools"], f"{path.name} uses pickletools.{used}"
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n and ("pickle" in n or "serialize" in n or n == "marshal") for n in names), \
                    f"{path.name}:{node.lineno} imports {names}"
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("loads", "load", "deserialize", "Unpickler"), f"{path.name}:{node.lineno}"


@pytest.mark.timeout(60)
def test_payloads_through_the_relay_are_never_unpickled_there(tmp_path):
    marks = {what: tmp_path / f"unpickled-{what}" for what in ("function", "args", "result")}
    blobs = {what: pickle.dumps(LeavesAMark(str(path)), protocol=5) for what, path in marks.items()}
    big = pickle.dumps([LeavesAMark(str(marks["args"]))] + [b"x" * 100_000], protocol=5)  # a frame, not inline
    endpoint_id = str(uuid.uuid4())
    ctx = zmq.Context()
    with running_relay(tmp_path) as address:
        endpoint = ctx.socket(zmq.DEALER)
        endpoint.setsockopt(zmq.IDENTITY, P.new_endpoint_routing_id())
        client = ctx.socket(zmq.DEALER)
        client.setsockopt(zmq.IDENTITY, b"C" + uuid.uuid4().bytes)
        for sock in (endpoint, client):
            sock.setsockopt(zmq.LINGER, 0)
            connect_plainly(sock, address)
        try:
            endpoint.send_multipart(P.encode(P.HELLO, {"role": "endpoint", "id": endpoint_id, "name": "fake",
                                                      "py": P.PYTHON_VERSION, "workers": 1, "capacity": 10}))
            assert endpoint.poll(5000) and P.decode(endpoint.recv_multipart()).type == P.WELCOME
            client.send_multipart(P.encode(P.HELLO, {"role": "client", "id": uuid.uuid4().bytes,
                                                    "py": P.PYTHON_VERSION}))
            fn_hash = P.content_hash(blobs["function"])
            tasks = []
            out = P.Blobs()
            fn_ref = out.ref(blobs["function"])
            for args in (blobs["args"], big):
                tasks.append([uuid.uuid4().bytes, fn_hash, out.ref(args), fn_ref, P.TASK_CALL, P.PYTHON_VERSION,
                              {"m": P.content_hash(args)}])
                fn_ref = -1
            client.send_multipart(P.encode(P.SUBMIT, {"ep": endpoint_id, "tasks": tasks}, out.frames))
            # the relay forwards them to the (fake) endpoint, still pickled
            got = []
            while len(got) < 2:
                assert endpoint.poll(5000), "the relay did not forward the tasks"
                msg = P.decode(endpoint.recv_multipart())
                if msg.type == P.TASKS:
                    got += [(row, msg.blobs) for row in msg.fields["tasks"]]
            assert [P.as_bytes(P.blob(b, row[2])) for row, b in got] == [blobs["args"], big]
            results = P.Blobs()
            rows = [[row[0], P.OK, results.ref(blobs["result"])] for row, _ in got]
            endpoint.send_multipart(P.encode(P.RESULTS, {"rows": rows}, results.frames))
            answered = 0
            while answered < 2:
                assert client.poll(5000), "no results came back"
                msg = P.decode(client.recv_multipart())
                if msg.type == P.RESULTS:
                    for row in msg.fields["rows"]:
                        assert P.as_bytes(P.blob(msg.blobs, row[2])) == blobs["result"]
                        answered += 1
        finally:
            endpoint.close()
            client.close()
            ctx.term()
    assert not [p.name for p in marks.values() if p.exists()], "the relay unpickled a payload"
    # and the payloads really do leave a mark when unpickled, so the test can fail
    pickle.loads(blobs["result"])
    assert marks["result"].exists()


# -- authentication (local mode) ---------------------------------------------------

@pytest.mark.timeout(90)
def test_connections_without_or_with_wrong_credentials_are_refused(tmp_path, monkeypatch):
    import os
    import stat

    import fedexec
    from fedexec.auth import secret_path
    from fedexec.relay.query import lookup_endpoint

    with running_relay(tmp_path) as address:
        secret = secret_path(address)
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600  # readable by its user only
        assert stat.S_IMODE(os.stat(secret.parent).st_mode) == 0o700
        # the right secret is found by address: the relay answers
        assert lookup_endpoint(address, str(uuid.uuid4()), timeout=5) is None
        # a wrong one is refused, with a message that says so
        with pytest.raises(fedexec.AuthenticationFailed, match="refused the credentials"):
            lookup_endpoint(address, str(uuid.uuid4()), timeout=3, token="local:not-the-secret")
        monkeypatch.setenv("FEDEXEC_TOKEN", "local:wrong-again")
        with pytest.raises(fedexec.AuthenticationFailed, match="refused"):
            fedexec.FederatedExecutor(str(uuid.uuid4()), relay=address, connect_timeout=5)
        monkeypatch.delenv("FEDEXEC_TOKEN")
        # none at all (another user, another machine): refused, and the message says how to fix it
        hidden = secret.with_name("moved")
        secret.rename(hidden)
        try:
            with pytest.raises(fedexec.AuthenticationFailed, match="requires credentials.*FEDEXEC_TOKEN"):
                fedexec.FederatedExecutor(str(uuid.uuid4()), relay=address, connect_timeout=5)
        finally:
            hidden.rename(secret)
        # and the relay still serves those who have the secret
        assert lookup_endpoint(address, str(uuid.uuid4()), timeout=5) is None
