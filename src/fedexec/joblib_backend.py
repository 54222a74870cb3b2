"""A joblib backend, "fedexec": ``joblib.Parallel`` work (and so scikit-learn's
``n_jobs``) runs on fedexec endpoints.

>>> import joblib
>>> with joblib.parallel_config("fedexec"):                  # the embedded default
...     squares = joblib.Parallel()(joblib.delayed(pow)(i, 2) for i in range(10))
>>> with joblib.parallel_config("fedexec", endpoint_id=ENDPOINT_ID, relay=RELAY):
...     GridSearchCV(model, grid, n_jobs=-1).fit(X, y)

``parallel_config("fedexec", endpoint_id=None, **options)``: ``endpoint_id``
and ``options`` are :class:`~fedexec.FederatedExecutor`'s (``relay``,
``max_workers`` for the embedded default, ``resource_specification``, ...).
Each batch of calls joblib makes (joblib's auto-batching sizes them from how
long batches take) is one fedexec task. ``n_jobs=-1`` (the default under
this backend) means every worker of the endpoint(s), ``-2`` all but one
(at least 2 in any case: joblib runs ``n_jobs=1`` in this process), a
positive number that many batches in flight.

The backend makes its executor on first use and keeps it for the Parallel
calls made under the same ``parallel_config`` block (an embedded default
starts once, not per call); it is shut down when the backend is no longer
referenced, at interpreter exit in any case, or at once by the backend's
``close()`` (``with parallel_config("fedexec") as config: ...;
config["backend"].close()``).

Importing ``fedexec`` registers the backend without importing joblib: if
joblib is not imported yet, an import hook registers it when joblib is
(:func:`install_hook`); then ``Parallel(backend="fedexec")`` works too. This
module imports joblib only then.
"""

from __future__ import annotations

import sys
import threading
import weakref
from concurrent.futures import Future
from types import ModuleType
from typing import Any, Callable

BACKEND_NAME = "fedexec"


