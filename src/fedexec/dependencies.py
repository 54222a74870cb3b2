"""Futures as task arguments: a task that names other tasks' futures waits for them.

``ex.submit(f, ex.submit(g, 1))`` runs ``f`` on ``g``'s value. The call's
arguments are pickled at ``submit`` (so later changes to them do not leak
into the task, as for any task) with every :class:`~concurrent.futures.Future`
in them, at any depth, replaced by a placeholder (:func:`snapshot`). The
task is held in the client until all of those futures are done
(:class:`DependentCall`), and then its arguments are rebuilt with each
future's value in its place (:func:`rebuild`) and sent like any task. A
dependency that failed or was cancelled fails the task with
:class:`~fedexec.DependencyError`, which names it and chains its exception.

This costs nothing to calls without futures: plain arguments take the
usual path, and others are pickled once, finding futures on the way
(:func:`arguments_or_futures`).
"""

from __future__ import annotations

import io
import pickle
import threading
from concurrent.futures import CancelledError, Future
from concurrent.futures._base import FINISHED as _FINISHED
from typing import Any, Callable

import cloudpickle

from .errors import DependencyError
from .serialize import _SIMPLE_TYPES, PICKLE_PROTOCOL, dumps_large, serialize_arguments
from .transfer import Pieces


class _FutureFinder(cloudpickle.Pickler):
    """Pickles a value with each distinct Future in it written as a call of
    :func:`_dependency` with its index in ``found``, wherever it is nested.

    It hooks ``reducer_override``, which pickle calls only for objects that
    are not plain data (never for ints, strings, lists, dicts...) and which
    cloudpickle's own pickler calls anyway: finding the futures costs the
    pickling of a value without futures one isinstance test per such object."""

    def __init__(self, file: io.BytesIO, buffer_callback: Callable[[pickle.PickleBuffer], Any] | None = None) -> None:
        super().__init__(file, protocol=PICKLE_PROTOCOL, buffer_callback=buffer_callback)
        self.found: list[Future] = []
        self._index: dict[int, int] = {}

    def reducer_override(self, obj: Any) -> Any:  # noqa: D102 - pickle's hook
        if not isinstance(obj, Future):
            return super().reducer_override(obj)
        index = self._index.get(id(obj))
        if index is None:
            index = self._index[id(obj)] = len(self.found)
            self.found.append(obj)
        return _dependency, (index,)


_loading = threading.local()   # .values: the dependencies' values, while a snapshot loads in this thread


def _dependency(index: int) -> Any:
    """(Called as a snapshot loads) the value of dependency ``index``."""
    values = getattr(_loading, "values", None)
    if values is None or type(index) is not int or not 0 <= index < len(values):
        raise pickle.UnpicklingError(f"unknown dependency {index!r} (a task's arguments that name other tasks' "
                                     f"futures load only with their values)")
    return values[index]


def _load(blob: Any, values: list[Any]) -> Any:
    """Unpickle a :func:`snapshot` with ``values`` for its futures."""
    previous = getattr(_loading, "values", None)
    _loading.values = values
    try:
        return pickle.loads(blob)
    finally:
        _loading.values = previous


def snapshot(value: Any) -> tuple[bytes, list[Future]]:
    """``value`` pickled with its futures left out, and those futures (each
    once, in order of first appearance); no futures: an empty list (and the
    bytes are what cloudpickle makes of ``value``).

    Raises what pickling raises for anything else that cannot be pickled."""
    buffer = io.BytesIO()
    finder = _FutureFinder(buffer)
    finder.dump(value)
    return buffer.getvalue(), finder.found


