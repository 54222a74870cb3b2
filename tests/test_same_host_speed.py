"""The same-host path without extra passes over the data (transfer.py):
arguments and results handed over as files are not hashed (sender, relay
and receivers are one OS user, the files stay in its 0700 directories), a
large result loads as views of the relay's file mapped copy-on-write, and a
receiver that fetches such an upload in chunks (another OS user's, another
machine's) still verifies it: the relay supplies its sha256, and a file
changed since it was first hashed is refused."""

from __future__ import annotations

import hashlib
import mmap
import os
import sys

import cloudpickle
import numpy as np
import pytest

from fedexec import FederatedExecutor, transfer
from fedexec.dependencies import arguments_or_futures
from fedexec.transfer import (BIG_THRESHOLD, CHUNK, HASHED, SAME_HOST_USES, Pieces, TransferError, TransferLink,
                              UploadDigests, parse_big)

from test_access import fedexec_cli
from test_faults import running_relay

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 1024 * 1024


def plus_one(array):
    return array + 1


def hashed_here():
    """(In a worker) the bytes this worker ran through sha256 for transfers."""
    from fedexec.transfer import HASHED
    return HASHED["bytes"]


def first(array, value):
    return float(array[0]) + value


def base_of(array):
    """What an array's memory finally belongs to (following .base and memoryview.obj)."""
    owner = array
    while True:
        nxt = getattr(owner, "base", None)
        if nxt is None and isinstance(owner, memoryview):
            nxt = owner.obj
        if nxt is None:
            return owner
        owner = nxt


