"""Recycled payload files (relay/spares.py): on the same-host path the files
of large arguments and results are written over again instead of new ones,
but never while someone still maps them (the client's result array, a
worker's kept argument), and never for another user."""

from __future__ import annotations

import builtins
import gc
import hashlib
import os
import sys
import time

import cloudpickle
import numpy as np
import pytest

from fedexec import FederatedExecutor
from fedexec import protocol as P
from fedexec.transfer import TransferLink

from test_access import RawClient, fedexec_cli, running_endpoint, wait_connected
from test_faults import running_relay, tail

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 1024 * 1024
ITEMS = 24 * MiB // 8   # a 24 MiB float64 array: over the 16 MiB of a large payload


def plus_one(array):
    return array + 1


def keep_argument(array):
    """Keeps its (mapped) argument alive in the worker after the task."""
    builtins.__dict__.setdefault("_fedexec_test_kept", []).append(array)
    return float(array[0])


def kept_argument():
    array = builtins.__dict__["_fedexec_test_kept"][0]
    return float(array.min()), float(array.max())


PINNED: list[int] = []   # open descriptors of the files results were mapped from


def mapped_inode(array: np.ndarray) -> int | None:
    """The inode of the file whose mapping holds ``array``'s data in this
    process (None: not a file's). The file is kept open (PINNED) so that its
    inode number cannot go to another file: a number seen again is the same
    file written again, recycled, not a new file that got a freed number."""
    address = array.__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high and int(fields[4]):
                fd = os.open(f"/proc/self/map_files/{fields[0]}", os.O_RDONLY)
                PINNED.append(fd)
                return os.fstat(fd).st_ino
    return None


@pytest.fixture(autouse=True)
def unpin():
    assert os.geteuid() == 0, "these tests open /proc/self/map_files (to pin mapped files): they must run as root"
    yield
    while PINNED:
        os.close(PINNED.pop())


def trips(ex: FederatedExecutor, count: int, fill: float) -> list[int]:
    """``count`` round trips whose results are freed at once; the inodes of their files."""
    inodes = []
    for i in range(count):
        result = ex.submit(plus_one, np.full(ITEMS, fill + i)).result(120)
        assert result[0] == fill + i + 1 and result[-1] == fill + i + 1
        inodes.append(mapped_inode(result))
        del result
    assert None not in inodes, "a large result was not mapped from its file: the same-host path was not taken"
    return inodes


@pytest.mark.timeout(300)
def test_a_result_array_the_client_holds_is_never_written_over_by_later_trips():
    with FederatedExecutor(max_workers=1) as ex:
        held = ex.submit(plus_one, np.full(ITEMS, 41.0)).result(120)
        held_inode = mapped_inode(held)
        assert held_inode is not None
        later = trips(ex, 6, 100.0)
        # files were recycled (the same inodes came back), and never the held result's
        assert len(set(later)) < len(later), f"no file was recycled: {later}"
        assert held_inode not in later, (held_inode, later)
        assert held.min() == 42.0 and held.max() == 42.0
        # once it is freed, its file may serve again (its release reached the relay); no harm to others
        del held
        again = trips(ex, 4, 200.0)
        assert len(set(again)) < len(again)


@pytest.mark.timeout(300)
def test_an_argument_a_task_keeps_in_its_worker_is_never_written_over():
    with FederatedExecutor(max_workers=1) as ex:   # (one worker: the same process runs every task)
        assert ex.submit(keep_argument, np.full(ITEMS, 7.0)).result(120) == 7.0
        later = trips(ex, 6, 300.0)
        assert len(set(later)) < len(later), f"no file was recycled: {later}"
        # the worker made its kept mapping private before the relay could recycle the file
        assert ex.submit(kept_argument).result(60) == (7.0, 7.0)


def spares_of(data_dir, user: str):
    return data_dir / "spares" / hashlib.sha256(user.encode()).hexdigest()[:32]


def inodes_in(directory) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in directory.iterdir()} if directory.exists() else {}


