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

Importing ``fedexec`` makes "fedexec" a joblib backend name without importing
joblib: see :func:`install_hook`. This module itself imports joblib.
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
                      require: str | None = None, **joblib_options: Any) -> int:
            """Ready for a Parallel call (joblib's own options, such as
            ``max_nbytes`` and ``temp_folder``, are for its local pools and
            mean nothing here); returns the number of batches in flight.
            (Work that needs shared memory, ``require="sharedmem"``, joblib
            itself runs in threads here: this backend says it has none.)"""
            self.parallel = parallel
            return self.effective_n_jobs(n_jobs)

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


def register() -> None:
    """Register the "fedexec" backend with joblib (imports joblib)."""
    import joblib

    joblib.register_parallel_backend(BACKEND_NAME, _joblib_backend_class())


def _offer(joblib_parallel: ModuleType) -> None:
    """Name the backend in joblib's table of backends registered on first use
    (``EXTERNAL_BACKENDS``, as joblib does for "dask"): nothing of this
    module's joblib classes is made until a ``parallel_config("fedexec")``."""
    external = getattr(joblib_parallel, "EXTERNAL_BACKENDS", None)
    if isinstance(external, dict):
        external.setdefault(BACKEND_NAME, register)
    else:   # a joblib without that table: register now
        joblib_parallel.register_parallel_backend(BACKEND_NAME, _joblib_backend_class())


class _JoblibImportHook:
    """Waits for ``joblib.parallel`` to be imported and then offers the
    backend to it; finds nothing itself, and costs one string comparison per
    import elsewhere."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "joblib.parallel":
            return None
        for finder in sys.meta_path:   # the spec the other finders make, run with our step after it
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _OfferingLoader(spec.loader)
                return spec
        return None


class _OfferingLoader:
    """A module loader that runs the real one, then offers the backend."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        if _HOOK in sys.meta_path:   # its work is done
            sys.meta_path.remove(_HOOK)
        try:
            _offer(module)
        except Exception:   # never let fedexec break an import of joblib
            pass

    def __getattr__(self, name: str) -> Any:   # get_source, get_filename, ...: the real loader's
        return getattr(self._loader, name)


_HOOK = _JoblibImportHook()


def install_hook() -> None:
    """Make "fedexec" a joblib backend name: at once when joblib is already
    imported, else when it is (an import hook; joblib is never imported for
    it). Idempotent."""
    parallel = sys.modules.get("joblib.parallel")
    if parallel is not None:
        _offer(parallel)
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
