"""Data sent once (dataref.py, relay/refs.py, endpoint/refs.py): ``ref =
ex.put(obj)`` stores an object at the relay once; tasks name it (also inside
containers and keyword arguments) and their workers get the object; each
endpoint fetches it once (counted by the relay) and caches it per user;
``ref.delete()`` and the TTL remove it; only its user can use or delete it;
large puts stream in chunks; puts survive a relay kill -9."""

from __future__ import annotations

import os
import re
import sys
import time
import uuid

import cloudpickle
import pytest

from fedexec import DataRef, DataRefError, FederatedExecutor, with_options, memoized
from fedexec import protocol as P
from fedexec.serialize import serialize_arguments, serialize_function
from fedexec.transfer import BIG_THRESHOLD, TransferError, TransferLink, big_ref

from test_access import RawClient, fedexec_cli, running_endpoint, wait_connected
from test_durability import started_federation
from test_faults import running_relay, tail

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 1024 * 1024


def total(data, more=(), table=None, scale=1):
    """What the tests' tasks compute from a put object and its copies."""
    out = len(data) * scale
    for item in more:
        out += len(item)
    for value in (table or {}).values():
        out += len(value[0])
    return out


def head(data):
    return bytes(data[:8]), len(data)


def status_of(endpoint, token: str) -> str:
    """``fedexec endpoint status`` of a configured endpoint: its output."""
    return fedexec_cli("endpoint", "status", endpoint.name,
                       env={"FEDEXEC_HOME": str(endpoint.home), "FEDEXEC_TOKEN": token}, check=False).stdout


