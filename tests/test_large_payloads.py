"""Large arguments and results (transfer.py): they travel in chunks through
real relays, endpoints and workers, are stored on disk, never whole in the
relay's or agent's memory, are refused over the limit by name, belong to
their user alone, and survive a kill -9 of the relay mid-upload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import cloudpickle
import psutil
import pytest

from fedexec import FederatedExecutor, PayloadTooLarge
from fedexec import protocol as P
from fedexec.serialize import serialize_arguments, serialize_function
from fedexec.transfer import BIG_THRESHOLD, CHUNKS_ONLY_ENV, SAME_HOST_USES, TransferError, TransferLink, big_ref, is_big, local_ref, parse_big

from test_access import RawClient, fedexec_cli, running_endpoint, wait_connected
from test_durability import started_federation
from test_faults import running_relay, tail

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 1024 * 1024
GiB = 1024 * MiB
RSS_BOUND = 200 * 1000 * 1000


def rotate(data):
    """The argument rotated by one byte: as large as it, and checkable."""
    return data[1:] + data[:1]


def make_bytes(n):
    return b"r" * n


def echo_small(x):
    return x


def pattern(size: int) -> bytes:
    block = os.urandom(MiB)
    return block * (size // MiB)


class PeakRss:
    """Samples the RSS of some processes every 20 ms until stopped; their peaks."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = {name: 0 for name in pids}
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            for name, proc in self.procs.items():
                try:
                    self.peak[name] = max(self.peak[name], proc.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.02)

    def stop(self) -> dict[str, int]:
        self.running = False
        self.thread.join(5)
        return self.peak


@pytest.mark.timeout(240)
def test_a_1_gib_argument_and_result_round_trip_with_bounded_relay_and_agent_memory():
    with FederatedExecutor(max_workers=1) as ex:
        services = ex._dispatcher.services
        relay_pid = agent_pid = services.processes[0].pid   # one process (fedexec.colocated)
        assert ex.submit(echo_small, 1).result(60) == 1   # workers up: what follows is the transfer alone
        data = pattern(GiB)
        rss = PeakRss({"relay": relay_pid, "agent": agent_pid})
        started = time.monotonic()
        try:
            result = ex.submit(rotate, data).result(180)
        finally:
            peak = rss.stop()
        seconds = time.monotonic() - started
        assert len(result) == len(data)
        assert memoryview(result)[:-1] == memoryview(data)[1:] and result[-1] == data[0]
        del result
        print(f"1 GiB argument and result round trip: {seconds:.1f} s; peak RSS relay "
              f"{peak['relay'] / 1e6:.0f} MB, agent {peak['agent'] / 1e6:.0f} MB")
        assert peak["relay"] < RSS_BOUND and peak["agent"] < RSS_BOUND, peak
        # everything transferred was deleted: the relay's spool holds nothing, nor the agent's
        relay_spool = os.path.join(services.directory, "relay", "spool")
        deadline = time.monotonic() + 10
        while True:
            left = [f for d, _, files in os.walk(relay_spool) for f in files if f != "user"]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not left, left
        # and small tasks go on as before
        assert ex.submit(echo_small, b"small").result(30) == b"small"


@pytest.mark.timeout(120)
def test_over_a_configured_limit_an_argument_is_refused_and_a_result_fails_only_its_task():
    limit = 20 * MiB
    with FederatedExecutor(max_workers=1, max_payload=limit) as ex:
        assert ex.submit(echo_small, 1).result(60) == 1
        fine = pattern(18 * MiB)   # over the chunking threshold, within the limit
        assert ex.submit(echo_small, fine).result(60) == fine
        with pytest.raises(PayloadTooLarge) as refused:
            ex.submit(echo_small, pattern(30 * MiB)).result(60)
        message = str(refused.value)
        assert "the arguments are" in message and f"{limit:,}" in message and refused.value.limit == limit
        assert refused.value.size > 30 * MiB and f"{refused.value.size:,}" in message
        others = [ex.submit(echo_small, i) for i in range(20)]
        too_big = ex.submit(make_bytes, 25 * MiB)
        chunked_fine = ex.submit(make_bytes, 17 * MiB)
        with pytest.raises(PayloadTooLarge) as failed:
            too_big.result(60)
        assert "result" in str(failed.value) and f"{limit:,}" in str(failed.value)
        assert failed.value.size > 25 * MiB
        assert [f.result(30) for f in others] == list(range(20))
        assert chunked_fine.result(60) == b"r" * (17 * MiB)


