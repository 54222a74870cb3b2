"""fedexec: federated function-as-a-service through a standard Executor.

>>> from fedexec import FederatedExecutor
>>> with FederatedExecutor() as ex:          # private relay + local endpoint
...     print(ex.submit(pow, 2, 10).result())
1024
"""

from .errors import (
    AuthenticationFailed,
    BrokenExecutor,
    EndpointNotConnected,
    EndpointNotConnectedWarning,
    ExecutorShutDown,
    InitializerFailed,
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
from .config import ConfigError
from .transfer import TransferError
from .dataref import DataRef
from .executor import FederatedExecutor, TaskFuture, memoized, with_options
from .client import Batch, Client
from .shell import ShellFunction, ShellResult
from .mpi import MPIFunction
from .joblib_backend import install_hook as _install_joblib_hook

_install_joblib_hook()   # "fedexec" becomes a joblib backend once joblib is imported (joblib_backend.py)

__version__ = "0.1.0"

_LAZY = {"progress": "progressbar", "ProgressBar": "progressbar"}   # loaded on first use, not by `import fedexec`


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "FederatedExecutor",
    "TaskFuture",
    "memoized",
    "with_options",
    "DataRef",
    "ShellFunction",
    "ShellResult",
    "MPIFunction",
    "ProgressBar",
    "progress",
    "DataRefError",
    "FedexecError",
    "AuthenticationFailed",
    "BrokenExecutor",
    "ConfigError",
    "EndpointNotConnected",
    "EndpointNotConnectedWarning",
    "ExecutorShutDown",
    "InitializerFailed",
    "TransferError",
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
