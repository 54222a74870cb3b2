"""fedexec: federated function-as-a-service through a standard Executor.

>>> from fedexec import FederatedExecutor
>>> with FederatedExecutor() as ex:          # private relay + local endpoint
...     print(ex.submit(pow, 2, 10).result())
1024
"""

from .errors import (
    AuthenticationFailed,
    DataRefError,
    DependencyError,
    NotAuthorized,
    DeserializationError,
    FedexecError,
    PayloadTooLarge,
    QuotaExceeded,
    RelayUnavailable,
    RemoteExecutionError,
    SerializationError,
    TaskLost,
    TaskPending,
    TaskRejected,
    TaskTimeout,
    UnknownEndpoint,
    VersionMismatch,
    WorkerLost,
)
from .dataref import DataRef
from .executor import FederatedExecutor, TaskFuture, memoized, with_options
from .client import Batch, Client
from .shell import ShellFunction, ShellResult
from .mpi import MPIFunction

__version__ = "0.1.0"

__all__ = [
    "FederatedExecutor",
    "TaskFuture",
    "memoized",
    "with_options",
    "DataRef",
    "ShellFunction",
    "ShellResult",
    "MPIFunction",
    "DataRefError",
    "FedexecError",
    "AuthenticationFailed",
    "DependencyError",
    "NotAuthorized",
    "DeserializationError",
    "PayloadTooLarge",
    "QuotaExceeded",
    "RelayUnavailable",
    "RemoteExecutionError",
    "SerializationError",
    "TaskLost",
    "TaskPending",
    "Client",
    "Batch",
    "TaskRejected",
    "TaskTimeout",
    "UnknownEndpoint",
    "VersionMismatch",
    "WorkerLost",
]