@pytest.mark.timeout(180)
def test_another_user_can_neither_fetch_nor_use_an_upload(tmp_path):
    data_dir = tmp_path / "relay-data"
    tokens = {user: fedexec_cli("relay", "add-user", user, "--data-dir", data_dir).stdout.strip()
              for user in ("alice", "bob")}
    with running_relay(tmp_path, "--auth", "token") as address:
        with running_endpoint(tmp_path, "ep", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address) as ep:
            wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
            payload = serialize_arguments(echo_small, (pattern(BIG_THRESHOLD + MiB),), {})
            alice_link = TransferLink(address, token=tokens["alice"])
            bob_link = TransferLink(address, token=tokens["bob"])
            alice = RawClient(address, tokens["alice"])
            bob = RawClient(address, tokens["bob"])
            try:
                ref = alice_link.upload(payload)
                assert is_big(ref)
                # alice gets her own upload back; bob cannot, even knowing its reference
                assert alice_link.fetch_bytes(ref) == payload
                with pytest.raises(TransferError, match="no upload .* of user 'bob'"):
                    bob_link.fetch_bytes(ref)
                # nor as an endpoint would, naming a task that is not on an endpoint of his
                with pytest.raises(TransferError, match="may not fetch the arguments of task"):
                    bob_link.fetch_bytes(ref, task_id=uuid.uuid4().bytes)
                # nor by naming it in a task of his (on an endpoint shared with him)
                alice.send(P.SHARE, {"ep": ep.id, "add_users": ["bob"]})
                assert alice.expect(P.SHARED)
                fn_hash, body = serialize_function(echo_small)
                for client, user in ((bob, "bob"),):
                    blobs = P.Blobs()
                    task_id = uuid.uuid4().bytes
                    row = [task_id, fn_hash, blobs.ref(ref), blobs.ref(body), P.TASK_CALL, P.PYTHON_VERSION]
                    client.send(P.SUBMIT, {"ep": ep.id, "tasks": [row]}, blobs.frames)
                    failure = client.failure_of(task_id, 20)
                    assert failure["kind"] == P.REJECTED and "has not uploaded" in failure["msg"], failure
                    assert f"user {user!r}" in failure["msg"]
                # an unknown upload is refused the same way
                _, size, digest = parse_big(ref)
                bogus = big_ref(os.urandom(16), size, digest)
                with pytest.raises(TransferError, match="no upload"):
                    alice_link.fetch_bytes(bogus)
                # nor can bob name a file on the endpoint (as alice's spooled arguments are)
                # for its worker to load as his task's arguments
                secret = tmp_path / "alice-args"
                secret.write_bytes(serialize_arguments(echo_small, ("alice's secret",), {}))
                blobs = P.Blobs()
                task_id = uuid.uuid4().bytes
                row = [task_id, fn_hash, blobs.ref(local_ref(str(secret), secret.stat().st_size)), blobs.ref(body),
                       P.TASK_CALL, P.PYTHON_VERSION]
                bob.send(P.SUBMIT, {"ep": ep.id, "tasks": [row]}, blobs.frames)
                failure = bob.failure_of(task_id, 20)
                assert failure["kind"] == P.REJECTED and "reference to a file" in failure["msg"], failure
                # however long the forged reference is (it was looked for in frames of at most 4 KiB only)
                blobs = P.Blobs()
                task_id = uuid.uuid4().bytes
                long_ref = local_ref(str(secret), secret.stat().st_size, b"x" * 8192)
                row = [task_id, fn_hash, blobs.ref(long_ref), blobs.ref(body), P.TASK_CALL, P.PYTHON_VERSION]
                bob.send(P.SUBMIT, {"ep": ep.id, "tasks": [row]}, blobs.frames)
                failure = bob.failure_of(task_id, 20)
                assert failure["kind"] == P.REJECTED and "reference to a file" in failure["msg"], failure
            finally:
                for closeable in (alice_link, bob_link, alice, bob):
                    closeable.close()
            # and alice's own task with a large argument runs (her executor uploads it)
            with FederatedExecutor(ep.id, relay=address, token=tokens["alice"]) as ex:
                big = pattern(BIG_THRESHOLD + 2 * MiB)
                assert ex.submit(len, big).result(60) == len(big)
            assert ep.proc.poll() is None, tail(ep.log)


