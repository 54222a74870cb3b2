"""The "fedexec" joblib backend (issue 16, item 3): importing fedexec makes
it a backend name without importing joblib; ``joblib.Parallel`` work, with
joblib's auto-batching, and scikit-learn's ``GridSearchCV(n_jobs=-1)`` run on
fedexec workers (the embedded default: real relay, endpoint and workers)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import cloudpickle
import pytest

from conftest import workers_of

try:
    import joblib
    from joblib import Parallel, delayed, parallel_config
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
except ImportError as exc:   # a test that cannot run here fails saying why
    raise ImportError(f"joblib and scikit-learn are needed ({exc}): pip install -e '.[test]'") from exc

import fedexec  # noqa: F401  (registers the backend)

from test_access import fedexec_cli, running_endpoint, wait_connected
from test_faults import running_relay

# tests/ is not importable on the workers: send this module's functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square_and_pid(x):
    return x * x, os.getpid()


def home_of(x):
    return x, os.environ.get("FEDEXEC_HOME", "")


def fails_on(x, bad):
    if x == bad:
        raise ValueError(f"bad input {x}")
    return x


class PidLoggingClassifier(ClassifierMixin, BaseEstimator):
    """A nearest-centroid classifier (quick to fit) that notes the pid of each process that fits it."""

    def __init__(self, shrink_threshold=None, log=None):
        self.shrink_threshold = shrink_threshold
        self.log = log

    def fit(self, X, y):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        self.model_ = NearestCentroid(shrink_threshold=self.shrink_threshold).fit(X, y)
        self.classes_ = self.model_.classes_
        return self

    def predict(self, X):
        return self.model_.predict(X)


def fedexec_workers() -> set[int]:
    """The pids of the embedded endpoint's workers (children of this process)."""
    return {proc.pid for proc in workers_of(os.getpid())}


def test_import_registers_without_importing_joblib(tmp_path):
    code = textwrap.dedent('''
        import sys
        import fedexec
        print("joblib imported by fedexec:", "joblib" in sys.modules)
        import joblib
        from joblib.parallel import BACKENDS
        print("registered:", "fedexec" in BACKENDS)
        print("loader:", type(sys.modules["joblib.parallel"].__loader__).__name__)
        print("runs:", joblib.Parallel(backend="fedexec", max_workers=2)(joblib.delayed(abs)(-i) for i in range(4)))
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "joblib imported by fedexec: False" in out.stdout
    assert "registered: True" in out.stdout
    assert "loader: SourceFileLoader" in out.stdout   # joblib's own module is left as it was
    assert "runs: [0, 1, 2, 3]" in out.stdout
    # joblib imported first, fedexec second: registered at once
    code = "import joblib, fedexec; from joblib.parallel import BACKENDS; print('fedexec' in BACKENDS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


@pytest.fixture(scope="module")
def config():
    """One parallel_config block (one embedded default, 2 workers) for the module's tests."""
    with parallel_config("fedexec", max_workers=2) as cfg:
        try:
            yield cfg
        finally:
            cfg["backend"].close()


def test_parallel_runs_on_fedexec_workers_with_auto_batching(config, capfd):
    results = Parallel(verbose=10)(delayed(square_and_pid)(i) for i in range(2000))
    assert [value for value, _ in results] == [i * i for i in range(2000)]
    pids = {pid for _, pid in results}
    assert os.getpid() not in pids and pids <= fedexec_workers(), pids
    backend, n_jobs = joblib.parallel.get_active_backend()
    assert type(backend).__name__ == "FedexecBackend" and n_jobs is None
    assert backend.effective_n_jobs(-1) == 2 and backend.effective_n_jobs(-3) == 2   # (never 1: that runs here)
    assert backend.effective_n_jobs(5) == 5 and backend.effective_n_jobs(None) == 2
    # joblib sized the batches up from how fast they came back (its auto-batching)
    err = capfd.readouterr().err
    assert "Setting batch_size=" in err, err[-2000:]


def test_a_failing_call_raises_its_error(config):
    with pytest.raises(ValueError, match="bad input 7"):
        Parallel(n_jobs=-1, batch_size=1)(delayed(fails_on)(i, 7) for i in range(20))
    # the backend is still usable after an abort
    assert Parallel()(delayed(fails_on)(i, -1) for i in range(5)) == list(range(5))


def test_sharedmem_work_stays_in_this_process(config):
    # the backend says it shares no memory, so joblib runs such work in threads here
    results = Parallel(require="sharedmem")(delayed(square_and_pid)(i) for i in range(3))
    assert results == [(0, os.getpid()), (1, os.getpid()), (4, os.getpid())]


@pytest.mark.timeout(300)   # scikit-learn loads slowly in each worker on a loaded machine
def test_grid_search_runs_its_fits_on_fedexec(config, tmp_path):
    X, y = load_iris(return_X_y=True)
    log = tmp_path / "fits"
    grid = {"shrink_threshold": [None, 0.1, 0.5, 1.0]}
    remote = GridSearchCV(PidLoggingClassifier(log=str(log)), grid, cv=3, n_jobs=-1).fit(X, y)
    pids = [int(line) for line in log.read_text().split()]
    # 4 candidates x 3 folds on the workers, and the refit of the best here
    assert len(pids) == 13
    assert sorted(pids).count(os.getpid()) == 1
    assert set(pids) - {os.getpid()} <= fedexec_workers()
    with parallel_config("sequential"):
        local = GridSearchCV(PidLoggingClassifier(log=str(tmp_path / "local")), grid, cv=3, n_jobs=1).fit(X, y)
    assert remote.best_params_ == local.best_params_
    assert list(remote.cv_results_["mean_test_score"]) == list(local.cv_results_["mean_test_score"])
    # and a real estimator, as a user would write it
    search = GridSearchCV(KNeighborsClassifier(), {"n_neighbors": [1, 5, 15]}, cv=3, n_jobs=-1).fit(X, y)
    assert search.best_score_ > 0.9


@pytest.mark.timeout(180)
def test_parallel_on_an_endpoint_through_its_relay(tmp_path):
    """parallel_config("fedexec", endpoint_id=..., relay=..., token=...): an endpoint process of its own."""
    data = tmp_path / "relay-data"
    token = fedexec_cli("relay", "add-user", "alice", "--data-dir", data).stdout.strip()
    with running_relay(tmp_path, "--auth", "token") as address:
        with running_endpoint(tmp_path, "joblib-ep", {"FEDEXEC_TOKEN": token}, relay=address, max_workers=2) as ep:
            wait_connected(address, ep.id, token, ep.proc, ep.log)
            with parallel_config("fedexec", endpoint_id=ep.id, relay=address, token=token) as remote:
                try:
                    results = Parallel(n_jobs=-1)(delayed(home_of)(i) for i in range(50))
                    assert remote["backend"].effective_n_jobs(-1) == 2   # the endpoint's workers
                finally:
                    remote["backend"].close()
    assert [x for x, _ in results] == list(range(50))
    assert {home for _, home in results} == {str(ep.home)}   # they ran under the endpoint, not here