@pytest.mark.timeout(300)
def test_another_users_trips_never_get_a_file_of_yours_nor_release_yours(tmp_path):
    data_dir = tmp_path / "relay-data"
    tokens = {user: fedexec_cli("relay", "add-user", user, "--data-dir", data_dir).stdout.strip()
              for user in ("alice", "bob")}
    # (recycling on, though this relay's data dir is on a disk; results not kept: a kept result's file
    # stays readable until its TTL, so only arguments would be recycled)
    recycling = {**os.environ, "FEDEXEC_RECYCLE_PAYLOADS": "on"}
    with running_relay(tmp_path, "--auth", "token", "--no-keep-results", env=recycling) as address:
        with running_endpoint(tmp_path, "ep", {"FEDEXEC_TOKEN": tokens["alice"]}, relay=address) as ep:
            wait_connected(address, ep.id, tokens["alice"], ep.proc, ep.log)
            owner = RawClient(address, tokens["alice"])
            try:   # (bob's tasks run on alice's endpoint, beside hers: the agent asks spares for each task's user)
                owner.send(P.SHARE, {"ep": ep.id, "add_users": ["bob"]})
                assert owner.expect(P.SHARED)
            finally:
                owner.close()
            with FederatedExecutor(ep.id, relay=address, token=tokens["alice"]) as alice, \
                    FederatedExecutor(ep.id, relay=address, token=tokens["bob"], data_only=False) as bob:
                mine = trips(alice, 4, 10.0)
                assert len(set(mine)) < len(mine), f"alice's files were not recycled: {mine}"
                held = alice.submit(plus_one, np.full(ITEMS, 1.0)).result(120)
                deadline = time.monotonic() + 10
                while not [n for n in inodes_in(spares_of(data_dir, "alice")) if n.startswith("h-")]:
                    assert time.monotonic() < deadline, "alice's mapped result was not held for her release"
                    time.sleep(0.05)
                # (her last trip's argument file is recycled once its result is committed: let her files settle)
                hers, settled = inodes_in(spares_of(data_dir, "alice")), time.monotonic()
                while time.monotonic() - settled < 1.0:
                    assert time.monotonic() < deadline + 20, "alice's recycled files kept changing"
                    time.sleep(0.1)
                    now = inodes_in(spares_of(data_dir, "alice"))
                    if now != hers:
                        hers, settled = now, time.monotonic()
                assert hers, "alice has no recycled files to be taken"
                # bob releases alice's held result by its upload id (as a forger would): nothing happens
                held_name = next(n for n in hers if n.startswith("h-"))
                forger = TransferLink(address, token=tokens["bob"])
                try:
                    forger.release([bytes.fromhex(held_name[2:])] * 2)
                    assert forger._same_host()   # (answered after the release: it was handled)
                finally:
                    forger.close()
                theirs = trips(bob, 5, 500.0)
                # bob's results are written into no recycled file at all: his tasks run on an endpoint he does
                # not own, whose agent gets spares for its owner's tasks only (review s24, finding 6)
                assert len(set(theirs)) == len(theirs), f"bob's results went into recycled files: {theirs}"
                assert not set(theirs) & set(hers.values()), "bob's payload went into a file of alice's"
                # alice's files are all still hers, untouched; her held result too
                assert inodes_in(spares_of(data_dir, "alice")) == hers
                assert held.min() == 2.0 and held.max() == 2.0
            # bob's executor as it is by default on an endpoint not his (data only): large plain-data arguments
            # pass as a file too, and the worker reads the file's format, not the reference's (was: a pickle
            # load of msgpack, "invalid load key")
            with FederatedExecutor(ep.id, relay=address, token=tokens["bob"]) as plain:
                assert plain.submit(len, b"x" * (20 << 20)).result(120) == 20 << 20
                for name in os.listdir(data_dir / "spares"):   # private, per user
                    assert os.stat(data_dir / "spares" / name).st_mode & 0o777 == 0o700
                    for f in (data_dir / "spares" / name).iterdir():
                        assert f.stat().st_mode & 0o777 == 0o600
            assert ep.proc.poll() is None, tail(ep.log)
    assert not (data_dir / "spares").exists(), "the relay left its recycled files behind as it stopped"