class _Placeholder:
    """Pickles as the call of :func:`_dependency` that stands for a future
    (what :class:`_FutureFinder` writes)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[Any, ...]:
        return _dependency, (self.index,)


def _plain_snapshot(args: tuple) -> tuple[bytes, list[Future]] | None:
    """:func:`snapshot` of ``(args, {})`` when each argument is plain data
    (``_SIMPLE_TYPES``) or a future, the usual shape of a graph's task
    (``submit(f, previous)``, ``submit(gather, *futures)``): pickled by the
    standard pickler, without making a cloudpickle pickler for each call;
    None for any other arguments."""
    found: list[Future] = []
    index: dict[int, int] = {}
    parts: list[Any] = []
    for arg in args:
        if type(arg) in _SIMPLE_TYPES:
            parts.append(arg)
        elif isinstance(arg, Future):
            position = index.get(id(arg))
            if position is None:
                position = index[id(arg)] = len(found)
                found.append(arg)
            parts.append(_Placeholder(position))
        else:
            return None
    return pickle.dumps((tuple(parts), {}), protocol=PICKLE_PROTOCOL), found


def _values_in_hand(args: tuple) -> tuple | None:
    """``args`` with each future in them replaced by its value, when they
    are plain data (``_SIMPLE_TYPES``) and futures that have all succeeded
    already (their values are in this process): the call is then sent as
    an ordinary task, as a task held here for its futures would be once
    they are done, without holding it (the leaves of a fan-out submitted
    after its root finished). None for any other arguments (also when a
    future is not done, or failed: that takes the path that waits for it
    or fails the task with a DependencyError)."""
    values: list[Any] = []
    any_future = False
    for arg in args:
        if type(arg) in _SIMPLE_TYPES:
            values.append(arg)
        elif isinstance(arg, Future) and arg._state == _FINISHED and arg._exception is None:  # type: ignore[attr-defined]
            values.append(arg._result)  # type: ignore[attr-defined]
            any_future = True
        else:
            return None
    return tuple(values) if any_future else None


class FuturesFound(Exception):
    """(Internal) raised by :func:`arguments_or_futures` for arguments that
    hold futures, with their :func:`snapshot`."""

    def __init__(self, blob: bytes, futures: list[Future]) -> None:
        super().__init__("the arguments hold futures")
        self.blob = blob
        self.futures = futures


def arguments_or_futures(fn: Callable[..., Any], args: tuple, kwargs: dict) -> bytes | Pieces:
    """:func:`~fedexec.serialize.serialize_arguments` (the same bytes, at the
    same cost for plain arguments; large ones with their big buffers out of
    band, as Pieces: not copied into the pickle) in one pickling pass that
    also finds any futures in them: then it raises :class:`FuturesFound`
    with the snapshot, rather than failing on the first future and pickling
    again (a snapshot keeps every buffer in band: it loads with plain
    pickle once its futures are done)."""
    if not kwargs:
        if all(type(a) in _SIMPLE_TYPES for a in args):
            return pickle.dumps((args, kwargs), protocol=PICKLE_PROTOCOL)
        values = _values_in_hand(args)
        if values is not None:   # its futures have their values here already: an ordinary task
            return serialize_arguments(fn, values, kwargs)
        plain = _plain_snapshot(args)
        if plain is not None:   # (some are futures: else the line above took them)
            raise FuturesFound(*plain)
    futures: list[Future] = []

    def dumps(value: Any, protocol: int, buffer_callback: Any = None) -> bytes:
        buffer = io.BytesIO()
        finder = _FutureFinder(buffer, buffer_callback)
        finder.dump(value)
        futures[:] = finder.found
        return buffer.getvalue()

    try:
        blob = dumps_large(dumps, (args, kwargs))
        if futures:
            raise FuturesFound(blob.fallback() if isinstance(blob, Pieces) else blob, futures)
    except FuturesFound:
        raise
    except Exception:
        return serialize_arguments(fn, args, kwargs)   # raises the error that names the call
    return blob


def rebuild(blob: bytes, futures: list[Future]) -> Any:
    """The value of a :func:`snapshot` with each future's result in its place
    (all of them must have succeeded)."""
    return _load(blob, [future.result() for future in futures])


def dependency_name(future: Future) -> str:
    """How an error names a dependency: its task id, or the future itself."""
    task_id = getattr(future, "task_id", None)
    return str(task_id) if task_id else repr(future)


def dependency_error(future: Future) -> DependencyError:
    """The error of a task whose dependency ``future`` failed or was cancelled,
    chaining that future's exception."""
    name = dependency_name(future)
    task_id = str(getattr(future, "task_id", "") or "")
    if future.cancelled():
        error = DependencyError(f"dependency {name} was cancelled, so this task was not run", dependency=task_id)
        error.__cause__ = CancelledError(f"task {name} was cancelled")
        return error
    cause = future.exception()
    error = DependencyError(f"dependency {name} failed, so this task was not run: {type(cause).__name__}: {cause}",
                            dependency=task_id)
    error.__cause__ = cause
    return error