def _joblib_backend_class() -> type:
    """The backend class, made on first use (it subclasses joblib's classes)."""
    global _BACKEND_CLASS
    if _BACKEND_CLASS is not None:
        return _BACKEND_CLASS
    from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase

    class FedexecBackend(AutoBatchingMixin, ParallelBackendBase):
        """joblib's ParallelBackend on a :class:`~fedexec.FederatedExecutor`."""

        supports_retrieve_callback = True   # results come through retrieve_result_callback
        supports_sharedmem = False          # tasks run in other processes, maybe other machines
        uses_threads = False
        default_n_jobs = -1                 # all of the endpoint's workers unless told otherwise

        def __init__(self, endpoint_id: str | list[str] | None = None, *, nesting_level: int | None = None,
                     inner_max_num_threads: int | None = None, **executor_options: Any) -> None:
            super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
            self._endpoint_id = endpoint_id
            self._executor_options = executor_options
            self._executor: Any = None
            self._executor_lock = threading.Lock()
            self._pending: set[Future] = set()   # this Parallel call's batches not yet finished

        def executor(self) -> Any:
            """This backend's FederatedExecutor, made on first use."""
            with self._executor_lock:
                if self._executor is None:
                    from .executor import FederatedExecutor

                    executor = FederatedExecutor(self._endpoint_id, **self._executor_options)
                    # shut down (finishing what it has) once this backend is unreferenced
                    self._finalizer = weakref.finalize(self, executor.shutdown, wait=False)
                    self._executor = executor
                return self._executor

        def effective_n_jobs(self, n_jobs: int | None) -> int:
            """Batches in flight: ``n_jobs`` if positive, else the endpoints'
            workers counted from the end (-1: all of them), but at least 2:
            joblib runs a call of one job in this process, and a negative
            ``n_jobs`` asks for the endpoint's workers, not for that."""
            if n_jobs == 0:
                raise ValueError("n_jobs == 0 in Parallel has no meaning")
            if n_jobs is None:
                n_jobs = self.default_n_jobs
            if n_jobs < 0:
                return max(self.executor()._max_workers + 1 + n_jobs, 2)
            return n_jobs

        def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: str | None = None,
                      require: str | None = None, **options: Any) -> int:
            """Ready for a Parallel call; returns the number of batches in
            flight. ``options``: joblib's own (``max_nbytes``, ``temp_folder``,
            ...: for its local pools, they mean nothing here), and those given
            to ``Parallel(backend="fedexec", endpoint_id=..., **options)``,
            which are the executor's. (Work that needs shared memory,
            ``require="sharedmem"``, joblib itself runs in threads here: this
            backend says it has none.)"""
            given = {key: value for key, value in options.items() if key not in _JOBLIB_OWN}
            if given:
                self._take_options(given)
            self.parallel = parallel
            return self.effective_n_jobs(n_jobs)

        def _take_options(self, given: dict[str, Any]) -> None:
            """Executor options given to Parallel rather than to parallel_config."""
            wanted = {"endpoint_id": self._endpoint_id, **self._executor_options}
            with self._executor_lock:
                if self._executor is not None:
                    changed = [key for key, value in given.items() if wanted.get(key, _MISSING) != value]
                    if changed:
                        raise ValueError(f"this fedexec joblib backend's executor is already made; it cannot "
                                         f"take {', '.join(changed)} now (give them to parallel_config)")
                    return
                self._endpoint_id = given.pop("endpoint_id", self._endpoint_id)
                self._executor_options.update(given)

        def submit(self, func: Callable[[], Any], callback: Callable[[Future], Any] | None = None) -> Future:
            """Run one batch of calls (``func``, joblib's BatchedCalls) as a task."""
            future = self.executor().submit(func)
            with self._executor_lock:
                self._pending.add(future)
            future.add_done_callback(self._settled)
            if callback is not None:
                future.add_done_callback(callback)
            return future

        def _settled(self, future: Future) -> None:
            with self._executor_lock:
                self._pending.discard(future)

        def retrieve_result_callback(self, future: Future) -> Any:
            return future.result()

        def abort_everything(self, ensure_ready: bool = True) -> None:
            """A batch failed: cancel those not finished (the executor stays
            ready for the next Parallel call)."""
            with self._executor_lock:
                pending = list(self._pending)
                self._pending.clear()
            for future in pending:
                future.cancel()

        def terminate(self) -> None:
            """End of a Parallel call: the executor is kept for the next one."""
            self.reset_batch_stats()

        def close(self) -> None:
            """Shut the executor down now (waiting for its tasks; an embedded
            default stops), rather than when the backend is unreferenced. A
            later Parallel call under this backend makes a new one."""
            with self._executor_lock:
                executor, self._executor = self._executor, None
            if executor is not None:
                self._finalizer.detach()
                executor.shutdown(wait=True)

    _BACKEND_CLASS = FedexecBackend
    return FedexecBackend


_BACKEND_CLASS: type | None = None
#: the options joblib's Parallel hands every backend's configure (for its local pools)
_JOBLIB_OWN = frozenset({"max_nbytes", "temp_folder", "mmap_mode", "verbose", "context", "idle_worker_timeout"})
_MISSING = object()


def register(joblib_parallel: ModuleType | None = None) -> None:
    """Register the "fedexec" backend with joblib (``joblib_parallel``: the
    ``joblib.parallel`` module, by default imported here)."""
    if joblib_parallel is None:
        import joblib.parallel as joblib_parallel
    joblib_parallel.register_parallel_backend(BACKEND_NAME, _joblib_backend_class())


class _JoblibImportHook:
    """Waits for ``joblib.parallel`` to be imported and then registers the
    backend with it; finds nothing itself, and costs one string comparison
    per import elsewhere."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "joblib.parallel":
            return None
        for finder in sys.meta_path:   # the spec the other finders make, run with our step after it
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader:
    """Runs the real loader of ``joblib.parallel``, puts it back in its place
    on the module, and registers the backend."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        if _HOOK in sys.meta_path:   # its work is done
            sys.meta_path.remove(_HOOK)
        try:
            register(module)
        except Exception:   # never let fedexec break an import of joblib
            pass


_HOOK = _JoblibImportHook()


def install_hook() -> None:
    """Make "fedexec" a joblib backend: at once when joblib is already
    imported, else as soon as it is (an import hook; joblib is never imported
    for it). Idempotent."""
    parallel = sys.modules.get("joblib.parallel")
    if parallel is not None:
        if BACKEND_NAME not in getattr(parallel, "BACKENDS", {}):
            register(parallel)
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
