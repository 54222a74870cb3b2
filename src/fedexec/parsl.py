"""A Parsl executor that runs Parsl apps on fedexec endpoints: ``pip install fedexec[parsl]``.

>>> import parsl
>>> from fedexec.parsl import FederatedParslExecutor
>>> parsl.load(parsl.Config(executors=[FederatedParslExecutor()]))   # the embedded default
>>> parsl.load(parsl.Config(executors=[FederatedParslExecutor(ENDPOINT_ID, relay=RELAY)]))

Parsl's DataFlowKernel keeps doing what it does with any executor: it waits
for an app's dependencies and passes their values, retries a failed app
(``Config(retries=N)``), stages files, and runs ``join_app``s itself. Each
app call it launches here becomes one fedexec task: the function Parsl hands
over (the app wrapped in Parsl's own error wrapper, or for a ``bash_app``
Parsl's ``remote_side_bash_executor`` that runs the command) is pickled and
runs on a worker, so the workers need Parsl installed too, of the same
version (the embedded default uses this environment).

An app's ``parsl_resource_specification`` travels as the task's resources
(see :func:`task_options`). Resource monitoring (Parsl's monitoring radios)
is not supported: tasks run where the worker cannot reach this process.

This module's name is that of the package it adapts: its imports of Parsl
are absolute (``parsl.executors.base``), which always means the top-level
``parsl`` package, not this module.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any, Callable

from parsl.executors.base import ParslExecutor
from parsl.executors.errors import InvalidResourceSpecification
from parsl.utils import RepresentationMixin

from .executor import FederatedExecutor, with_options
from .resources import SPEC_KEYS

log = logging.getLogger("fedexec.parsl")

__all__ = ["FederatedParslExecutor", "app_call", "task_options"]

#: Parsl's spelling of a task's walltime, in minutes (Work Queue, TaskVine)
RUNNING_TIME = "running_time_min"
#: what a resource_specification may name
PARSL_KEYS = (*SPEC_KEYS, RUNNING_TIME)
_MIB = 1 << 20


def task_options(resource_specification: dict[str, Any] | None) -> dict[str, Any]:
    """The :class:`~fedexec.with_options` keywords for a Parsl app's
    ``parsl_resource_specification`` ({} when it asks nothing).

    Keys are fedexec's (:mod:`fedexec.resources`: ``cores``, ``memory``,
    ``gpus``, ``nodes``/``num_nodes``, ``ranks_per_node``,
    ``num_ranks``/``ranks``) read the way Parsl's executors read them:
    ``memory`` as a whole number is in MB (as in Work Queue and TaskVine), a
    string such as ``"4G"`` as fedexec reads it; ``running_time_min`` is the
    task's walltime in minutes (fedexec's ``timeout``). Another key raises
    Parsl's ``InvalidResourceSpecification`` naming it (values are checked
    by :func:`app_call`)."""
    if not resource_specification:
        return {}
    if not isinstance(resource_specification, dict):
        raise InvalidResourceSpecification(set(), f"a resource specification is a dict, not "
                                                  f"{resource_specification!r}")
    unknown = {key for key in resource_specification if key not in PARSL_KEYS}
    if unknown:
        raise InvalidResourceSpecification(unknown, f"the fedexec executor takes {', '.join(PARSL_KEYS)}")
    spec = {key: value for key, value in resource_specification.items() if key != RUNNING_TIME}
    memory = spec.get("memory")
    if isinstance(memory, int) and not isinstance(memory, bool):
        spec["memory"] = memory * _MIB
    options: dict[str, Any] = {}
    if RUNNING_TIME in resource_specification:
        minutes = resource_specification[RUNNING_TIME]
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes <= 0:
            raise InvalidResourceSpecification({RUNNING_TIME}, f"{RUNNING_TIME} is a number of minutes "
                                                               f"greater than 0, not {minutes!r}")
        options["timeout"] = minutes * 60
    if spec:
        options["resources"] = spec
    return options


def app_call(func: Callable[..., Any], resource_specification: dict[str, Any] | None) -> Callable[..., Any]:
    """What to submit for an app call: ``func`` itself, or with the options
    its resource specification asks (:func:`task_options`); a bad value
    raises ``InvalidResourceSpecification`` with fedexec's reason."""
    options = task_options(resource_specification)
    if not options:
        return func
    try:
        return with_options(func, **options)
    except ValueError as exc:
        raise InvalidResourceSpecification(set(resource_specification or ()), str(exc)) from None


class FederatedParslExecutor(ParslExecutor, RepresentationMixin):
    """A Parsl executor whose apps run as fedexec tasks.

    ``endpoint_id``: the endpoint (an id, a configured name, a list of ids
    or a group's name, as for :class:`~fedexec.FederatedExecutor`); None
    starts the embedded default (a private relay and a local endpoint) when
    Parsl starts the executor, and stops it at ``parsl.dfk().cleanup()``.
    ``label``: the executor's label in Parsl's config (apps name it in
    ``executors=[...]``). ``storage_access``, ``working_dir``: Parsl's file
    staging, as for its own executors. ``executor_options``: the rest of
    FederatedExecutor's keywords (``relay``, ``max_workers``, ``token``,
    ``resource_specification`` for every app, ``task_timeout``, ...).

    ``executor``: the FederatedExecutor, once started. Each app's future is a
    :class:`~fedexec.TaskFuture`; its task id is also its
    ``parsl_executor_task_id``, which Parsl logs.
    """

    def __init__(self, endpoint_id: str | list[str] | None = None, label: str = "fedexec", *,
                 storage_access: list[Any] | None = None, working_dir: str | None = None,
                 **executor_options: Any) -> None:
        ParslExecutor.__init__(self)
        if not isinstance(label, str) or not label:
            raise ValueError(f"label must be a non-empty string, not {label!r}")
        self.label = label
        self.endpoint_id = endpoint_id
        self.storage_access = storage_access
        self.working_dir = working_dir
        self.executor_options = executor_options
        self.executor: FederatedExecutor | None = None

    def start(self) -> None:
        """Connect (or start the embedded default); Parsl calls it on ``parsl.load``."""
        if self.executor is None:
            self.executor = FederatedExecutor(self.endpoint_id, **self.executor_options)
            log.info("Parsl executor %r runs apps on endpoint %s", self.label, self.executor.endpoint_id)

    def submit(self, func: Callable[..., Any], resource_specification: dict[str, Any] | None,
               *args: Any, **kwargs: Any) -> Future:
        """Run ``func(*args, **kwargs)`` as a task with the app's resources."""
        if self.executor is None:
            raise RuntimeError(f"the Parsl executor {self.label!r} was not started (parsl.load starts it)")
        future = self.executor.submit(app_call(func, resource_specification), *args, **kwargs)
        future.parsl_executor_task_id = future.task_id   # type: ignore[attr-defined]
        return future

    def shutdown(self) -> None:
        """Cancel what has not started, wait for the rest, and disconnect (or
        stop the embedded default). Parsl calls it at ``cleanup()``, after its
        own apps are done or abandoned."""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        super().shutdown()

    def monitor_resources(self) -> bool:
        """No Parsl resource monitoring: workers may be on machines that
        cannot reach Parsl's monitoring hub."""
        return False
