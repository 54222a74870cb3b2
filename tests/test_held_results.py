"""Results a worker finished are not held back behind a long task.

A worker batches the results of quick tasks and sends them between tasks
(worker/process.py); when the next task runs long, its control thread sends
what the batch holds (worker/outgoing.py). Before, the results of the quick
tasks that ran just before a long one on the same worker waited for it to
end. One worker here, so no other worker can take anything over.
"""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from fedexec import FederatedExecutor

from test_executor_contract import wait_for_gate


def quick(x):
    return x


@pytest.mark.timeout(120)
def test_quick_results_before_a_long_task_are_not_held_until_it_ends(tmp_path):
    gate = tmp_path / "gate"
    with FederatedExecutor(max_workers=1) as ex:
        assert ex.submit(quick, 0).result(60) == 0   # the worker is up
        try:
            for attempt in range(3):   # the batch the long task lands in is the pool's choice: try a few
                quicks = [ex.submit(quick, i) for i in range(500)]
                slow = ex.submit(wait_for_gate, str(gate), "opened", 60.0)
                done, pending = cf.wait(quicks, timeout=15)
                assert not pending, (f"{len(pending)} quick results still missing 15 s after they were submitted, "
                                     f"while the long task runs on the same worker")
                assert [f.result() for f in quicks] == list(range(500))
                assert not slow.done()
                gate.touch()
                assert slow.result(60) == "opened"
                gate.unlink()
        finally:
            gate.touch()