def cached_refs(endpoint, token: str, want: int, timeout: float = 15.0) -> int:
    """The count of cached refs the endpoint's status shows, once it is
    ``want`` (it rewrites its status each second), or the last one seen."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(r"data refs: (\d+) cached", status_of(endpoint, token))
        count = int(found.group(1)) if found else -1
        if count == want or time.monotonic() > deadline:
            return count
        time.sleep(0.3)


def two_users(tmp_path):
    data_dir = tmp_path / "relay-data"
    return {user: fedexec_cli("relay", "add-user", user, "--data-dir", data_dir).stdout.strip()
            for user in ("alice", "bob")}


@pytest.mark.timeout(240)
def test_a_put_used_by_1000_tasks_on_two_endpoints_is_fetched_once_per_endpoint(tmp_path):
    tokens = two_users(tmp_path)
    alice = {"FEDEXEC_TOKEN": tokens["alice"]}
    with running_relay(tmp_path, "--auth", "token") as address, \
            running_endpoint(tmp_path, "one", alice, relay=address, max_workers=2) as one, \
            running_endpoint(tmp_path, "two", alice, relay=address, max_workers=2) as two:
        for ep in (one, two):
            wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
        with FederatedExecutor(one.id, relay=address, token=tokens["alice"]) as ex1, \
                FederatedExecutor(two.id, relay=address, token=tokens["alice"]) as ex2:
            data = os.urandom(3 * MiB)
            ref = ex1.put(data, ttl=600)
            assert isinstance(ref, DataRef) and ref.size > len(data) and len(ref.id) == 32
            assert ref.expires == pytest.approx(time.time() + 600, abs=30)
            futures = []
            for i in range(250):   # 1,000 tasks: at top level, in containers, as keywords, through map
                ex = ex1 if i % 2 else ex2
                futures.append(ex.submit(total, ref))
                futures.append(ex.submit(total, ref, more=(ref, ref), table={"k": [ref]}))
                futures.append(ex.submit(with_options(total, max_retries=1), ref, scale=2))
            expected = [len(data), 4 * len(data), 2 * len(data)] * 250
            mapped = list(ex1.map(total, [ref] * 125)) + list(ex2.map(total, [ref] * 125, chunksize=25))
            assert [f.result(120) for f in futures] == expected
            assert mapped == [len(data)] * 250
            assert ex1.submit(memoized(head), ref).result(60) == (data[:8], len(data))
            fetches = ref.info()["fetches"]
            assert fetches == {one.id: 1, two.id: 1}, fetches   # counted by the relay, per endpoint
            assert cached_refs(one, tokens["alice"], 1) == 1
            assert cached_refs(two, tokens["alice"], 1) == 1
            # deleted: a task naming it fails with an error that names it, others go on
            ref.delete()
            with pytest.raises(DataRefError, match=ref.id) as failed:
                ex1.submit(total, [ref]).result(60)
            assert failed.value.ref == ref.id and "deleted" in str(failed.value)
            assert ex1.submit(len, b"abc").result(60) == 3
            with pytest.raises(DataRefError, match=ref.id):
                ref.info()
            # and the endpoints drop their copies (the relay tells those that fetched it)
            assert cached_refs(one, tokens["alice"], 0) == 0
            assert cached_refs(two, tokens["alice"], 0) == 0
        spool = tmp_path / "relay-data" / "spool"
        assert not [f for f in spool.glob("*/*") if f.name != "user"]   # its bytes left the quota too
        for ep in (one, two):
            assert ep.proc.poll() is None, tail(ep.log)


@pytest.mark.timeout(180)
def test_another_user_can_neither_use_nor_delete_your_ref(tmp_path):
    tokens = two_users(tmp_path)
    with running_relay(tmp_path, "--auth", "token") as address, \
            running_endpoint(tmp_path, "shared", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address) as ep:
        wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
        owner = RawClient(address, tokens["alice"])
        owner.send(P.SHARE, {"ep": ep.id, "add_users": ["bob"]})   # bob's tasks run on alice's endpoint
        assert owner.expect(P.SHARED)
        owner.close()
        with FederatedExecutor(ep.id, relay=address, token=tokens["alice"]) as alice, \
                FederatedExecutor(ep.id, relay=address, token=tokens["bob"], data_only=False) as bob:
            ref = alice.put(b"alice's data", ttl=600)
            assert alice.submit(head, ref).result(60) == (b"alice's ", 12)   # cached at the endpoint now
            # bob holding her ref (its id, size and sha256: all a pickled DataRef carries) cannot use it
            forged = DataRef(bob, ref._id, ref.size, ref.digest, ref.expires)
            with pytest.raises(DataRefError, match=f"{ref.id} is not a DataRef of user 'bob'"):
                bob.submit(head, forged).result(60)
            with pytest.raises(DataRefError, match=ref.id):
                forged.delete()
            with pytest.raises(DataRefError):
                forged.info()
            # nor by raw messages naming its id: a task, a delete, a fetch as an endpoint would
            raw = RawClient(address, tokens["bob"])
            link = TransferLink(address, token=tokens["bob"])
            try:
                fn_hash, body = serialize_function(head)
                blobs = P.Blobs()
                task_id = uuid.uuid4().bytes
                args = serialize_arguments(head, (b"x",), {})
                row = [task_id, fn_hash, blobs.ref(args), blobs.ref(body), P.TASK_CALL, P.PYTHON_VERSION,
                       {"rf": [ref.wire()]}]
                raw.send(P.SUBMIT, {"ep": ep.id, "tasks": [row]}, blobs.frames)
                failure = raw.failure_of(task_id, 20)
                assert failure["kind"] == P.REF_MISSING and ref.id in failure["msg"], failure
                raw.send(P.REF, {"op": "del", "b": ref._id, "q": b"q1"})
                answer = raw.expect(P.REF_ANSWER)
                assert answer is not None and "not a DataRef of user 'bob'" in answer.fields["err"]
                with pytest.raises(TransferError, match="no upload|may not fetch"):
                    link.fetch_bytes(big_ref(ref._id, ref.size, ref.digest))
                with pytest.raises(TransferError, match="may not fetch"):
                    link.fetch_bytes(big_ref(ref._id, ref.size, ref.digest), task_id=task_id)
                guessed = os.urandom(16)   # a guessed id is as unknown as another user's
                raw.send(P.REF, {"op": "info", "b": guessed, "q": b"q2"})
                answer = raw.expect(P.REF_ANSWER)
                assert answer is not None and "not a DataRef of user 'bob'" in answer.fields["err"]
            finally:
                raw.close()
                link.close()
            # bob's own put of the same bytes is his: fetched for him, not served from her copy
            own = bob.put(b"alice's data", ttl=600)
            assert own.id != ref.id
            assert bob.submit(head, own).result(60) == (b"alice's ", 12)
            assert own.info()["fetches"] == {ep.id: 1}
            # alice's ref is untouched by all that, and still fetched only once
            assert alice.submit(head, ref).result(60) == (b"alice's ", 12)
            assert ref.info()["fetches"] == {ep.id: 1}
        assert ep.proc.poll() is None, tail(ep.log)


def test_a_ref_expires_with_its_ttl_in_the_embedded_default():
    with FederatedExecutor(max_workers=1) as ex:
        ref = ex.put([1, 2, 3], ttl=1.5)
        idle = ex.put(b"never looked up again", ttl=1.0)   # goes by the relay's own expiry, not a lookup
        assert ex.submit(sum, ref).result(60) == 6
        assert ex.submit(len, {"a": ref}).result(60) == 1
        time.sleep(2.0)
        with pytest.raises(DataRefError, match=f"{ref.id} .*expired"):
            ex.submit(sum, ref).result(60)
        with pytest.raises(DataRefError, match="ttl is at most"):
            ex.put(b"x", ttl=10 * 365 * 24 * 3600.0)
        with pytest.raises(ValueError, match="ttl"):
            ex.put(b"x", ttl=0)
        # a DataRef travels only as a task's argument
        import pickle
        with pytest.raises(pickle.PicklingError, match="only as an argument of a task"):
            pickle.dumps(ref)
        services = ex._dispatcher.services
        spool = os.path.join(services.directory, "relay", "spool")
        deadline = time.monotonic() + 15   # (the relay looks for expired refs every 5 s)
        while (left := [f for d, _, files in os.walk(spool) for f in files if f != "user"]) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, (left, idle.id)


@pytest.mark.timeout(180)
def test_a_large_put_streams_in_chunks_and_is_used(tmp_path):
    import numpy as np

    with FederatedExecutor(max_workers=1) as ex:
        array = np.arange((BIG_THRESHOLD + 24 * MiB) // 8, dtype=np.int64)   # 40 MiB: over one frame's limit
        ref = ex.put(array)
        assert ref.size > P.MAX_FRAME
        assert ex.submit(np.sum, ref).result(120) == array.sum()
        assert ex.submit(lambda a, b: a.shape == b.shape, ref, b=ref).result(120) is True
        # a worker gets the array as a read-only view of the endpoint's copy: no task changes it for the next
        assert ex.submit(lambda a: a.flags.writeable, ref).result(60) is False
        assert ex.submit(lambda a: (a + 1)[-1], ref).result(60) == array[-1] + 1


@pytest.mark.timeout(180)
def test_a_put_survives_a_relay_kill_9(tmp_path):
    with started_federation(tmp_path, workers=1) as (relay, endpoint):
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            ref = ex.put(b"durable", ttl=600)
            short = ex.put(b"short", ttl=2)
            assert ex.submit(head, ref).result(60) == (b"durable", 7)
            relay.kill()
            time.sleep(0.5)
            relay.start()
            assert ex.submit(head, ref).result(60) == (b"durable", 7)
            assert ref.info()["expires"] == pytest.approx(ref.expires, abs=1e-3)   # its TTL kept
            # its fetch count too (the endpoint's cached copy served the task after the restart), so a
            # delete after a restart still tells the endpoint to drop its copy
            assert ref.info()["fetches"] == {endpoint.endpoint_id: 1}
            time.sleep(2.0)
            with pytest.raises(DataRefError, match=short.id):
                ex.submit(head, short).result(60)
            refs_dir = tmp_path / "relay-data" / "refs"
            assert refs_dir.stat().st_mode & 0o777 == 0o700
            for meta in refs_dir.glob("*/*"):
                assert meta.stat().st_mode & 0o777 == 0o600, meta
        assert endpoint.proc.poll() is None, tail(endpoint.log)


def add(a, b):
    return a + b


def test_a_ref_beside_futures_and_in_copies_works():
    import copy

    with FederatedExecutor(max_workers=1) as ex:
        ref = ex.put(10, ttl=600)
        assert copy.deepcopy([ref])[0] is ref and copy.copy(ref) is ref
        first = ex.submit(add, 1, 2)
        held_at_relay = ex.submit(add, first, ref)                 # a task future of this executor
        held_here = ex.submit(memoized(add), first, b=ref)         # memoized: waits in the client
        assert held_at_relay.result(60) == 13 and held_here.result(60) == 13
        assert sum(ref.info()["fetches"].values()) == 1


@pytest.mark.timeout(180)
def test_puts_count_against_the_users_byte_quota_until_deleted(tmp_path):
    with started_federation(tmp_path, "--max-bytes-per-user", str(40 * MiB), workers=1) as (relay, endpoint):
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            first = ex.put(os.urandom(25 * MiB))
            with pytest.raises(TransferError, match="quota of 41,943,040 bytes per user"):
                ex.put(os.urandom(25 * MiB))
            assert ex.submit(len, first).result(60) == 25 * MiB   # the first is untouched, and usable
            first.delete()
            second = ex.put(os.urandom(25 * MiB))                 # its room is free again
            assert ex.submit(len, second).result(60) == 25 * MiB
            spool = tmp_path / "relay-data" / "spool"
            assert len([f for f in spool.glob("*/*") if f.name != "user"]) == 1
        assert endpoint.proc.poll() is None, tail(endpoint.log)


@pytest.mark.timeout(180)
def test_an_endpoint_owner_cannot_destroy_a_users_ref_with_a_forged_result(tmp_path):
    """Alice shares an endpoint of her own making with bob; bob's task names
    his ref, so her endpoint learns its id, size and sha256. Her answer, a
    large result naming that upload of bob's (once of its size, which bob's
    client would fetch and then tell the relay to drop; once over the
    relay's limit, which the relay drops at once), must not delete his ref:
    his own endpoint still fetches it afterwards."""
    from test_client_trust import FakeEndpoint

    tokens = two_users(tmp_path)
    with running_relay(tmp_path, "--auth", "token") as address, \
            running_endpoint(tmp_path, "bobs", {"FEDEXEC_TOKEN": tokens["bob"]}, relay=address) as bobs:
        wait_connected(address, bobs.id, tokens["bob"], bobs.proc, bobs.log)

        answered = []

        def naming_the_ref(row):   # first of its size, then over the relay's limit
            ref_id, size, digest = row[6]["rf"][0]
            answered.append(row[0])
            return P.OK, big_ref(ref_id, size if len(answered) == 1 else P.MAX_FRAME * 64, digest)

        with FakeEndpoint(address, tokens["alice"], naming_the_ref) as fake:
            owner = RawClient(address, tokens["alice"])
            owner.send(P.SHARE, {"ep": fake.id, "add_users": ["bob"]})
            assert owner.expect(P.SHARED)
            owner.close()
            with FederatedExecutor(bobs.id, relay=address, token=tokens["bob"]) as bob, \
                    FederatedExecutor(fake.id, relay=address, token=tokens["bob"], data_only=False) as via_alice:
                ref = bob.put(b"bob's data", ttl=600)
                for _ in range(2):   # (what her endpoint answers is hers to choose; his ref is not)
                    with pytest.raises(Exception, match="names a DataRef"):
                        via_alice.submit(head, ref).result(60)
                assert len(answered) == 2
                time.sleep(1.0)   # (a client's DROP of a result it fetched is a message of its own)
                assert ref.info()["size"] == ref.size
                assert bob.submit(head, ref).result(60) == (b"bob's da", 10)   # fetched now, intact
        assert bobs.proc.poll() is None, tail(bobs.log)


@pytest.mark.timeout(180)
def test_a_relay_restarts_past_corrupt_ref_metadata_and_keeps_the_good_refs(tmp_path):
    """Metadata files spoiled on disk (a user that is not a name, an expiry
    that is not a number, a stray file where a user's directory goes, a
    leftover temporary file) are removed with a warning at the restart; the
    relay starts, and the sound refs beside them still work."""
    import msgpack

    with started_federation(tmp_path, workers=1) as (relay, endpoint):
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            ref = ex.put(b"sound", ttl=600)
            relay.kill()
            refs_dir = tmp_path / "relay-data" / "refs"
            (meta,) = refs_dir.glob("*/*")
            spoiled = {"u": 5, "n": 5, "h": b"\0" * 32, "e": time.time() + 600}
            for i, fields in enumerate([spoiled, {**spoiled, "u": ["x"]}, {**spoiled, "u": "a", "e": float("nan")},
                                        {**spoiled, "u": "a", "h": "text"}]):
                (meta.parent / f"{i:032x}").write_bytes(msgpack.packb(fields, use_bin_type=True))
            (meta.parent / (meta.name + ".tmp")).write_bytes(b"\x81")
            (refs_dir / "stray-file").write_bytes(b"not a directory")
            (meta.parent / ("f" * 32)).mkdir()
            relay.start()
            assert ex.submit(head, ref).result(60) == (b"sound", 5)
            assert ref.info()["size"] == ref.size
            assert sorted(p.name for p in meta.parent.iterdir()) == [meta.name, "f" * 32]
        assert endpoint.proc.poll() is None, tail(endpoint.log)


def hold(data, seconds):
    time.sleep(seconds)
    return len(data)


@pytest.mark.timeout(180)
def test_a_user_cannot_fill_a_shared_endpoints_disk_past_its_ref_cache(tmp_path):
    """Bob, on alice's shared endpoint, keeps one ref's copy in use with a
    long task and names another ref: the two do not fit the endpoint's
    ref_cache_bytes, so the second task fails saying so (the copy in use is
    not evicted, and no more is fetched); once the first ends, it fits."""
    tokens = two_users(tmp_path)
    with running_relay(tmp_path, "--auth", "token") as address, \
            running_endpoint(tmp_path, "shared", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address,
                             max_workers=2, ref_cache_bytes=2 * MiB) as ep:
        wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
        owner = RawClient(address, tokens["alice"])
        owner.send(P.SHARE, {"ep": ep.id, "add_users": ["bob"]})
        assert owner.expect(P.SHARED)
        owner.close()
        with FederatedExecutor(ep.id, relay=address, token=tokens["bob"], data_only=False) as bob:
            first, second = bob.put(os.urandom(3 * MiB // 2), ttl=600), bob.put(os.urandom(3 * MiB // 2), ttl=600)
            holding = bob.submit(hold, first, 8.0)
            deadline = time.monotonic() + 30
            while not first.info()["fetches"] and time.monotonic() < deadline:
                time.sleep(0.2)
            with pytest.raises(DataRefError, match=f"no room for DataRef {second.id}"):
                bob.submit(hold, second, 0).result(60)
            assert cached_refs(ep, tokens["alice"], 1) == 1   # (status rewritten each second)
            assert holding.result(60) == 3 * MiB // 2
            assert bob.submit(hold, second, 0).result(60) == 3 * MiB // 2   # the unused copy made room
        assert ep.proc.poll() is None, tail(ep.log)



def worker_pid(data):
    return os.getpid(), len(data)


def mapped_copies(pid: int) -> list[str]:
    """The ref copies worker ``pid`` maps, a deleted one with " (deleted)"
    (its disk space is taken until the worker lets go of it)."""
    with open(f"/proc/{pid}/maps") as maps:
        return sorted({line.split(None, 5)[-1].strip() for line in maps if "/refs/" in line})


@pytest.mark.timeout(180)
def test_a_worker_lets_go_of_the_copies_of_deleted_refs(tmp_path):
    """Refs used one after another and deleted: their copies go at the
    endpoint, and the worker that mapped them lets go of them by its next
    task with a ref, so their disk space is free again (it kept up to 16
    mappings of deleted files, space the endpoint's count no longer saw)."""
    with started_federation(tmp_path, workers=1) as (relay, endpoint):
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            pids = set()
            for _ in range(4):
                ref = ex.put(os.urandom(MiB), ttl=600)
                pid, size = ex.submit(worker_pid, ref).result(60)
                assert size == MiB
                pids.add(pid)
                copy = next(path for path in mapped_copies(pid) if ref.id in path)
                ref.delete()
                deadline = time.monotonic() + 15
                while os.path.exists(copy) and time.monotonic() < deadline:   # (the endpoint drops it)
                    time.sleep(0.1)
                assert not os.path.exists(copy)
            (pid,) = pids
            last = ex.put(os.urandom(MiB), ttl=600)
            assert ex.submit(worker_pid, last).result(60) == (pid, MiB)
            mapped = mapped_copies(pid)
            assert len(mapped) == 1 and last.id in mapped[0] and "(deleted)" not in mapped[0], mapped
        assert endpoint.proc.poll() is None, tail(endpoint.log)


@pytest.mark.timeout(180)
def test_tiny_refs_cannot_pile_up_files_at_an_endpoint(tmp_path):
    """Each cached copy costs the endpoint's ref_cache_bytes 64 KiB beyond
    its bytes (a file, an inode), so a user's many tiny refs are bounded in
    count too: with a 256 KiB cache, 12 one-byte refs used in turn leave
    exactly 3 copies (the older unused ones evicted), and all run."""
    tokens = two_users(tmp_path)
    with running_relay(tmp_path, "--auth", "token") as address, \
            running_endpoint(tmp_path, "small", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address,
                             ref_cache_bytes=256 * 1024) as ep:
        wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
        with FederatedExecutor(ep.id, relay=address, token=tokens["alice"]) as ex:
            refs = [ex.put(i, ttl=600) for i in range(12)]
            assert [ex.submit(lambda x: x + 1, ref).result(60) for ref in refs] == list(range(1, 13))
            # a copy costs its bytes + 64 KiB: three fit in 256 KiB, a fourth would not (twelve before the cost)
            assert cached_refs(ep, tokens["alice"], 3) == 3
        assert ep.proc.poll() is None, tail(ep.log)


@pytest.mark.timeout(180)
def test_a_refused_put_again_does_not_remove_the_ref_it_names(tmp_path):
    """A put naming an existing ref again, but refused (a bad TTL, no size),
    is answered with its error and leaves the ref alone: before, the
    refusal dropped the upload it named, the ref's own. So do a DROP naming
    it and a task naming it as its large arguments."""
    with started_federation(tmp_path, workers=1) as (relay, endpoint):
        with FederatedExecutor(endpoint.endpoint_id, relay=relay.address) as ex:
            ref = ex.put(b"kept", ttl=600)
            raw = RawClient(relay.address, None)
            try:
                for i, fields in enumerate([{"ttl": -1, "n": ref.size, "h": ref.digest}, {"ttl": 60}]):
                    raw.send(P.REF, {"op": "put", "b": ref._id, "q": b"again%d" % i, **fields})
                    answer = raw.expect(P.REF_ANSWER)
                    assert answer is not None and "err" in answer.fields, answer
                # nor does a DROP of it (meant for a large result received), nor a task taking it as its
                # large arguments (whose upload goes when the task ends): a ref goes by ref.delete() only
                raw.send(P.DROP, {"b": ref._id})
                fn_hash, body = serialize_function(head)
                blobs = P.Blobs()
                task_id = uuid.uuid4().bytes
                row = [task_id, fn_hash, blobs.ref(big_ref(ref._id, ref.size, ref.digest)), blobs.ref(body),
                       P.TASK_CALL, P.PYTHON_VERSION]
                raw.send(P.SUBMIT, {"ep": endpoint.endpoint_id, "tasks": [row]}, blobs.frames)
                failure = raw.failure_of(task_id, 20)
                assert failure["kind"] == P.REJECTED and "is a DataRef" in failure["msg"], failure
            finally:
                raw.close()
            assert ex.submit(head, ref).result(60) == (b"kept", 4)   # its first use: fetched now
        assert endpoint.proc.poll() is None, tail(endpoint.log)


def count_and_size(*refs, extra=b""):
    return len(refs), sum(refs), len(extra)


def test_a_task_naming_many_refs_or_with_long_inline_arguments_runs():
    """The agent wraps a task's arguments with the files of its DataRefs (a
    local reference); past 4 KiB (about 45 refs, or inline arguments of
    that size beside one ref) the worker took the wrapper for a pickle."""
    with FederatedExecutor(max_workers=1) as ex:
        refs = [ex.put(i) for i in range(100)]
        assert ex.submit(count_and_size, *refs).result(60) == (100, sum(range(100)), 0)
        assert ex.submit(count_and_size, refs[0], refs[1], extra=b"x" * 20000).result(60) == (2, 1, 20000)