class DependentCall:
    """Calls ``ready(None)`` once every one of ``futures`` has succeeded, or
    ``ready(failed_future)`` as soon as one fails or is cancelled; exactly
    once, in the thread that completed the last (or failing) future, or in
    the caller's if they are all done already."""

    def __init__(self, futures: list[Future], ready: Callable[[Future | None], None]) -> None:
        self._ready = ready
        self._remaining = len(futures)
        self._fired = False
        self._lock = threading.Lock()
        if not futures:
            self._fire(None)
            return
        for future in futures:
            future.add_done_callback(self._one_done)

    def _one_done(self, future: Future) -> None:
        failed = future.cancelled() or future.exception() is not None
        with self._lock:
            if self._fired:
                return
            self._remaining -= 1
            if not failed and self._remaining:
                return
            self._fired = True
        self._ready(future if failed else None)

    def _fire(self, failed: Future | None) -> None:
        with self._lock:
            if self._fired:
                return
            self._fired = True
        self._ready(failed)


# -- held at the relay -------------------------------------------------------------
# A task whose dependencies are all tasks of the same executor goes to the relay
# at once, its arguments pickled as by snapshot() with option "d" naming the
# tasks whose futures the placeholders 0, 1, ... stand for. The relay holds it
# until they have finished (relay/graph.py) and then sends it with their results
# wrapped around its arguments (wrap_arguments): loading that in the worker
# (an ordinary pickle.loads there) calls load_with_results, which puts each
# result's value in its place. The relay never unpickles either.


def load_with_results(args: bytes, results: list[bytes]) -> Any:
    """(In the worker) a task's ``(args, kwargs)`` with its dependencies'
    results (pickled, or plain data) in place of their placeholders."""
    from .serialize import decode_data, is_data

    values = [_result_in_file(blob) if blob.startswith(IN_FILE) else decode_data(blob) if is_data(blob)
              else pickle.loads(blob) for blob in results]
    return _load(args, values)


# A dependency's result too large to wrap in (one that travels in chunks: a file
# its worker wrote into the endpoint's spool) stands in the results as IN_FILE,
# the dependency's id and the file's size; the file itself is named, under that
# id, by the DataRef-style wrapper around the arguments (dataref.wrap_arguments:
# a local reference only the endpoint agent makes, whose files a sandbox
# shares), so the worker maps it as it maps a DataRef's file.
IN_FILE = b"\x00fedexec-dep-file\x00"


def result_in_file(dependency: bytes, size: int) -> bytes:
    """(The endpoint) what stands for a dependency's result kept in a file."""
    return IN_FILE + dependency + size.to_bytes(8, "little")


def _result_in_file(blob: bytes) -> Any:
    from . import dataref
    from .serialize import deserialize_large
    from .transfer import load_local, local_ref

    at = len(IN_FILE)
    dependency, size = blob[at:at + 16], int.from_bytes(blob[at + 16:at + 24], "little")
    files = getattr(dataref._local, "files", None)
    path = files.get(dependency) if isinstance(files, dict) else None
    if path is None:
        raise pickle.UnpicklingError(f"the result of task {dependency.hex()}, which this task depends on, is not "
                                     f"available where it runs")
    return load_local(local_ref(path, size), deserialize_large)


class _WithResults:
    """Pickles as a call of :func:`load_with_results` (what the relay sends)."""

    __slots__ = ("args", "results")

    def __init__(self, args: bytes, results: list[bytes]) -> None:
        self.args = args
        self.results = results

    def __reduce__(self) -> tuple[Any, ...]:
        return (load_with_results, (self.args, self.results))


def wrap_arguments(args: bytes, results: list[bytes]) -> bytes:
    """(At the relay) a dependent task's arguments with its dependencies'
    results around them, as one pickle whose loading substitutes them."""
    return pickle.dumps(_WithResults(args, results), protocol=PICKLE_PROTOCOL)
