"""An executor's ``initializer``: run once in each worker before the first
of that executor's tasks there, as ProcessPoolExecutor's ``initializer``
and ``initargs`` are.

The executor pickles the initializer and its arguments once, at
construction (:class:`Setup`), and sends each of its functions wrapped in
:class:`Initialized` (pickled once per function, as any function is). A
worker runs the setup before the first call of any such function and
remembers it by the setup's key, so later tasks of that executor skip it;
tasks that do not use the feature carry nothing more. If the initializer
raises, that worker remembers the failure and every task of that executor
it gets fails with :class:`~fedexec.InitializerFailed` (a
``BrokenExecutor``) naming the initializer, as ProcessPoolExecutor fails
its tasks with ``BrokenProcessPool``; the worker itself lives on for other
executors' tasks.

Workers outlive executors on a long-running endpoint: each executor has its
own key, so its initializer runs again for it, in the same process that
earlier executors' initializers ran in.
"""

from __future__ import annotations

import functools
import io
import multiprocessing.synchronize
import os
import threading
import traceback
from collections import ChainMap
from typing import Any, Callable

import cloudpickle

from ..errors import InitializerFailed, SerializationError

_lock = threading.Lock()
# setup key -> None (ran) or the failure's message, in this worker process
_ran: dict[bytes, str | None] = {}


class Setup:
    """An executor's initializer and its arguments, pickled once; ``key``
    tells one executor's setup from another's."""

    __slots__ = ("key", "name", "blob")

    def __init__(self, initializer: Callable[..., Any], initargs: tuple[Any, ...] = ()) -> None:
        if not callable(initializer):
            raise TypeError("initializer must be a callable")
        self.key = os.urandom(16)
        self.name = getattr(initializer, "__qualname__", None) or repr(initializer)
        try:
            self.blob = _dumps((initializer, tuple(initargs)))
        except Exception as exc:
            raise SerializationError(
                f"cannot serialize the initializer {self.name}() with its initargs, which go to each worker: "
                f"{type(exc).__name__}: {exc} (locks and open files cannot travel to another process; make "
                "them in the initializer instead)") from exc

    def __getstate__(self) -> tuple[bytes, str, bytes]:
        return self.key, self.name, self.blob

    def __setstate__(self, state: tuple[bytes, str, bytes]) -> None:
        self.key, self.name, self.blob = state

    def ensure(self) -> None:
        """Run the initializer in this process unless it ran already; raise
        :class:`~fedexec.InitializerFailed` if it failed (now or before)."""
        state = _ran.get(self.key, self)   # (self: not run yet; a dict read needs no lock)
        if state is None:
            return
        with _lock:
            state = _ran.get(self.key, self)
            if state is self:
                state = _ran[self.key] = self._run()
        if state is not None:
            raise InitializerFailed(state, initializer=self.name)

    def _run(self) -> str | None:
        try:
            initializer, initargs = cloudpickle.loads(self.blob)
            initializer(*initargs)
        except BaseException as exc:   # SystemExit too: this worker must go on to say so
            where = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]).rstrip()
            return (f"the executor's initializer {self.name}() raised {type(exc).__qualname__}: {exc} in the "
                    f"worker (pid {os.getpid()}), so its tasks cannot run there; fix the initializer (or its "
                    f"initargs) and make a new executor. End of its traceback:\n{where}")
        return None


def _fresh(factory: Callable[[], Any]) -> Callable[[Any], tuple[Callable[[], Any], tuple[()]]]:
    return lambda lock: (factory, ())


class _SetupPickler(cloudpickle.CloudPickler):
    """Pickles an initializer and its initargs, with any lock among them
    (threading's, multiprocessing's) as a new lock of the same kind: a lock
    cannot be shared with a worker that may be on another machine, and what
    an initializer is given a lock for (tqdm's ``set_lock``, say: to keep
    its workers' output apart) is then served by a lock of the worker's
    own."""

    dispatch_table = ChainMap({
        type(threading.Lock()): _fresh(threading.Lock),
        type(threading.RLock()): _fresh(threading.RLock),
        multiprocessing.synchronize.Lock: _fresh(multiprocessing.Lock),
        multiprocessing.synchronize.RLock: _fresh(multiprocessing.RLock),
    }, cloudpickle.CloudPickler.dispatch_table)


def _dumps(value: Any) -> bytes:
    out = io.BytesIO()
    _SetupPickler(out, protocol=5).dump(value)
    return out.getvalue()


class Initialized:
    """A task's function, wrapped to run its executor's :class:`Setup` first."""

    __slots__ = ("fn", "setup", "__wrapped__")

    def __init__(self, fn: Callable[..., Any], setup: Setup) -> None:
        self.fn = fn
        self.setup = setup
        self.__wrapped__ = fn

    def __getstate__(self) -> tuple[Callable[..., Any], Setup]:
        return self.fn, self.setup

    def __setstate__(self, state: tuple[Callable[..., Any], Setup]) -> None:
        self.fn, self.setup = state
        self.__wrapped__ = self.fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.setup.ensure()
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{self.fn!r} (after initializer {self.setup.name})"


def wrapper(setup: Setup | None) -> Callable[[Callable[..., Any]], Callable[..., Any]] | None:
    """What the executor's function cache wraps each function in (None: nothing)."""
    return None if setup is None else functools.partial(Initialized, setup=setup)