@pytest.mark.timeout(180)
def test_a_relay_killed_during_a_large_upload_loses_nothing(tmp_path):
    with started_federation(tmp_path, workers=1) as (relay, endpoint):
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            assert ex.submit(echo_small, 1).result(60) == 1
            data = pattern(600 * MiB)
            outcome: list = []
            submitter = threading.Thread(target=lambda: outcome.append(ex.submit(rotate, data)))
            submitter.start()
            spool = tmp_path / "relay-data" / "spool"
            deadline = time.monotonic() + 60
            while not any(f.suffix == ".part" and f.stat().st_size > 0 for f in spool.glob("*/*")):
                assert time.monotonic() < deadline, "the upload did not start"
                time.sleep(0.005)
            relay.kill()   # mid-upload
            time.sleep(0.5)
            relay.start()
            submitter.join(120)
            assert outcome, "submit did not return"
            result = outcome[0].result(120)
            assert len(result) == len(data) and memoryview(result)[:-1] == memoryview(data)[1:]
            assert ex.submit(echo_small, 2).result(60) == 2
        assert endpoint.proc.poll() is None, tail(endpoint.log)


@pytest.mark.timeout(180)
def test_an_endpoint_killed_while_fetching_large_arguments_loses_nothing(tmp_path):
    with started_federation(tmp_path, workers=1) as (relay, endpoint):
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            assert ex.submit(echo_small, 1).result(60) == 1
            data = pattern(600 * MiB)
            future = ex.submit(rotate, data)   # returns once the upload is complete at the relay
            time.sleep(0.3)                    # the endpoint is fetching it
            endpoint.proc.send_signal(signal.SIGKILL)
            endpoint.proc.wait(10)
            endpoint.start()                   # the same endpoint id, again
            result = future.result(150)
            assert len(result) == len(data) and memoryview(result)[:-1] == memoryview(data)[1:]
            assert ex.submit(echo_small, 2).result(60) == 2
        assert endpoint.proc.poll() is None, tail(endpoint.log)