def test_recycled_files_are_bounded_per_user_and_in_all_and_never_cross_users(tmp_path):
    from fedexec.relay import spares as S

    def upload(name: str, size: int):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    spares = S.Spares(tmp_path / "data", enabled=True)
    big = S.MIN_BYTES
    for i in range(S.MAX_FILES + 2):   # more than a user may keep: the oldest go (unlinked)
        assert spares.keep("alice", upload(f"a{i}", big), os.urandom(16), held=False)
    assert len(list(spares.directory("alice").iterdir())) == S.MAX_FILES
    assert not spares.keep("alice", upload("small", big - 1), os.urandom(16), held=False)   # (not worth keeping)
    # a held file is not handed out, and only its own user's release (once) makes it spare
    bid = os.urandom(16)
    assert spares.keep("bob", upload("b", big), bid, held=True)
    assert spares.take("bob", big) is None
    assert not spares.release("alice", bid)
    assert spares.release("bob", bid) and not spares.release("bob", bid)
    # a user is given only their own files; a file with another name somewhere (nlink > 1) is never given
    alice_inodes = {p.stat().st_ino for p in spares.directory("alice").iterdir()}
    taken = spares.take("bob", big)
    assert taken is not None and taken.stat().st_ino not in alice_inodes and taken.parent == spares.directory("bob")
    os.link(next(spares.directory("alice").iterdir()), tmp_path / "elsewhere")
    given = [spares.take("alice", big) for _ in range(S.MAX_FILES)]
    assert given.count(None) == 1 and all(p is None or p.parent == spares.directory("alice") for p in given)
    assert spares.take("carol", big) is None
    for path in [taken, *given]:   # (a file taken is its taker's: it moves it where it writes)
        if path is not None:
            path.unlink()
    # in all: at most MAX_TOTAL_FILES, whoever keeps them
    for user in range(S.MAX_TOTAL_FILES):
        spares.keep(f"user{user}", upload(f"u{user}", big), os.urandom(16), held=False)
    kept = sum(1 for d in spares.root.iterdir() for _ in d.iterdir())
    assert kept == spares.count <= S.MAX_TOTAL_FILES
    spares.close()
    assert not spares.root.exists()
    # a new relay starts with none (what a killed one left is deleted)
    (tmp_path / "data" / "spares" / "x").mkdir(parents=True)
    assert not any(S.Spares(tmp_path / "data").root.iterdir())


def slow_plus_one(array):
    import time
    time.sleep(4)
    return array + 1


@pytest.mark.timeout(300)
def test_a_result_read_by_two_readers_is_never_recycled_under_either(tmp_path):
    """Review s24, finding 2: Client.get_result maps a result's file and
    releases nothing; when an executor then reattaches to the same result
    (maps it too, drops it, and releases its mapping), the relay must not
    recycle the file while the Client's array still reads it: a file handed
    to more than one reader is unlinked, not recycled."""
    from fedexec import Client

    data_dir = tmp_path / "relay-data"
    token = fedexec_cli("relay", "add-user", "alice", "--data-dir", data_dir).stdout.strip()
    recycling = {**os.environ, "FEDEXEC_RECYCLE_PAYLOADS": "on"}
    with running_relay(tmp_path, "--auth", "token", "--no-keep-results", env=recycling) as address:
        with running_endpoint(tmp_path, "ep", {"FEDEXEC_TOKEN": token}, relay=address) as ep:
            wait_connected(address, ep.id, token, ep.proc, ep.log)
            first = FederatedExecutor(ep.id, relay=address, token=token)
            task_id = first.submit(slow_plus_one, np.full(ITEMS, 41.0)).task_id
            time.sleep(1.0)
            first._detach()   # (the task stays at the relay, as after Client.close)
            with Client(address, token=token) as client:
                deadline = time.monotonic() + 60
                while client.get_task(task_id)["pending"]:
                    assert time.monotonic() < deadline, "the task did not finish"
                    time.sleep(0.2)
                mine = client.get_result(task_id)
                assert mine.min() == 42.0 and mine.max() == 42.0
                with FederatedExecutor(ep.id, relay=address, token=token) as second:
                    [again] = second.reattach([task_id])
                    assert again.result(60)[0] == 42.0
                    del again
                    gc.collect()
                    second.submit(len, b"x").result(30)   # (its release goes ahead of its next transfers)
                    trips(second, 6, 1000.0)   # later trips of the same user, recycling what they may
                assert mine.min() == 42.0 and mine.max() == 42.0, (mine.min(), mine.max())
            assert ep.proc.poll() is None, tail(ep.log)
