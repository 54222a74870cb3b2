"""Run CPython's own ``test_concurrent_futures`` (its executor, wait and
as_completed test cases) against FederatedExecutor, the embedded default
with the suite's 5 workers per test.

    python benchmarks/cpython_futures_tests.py /path/to/python3.13/test/test_concurrent_futures \\
        [ExecutorTest WaitTests AsCompletedTests]

The package is the one of CPython 3.12+ (a directory with util.py,
executor.py, test_wait.py, test_as_completed.py); it is copied to a
temporary directory under another name (so it does not clash with this
interpreter's ``test`` package, whose ``test.support`` it uses) and its
relative imports are made absolute. The deadlock and shutdown cases are not
run: they test ProcessPoolExecutor's own machinery (BrokenProcessPool after
a crashed worker, scripts that name the executor class), where
FederatedExecutor fails only the task concerned and goes on; its own tests
(tests/test_executor_contract.py, tests/test_faults.py) cover those cases.
Each test starts its own embedded relay and endpoint, so the run takes a
few minutes. Before each test body the executor is *primed*: ``worker_count``
short tasks are run and waited for (at most PRIME_TIMEOUT seconds), as
CPython's own suite did for every executor up to 3.8 (``_prime_executor``,
"to reduce the probability of timeouts in the tests"); 3.9+ dropped it
because its pools' workers start in milliseconds, while here a test's first
task waits for a new relay, endpoint and worker processes (about 5 s at a
load of 20). So a timing-based case measures what it asserts, and nothing of
the start: ``test_map_timeout`` still requires two ``time.sleep(0)`` tasks
to finish, and a ``time.sleep(6)`` one not, within 5 s of ``map``.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import unittest
from concurrent.futures import Executor
from pathlib import Path

CASES = ("ExecutorTest", "WaitTests", "AsCompletedTests")
PRIME_TIMEOUT = 300.0   # seconds an executor may take to run its first tasks (a failure past it says so)
MODULES = {"ExecutorTest": "executor", "WaitTests": "test_wait", "AsCompletedTests": "test_as_completed"}


def load(source: Path, into: Path) -> str:
    """Copy the package to ``into``/cpython_cf (imports made absolute); its name."""
    target = into / "cpython_cf"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in target.glob("*.py"):
        text = path.read_text()
        text = re.sub(r"^from \.(\w+) import", r"from cpython_cf.\1 import", text, flags=re.M)
        text = re.sub(r"^from \. import", "from cpython_cf import", text, flags=re.M)
        # (3.13's flag for free-threaded builds, not in older test.support)
        text = text.replace("from test.support import Py_GIL_DISABLED", "Py_GIL_DISABLED = False")
        path.write_text(text)
    return "cpython_cf"


def prime(executor: Executor, count: int) -> None:
    """Run ``count`` short tasks on ``executor`` and wait for them: its relay,
    endpoint and workers are up before a test starts timing anything."""
    import time
    from concurrent.futures import wait

    done, pending = wait([executor.submit(time.sleep, 0.1) for _ in range(count)], timeout=PRIME_TIMEOUT)
    if pending:
        raise AssertionError(f"the executor ran {len(done)} of {count} priming tasks within {PRIME_TIMEOUT:g} s "
                             "(before the test): it did not start")
    for future in done:
        future.result()


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    source, names = Path(argv[0]), argv[1:] or list(CASES)
    from fedexec import FederatedExecutor

    with tempfile.TemporaryDirectory() as tmp:
        package = load(source, Path(tmp))
        sys.path.insert(0, tmp)   # (the embedded default gives its workers this sys.path)
        util = __import__(f"{package}.util", fromlist=["util"])

        class FederatedMixin(util.ExecutorMixin):
            executor_type = FederatedExecutor

            def setUp(self) -> None:
                super().setUp()
                prime(self.executor, self.worker_count)

        suite = unittest.TestSuite()
        for name in names:
            module = __import__(f"{package}.{MODULES[name]}", fromlist=[name])
            case = type(f"Federated{name}", (getattr(module, name), FederatedMixin, util.BaseTestCase),
                        {"__module__": __name__})
            suite.addTests(unittest.defaultTestLoader.loadTestsFromTestCase(case))
        result = unittest.TextTestRunner(verbosity=2).run(suite)
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