@pytest.mark.timeout(120)
def test_an_upload_over_the_users_byte_quota_is_refused_and_leaves_nothing(tmp_path):
    with running_relay(tmp_path, "--max-bytes-per-user", str(40 * MiB)) as address:
        link = TransferLink(address)
        try:
            with pytest.raises(TransferError, match="quota of 41,943,040 bytes per user"):
                link.upload(pattern(60 * MiB))
            spool = tmp_path / "relay-data" / "spool"
            deadline = time.monotonic() + 10
            while [f for f in spool.glob("*/*") if f.name != "user"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not [f for f in spool.glob("*/*") if f.name != "user"]
            # the quota is free again: an upload within it goes through, and back
            data = pattern(30 * MiB)
            ref = link.upload(data)
            assert link.fetch_bytes(ref) == data
            for f in spool.glob("*/*"):
                assert f.stat().st_mode & 0o777 == 0o600, f
            assert spool.stat().st_mode & 0o777 == 0o700
        finally:
            link.close()


def add_one_in_place(array):
    """Changes its argument in place (it must be an ordinary, writable array),
    and returns it and a new array beside it: two large buffers."""
    array += 1
    return array, array * 2


@pytest.mark.timeout(120)
def test_large_numpy_buffers_travel_out_of_band_and_load_as_ordinary_arrays():
    import numpy as np
    from fedexec.serialize import OOB_MAGIC, dumps_large, deserialize
    from fedexec.transfer import Pieces
    array = np.arange(3 * MiB, dtype=np.float64)   # 24 MiB
    # the pickle leaves the array's buffer out of band, in place: no joined copy of it is made
    payload = serialize_arguments(add_one_in_place, (array,), {})
    assert isinstance(payload, Pieces) and bytes(payload.parts[0][:len(OOB_MAGIC)]) == OOB_MAGIC
    assert any(len(part) == array.nbytes and np.shares_memory(np.frombuffer(part, dtype=np.uint8), array)
               for part in payload.parts)
    # loaded from a writable buffer: views of it; from a read-only one: copies (a value may change them)
    import pickle
    flat = bytearray(b"".join(bytes(p) for p in payload.parts))
    (args, _), = [deserialize(flat)]
    assert np.shares_memory(args[0], np.frombuffer(flat, dtype=np.uint8)) and args[0].flags.writeable
    (args, _), = [deserialize(bytes(flat))]
    assert args[0].flags.writeable and np.array_equal(args[0], array)
    # small payloads with a numpy array stay plain pickles, byte for byte
    small = np.arange(10)
    assert serialize_arguments(add_one_in_place, (small,), {}) == cloudpickle.dumps(((small,), {}), protocol=5)
    assert dumps_large(pickle.dumps, np.zeros(MiB)) == pickle.dumps(np.zeros(MiB), protocol=5)   # 8 MiB
    with FederatedExecutor(max_workers=1) as ex:
        # through relay, agent and worker: the worker's argument is writable, both results come back right
        changed, doubled = ex.submit(add_one_in_place, array).result(60)
        assert np.array_equal(changed, array + 1) and np.array_equal(doubled, (array + 1) * 2)
        assert changed.flags.writeable and not np.shares_memory(changed, doubled)
    assert array[0] == 0.0   # the caller's own array was never changed


@pytest.mark.timeout(180)
def test_small_tasks_keep_completing_while_a_large_result_is_fetched(monkeypatch):
    # in chunks, as from another machine (on the relay's machine a result is mapped at once: nothing to wait for)
    monkeypatch.setenv(CHUNKS_ONLY_ENV, "1")
    with FederatedExecutor(max_workers=2) as ex:
        assert ex.submit(echo_small, 0).result(30) == 0   # workers up
        big = ex.submit(make_bytes, 768 * MiB)
        during = 0
        deadline = time.monotonic() + 150
        while not big.done():
            assert time.monotonic() < deadline, "the large result never came"
            if ex._dispatcher.fetching:   # its result is being fetched from the relay now
                started = time.monotonic()
                assert ex.submit(echo_small, during).result(30) == during
                if ex._dispatcher.fetching:   # and still was once the small task came back
                    during += 1
                    assert time.monotonic() - started < 5
            else:
                time.sleep(0.005)
        data = big.result()
        assert len(data) == 768 * MiB and data[:1] == data[-1:] == b"r"
        assert during >= 1, "no small task completed while the large result was fetched"
        assert not ex._dispatcher.fetching


# -- the same-host fast path (transfer.py TransferLink._same_host, relay/bulk.py SameHost) ----------------------
def test_the_embedded_default_hands_large_payloads_over_as_files():
    before = dict(SAME_HOST_USES)
    data = pattern(BIG_THRESHOLD + 4 * MiB)
    with FederatedExecutor(max_workers=1) as ex:
        result = ex.submit(rotate, data).result(120)
        assert result == rotate(data)
        assert ex.submit(echo_small, 3).result(60) == 3
    # this process (the client) wrote its argument into the relay's file and read the result from another,
    # with no chunk over the socket
    assert SAME_HOST_USES["upload"] == before["upload"] + 1
    assert SAME_HOST_USES["fetch"] == before["fetch"] + 1


OTHER_USER_CLIENT = r"""
import os, sys, json
import fedexec.relay   # (every module loaded while root: the interpreter's own files are not readable to nobody)
from fedexec.auth import find_credentials
from fedexec.transfer import SAME_HOST_USES, TransferLink
address, token, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
credentials = find_credentials(address, token)
os.setgroups([]); os.setgid(65534); os.setuid(65534)   # from here on: nobody, who cannot read the relay's files
payload = os.urandom(1 << 20) * (size >> 20)
link = TransferLink(address, credentials=credentials)
try:
    proven = link._same_host()
    ref = link.upload(payload)
    back = link.fetch_bytes(ref)
    print(json.dumps({"uid": os.getuid(), "proven": proven, "same": back == payload, "uses": SAME_HOST_USES}))
finally:
    link.close()
"""


@pytest.mark.timeout(120)
def test_a_client_of_another_os_user_cannot_prove_it_and_keeps_to_chunks(tmp_path):
    assert os.geteuid() == 0, "this test runs a client as user nobody: it must start as root"
    data_dir = tmp_path / "relay-data"
    token = fedexec_cli("relay", "add-user", "alice", "--data-dir", data_dir).stdout.strip()
    with running_relay(tmp_path, "--auth", "token") as address:
        out = subprocess.run([sys.executable, "-c", OTHER_USER_CLIENT, address, token, str(BIG_THRESHOLD + 2 * MiB)],
                             capture_output=True, text=True, timeout=90, cwd="/",
                             env={**os.environ, "HOME": "/nonexistent"})
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert seen["uid"] == 65534
        assert seen["proven"] is False and seen["same"] is True
        assert seen["uses"] == {"upload": 0, "fetch": 0, "link": 0}
        # a wrong secret is refused, and the connection's hand-over requests with it
        link = TransferLink(address, token=token)
        try:
            assert "p" in link._local_request({"op": "hello"})
            assert "wrong same-host secret" in link._local_request({"op": "prove", "s": b"0" * 64})["err"]
            refused = link._local_request({"op": "place", "b": os.urandom(16), "n": 5})
            assert "has not shown" in refused["err"]
            link.same_host = False   # (as after that refusal) everything goes in chunks, and works
            payload = pattern(BIG_THRESHOLD + MiB)
            ref = link.upload(payload)
            assert link.fetch_bytes(ref) == payload
        finally:
            link.close()


@pytest.mark.timeout(120)
def test_the_relay_never_takes_a_path_from_a_message_nor_follows_a_link(tmp_path):
    data_dir = tmp_path / "relay-data"
    tokens = {user: fedexec_cli("relay", "add-user", user, "--data-dir", data_dir).stdout.strip()
              for user in ("alice", "bob")}
    victim = tmp_path / "victim"
    victim.write_bytes(b"v" * 100)
    with running_relay(tmp_path, "--auth", "token") as address:
        alice, bob = TransferLink(address, token=tokens["alice"]), TransferLink(address, token=tokens["bob"])
        try:
            assert alice._same_host() and bob._same_host()
            # a 'placed' naming a file of the sender's choosing: the relay looks only at its own names
            bid = os.urandom(16)
            answer = alice._local_request({"op": "placed", "b": bid, "n": 100, "p": str(victim)})
            assert "no same-host upload" in answer["err"]
            # the relay's placeholder swapped for a symlink to another file: refused, that file untouched
            answer = alice._local_request({"op": "place", "b": bid, "n": 100})
            placeholder = answer["p"]
            assert os.stat(placeholder).st_mode & 0o777 == 0o600 and os.path.getsize(placeholder) == 100
            os.unlink(placeholder)
            os.symlink(victim, placeholder)
            answer = alice._local_request({"op": "placed", "b": bid, "n": 100})
            assert "err" in answer and victim.read_bytes() == b"v" * 100
            # bob, proven too, gets no path of alice's upload (ownership as for chunks)
            payload = pattern(BIG_THRESHOLD + MiB)
            before = dict(SAME_HOST_USES)
            ref = alice.upload(payload)
            assert SAME_HOST_USES["upload"] == before["upload"] + 1
            answer = bob._local_request({"op": "where", "b": parse_big(ref)[0]})
            assert "no upload" in answer["err"] and "p" not in answer
            with pytest.raises(TransferError, match="no upload .* of user 'bob'"):
                bob.fetch_bytes(ref)
            assert alice.fetch_bytes(ref) == payload
            assert SAME_HOST_USES["fetch"] == before["fetch"] + 1
        finally:
            alice.close()
            bob.close()
