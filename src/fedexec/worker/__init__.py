"""The worker: a process that runs one task at a time for its endpoint."""

from .process import WorkerProcess

__all__ = ["WorkerProcess"]