def test_a_round_trip_on_the_same_host_hashes_nothing_and_the_result_is_a_mapping_of_the_relays_file():
    array = np.arange(3 * BIG_THRESHOLD // 8, dtype=np.float64)   # 48 MiB
    before, uses = HASHED["bytes"], dict(SAME_HOST_USES)
    with FederatedExecutor(max_workers=1) as ex:
        out = ex.submit(plus_one, array).result(120)
        assert out.shape == array.shape and out[0] == 1.0 and out[-1] == array[-1] + 1
        # the result's memory is the relay's file, mapped here (copy-on-write: no read, no copy) ...
        owner = base_of(out)
        assert isinstance(owner, mmap.mmap), f"the result's memory is a {type(owner).__name__}, not a mapping"
        assert len(owner) >= out.nbytes
        # ... and it may be changed, privately, as an array unpickled the usual way may
        out[0] = 42.0
        assert out[0] == 42.0
        # the client hashed nothing (neither its upload nor the result), nor did the worker (its result's file)
        assert HASHED["bytes"] == before
        assert ex.submit(hashed_here).result(60) == 0
    assert SAME_HOST_USES["upload"] == uses["upload"] + 1 and SAME_HOST_USES["fetch"] == uses["fetch"] + 1


def test_large_arguments_found_free_of_futures_keep_their_buffers_out_of_band_and_futures_still_work():
    array = np.ones(3 * BIG_THRESHOLD // 8)
    payload = arguments_or_futures(plus_one, (array,), {})
    # not pickled into one bytes object (a copy of 48 MiB): the array's own memory is a piece of it
    assert isinstance(payload, Pieces)
    assert any(np.shares_memory(np.frombuffer(part, dtype=np.uint8), array.view(np.uint8)) for part in payload.parts)
    with FederatedExecutor(max_workers=1) as ex:
        # a large array beside a future: the task waits for it and gets both
        assert ex.submit(first, array, ex.submit(first, array, 1.0)).result(120) == 3.0


def test_a_chunked_fetch_of_an_unhashed_upload_is_verified_and_a_file_changed_since_is_refused(tmp_path):
    data_dir = tmp_path / "relay-data"
    token = fedexec_cli("relay", "add-user", "alice", "--data-dir", data_dir).stdout.strip()
    payload = os.urandom(MiB) * (BIG_THRESHOLD // MiB + 3)   # 19 MiB: three chunks
    with running_relay(tmp_path, "--auth", "token") as address:
        near, far = TransferLink(address, token=token), TransferLink(address, token=token)
        try:
            assert near._same_host()
            before = HASHED["bytes"]
            ref = near.upload(payload, hashed=False)
            bid, size, digest = parse_big(ref)
            assert size == len(payload) and digest == b"" and HASHED["bytes"] == before   # handed over, not hashed
            # same host: linked and mapped without a read or a hash
            linked = tmp_path / "linked"
            assert near.fetch_file(ref, str(linked)) == len(payload) and HASHED["bytes"] == before
            assert linked.read_bytes() == payload
            mapped = near.fetch_mapped(ref)
            assert isinstance(mapped, mmap.mmap) and mapped[:] == payload and HASHED["bytes"] == before
            # a receiver that keeps to chunks (as another OS user's or machine's does): checked against the
            # sha256 the relay sends with the last chunk
            far.same_host = False
            assert far.fetch_bytes(ref) == payload
            assert HASHED["bytes"] == before + len(payload)
            # the relay's file changed after that (same size): the next chunked fetch is refused
            where = near._local_request({"op": "where", "b": bid})["p"]
            with open(where, "r+b") as f:
                f.seek(CHUNK + 5)
                f.write(b"X" if payload[CHUNK + 5:CHUNK + 6] != b"X" else b"Y")
            with pytest.raises(TransferError, match="does not match its sha256"):
                far.fetch_bytes(ref)
            # a hashed upload (a DataRef's, or any by default) is still checked on the same host too
            hashed = near.upload(payload)
            assert len(parse_big(hashed)[2]) == 32
            where = near._local_request({"op": "where", "b": parse_big(hashed)[0]})["p"]
            with open(where, "r+b") as f:
                f.write(b"X" if payload[:1] != b"X" else b"Y")
            with pytest.raises(TransferError, match="does not match its sha256"):
                near.fetch_mapped(hashed)
        finally:
            near.close()
            far.close()


def test_the_relay_hashes_an_unhashed_upload_right_whatever_order_its_chunks_are_read_in(tmp_path):
    path = tmp_path / "upload"
    data = os.urandom(5 * CHUNK + 1234)
    path.write_bytes(data)
    expected, total, key = hashlib.sha256(data).digest(), len(data), str(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        def read(off):
            return os.pread(fd, CHUNK, off)

        in_order = UploadDigests()
        answers = [in_order.advance(key, fd, off, read(off), total) for off in range(0, total, CHUNK)]
        assert answers[:-1] == [None] * (len(answers) - 1) and answers[-1] == expected
        # a fetch resumed mid-file (the relay restarted): the part before is read to be hashed, at most
        # GAP_PER_FETCH bytes per message, and the fetcher asks past the end until the sha256 comes
        resumed = UploadDigests()
        assert resumed.advance(key, fd, 4 * CHUNK, read(4 * CHUNK), total) is None
        assert resumed.partial[key][1] == transfer.GAP_PER_FETCH
        assert resumed.advance(key, fd, 5 * CHUNK, read(5 * CHUNK), total) is None
        assert resumed.advance(key, fd, total, b"", total) == expected
        # a chunk asked again, and a second fetcher from the start: the same sha256, kept
        assert resumed.advance(key, fd, 5 * CHUNK, read(5 * CHUNK), total) == expected
        assert resumed.advance(key, fd, 0, read(0), total) is None
        # at most DIGESTS_KEPT files are remembered, the oldest forgotten first
        many = UploadDigests()
        for n in range(transfer.DIGESTS_KEPT + 5):
            many.advance(f"{key}.{n}", fd, 0, read(0), total)
        assert len(many.partial) == transfer.DIGESTS_KEPT and f"{key}.0" not in many.partial
    finally:
        os.close(fd)


def test_unhashed_uploads_survive_a_relay_restart_but_not_a_machine_restart(tmp_path):
    data_dir = tmp_path / "relay-data"
    token = fedexec_cli("relay", "add-user", "alice", "--data-dir", data_dir).stdout.strip()
    payload = os.urandom(MiB) * (BIG_THRESHOLD // MiB + 1)

    def fetch_in_chunks(address, ref):
        link = TransferLink(address, token=token)
        link.same_host = False
        try:
            return link.fetch_bytes(ref)
        finally:
            link.close()

    with running_relay(tmp_path, "--auth", "token") as address:
        link = TransferLink(address, token=token)
        try:
            unhashed, hashed = link.upload(payload, hashed=False), link.upload(payload)
            modes = {name: os.stat(link._local_request({"op": "where", "b": parse_big(ref)[0]})["p"]).st_mode & 0o7777
                     for name, ref in (("unhashed", unhashed), ("hashed", hashed))}
        finally:
            link.close()
    assert modes == {"unhashed": transfer.UNHASHED_MODE, "hashed": 0o600}
    # the relay restarted (a kill -9, an upgrade): both are still there, whole; a fetcher that resumes at the end
    # (after a restart mid-fetch) asks until the relay, reading GAP_PER_FETCH bytes per ask, has its sha256
    with running_relay(tmp_path, "--auth", "token") as address:
        link = TransferLink(address, token=token)
        link.same_host = False
        try:
            head = {"b": parse_big(unhashed)[0], "q": os.urandom(8), "d": True}
            assert len(payload) > transfer.GAP_PER_FETCH
            assert link._relay_digest(head, len(payload), {}) == hashlib.sha256(payload).digest()
        finally:
            link.close()
        assert fetch_in_chunks(address, unhashed) == payload and fetch_in_chunks(address, hashed) == payload
    # the machine restarted (its boot id is another): a power cut may have cut the unhashed one, which nothing
    # could tell, so it is gone, saying why; the hashed one stays (its fetcher checks it)
    (data_dir / "boot-id").write_text("another boot")
    with running_relay(tmp_path, "--auth", "token") as address:
        with pytest.raises(TransferError, match="without a sha256, and the machine restarted since"):
            fetch_in_chunks(address, unhashed)
        assert fetch_in_chunks(address, hashed) == payload
    assert (data_dir / "boot-id").read_text() == open(transfer.BOOT_ID_FILE).read().strip()
