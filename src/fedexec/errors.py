"""Exceptions a fedexec user can see, all exported from :mod:`fedexec`.

Exceptions raised *by the user's function* are re-raised in the caller with
their own type; the classes here describe what went wrong around it.
"""

from __future__ import annotations

import concurrent.futures
import pickle


class FedexecError(Exception):
    """Base class of the errors fedexec itself raises."""


class SerializationError(pickle.PicklingError, FedexecError):
    """A function, its arguments or its result could not be pickled.

    Subclasses :class:`pickle.PicklingError`, as the standard executors fail
    such a task with a pickling error; the message names the offending type.
    """


class DeserializationError(FedexecError):
    """A result or exception arrived but cannot be unpickled in this process
    (typically a module installed on the endpoint but not here)."""


class RemoteExecutionError(FedexecError):
    """The function raised an exception whose type cannot be rebuilt here.

    ``type_name`` is the remote exception's qualified type name and
    ``remote_traceback`` its formatted traceback.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}\n\nRemote traceback:\n{remote_traceback}")
        self.type_name = type_name
        self.remote_traceback = remote_traceback


class WorkerLost(FedexecError):
    """The worker process running a task died before it returned a result
    (``os._exit``, a signal such as SIGKILL or SIGSEGV, the OOM killer).

    Only that task fails; the endpoint replaces the worker.
    """

    def __init__(self, message: str, *, endpoint: str = "", pid: int = 0, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.pid = pid
        self.exitcode = exitcode

    def __reduce__(self):  # keep the keyword fields through pickling
        return (_rebuild_worker_lost, (str(self), self.endpoint, self.pid, self.exitcode))


def _rebuild_worker_lost(message: str, endpoint: str, pid: int, exitcode: int | None) -> WorkerLost:
    return WorkerLost(message, endpoint=endpoint, pid=pid, exitcode=exitcode)


class UnknownEndpoint(FedexecError, LookupError):
    """No endpoint goes by the given id or name: the relay has none with
    that id, or a name is neither a locally configured endpoint's nor a
    group's. The message says which, and where to look."""


class EndpointNotConnected(FedexecError):
    """The relay knows the endpoint, but it did not connect within
    ``wait_for_endpoint`` seconds (without that option, tasks wait for it
    and a :class:`EndpointNotConnectedWarning` says so)."""


class EndpointNotConnectedWarning(UserWarning):
    """Warned at construction when the relay knows the endpoint but it is
    not connected: tasks wait at the relay until it connects."""


class BrokenExecutor(FedexecError, concurrent.futures.BrokenExecutor):
    """The executor cannot run tasks any more (its background thread
    stopped, or its embedded default could not start); the message says why.
    A :class:`concurrent.futures.BrokenExecutor`, as the standard executors
    raise."""


class InitializerFailed(BrokenExecutor):
    """The executor's ``initializer`` raised in a worker, so the tasks sent
    to that worker fail with this (as ``BrokenProcessPool`` does in
    ProcessPoolExecutor); the message names the initializer and its error.
    ``initializer`` is its qualified name."""

    def __init__(self, message: str, *, initializer: str = "") -> None:
        super().__init__(message)
        self.initializer = initializer

    def __reduce__(self):  # keep the keyword field through pickling (it travels from the worker)
        return (_rebuild_initializer_failed, (str(self), self.initializer))


def _rebuild_initializer_failed(message: str, initializer: str) -> InitializerFailed:
    return InitializerFailed(message, initializer=initializer)


class ExecutorShutDown(FedexecError, RuntimeError):
    """A task was submitted after ``shutdown()`` (a :class:`RuntimeError`,
    as with the standard executors)."""


class VersionMismatch(FedexecError):
    """Client and endpoint run different Python minor versions, so pickled
    functions and data cannot be trusted to load on the other side."""


class TaskRejected(FedexecError):
    """The relay or endpoint refused a task (bad input, unknown endpoint,
    protocol error); the message says why."""


class RelayUnavailable(FedexecError):
    """The relay could not be reached within the configured time."""


class TaskTimeout(FedexecError):
    """The task ran past its walltime (``timeout``) on the endpoint and was
    stopped. Not a :class:`TimeoutError`, so that it is never mistaken for
    ``Future.result(timeout)`` running out."""

    def __init__(self, message: str, *, timeout: float = 0.0, endpoint: str = "") -> None:
        super().__init__(message)
        self.timeout = timeout
        self.endpoint = endpoint


class TaskLost(FedexecError):
    """The relay has no record of the task: it was never accepted, its
    result was already fetched and acknowledged, or it expired."""


class PayloadTooLarge(FedexecError):
    """The pickled arguments or result are larger than the relay's payload
    limit (``fedexec relay start --max-payload``, default 4 GiB)."""

    def __init__(self, message: str, *, size: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class QuotaExceeded(FedexecError):
    """The relay refused the task: its user is at a quota (tasks in flight
    or with results not yet acknowledged, ``fedexec relay start
    --max-tasks-per-user``; bytes stored, ``--max-bytes-per-user``; distinct
    groups of endpoints with unfinished tasks). The message names the quota,
    the usage and the limit; ``.quota`` is "tasks", "bytes" or "groups"."""

    def __init__(self, message: str, *, quota: str = "", usage: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.quota = quota
        self.usage = usage
        self.limit = limit


class AuthenticationFailed(FedexecError, PermissionError):
    """The relay refused this connection's credentials, or needs some and
    none were found (see ``token=`` and ``FEDEXEC_TOKEN``)."""


class NotAuthorized(FedexecError, PermissionError):
    """The relay (or endpoint) knows who you are but you may not do this:
    the endpoint is another user's and not shared with you, the function
    is not on its allow-list, or the task is another user's."""


class DependencyError(FedexecError):
    """A task was not run because a future passed as one of its arguments
    (a dependency) failed or was cancelled. ``dependency`` is that task's id
    (empty for a future that is not a task's), also named in the message;
    ``__cause__`` is the dependency's exception when this process has it."""

    def __init__(self, message: str, *, dependency: str = "") -> None:
        super().__init__(message)
        self.dependency = dependency

    def __reduce__(self):  # keep the keyword field through pickling
        return (_rebuild_dependency_error, (str(self), self.dependency))


def _rebuild_dependency_error(message: str, dependency: str) -> DependencyError:
    return DependencyError(message, dependency=dependency)


class DataRefError(FedexecError):
    """A task was not run because a :class:`~fedexec.DataRef` it names is not
    usable: unknown, deleted, expired, or put by another user (the relay does
    not say which of these, so as not to tell anyone whether another user's
    ref exists); or ``put``/``delete`` was refused. ``ref`` is the ref's id
    (hex), also named in the message."""

    def __init__(self, message: str, *, ref: str = "") -> None:
        super().__init__(message)
        self.ref = ref

    def __reduce__(self):  # keep the keyword field through pickling
        return (_rebuild_data_ref_error, (str(self), self.ref))


def _rebuild_data_ref_error(message: str, ref: str) -> DataRefError:
    return DataRefError(message, ref=ref)


class TaskPending(FedexecError):
    """``Client.get_result`` of a task that has not finished yet (its
    ``status`` says where it is: waiting-for-ep, waiting-for-launch, running)."""

    def __init__(self, message: str, *, status: str = "") -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # keep the keyword field through pickling
        return (_rebuild_task_pending, (str(self), self.status))


def _rebuild_task_pending(message: str, status: str) -> TaskPending:
    return TaskPending(message, status=status)
