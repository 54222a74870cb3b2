"""Results over 16 MiB are kept as small ones are (relay/retained.py): read
again through Client.get_result and FederatedExecutor.reattach until their
owner deletes them (or their TTL), across a relay restart, with their spool
file charged to the owner and removed with the result."""

from __future__ import annotations

import time

import pytest

from fedexec import Client, FederatedExecutor, TaskLost

from test_access import fedexec_cli, running_endpoint, wait_connected
from test_faults import running_relay

DEADLINE = 60
SIZE = 20 * 1024 * 1024


def big_result(n):
    return bytes(range(256)) * (n // 256)


def spool_files(data) -> list:
    """The complete uploads in the relay's spool (every user's)."""
    return [f for d in (data / "spool").iterdir() if d.is_dir()
            for f in d.iterdir() if f.name != "user" and f.suffix != ".part"]


def wait_until(what: str, check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


@pytest.mark.timeout(240)
def test_a_20_mib_result_is_read_twice_until_deleted(tmp_path):
    data = tmp_path / "relay-data"
    token = fedexec_cli("relay", "add-user", "gina", "--data-dir", data).stdout.strip()
    expected = big_result(SIZE)
    with running_relay(tmp_path, "--auth", "token") as address:
        with running_endpoint(tmp_path, "gina-ep", {"FEDEXEC_TOKEN": token}, relay=address) as ep:
            wait_connected(address, ep.id, token, ep.proc, ep.log)
            with FederatedExecutor(ep.id, relay=address, token=token) as ex:
                future = ex.submit(big_result, SIZE)
                assert future.result(DEADLINE) == expected   # received (fetched, dropped, acknowledged)
                task_id = future.task_id
            time.sleep(0.5)   # its DROP and acknowledgement reach the relay: the upload stays all the same
            assert [f.stat().st_size >= SIZE for f in spool_files(data)] == [True]   # (its pickle)
            with Client(relay=address, token=token) as gina:
                assert gina.get_result(task_id) == expected
                assert gina.get_result(task_id) == expected
                assert gina.get_task(task_id)["status"] == "success"
            with FederatedExecutor(ep.id, relay=address, token=token) as ex:
                assert ex.reattach([task_id])[0].result(DEADLINE) == expected
                assert ex.reattach([task_id])[0].result(DEADLINE) == expected
            time.sleep(0.5)
            assert len(spool_files(data)) == 1
    # a restarted relay keeps it too (its row and its upload)
    with running_relay(tmp_path, "--auth", "token") as address:
        with Client(relay=address, token=token) as gina:
            assert gina.get_result(task_id) == expected
            assert gina.delete_result(task_id) is True
            with pytest.raises(TaskLost):
                gina.get_result(task_id)
        wait_until("the deleted result's upload removed from the spool", lambda: spool_files(data) == [])


@pytest.mark.timeout(240)
def test_kept_large_results_count_against_the_byte_quota_and_yield_to_new_work(tmp_path):
    """A kept 20 MiB result's upload counts against its user's byte quota
    (50 MiB here): two fit; the third result needs the room, and the oldest
    kept one goes (its row and its upload) rather than the new work failing."""
    data = tmp_path / "relay-data"
    token = fedexec_cli("relay", "add-user", "hal", "--data-dir", data).stdout.strip()
    with running_relay(tmp_path, "--auth", "token", "--max-bytes-per-user", str(50 * 1024 * 1024)) as address:
        with running_endpoint(tmp_path, "hal-ep", {"FEDEXEC_TOKEN": token}, relay=address) as ep:
            wait_connected(address, ep.id, token, ep.proc, ep.log)
            ids = []
            with FederatedExecutor(ep.id, relay=address, token=token) as ex:
                for _ in range(2):
                    future = ex.submit(big_result, SIZE)
                    assert len(future.result(DEADLINE)) == SIZE
                    ids.append(future.task_id)
                time.sleep(0.5)
                assert len(spool_files(data)) == 2
                third = ex.submit(big_result, SIZE)
                assert len(third.result(DEADLINE)) == SIZE
                ids.append(third.task_id)
            time.sleep(0.5)
            with Client(relay=address, token=token) as hal:
                with pytest.raises(TaskLost):
                    hal.get_result(ids[0])
                assert [len(hal.get_result(t)) for t in ids[1:]] == [SIZE, SIZE]
            assert len(spool_files(data)) == 2
