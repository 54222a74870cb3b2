"""FederatedExecutor: a concurrent.futures.Executor whose tasks run on an endpoint.

``submit`` pickles the call in the caller's thread (so a bad argument fails
that future at once, and later mutation of the arguments does not leak into
the task) and hands it to one background thread, the dispatcher
(dispatcher.py, the transport), which owns the ZeroMQ socket to the relay:
it sends whatever has queued up as one batch, registers each function once
by content hash, and completes futures as results arrive. This module is
the facade: the Executor contract, futures as arguments, DataRefs, map and
shutdown.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import struct
import threading
import time
import uuid
import weakref
from collections import deque
from concurrent.futures import Executor, Future, InvalidStateError
from concurrent.futures._base import FINISHED as _FINISHED
from concurrent.futures._base import PENDING as _PENDING
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from . import protocol as P
from .config import DEFAULT_RELAY_ADDRESS, DEFAULT_WORKER_BATCH, ConfigError, relay_dir
from .auth import check_token
from .dependencies import DependentCall, FuturesFound, arguments_or_futures, dependency_error, rebuild, snapshot
from . import dataref
from .dispatcher import AUTH_GRACE, Dispatcher, TaskFuture, WorkItem
from .embedded import EmbeddedFederation
from .mpi import check_resources as check_mpi_resources
from .resources import resource_option
from .output import check_output_limit
from .shell import ShellFunction
from .transfer import BIG_THRESHOLD, TransferError, parse_big
from .errors import (
    BrokenExecutor,
    DataRefError,
    AuthenticationFailed,
    EndpointNotConnected,
    ExecutorShutDown,
    NotAuthorized,
    PayloadTooLarge,
    RelayUnavailable,
    SerializationError,
    UnknownEndpoint,
    VersionMismatch,
)
from .first_contact import (check_listening, check_relay_address, disconnected_message, resolve_endpoints,
                            unknown_endpoint_message, warn_disconnected)
from .worker.initializer import Setup, wrapper
from .serialize import (
    content_hash,
    serialize_arguments,
    serialize_chunk,
    serialize_data_arguments,
    serialize_data_chunk,
    serialize_function,
)

if TYPE_CHECKING:
    from .client import RelayQuestions

log = logging.getLogger("fedexec.executor")

_live_executors: "weakref.WeakSet[FederatedExecutor]" = weakref.WeakSet()
_global_shutdown = False


def _python_exit() -> None:
    """At interpreter exit, finish what was submitted and stop embedded services,
    as the standard executors do."""
    global _global_shutdown
    _global_shutdown = True
    for executor in list(_live_executors):
        executor.shutdown(wait=True)


try:  # run before non-daemon threads are joined, like concurrent.futures.thread
    threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover
    import atexit

    atexit.register(_python_exit)


class _FunctionCache:
    """Content hash and pickled body per function object, so a function used
    for many tasks is pickled once. Held weakly, so a function (and whatever
    it captured) is freed with its last user reference; callables that cannot
    be weakly referenced (builtins) are kept in a small bounded table.

    A function object is assumed not to change after its first submission.

    ``wrap``: what each function is wrapped in before it is pickled (an
    executor's initializer, worker/initializer.py); the cache stays keyed by
    the function itself.
    """

    def __init__(self, limit: int = 256, wrap: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None) -> None:
        self._weak: "weakref.WeakKeyDictionary[Any, tuple[bytes, bytes]]" = weakref.WeakKeyDictionary()
        self._strong: dict[int, tuple[Any, bytes, bytes]] = {}
        self._limit = limit
        self._wrap = wrap

    def lookup(self, fn: Callable[..., Any]) -> tuple[bytes, bytes]:
        try:
            entry = self._weak.get(fn)
            weak = True
        except TypeError:  # not weakly referenceable, or unhashable
            strong = self._strong.get(id(fn))
            entry = strong[1:] if strong is not None and strong[0] is fn else None
            weak = False
        if entry is not None:
            return entry
        fn_hash, body = serialize_function(fn if self._wrap is None else self._wrap(fn))
        if weak:
            self._weak[fn] = (fn_hash, body)
        else:
            if len(self._strong) >= self._limit:
                self._strong.clear()
            self._strong[id(fn)] = (fn, fn_hash, body)
        return fn_hash, body

    def add(self, fn: Any, fn_hash: bytes, body: bytes) -> None:
        """Know ``fn`` (a :class:`RegisteredFunction`) by this hash and body."""
        self._weak[fn] = (fn_hash, body)


class RegisteredFunction:
    """A function registered at the relay, as an executor submits it: by
    its id, with the body the relay keeps (fetched once per executor).
    Calling it here is an error: it runs on endpoints."""

    def __init__(self, function_id: str, name: str) -> None:
        self.function_id = function_id
        self.__name__ = self.__qualname__ = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"registered function {self.__name__} ({self.function_id}) runs on endpoints only: "
                        "submit it with submit_to_registered_function")

    def __repr__(self) -> str:
        return f"<registered function {self.__name__} {self.function_id}>"


class _TaskIds:
    """Task ids: 16 bytes each, an 8-byte ordered part and 8 random bytes.

    The random half makes an id unguessable: knowing any number of a user's
    ids says nothing of their next ones (and the relay binds an id to its
    user, first come). The ordered half (the time this executor started, in
    nanoseconds, plus one per id) makes the relay's record add new rows next
    to each other in its index rather than at random places in it, which
    costs SQLite about a third less per task.

    Ids are made ``batch`` at a time (one ``os.urandom`` call) into a list
    that :meth:`next` pops from: ``list.pop`` is atomic, so any thread may
    call it without a lock. Two threads refilling at once each make a
    batch from a block of order numbers of its own, so no id repeats."""

    def __init__(self, batch: int = 1024) -> None:
        self._batch = batch
        self._start = time.time_ns()
        self._blocks = itertools.count()   # next() of a count is atomic too
        self._ids: list[bytes] = []

    def next(self) -> bytes:
        try:
            return self._ids.pop()
        except IndexError:
            pass
        batch = self._batch
        first = self._start + next(self._blocks) * batch
        noise = struct.unpack(f">{batch}Q", os.urandom(8 * batch))
        pack = _ID.pack
        ids = [pack(first + i, noise[i]) for i in range(batch - 1, -1, -1)]
        own = ids.pop()
        self._ids = ids
        return own


_ID = struct.Struct(">QQ")   # a task id: its ordered part, its random part


class FederatedExecutor(Executor):
    """Run functions on a fedexec endpoint through the standard Executor API.

    ``FederatedExecutor()`` with no endpoint and no relay starts a private
    relay and a local endpoint with ``max_workers`` workers (default: the
    usable cores) and stops them on :meth:`shutdown`. With an ``endpoint_id``
    it sends tasks to that endpoint through ``relay`` (default:
    ``$FEDEXEC_RELAY``, else the relay started by ``fedexec relay start`` in the
    fedexec home, else ``tcp://127.0.0.1:55700``). A list of endpoint ids, or
    the name of a group made with ``fedexec group set`` (any string that is not
    a UUID names a group), is a group: the relay runs each task on one member
    with free capacity, preferring one the function is warm on, and moves a
    task to a live member when the one it went to is lost.

    Functions are registered once by content hash; each function *object* is
    pickled once, on its first submission, so later changes to its globals or
    closure are not seen (as with Globus Compute's executor).

    ``data_only``: whether arguments travel and results are loaded as plain
    data only (see ``serialize.DATA_TYPES``), never as pickles. Unpickling a
    result runs whatever code the pickle names, so it trusts the endpoint's
    owner with this process. True: always (arguments that are not plain data
    fail with :class:`~fedexec.SerializationError`; a result or exception
    that is not plain data fails with :class:`~fedexec.DeserializationError`
    and is never loaded), whatever the endpoint says; its workers answer in
    the format the arguments came in. False: pickles, for an endpoint you
    trust (ValueError if the endpoint is data-only). None (the default):
    data only when the endpoint (or a member of the group) is data-only, or
    belongs to another user; pickles on your own endpoints.

    What a task writes to stdout and stderr on its worker comes back on its
    future (``future.stdout``, ``future.stderr``: see :mod:`fedexec.output`);
    ``echo_output``: also write it to this process's ``sys.stdout`` and
    ``sys.stderr`` as each task finishes, every line prefixed with
    ``[<last 8 hex digits of the task id>]`` (the end of ``future.task_id``).
    ``output_limit``: the bytes of each stream a task's result carries at
    most (the last ones; 0: none), for this executor's tasks; the endpoint's
    own limit (1 MiB by default) still caps it. None: the endpoint's.

    ``resource_specification``: what each task needs of its node(s), e.g.
    ``{"cores": 2, "memory": "4G", "gpus": 1}`` (see :mod:`fedexec.resources`
    and :class:`with_options`); the endpoint runs a task only where that is
    free. Unknown keys and bad values raise ValueError.

    As with ProcessPoolExecutor: an int first argument is ``max_workers``
    (``FederatedExecutor(4)``: four workers on the embedded default), and
    ``initializer(*initargs)`` runs once in each worker before the first of
    this executor's tasks there; if it raises, the tasks sent to that worker
    fail with :class:`~fedexec.InitializerFailed` (a ``BrokenExecutor``)
    naming it. The initializer and its initargs are pickled once, here.

    First contact (first_contact.py): a relay address not of the form
    ``tcp://HOST:PORT`` (or ``ipc://PATH``) is a ValueError here; nothing
    listening there is :class:`~fedexec.RelayUnavailable` within seconds;
    an id or name no endpoint goes by is :class:`~fedexec.UnknownEndpoint`
    (the name of an endpoint configured on this machine, ``fedexec endpoint
    configure NAME``, is accepted where an id is). An endpoint the relay
    knows but that is not connected is warned about
    (:class:`~fedexec.EndpointNotConnectedWarning`: tasks wait for it);
    ``wait_for_endpoint``: wait that many seconds for it to connect instead,
    then raise :class:`~fedexec.EndpointNotConnected`.
    """

    def __init__(self, endpoint_id: str | list[str] | int | None = None, *, relay: str | None = None,
                 max_workers: int | None = None, batch_size: int = 1024, batch_window: float = 0.0,
                 prefetch: int | None = None, worker_batch: int | None = None,
                 memoize: bool = False, trace: bool = False, max_retries: int = 0,
                 task_timeout: float | None = None, max_in_flight: int | None = 100_000,
                 token: str | None = None, relay_public_key: str | None = None,
                 connect_timeout: float = 30.0, data_only: bool | None = None,
                 max_payload: int | None = None, echo_output: bool = False,
                 resource_specification: dict[str, Any] | None = None, output_limit: int | None = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                 wait_for_endpoint: float | None = None) -> None:
        if isinstance(endpoint_id, int) and not isinstance(endpoint_id, bool):   # FederatedExecutor(4)
            if max_workers is not None:
                raise ConfigError("max_workers is given twice: as the first argument and as max_workers=")
            endpoint_id, max_workers = None, endpoint_id
        if max_workers is not None and max_workers <= 0:
            raise ConfigError("max_workers must be greater than 0")
        if batch_size <= 0:
            raise ConfigError("batch_size must be greater than 0")
        if not 0 <= batch_window <= 1:
            raise ConfigError("batch_window must be from 0 to 1 second")
        if prefetch is not None and prefetch < 0:
            raise ConfigError("prefetch must be >= 0")
        if worker_batch is not None and worker_batch < 1:
            raise ConfigError("worker_batch must be >= 1")
        _check_task_options(task_timeout, max_retries)
        if wait_for_endpoint is not None and (isinstance(wait_for_endpoint, bool)
                                              or not isinstance(wait_for_endpoint, (int, float))
                                              or not 0 <= wait_for_endpoint < float("inf")):
            raise ConfigError(f"wait_for_endpoint must be None or a number of seconds >= 0, not {wait_for_endpoint!r}")
        # (first: a bad initializer or initargs fails here, before anything starts)
        setup = Setup(initializer, initargs) if initializer is not None else None
        #: the resources every task asks unless with_options says otherwise (the ``rs`` option, resources.py)
        self._resources = resource_option(resource_specification)
        if data_only is not None and not isinstance(data_only, bool):
            raise ConfigError(f"data_only must be None, True or False, not {data_only!r}")
        if max_in_flight is not None and (isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int)
                                          or max_in_flight < 1):
            raise ConfigError(f"max_in_flight must be None or an integer > 0, not {max_in_flight!r}")
        self._max_in_flight = max_in_flight
        #: the bytes of each output stream a task's result carries at most (the "ol" option; None: the endpoint's)
        self._output_limit = check_output_limit(output_limit)
        self._max_retries = max_retries
        self._task_timeout = task_timeout
        services: EmbeddedFederation | None = None
        if endpoint_id is None:
            if relay is not None:
                raise ConfigError("an endpoint_id is needed to use a relay; omit both for the embedded default")
            services = EmbeddedFederation(max_workers, prefetch=1 if prefetch is None else prefetch,
                                          worker_batch=worker_batch or DEFAULT_WORKER_BATCH,
                                          max_payload=None if max_payload is None
                                          else P.check_payload_limit(max_payload))
            services.start()
            endpoint_id, relay = services.endpoint_id, services.relay_address
        else:
            # an endpoint id, a list of them (a group: each task runs on one), a group's name
            # (groups.toml) or the name of an endpoint configured here
            members, configured_relay = resolve_endpoints(endpoint_id)
            endpoint_id = members[0] if len(members) == 1 else members
            for name, value in (("max_workers", max_workers), ("prefetch", prefetch),
                                ("worker_batch", worker_batch), ("max_payload", max_payload)):
                if value is not None:
                    raise ConfigError(f"{name} only applies to the embedded default; "
                                     "a remote endpoint sets it in its config")
            relay = check_relay_address(*_relay_and_source(relay, configured_relay))
            check_listening(relay)
        try:
            check_token(relay, token, relay_public_key)   # here, not in the dispatcher thread
        except BaseException:
            if services is not None:
                services.stop()
            raise
        #: the endpoint id, or for a group the list of its members' ids (SUBMIT's ``ep``)
        self.endpoint_id: str | list[str] = endpoint_id
        self.endpoint_ids: list[str] = endpoint_id if isinstance(endpoint_id, list) else [endpoint_id]
        self.relay: str = relay
        self._task_ids = _TaskIds()
        self._batch_size = batch_size
        self._functions = _FunctionCache(wrap=wrapper(setup))
        self._registered: dict[str, RegisteredFunction] = {}   # function id -> its stand-in (submit_to_registered_function)
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._memoize = memoize
        self._trace = trace
        self._dispatcher = Dispatcher(relay, endpoint_id, batch_size, batch_window, services, token,
                                       relay_public_key)
        self._dispatcher.echo_output = bool(echo_output)
        self._dispatcher.initializer_name = setup.name if setup is not None else None
        self._serialize_arguments, self._serialize_chunk = serialize_arguments, serialize_chunk
        # a call's arguments as submit pickles them: finding futures in the same pass
        self._submit_arguments: Callable[[Callable[..., Any], tuple, dict], bytes] = arguments_or_futures
        self._dispatcher.start()
        try:
            infos = [self._lookup_endpoint(connect_timeout, wait_for_it=services is not None, services=services,
                                           endpoint_id=member) for member in self.endpoint_ids]
            if services is None:
                infos = self._await_connected(infos, wait_for_endpoint, connect_timeout)
        except BaseException:
            self.shutdown(wait=True)
            raise
        try:
            why = _data_only_reason(data_only, infos)
        except BaseException:
            self.shutdown(wait=True)
            raise
        #: arguments go as plain data (others fail with SerializationError), and
        #: what the endpoint returns is never unpickled here (see ``data_only``)
        self.data_only: bool = why is not None
        if why is not None:
            self._serialize_arguments, self._serialize_chunk = serialize_data_arguments, serialize_data_chunk
            self._submit_arguments = serialize_data_arguments
            self._dispatcher.data_only_why = why
            self._dispatcher.data_only = True
        #: the endpoints' worker count; Dask reads it to size its concurrency
        self._max_workers = max(1, sum(int(info.get("workers") or 0) for info in infos))
        self.endpoint_name: str = ",".join(str(info.get("name", "")) for info in infos)
        _live_executors.add(self)

    def _lookup_endpoint(self, timeout: float, *, wait_for_it: bool,
                         services: EmbeddedFederation | None, endpoint_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            future: Future = Future()
            self._dispatcher.post("lookup", (endpoint_id, future))
            while not future.done():
                handshake = self._dispatcher.handshake
                refused = handshake.refused_for(AUTH_GRACE) if handshake is not None else None
                if refused:
                    raise AuthenticationFailed(refused)
                if services is not None and services.failed():
                    raise BrokenExecutor(f"fedexec could not start its embedded default: {services.failed()}")
                if time.monotonic() > deadline:
                    raise RelayUnavailable(f"no answer from the relay at {self.relay} within {timeout:g} s: "
                                           "something listens there but did not answer as a fedexec relay "
                                           "(another program, or a relay too busy to answer; see "
                                           "connect_timeout)")
                try:
                    future.result(0.05)
                except TimeoutError:
                    pass
            reply = future.result()
            if reply.get("refused"):
                raise NotAuthorized(f"the relay at {self.relay} refused: {reply['refused']}")
            if reply.get("found"):
                info = reply["endpoint"]
                if info.get("py") and info["py"] != P.PYTHON_VERSION:
                    raise VersionMismatch(
                        f"endpoint {info.get('name')!r} runs Python {info['py']} but this client runs Python "
                        f"{P.PYTHON_VERSION}; pickled functions need the same minor version")
                if not wait_for_it or info.get("status") == "connected":
                    return info
            elif not wait_for_it:
                raise UnknownEndpoint(unknown_endpoint_message(self.relay, endpoint_id))
            if time.monotonic() > deadline:
                raise RelayUnavailable(f"the embedded endpoint did not connect within {timeout:g} s")
            time.sleep(0.02)

    def _await_connected(self, infos: list[dict[str, Any]], wait_for: float | None,
                         timeout: float) -> list[dict[str, Any]]:
        """The endpoints' descriptions once one of them is connected. With
        none connected: without ``wait_for``, a warning that tasks will wait
        for them; with it, asked again until one connects, or
        EndpointNotConnected after ``wait_for`` seconds."""
        if any(info.get("status") == "connected" for info in infos):
            return infos
        if wait_for is None:
            for info in infos:
                warn_disconnected(info, self.relay)
            return infos
        deadline = time.monotonic() + wait_for
        while time.monotonic() < deadline:
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
            infos = [self._lookup_endpoint(timeout, wait_for_it=False, services=None, endpoint_id=member)
                     for member in self.endpoint_ids]
            if any(info.get("status") == "connected" for info in infos):
                return infos
        raise EndpointNotConnected(f"{disconnected_message(infos[0], self.relay)}, and did not connect within "
                                   f"wait_for_endpoint={wait_for:g} s: start it ('fedexec endpoint start NAME' on "
                                   "its machine; 'fedexec endpoint status NAME' says why it is not running)")

    @property
    def resource_specification(self) -> dict[str, int] | None:
        """The resources every task of this executor asks (as Globus Compute's
        executor attribute; ``with_options(f, resources=...)`` overrides it
        per function), in the checked wire form (:mod:`fedexec.resources`);
        set it to a spec such as ``{"cores": 2, "gpus": 1}``, or None."""
        return self._resources

    @resource_specification.setter
    def resource_specification(self, spec: dict[str, Any] | None) -> None:
        self._resources = resource_option(spec)

    # -- the Executor API ----------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)`` on the endpoint; return its Future.

        Futures among the arguments (at any depth) are dependencies: the task
        runs once they are all done, on their values (see :mod:`fedexec.dependencies`)."""
        if isinstance(fn, (ShellFunction, with_options)):
            _check_shell_call(fn, args, kwargs)
            self._check_mpi_call(fn)
        try:
            future = self._submit(fn, P.TASK_CALL, lambda: self._submit_arguments(fn, args, kwargs))
        except FuturesFound as found:
            fn, memoize, extra = self._callable(fn)
            return self._submit_dependent(fn, memoize, extra, args, kwargs, None, found)
        if future._state == _FINISHED and isinstance(future._exception, SerializationError):
            fn, memoize, extra = self._callable(fn)
            return self._submit_dependent(fn, memoize, extra, args, kwargs, future)
        return future

    def _check_mpi_call(self, fn: Callable[..., Any]) -> None:
        """An MPIFunction must ask for nodes or ranks (mpi.py)."""
        if isinstance(fn, with_options):
            check_mpi_resources(fn.fn, fn.resources if fn.resources is not _UNSET else self._resources)
        else:
            check_mpi_resources(fn, self._resources)

    def _callable(self, fn: Callable[..., Any]) -> tuple[Callable[..., Any], bool, dict[str, Any] | None]:
        """The function to send, whether its calls are memoized, and the task
        options that travel with it; raises if the executor is shut down or
        ``fn`` is not callable."""
        self._check_open()
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        memoize, timeout, retries = self._memoize, self._task_timeout, self._max_retries
        resources = self._resources
        if isinstance(fn, with_options):
            memoize = fn.memoize if fn.memoize is not None else memoize
            timeout = fn.timeout if fn.timeout is not None else timeout
            retries = fn.max_retries if fn.max_retries is not None else retries
            resources = fn.resources if fn.resources is not _UNSET else resources
            fn = fn.fn
        extra: dict[str, Any] = {}
        if retries:
            extra["r"] = retries
        if timeout is not None:
            extra["to"] = timeout
        if resources is not None:
            extra["rs"] = resources
        if self._output_limit is not None:
            extra["ol"] = self._output_limit
        return fn, memoize, extra or None

    def _submit(self, fn: Callable[..., Any], kind: int, make_payload: Callable[[], bytes]) -> Future:
        fn, memoize, extra = self._callable(fn)
        future, item = self._new_task(fn, kind, make_payload, memoize, extra)
        if item is not None:
            self._post_group([item])
        return future

    def _submit_calls(self, fn: Callable[..., Any], calls: Iterable[tuple],
                      settled: "_SettledCalls | None" = None) -> list[Future]:
        """``submit(fn, *args)`` for each args tuple, handed to the dispatcher
        in groups of ``batch_size`` rather than one by one (``map``'s path).
        With ``settled``, the futures already finished are replaced by their
        outcomes after each group (see :class:`_SettledCalls`)."""
        fn, memoize, extra = self._callable(fn)
        futures: list[Future] = []
        group: list[WorkItem] = []
        try:   # once for the whole map (a weak-dictionary look-up per task was ~3 % of its cost here)
            known: tuple[bytes, bytes] | None = self._functions.lookup(fn)
        except SerializationError:
            known = None   # each task's future says why
        for args in calls:
            try:
                future, item = self._new_task(fn, P.TASK_CALL, lambda: self._submit_arguments(fn, args, {}), memoize,
                                              extra, known=known)
            except FuturesFound as found:
                future, item = self._submit_dependent(fn, memoize, extra, args, {}, None, found), None
            if item is None and isinstance(future._exception, SerializationError):
                future = self._submit_dependent(fn, memoize, extra, args, {}, future)
            futures.append(future)
            if item is not None:
                group.append(item)
                if len(group) >= self._batch_size:
                    self._post_group(group)
                    group = []
                    if settled is not None:
                        settled.compact(futures)
        if group:
            self._post_group(group)
            if settled is not None:
                settled.compact(futures)
        return futures

    def _new_task(self, fn: Callable[..., Any], kind: int, make_payload: Callable[[], bytes], memoize: bool,
                  extra: dict[str, Any] | None, future: TaskFuture | None = None,
                  known: tuple[bytes, bytes] | None = None) -> tuple[TaskFuture, WorkItem | None]:
        """A task's future (``future``, or a new one) and what travels for
        it; when its function or arguments cannot be sent, the future already
        holds the error and there is nothing to send. ``known``: ``fn``'s
        hash and body, when the caller has looked them up already."""
        submitted = time.time() if self._trace else 0.0
        try:
            fn_hash, fn_body = known if known is not None else self._functions.lookup(fn)
            payload = make_payload()
            if future is None:   # (made after the payload: a FuturesFound leaves no future behind)
                future = TaskFuture(self._dispatcher, self._task_ids.next())
            limit = self._dispatcher.max_payload
            if limit is not None and (len(payload) > limit or len(fn_body) > limit):
                self._check_size(payload)
                self._check_size(fn_body, "the function")
            if len(payload) > BIG_THRESHOLD or len(fn_body) > BIG_THRESHOLD:
                self._check_size(fn_body, "the function", P.MAX_PAYLOAD_LIMIT)   # a body travels in one frame
                if len(payload) > BIG_THRESHOLD:   # uploaded in chunks first; the task carries its reference
                    # (on the same host handed over as a file and not hashed: see transfer.big_ref)
                    payload = self._dispatcher.transfers.upload(payload, hashed=False)
        except (SerializationError, PayloadTooLarge, TransferError) as exc:
            future = future or TaskFuture(self._dispatcher, self._task_ids.next())
            future.set_exception(exc)
            return future, None
        task_id = future._task_bytes
        item = WorkItem(future, task_id, fn_hash, fn_body, payload, kind)
        item.extra = extra
        if memoize:
            item.memo_key = content_hash(fn_hash + bytes([kind]) + payload)
        if self._trace:
            item.trace = [submitted]
        return future, item

    def _submit_dependent(self, fn: Callable[..., Any], memoize: bool, extra: dict[str, Any] | None,
                          args: tuple, kwargs: dict[str, Any], failed: TaskFuture | None,
                          found: FuturesFound | None = None) -> TaskFuture:
        """A call whose arguments hold futures (``found``: their snapshot
        already made), or could not be pickled (``failed``: its future, which
        holds the error): if that is because they hold futures or DataRefs,
        a new future for the call (held here until those futures are done
        and then sent with their values in their place, or failed with a
        DependencyError); otherwise ``failed``."""
        if found is not None:   # (no DataRefs: those pickle only while collecting, dataref.py)
            blob, futures = found.blob, found.futures
        else:
            assert failed is not None
            try:
                with dataref.collecting() as refs:
                    blob, futures = snapshot((args, kwargs))
            except Exception:
                return failed   # something else cannot be pickled: the original error stands
            if refs:
                extra = self._with_refs(extra, refs)
                if extra is None:
                    return failed
                if not futures:
                    return self._submit_with_refs(fn, memoize, extra, blob)
            if not futures:
                return failed
        dispatcher = self._dispatcher
        dependent = TaskFuture(dispatcher, self._task_ids.next())
        hold = functools.partial(self._hold_dependent, fn, memoize, extra, blob, futures, dependent)
        if (memoize or self.data_only or not dispatcher.relay_deps or len(futures) > P.MAX_ITEMS
                or len(blob) > BIG_THRESHOLD   # (the relay cannot wrap results around an upload)
                or not all(type(f) is TaskFuture and f._dispatcher is dispatcher for f in futures)):
            hold()   # held here until they are done, then sent with their values
            return dependent
        # all are this executor's tasks: the relay holds it, and their values never come here
        options = dict(extra or {})
        options["d"] = [f._task_bytes for f in futures]
        _, item = self._new_task(fn, P.TASK_CALL, lambda: blob, False, options, future=dependent)
        if item is not None:
            with dispatcher._post_lock:   # (before the dispatcher can see it)
                dispatcher.relayed[item.task_id] = (futures, hold)
            self._post_group([item])
        return dependent

    def _with_refs(self, extra: dict[str, Any] | None, refs: list[dataref.DataRef]) -> dict[str, Any] | None:
        """The task options ``extra`` plus the DataRefs the arguments name
        (``rf``); None (the call fails with its pickling error) for a data-only
        executor, which sends no pickles, or too many refs."""
        wire = dataref.wire_refs(refs)
        if self.data_only or len(wire) > P.MAX_REFS:
            return None
        return {**(extra or {}), "rf": wire}

    def _submit_with_refs(self, fn: Callable[..., Any], memoize: bool, extra: dict[str, Any],
                          blob: bytes) -> TaskFuture:
        """A call whose arguments name DataRefs (``blob``, pickled while
        collecting them): sent with their ids in ``extra`` (``rf``)."""
        future, item = self._new_task(fn, P.TASK_CALL, lambda: blob, memoize, extra)
        if item is not None:
            self._post_group([item])
        return future

    def _submit_chunk(self, fn: Callable[..., Any], chunk: list[tuple]) -> Future:
        """One ``map`` chunk as a task; if its arguments name DataRefs, with
        them (pickled again while collecting, only after the ordinary
        pickling failed)."""
        future = self._submit(fn, P.TASK_CHUNK, lambda: self._serialize_chunk(fn, chunk))
        if not (future._state == _FINISHED and isinstance(future._exception, SerializationError)):
            return future
        try:
            with dataref.collecting() as refs:
                blob = self._serialize_chunk(fn, chunk)
        except Exception:
            return future
        target, memoize, extra = self._callable(fn)
        extra = self._with_refs(extra, refs) if refs else None
        if extra is None:
            return future
        chunk_future, item = self._new_task(target, P.TASK_CHUNK, lambda: blob, memoize, extra)
        if item is not None:
            self._post_group([item])
        return chunk_future

    def _serialize_with_refs(self, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> bytes:
        with dataref.collecting():
            return self._serialize_arguments(fn, args, kwargs)

    def _hold_dependent(self, fn: Callable[..., Any], memoize: bool, extra: dict[str, Any] | None, blob: bytes,
                        futures: list[Future], dependent: TaskFuture) -> None:
        """Hold a task here until ``futures`` are done, then send it with
        their values in the arguments (``blob``, from ``snapshot``), or fail
        it with a DependencyError."""
        dispatcher = self._dispatcher
        held = dispatcher.held
        lock = dispatcher._post_lock
        claimed = [False]   # ready() has taken it: from then on, a cancel is handled where it goes
        with lock:
            held.add(dependent)

        def wake() -> None:
            try:
                dispatcher.post("wake")   # it may be waiting to stop
            except RuntimeError:
                pass

        def on_cancel(future: Future) -> None:
            """Cancelled while it waits: it is dropped at once (for wait()
            and as_completed(), and so that shutdown does not wait for it)."""
            with lock:
                if not future.cancelled() or claimed[0]:
                    return   # ready() has it: failed there, or the dispatcher drops it
                held.discard(future)
            future.set_running_or_notify_cancel()
            wake()

        def ready(failed_dependency: Future | None) -> None:
            with lock:
                if dependent not in held:
                    return   # cancelled meanwhile: on_cancel dropped it
                claimed[0] = True   # it stays in `held` until it is posted
            try:
                if failed_dependency is not None:
                    _fail(dependent, dependency_error(failed_dependency))
                    return
                try:
                    if extra is not None and "rf" in extra:   # its DataRefs stay handles here (dataref.py)
                        with dataref.as_handles():
                            values = rebuild(blob, futures)
                    else:
                        values = rebuild(blob, futures)
                except Exception as exc:
                    _fail(dependent, SerializationError(f"cannot rebuild the arguments of "
                                                        f"{getattr(fn, '__qualname__', repr(fn))}() with their "
                                                        f"dependencies' values: {exc}"))
                    return
                try:
                    serialize = self._serialize_arguments
                    if extra is not None and "rf" in extra:   # (its DataRefs pickle only while collecting)
                        serialize = self._serialize_with_refs
                    _, item = self._new_task(fn, P.TASK_CALL, lambda: serialize(fn, values[0], values[1]),
                                             memoize, extra, future=dependent)
                except InvalidStateError:
                    return   # could not be sent, and was cancelled meanwhile
                if item is not None:
                    try:
                        dispatcher.post("submit", [item], 1)
                    except RuntimeError as exc:   # the dispatcher has stopped
                        _fail(dependent, BrokenExecutor(str(exc)))
            finally:
                with lock:
                    held.discard(dependent)
                wake()

        dependent.add_done_callback(on_cancel)
        DependentCall(futures, ready)

    def _check_size(self, payload: bytes, what: str = "the arguments", limit: int | None = None) -> None:
        limit = limit or self._dispatcher.max_payload
        if limit is not None and len(payload) > limit:
            message, details = P.too_large(what, len(payload), limit)
            raise PayloadTooLarge(message, **details)

    def _post_group(self, group: list[WorkItem]) -> None:
        """Hand tasks to the dispatcher, once there is room for them; if the
        executor is shut down meanwhile, their futures fail and this raises."""
        if self._max_in_flight is not None:
            self._dispatcher.wait_for_room(self._max_in_flight, len(group))
        with self._shutdown_lock:  # so no task slips in after shutdown() posted "stop"
            try:
                self._check_open()
                self._dispatcher.post("submit", group, len(group))
            except BaseException as exc:  # nothing of this group left: its futures must not hang
                for item in group:
                    if item.future.set_running_or_notify_cancel():
                        item.future.set_exception(exc if isinstance(exc, Exception) else BrokenExecutor(str(exc)))
                raise

    def reattach(self, task_ids: Iterable[str | uuid.UUID]) -> list[TaskFuture]:
        """Futures for tasks submitted earlier, by this or another process (a
        program that restarted, say), from their ids (``TaskFuture.task_id``).

        The relay keeps a result until a client has received and acknowledged
        it, and one nobody fetches until its ``--result-ttl``; a task it has no
        record of fails with :class:`~fedexec.TaskLost`.
        """
        self._check_open()
        items = []
        for value in task_ids:
            try:
                task_id = value.bytes if isinstance(value, uuid.UUID) else uuid.UUID(str(value)).bytes
            except ValueError:
                raise ConfigError(f"{value!r} is not a task id (a UUID string, as TaskFuture.task_id)") from None
            future = TaskFuture(self._dispatcher, task_id)
            future._sent = True  # it is the relay's: cancel() asks there
            items.append(WorkItem(future, task_id, b"", b"", b"", P.TASK_CALL))
        if items:
            with self._shutdown_lock:
                self._check_open()
                self._dispatcher.post("reattach", items, len(items))
        return [item.future for item in items]

    def _questions(self) -> "RelayQuestions":
        """Questions to this executor's relay (the Client API, client.py), with its credentials."""
        from .client import RelayQuestions

        dispatcher = self._dispatcher
        services = dispatcher.services
        return RelayQuestions(self.relay, dispatcher.token, dispatcher.relay_public_key,
                              services.secret_file if services is not None else None)

    def register_function(self, fn: Callable[..., Any], description: str | None = None,
                          public: bool = False) -> str:
        """Keep ``fn`` at the relay (as ``fedexec.Client.register_function``);
        its function id, for :meth:`submit_to_registered_function` here or in
        any other process of the same user (or any user's, if ``public``)."""
        self._check_open()
        return self._questions().register_function(fn, description, public)

    def submit_to_registered_function(self, function_id: str, args: tuple = (),
                                      kwargs: dict[str, Any] | None = None) -> Future:
        """``submit`` of the function registered as ``function_id`` (by
        :meth:`register_function` or ``Client.register_function``), which
        this process need not have: its body comes from the relay, once."""
        self._check_open()
        fn = self._registered.get(function_id)
        if fn is None:
            info = self._questions().get_function(function_id)
            fn = RegisteredFunction(function_id, info["function_name"])
            self._functions.add(fn, bytes.fromhex(function_id), info["function_code"])
            self._registered[function_id] = fn
        return self.submit(fn, *args, **(kwargs or {}))

    def _detach(self) -> None:
        """Shut down once the relay has every task submitted here in its
        record, not waiting for their results (fedexec.Client.close: they
        stay at the relay); futures still pending then fail, saying so."""
        with self._shutdown_lock:
            self._shutdown = True
            try:
                self._dispatcher.post("detach")
            except RuntimeError:
                pass   # stopped already
        if self._dispatcher is not threading.current_thread():
            self._dispatcher.join()
            _live_executors.discard(self)

    def _check_open(self) -> None:
        if self._shutdown:
            raise ExecutorShutDown("cannot schedule new futures after shutdown")
        if _global_shutdown:
            raise ExecutorShutDown("cannot schedule new futures after interpreter shutdown")
        if self._dispatcher.closed:
            raise BrokenExecutor(self._dispatcher.failure or "the executor's dispatcher has stopped")

    def put(self, obj: Any, ttl: float = dataref.DEFAULT_TTL) -> dataref.DataRef:
        """Store ``obj`` at the relay once, for ``ttl`` seconds (at most the
        relay's maximum), and return a small handle to pass to any number of
        tasks instead of the object: see :class:`fedexec.DataRef`. It counts
        against your byte quota at the relay until it is deleted or expires.
        A large object streams in chunks like any large payload."""
        self._check_open()
        if self.data_only:
            raise DataRefError("put() needs pickled tasks; this executor sends plain data only (data_only)")
        if not (isinstance(ttl, (int, float)) and ttl > 0):
            raise ConfigError(f"ttl must be a positive number of seconds, not {ttl!r}")
        try:
            blob = dataref.dumps_put(obj)
        except Exception as exc:
            raise SerializationError(f"cannot serialize the object to put ({type(obj).__qualname__}): {exc}") from exc
        limit = self._dispatcher.max_payload
        if limit is not None and len(blob) > limit:
            self._check_size(blob, "the object to put")
        transfers = self._dispatcher.transfers
        reference = transfers.upload(blob)
        del blob
        ref_id, size, digest = parse_big(reference)
        answer = dataref.request(transfers.get(), {"op": "put", "b": ref_id, "n": size, "h": digest,
                                                   "ttl": float(ttl)})
        return dataref.DataRef(self, ref_id, size, digest, float(answer.get("e", 0.0)))

    def _ref_request(self, ref: dataref.DataRef, op: str) -> dict[str, Any]:
        """Ask the relay about one of this executor's DataRefs (``del``, ``info``)."""
        self._check_open()
        return dataref.request(self._dispatcher.transfers.get(), {"op": op, "b": ref._id})

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None, progress: bool | str = False) -> Iterator[Any]:
        """Like :meth:`Executor.map`; with ``chunksize`` > 1 each chunk of
        arguments travels and runs as one task, as in ProcessPoolExecutor.
        With ``buffersize`` (as in Python 3.14) the iterables are read lazily
        and at most that many tasks (chunks) are out at once, topped up in
        groups as results are taken. ``progress``: True draws a progress bar
        of the calls on standard error when it is a terminal, "force" draws
        it there in any case (see :mod:`fedexec.progressbar`)."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        shell = fn.fn if isinstance(fn, with_options) else fn
        if isinstance(shell, ShellFunction):
            raise TypeError(f"{shell!r} takes keyword arguments (its command's fields), which map cannot "
                            f"pass: submit each call")
        if buffersize is not None and (isinstance(buffersize, bool) or not isinstance(buffersize, int)
                                       or buffersize < 1):
            raise ValueError("buffersize must be None or > 0.")
        bar = None
        if progress is not False:
            from .progressbar import progress_option

            bar = progress_option(progress)
        end_time = None if timeout is None else timeout + time.monotonic()
        chunked = chunksize > 1
        source: Iterator[Any] = _chunked(zip(*iterables), chunksize) if chunked else zip(*iterables)

        def submit_next(count: int | None) -> list[Future]:
            items = source if count is None else itertools.islice(source, count)
            if chunked:
                if bar is not None:
                    return [bar.expect(self._submit_chunk(fn, chunk), len(chunk)) for chunk in items]
                return [self._submit_chunk(fn, chunk) for chunk in items]
            submitted = self._submit_calls(fn, items, _SettledCalls() if bar is None else None)
            if bar is not None:
                bar.add_total(len(submitted))
                for future in submitted:
                    bar.track(future)
            return submitted

        try:
            futures: deque[Future] = deque(submit_next(buffersize))
        except BaseException:
            if bar is not None:
                bar.close()
            raise
        exhausted = buffersize is None or len(futures) < buffersize

        def result_iterator() -> Iterator[Any]:
            nonlocal exhausted
            try:
                # (no local names a value while it is yielded: the caller's dropping it frees it)
                while futures:
                    if not exhausted and len(futures) - 1 < (buffersize or 0) // 2 + 1:
                        wanted = buffersize - len(futures)  # type: ignore[operator]
                        more = submit_next(wanted)
                        exhausted = len(more) < wanted
                        futures.extend(more)
                    if chunked:
                        values = _result_or_cancel(futures.popleft(), end_time)
                        values.reverse()
                        while values:
                            yield values.pop()
                    else:
                        yield _result_or_cancel(futures.popleft(), end_time)
            finally:
                self._cancel_quietly(list(futures))
                if bar is not None:
                    bar.close()

        return result_iterator()

    def _cancel_quietly(self, futures: list[Future]) -> None:
        """Cancel what is left of a ``map`` whose iterator was abandoned: like
        ``cancel()`` on each, but without waiting for the endpoint's answers
        one by one."""
        remote: list[bytes] = []
        for future in futures:
            if future.__class__ is _Settled:   # finished already
                continue
            with future._condition:
                if future._state != _PENDING:
                    continue
                if not future._sent:  # still here: the dispatcher will skip it
                    Future.cancel(future)
                    continue
            remote.append(future._task_bytes)
        if remote:
            try:
                self._dispatcher.post("cancel_many", remote)
            except RuntimeError:
                pass  # the dispatcher has stopped; its leftovers are failed

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; optionally cancel those not yet running; with
        ``wait``, return once every remaining future is done and embedded
        services are stopped."""
        dispatcher = self._dispatcher
        in_dispatcher = dispatcher is threading.current_thread()
        cancelled = threading.Event()
        with self._shutdown_lock:
            self._shutdown = True
            try:
                if cancel_futures:
                    # The dispatcher owns the pending set: it cancels every task
                    # not running, after every submit made before now.
                    dispatcher.cancel_unsent = True
                    dispatcher.post("cancel_all", cancelled)
                dispatcher.post("stop")
            except RuntimeError:
                cancelled.set()  # it has stopped already; nothing is pending
        if cancel_futures and not in_dispatcher:
            cancelled.wait(10.0)
        if wait and not in_dispatcher:
            dispatcher.join()
            _live_executors.discard(self)
        # without wait, interpreter exit still waits for the remaining tasks,
        # as with the standard executors


class _Settled:
    """The outcome of a finished call of a ``map``, in place of its future:
    what the map's iterator asks of it (``result``, ``cancel``) without the
    future's lock, condition and lists (about 60 bytes rather than 460)."""

    __slots__ = ("_value", "_error")

    def __init__(self, value: Any, error: BaseException | None) -> None:
        self._value = value
        self._error = error

    def result(self, timeout: float | None = None) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def cancel(self) -> bool:
        return False   # it has run


class _SettledCalls:
    """Keeps the client's memory for a long ``map`` bounded by the tasks in
    flight rather than by the calls submitted.

    CPython's ``map`` submits every call before it returns, and so does this
    one (without ``buffersize``); with ``max_in_flight`` the submitting waits
    for room, so by the time the last call is submitted most of the first
    ones have finished. Their futures, which no one but the map holds, are
    replaced by :class:`_Settled` outcomes as the submission goes on: from
    the oldest call not yet replaced, up to the first one not finished (the
    calls finish about in order, so each is looked at about once). The
    iterator sees the same values, exceptions and timeouts."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0   # the first future not replaced yet

    def compact(self, futures: list[Any]) -> None:
        i, end = self._next, len(futures)
        while i < end:
            future = futures[i]
            if future.__class__ is not _Settled:
                if future._state != _FINISHED:
                    break
                futures[i] = _Settled(future._result, future._exception)
            i += 1
        self._next = i


def _result_or_cancel(future: Future, end_time: float | None) -> Any:
    """``future``'s result, waiting until ``end_time`` at most; cancelled if
    it is not done by then (``map``)."""
    try:
        return future.result() if end_time is None else future.result(end_time - time.monotonic())
    finally:
        future.cancel()


def _fail(future: Future, error: BaseException) -> None:
    """Fail a future not yet running (unless it was cancelled meanwhile)."""
    try:
        if future.set_running_or_notify_cancel():
            future.set_exception(error)
    except (RuntimeError, InvalidStateError):
        pass   # finished meanwhile


def _data_only_reason(data_only: bool | None, infos: list[dict[str, Any]]) -> str | None:
    """Why an executor takes only plain data (None: it takes pickles), from
    its ``data_only`` and what the relay said of each endpoint: whether it is
    data-only, and whether it is the asker's own (``yours``; a relay that
    does not say is taken to mean not). ValueError for data_only=False with
    a data-only endpoint."""
    says = [info for info in infos if info.get("data_only") is True]
    if data_only is False:
        if says:
            raise ConfigError(f"endpoint {says[0].get('name')!r} ({says[0].get('id')}) is data-only: it takes and "
                             "gives plain data only, never pickles, so data_only=False cannot be used with it")
        return None
    if data_only is True:
        return "it was made with data_only=True"
    if says:
        return f"endpoint {says[0].get('name')!r} ({says[0].get('id')}) is data-only"
    foreign = [info for info in infos if info.get("yours") is not True]
    if foreign:
        return (f"endpoint {foreign[0].get('name')!r} ({foreign[0].get('id')}) belongs to another user "
                f"({foreign[0].get('owner')!r}), whose results are not unpickled here unless you pass "
                "data_only=False (which trusts its owner with this process)")
    return None


def _check_shell_call(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> None:
    """A ShellFunction's call (``fn`` itself or inside ``with_options``) is
    checked in submit: its command must fill from ``kwargs``."""
    shell = fn.fn if isinstance(fn, with_options) else fn
    if isinstance(shell, ShellFunction):
        shell.check_call(args, kwargs)


def _check_task_options(timeout: float | None, max_retries: int | None) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= P.MAX_WALLTIME):
        raise ConfigError(f"timeout must be a number of seconds greater than 0 (at most {P.MAX_WALLTIME:g}), "
                         f"not {timeout!r}")
    if max_retries is not None and (isinstance(max_retries, bool) or not isinstance(max_retries, int)
                                    or not 0 <= max_retries <= P.MAX_RETRIES):
        raise ConfigError(f"max_retries must be an integer from 0 to {P.MAX_RETRIES}, not {max_retries!r}")


_UNSET = object()   # with_options(resources=...) not given: the executor's resource_specification


class with_options:
    """Options for the calls of one function, for ``submit`` and ``map``:
    ``ex.submit(with_options(f, timeout=60, max_retries=2), x)``.

    ``timeout``: the walltime of each call in seconds, enforced on the
    endpoint (the worker running a call past it is stopped and the call fails
    with :class:`~fedexec.TaskTimeout`). ``max_retries``: times a call that
    raised is run again before its exception is returned. ``memoize``: see
    :class:`memoized`. ``resources``: what each call needs of its node(s),
    e.g. ``{"cores": 4, "memory": "8G", "gpus": 1}`` or for MPI
    ``{"nodes": 2, "ranks_per_node": 4}`` (see :mod:`fedexec.resources`;
    it replaces the executor's ``resource_specification``, ``None`` asks
    for nothing beyond one core). Unknown keys and bad values raise
    ValueError here. Unset options take the executor's.
    """

    def __init__(self, fn: Callable[..., Any], *, timeout: float | None = None, max_retries: int | None = None,
                 memoize: bool | None = None, resources: dict[str, Any] | None | object = _UNSET) -> None:
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        _check_task_options(timeout, max_retries)
        option = resources if resources is _UNSET else resource_option(resources)  # type: ignore[arg-type]
        if isinstance(fn, with_options):  # the outer options win
            timeout = fn.timeout if timeout is None else timeout
            max_retries = fn.max_retries if max_retries is None else max_retries
            memoize = fn.memoize if memoize is None else memoize
            option = fn.resources if option is _UNSET else option
            fn = fn.fn
        self.fn = fn
        self.timeout = timeout
        self.max_retries = max_retries
        self.memoize = memoize
        #: the ``rs`` option (resources.py) its calls carry; _UNSET: the executor's
        self.resources: dict[str, int] | None | object = option
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class memoized(with_options):
    """Mark a function's calls as memoizable: ``ex.submit(memoized(f), x)``
    returns the earlier result of ``f(x)`` when there is one (from this
    executor, or from the relay's store), without running it again.

    The key is the hash of the function's pickled code and of the pickled
    arguments, so use it for pure functions only: side effects are not
    repeated, and arguments that pickle differently each time (sets of
    strings across processes, objects with unordered state) miss the cache.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__(fn, memoize=True)


def _chunked(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(iterable)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _relay_and_source(relay: str | None, configured: str | None) -> tuple[str, str]:
    """The relay address to use and where it came from (for errors): the
    ``relay`` argument, else ``$FEDEXEC_RELAY``, else the relay in the config
    of the endpoint named (``configured``), else the one ``fedexec relay
    start`` runs (its relay.json), else the default."""
    if relay is not None:
        return relay, "relay"
    env = os.environ.get("FEDEXEC_RELAY")
    if env:
        return env, "$FEDEXEC_RELAY"
    if configured:
        return configured, "the relay in the endpoint's config.toml"
    info = relay_dir() / "relay.json"
    try:
        import json

        return str(json.loads(info.read_text())["address"]), f"the relay address in {info}"
    except (OSError, ValueError, KeyError):
        return DEFAULT_RELAY_ADDRESS, "relay"

