"""``fedexec.Client``: the Globus Compute ``Client``'s shape on a fedexec relay.

Code written for Globus Compute (or funcX) ports by changing the import and
the constructor::

    from fedexec import Client
    gcc = Client()                       # the relay in the fedexec home; or Client(relay=..., token=...)
    func_id = gcc.register_function(double)
    task_id = gcc.run(21, endpoint_id=ep, function_id=func_id)
    gcc.get_result(task_id)              # TaskPending until it is done; then 42, as often as asked

Tasks run through a :class:`~fedexec.FederatedExecutor` per endpoint (one
connection each, made on first use); questions about tasks, functions and
endpoints go to the relay (relay/inspect.py) on a short connection each, and
never consume a result: a relay started from the command line keeps results
until their ``--result-ttl`` or :meth:`Client.delete_result` (relay/retained.py).
"""

from __future__ import annotations

import time
import uuid
import warnings
from concurrent.futures import CancelledError, Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from . import protocol as P
from .errors import DeserializationError, EndpointNotConnectedWarning, FedexecError, TaskLost, TaskPending, TaskRejected
from .output import MAGIC as OUTPUT_MAGIC, split as split_output
from .relay.query import ask_relay_message
from .serialize import deserialize, deserialize_exception, serialize_function
from .transfer import is_big

if TYPE_CHECKING:
    from .executor import FederatedExecutor

#: statuses of :meth:`Client.get_task`, as Globus Compute names them
PENDING_STATUSES = ("waiting-for-ep", "waiting-for-launch", "running")
STATUSES = (*PENDING_STATUSES, "success", "failed", "cancelled")
MAX_BUSY_WAIT = 2.0   # seconds between asking again while the relay says it is busy (its query budget)


class RelayQuestions:
    """Questions to one relay about the asker's own tasks, functions and
    endpoints (INSPECT, relay/inspect.py), each on a short connection of its
    own; answered ``{busy: true}`` (past the user's queries a second), a
    question is asked again a moment later, until ``timeout``."""

    def __init__(self, relay: str, token: str | None = None, relay_public_key: str | None = None,
                 secret_file: str | Path | None = None, timeout: float = 30.0) -> None:
        self.relay = relay
        self.token = token
        self.relay_public_key = relay_public_key
        self.secret_file = secret_file
        self.timeout = timeout

    def ask(self, op: str, blobs: Iterable[Any] = (), **fields: Any) -> P.Message:
        deadline = time.monotonic() + self.timeout
        wait = 0.05
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the relay at {self.relay} stayed busy for {self.timeout:g} s")
            answer = ask_relay_message(self.relay, P.INSPECT, {"op": op, **fields}, P.INSPECTED, left,
                                       self.token, self.relay_public_key, blobs=list(blobs),
                                       secret_file=self.secret_file)
            if not answer.fields.get("busy"):
                return answer
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            wait = min(2 * wait, MAX_BUSY_WAIT)

    # -- functions ---------------------------------------------------------------
    def register_function(self, function: Callable[..., Any], description: str | None = None,
                          public: bool = False, function_name: str | None = None) -> str:
        """Keep ``function`` at the relay; its id: the sha256 of its pickled
        body (hex), the same from any process that pickles it the same way."""
        if not callable(function):
            raise TypeError(f"{function!r} is not callable")
        if type(public) is not bool:
            raise TypeError(f"public must be True or False, not {public!r}")
        fn_hash, body = serialize_function(function)
        name = function_name or getattr(function, "__qualname__", None) or type(function).__name__
        answer = self.ask("fn_put", [body], h=fn_hash, name=str(name)[:256], desc=(description or "")[:1024],
                          public=public)
        if answer.fields.get("err"):
            raise TaskRejected(f"the relay did not register function {name!r}: {answer.fields['err']}")
        return fn_hash.hex()

    def get_function(self, function_id: str) -> dict[str, Any]:
        """What was registered as ``function_id`` (the caller's, or another
        user's public one): ``function_id``, ``function_name``,
        ``description``, ``public``, ``yours``, ``created`` and
        ``function_code`` (the pickled body, bytes); raises LookupError for
        an id the caller may not use (unknown or another user's private one alike)."""
        answer = self.ask("fn_get", h=function_hash_bytes(function_id))
        f = answer.fields
        if not f.get("found"):
            raise LookupError(f"no function {function_id} registered by you or made public at {self.relay}")
        return {"function_id": function_id, "function_name": f["name"], "description": f["desc"],
                "public": f["public"], "yours": f["yours"], "created": f["created"],
                "function_code": P.as_bytes(answer.blobs[0])}

    def delete_function(self, function_id: str) -> bool:
        """Forget a function you registered; whether there was one of yours by that id."""
        return self.ask("fn_del", h=function_hash_bytes(function_id)).fields["deleted"] is True

    # -- tasks -------------------------------------------------------------------
    def task_rows(self, task_ids: list[str], results: bool) -> dict[str, list[Any]]:
        """The relay's rows for these tasks (relay/inspect.py, task_info), by
        task id string; rows it left for later (``more``) asked again."""
        wanted = {task_id_bytes(task_id): str(task_id) for task_id in task_ids}
        rows: dict[str, list[Any]] = {}
        todo = list(wanted)
        deadline = time.monotonic() + self.timeout
        while todo:
            part, todo = todo[:P.MAX_ITEMS], todo[P.MAX_ITEMS:]
            answer = self.ask("tasks", tids=part, results=results)
            again = []
            for row in answer.fields["tasks"]:
                if len(row) > 7 and row[7]:
                    again.append(row[0])
                    continue
                if row[6] is not None:
                    row[6] = P.as_bytes(P.blob(answer.blobs, row[6]))
                rows[wanted[row[0]]] = row
            if len(again) == len(part):   # the relay's reading budget for now is spent: a moment later
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the relay at {self.relay} did not give the results of {len(again)} "
                                       f"task(s) within {self.timeout:g} s")
                time.sleep(0.05)
            todo = again + todo
        return rows

    def list_tasks(self, status: str | None = None, endpoint_id: str | None = None, since: float | None = None,
                   limit: int = 100) -> Iterator[list[Any]]:
        """Rows ``[task id, status, endpoint, submitted, finished]`` of the
        caller's tasks, newest first, at most ``limit``, page by page."""
        before = None
        left = limit
        while left > 0:
            fields: dict[str, Any] = {"limit": min(left, 1000)}
            if status is not None:
                fields["status"] = status
            if endpoint_id is not None:
                fields["ep"] = endpoint_id
            if since is not None:
                fields["since"] = float(since)
            if before is not None:
                fields["before"] = before
            answer = self.ask("list", **fields).fields
            for row in answer["tasks"][:left]:
                yield row
            left -= len(answer["tasks"])
            before = answer.get("next")
            if before is None:
                return

    def delete_results(self, task_ids: list[str]) -> int:
        count = 0
        ids = [task_id_bytes(task_id) for task_id in task_ids]
        for part in P.chunks(ids):
            count += self.ask("delete", tids=part).fields["deleted"]
        return count

    # -- endpoints ---------------------------------------------------------------
    def endpoints(self) -> list[dict[str, Any]]:
        return self.ask("endpoints").fields["endpoints"]

    def endpoint(self, endpoint_id: str) -> dict[str, Any]:
        answer = self.ask("endpoint", ep=str(endpoint_id)).fields
        if not answer.get("found"):
            raise LookupError(f"the relay at {self.relay} knows no endpoint {endpoint_id} you may use")
        return answer["endpoint"]


class Batch:
    """Tasks to submit together (:meth:`Client.batch_run`), as Globus Compute's
    ``create_batch()`` / ``batch.add(...)``."""

    def __init__(self) -> None:
        self.tasks: list[tuple[str, str, tuple, dict[str, Any]]] = []

    def add(self, *args: Any, endpoint_id: str, function_id: str, **kwargs: Any) -> None:
        """Add ``function(*args, **kwargs)`` on ``endpoint_id``."""
        self.tasks.append((str(endpoint_id), function_id, args, kwargs))

    def __len__(self) -> int:
        return len(self.tasks)


class Client:
    """A Globus Compute-style client of a fedexec relay.

    ``relay``: its address (default: the relay in the fedexec home, as
    ``fedexec relay start`` runs it); ``token``: your API token, for a relay
    in token mode; ``relay_public_key``: an encrypted relay's key, if it is
    not in the fedexec home. ``timeout``: seconds a question may take.
    """

    def __init__(self, relay: str | None = None, token: str | None = None, *,
                 relay_public_key: str | None = None, timeout: float = 30.0) -> None:
        from .executor import _relay_and_source
        from .first_contact import check_relay_address

        # (as the executor finds its relay; a malformed address is a ConfigError at once)
        self.relay: str = check_relay_address(*_relay_and_source(relay, None))
        self.token = token
        self.relay_public_key = relay_public_key
        self.questions = RelayQuestions(self.relay, token, relay_public_key, timeout=timeout)
        self._executors: dict[str, "FederatedExecutor"] = {}
        # this client's own submissions, until the relay has them: a task asked for before its
        # SUBMIT reached the relay is pending, and one the relay refused is failed, not unknown
        self._futures: dict[str, Future] = {}
        self._links: Any = None   # transfer links (fedexec.transfer.LinkPool) for results over 16 MiB, made on first use

    # -- functions ---------------------------------------------------------------
    def register_function(self, function: Callable[..., Any], description: str | None = None,
                          public: bool = False, function_name: str | None = None) -> str:
        """Keep ``function`` at the relay for :meth:`run`; its id (the
        content hash of its pickled body, stable across processes for a
        function pickled by reference). ``public``: any user of the relay
        may run it (and read its code)."""
        return self.questions.register_function(function, description, public, function_name)

    def get_function(self, function_id: str) -> dict[str, Any]:
        """What was registered as ``function_id``: a dict with
        ``function_name``, ``description``, ``public``, ``function_code``
        (the pickled body), and ``function`` (the function itself) when you
        registered it (another user's public function is not unpickled here)."""
        info = self.questions.get_function(function_id)
        if info["yours"]:
            info["function"] = deserialize(info["function_code"])
        return info

    def delete_function(self, function_id: str) -> bool:
        """Forget a function you registered (its owner only); whether there
        was one of yours by that id. Tasks already submitted with it run on;
        new ones with it (from here or any process) raise LookupError."""
        deleted = self.questions.delete_function(function_id)
        for executor in self._executors.values():   # (their stand-in would submit its body still)
            executor._registered.pop(str(function_id), None)
        return deleted

    # -- running -----------------------------------------------------------------
    def _executor(self, endpoint_id: str) -> "FederatedExecutor":
        from .executor import FederatedExecutor

        executor = self._executors.get(endpoint_id)
        if executor is None:
            # a task for an endpoint that is not connected waits for it ("waiting-for-ep", as in
            # Globus Compute): that is what get_task says, so the executor's warning would only repeat it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", EndpointNotConnectedWarning)
                executor = self._executors[endpoint_id] = FederatedExecutor(
                    endpoint_id, relay=self.relay, token=self.token, relay_public_key=self.relay_public_key)
        return executor

    def run(self, *args: Any, endpoint_id: str, function_id: str, **kwargs: Any) -> str:
        """Run registered function ``function_id`` on ``args`` and ``kwargs``
        on ``endpoint_id``; the task's id (at once: ask :meth:`get_task`)."""
        future = self._executor(str(endpoint_id)).submit_to_registered_function(function_id, args, kwargs)
        self._remember(future)
        return future.task_id

    def create_batch(self) -> Batch:
        """An empty :class:`Batch` to :meth:`~Batch.add` tasks to."""
        return Batch()

    def batch_run(self, batch: Batch) -> list[str]:
        """Submit a batch's tasks; their ids, in the batch's order."""
        return [self.run(*args, endpoint_id=endpoint_id, function_id=function_id, **kwargs)
                for endpoint_id, function_id, args, kwargs in batch.tasks]

    def _remember(self, future: Future) -> None:
        futures = self._futures
        if len(futures) > 10_000:   # the relay has long had (or refused) the older ones
            for task_id in [t for t, f in futures.items() if f.done()]:
                del futures[task_id]
        futures[future.task_id] = future

    # -- tasks -------------------------------------------------------------------
    def get_task(self, task_id: str) -> dict[str, Any]:
        """A task's state, without consuming its result: ``task_id``,
        ``pending`` (bool), ``status`` (waiting-for-ep, waiting-for-launch,
        running, success, failed, cancelled), ``endpoint_id``, ``submitted``
        and ``completed`` (seconds since the epoch; None until done), and once
        done ``result`` or ``exception``. Raises TaskLost for an id that is
        not one of your tasks at the relay (unknown, expired or deleted, or
        another user's: the relay does not say which)."""
        return self.get_batch_result([task_id])[str(task_id)]

    def get_result(self, task_id: str) -> Any:
        """A task's result (read again as often as asked, until it expires or
        :meth:`delete_result`); raises TaskPending while it is not done, and
        the task's exception if it failed."""
        info = self.get_task(task_id)
        if info["pending"]:
            raise TaskPending(f"task {task_id} is not done yet: {info['status']}", status=info["status"])
        if "exception" in info:
            raise info["exception"]
        return info["result"]

    def get_batch_result(self, task_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """:meth:`get_task` of each of these tasks (asked together), by id."""
        ids = [str(uuid.UUID(str(task_id))) for task_id in task_ids]
        rows = self.questions.task_rows(ids, results=True)
        answer: dict[str, dict[str, Any]] = {}
        for task_id in ids:
            row = rows[task_id]
            if row[1] == "unknown":
                answer[task_id] = self._local(task_id)
                continue
            info: dict[str, Any] = {"task_id": task_id, "status": row[1], "pending": row[1] in PENDING_STATUSES,
                                    "endpoint_id": row[2] or None, "submitted": row[3] or None,
                                    "completed": row[4] or None}
            if not info["pending"]:
                info["completion_t"] = info["completed"]   # (Globus Compute's name for it)
                _set_outcome(info, row[5], row[6], self._fetch_large)
            answer[task_id] = info
        return answer

    def _fetch_large(self, ref: bytes) -> Any:
        """A result over 16 MiB, which the relay keeps as an upload: fetched
        (on the relay's machine, its file mapped), never dropped, so that it
        is read again as often as asked until it expires or is deleted."""
        if self._links is None:
            from .transfer import LinkPool

            self._links = LinkPool(self.relay, self.token, relay_key=self.relay_public_key)
        return self._links.get().fetch_mapped(ref)

    def _local(self, task_id: str) -> dict[str, Any]:
        """A task the relay has no record of: this client's own on its way
        there (pending), or refused by it (failed); else TaskLost."""
        future = self._futures.get(task_id)
        if future is None:
            raise TaskLost(f"the relay at {self.relay} has no task {task_id} of yours: it was never accepted, "
                           "its result expired or was deleted, or it is not yours")
        info: dict[str, Any] = {"task_id": task_id, "endpoint_id": None, "submitted": None, "completed": None}
        if not future.done():
            info.update(status="waiting-for-ep", pending=True)
        elif future.cancelled():
            info.update(status="cancelled", pending=False, exception=CancelledError(f"task {task_id} was cancelled"))
        elif future.exception() is not None:
            info.update(status="failed", pending=False, exception=future.exception())
        else:   # done here, and already gone from the relay (deleted, or an embedded relay's)
            info.update(status="success", pending=False, result=future.result())
        return info

    def list_tasks(self, status: str | None = None, endpoint_id: str | None = None, since: float | None = None,
                   limit: int = 100) -> list[dict[str, Any]]:
        """Your tasks, newest first, at most ``limit``: each a dict with
        ``task_id``, ``status``, ``endpoint_id``, ``submitted``, ``completed``.
        ``status``: only those in it (one of STATUSES, or "pending" for
        the first three); ``endpoint_id``: only those sent there;
        ``since``: only those submitted since (seconds since the epoch)."""
        if status is not None and status not in (*STATUSES, "pending"):
            raise ValueError(f"status must be one of {', '.join(STATUSES)} or pending, not {status!r}")
        if type(limit) is not int or limit < 1:
            raise ValueError(f"limit must be an integer of 1 or more, not {limit!r}")
        return [{"task_id": str(uuid.UUID(bytes=row[0])), "status": row[1], "endpoint_id": row[2] or None,
                 "submitted": row[3] or None, "completed": row[4] or None}
                for row in self.questions.list_tasks(status, endpoint_id and str(endpoint_id), since, limit)]

    def delete_result(self, task_id: str) -> bool:
        """Forget a finished task's result at the relay now (else it goes at
        its TTL); whether there was one of yours to forget."""
        self._futures.pop(str(task_id), None)
        return self.questions.delete_results([str(task_id)]) == 1

    def cancel(self, task_id: str) -> bool:
        """Cancel a task that has not started; whether it was cancelled."""
        task_id = str(uuid.UUID(str(task_id)))
        future = self._futures.get(task_id)
        if future is None:
            info = self.get_task(task_id)
            if not info["pending"] or not info["endpoint_id"]:
                return info["status"] == "cancelled"
            endpoint = info["endpoint_id"].split(",")
            future = self._executor(endpoint[0] if len(endpoint) == 1 else endpoint).reattach([task_id])[0]
            self._futures[task_id] = future
        return future.cancel()

    # -- endpoints ---------------------------------------------------------------
    def list_endpoints(self) -> list[dict[str, Any]]:
        """The endpoints you may use, each as :meth:`get_endpoint_status` gives it, with ``id`` and ``name``."""
        return self.questions.endpoints()

    def get_endpoint_status(self, endpoint_id: str) -> dict[str, Any]:
        """``status`` (online/offline), ``workers``, ``idle_workers``,
        ``queued`` (tasks waiting at the relay), ``blocks`` (as the endpoint
        counts them at its last heartbeat; None while it is offline), and
        ``id``, ``name``, ``running`` (tasks sent to it and not finished)."""
        info = self.questions.endpoint(endpoint_id)
        return {key: info.get(key) for key in ("id", "name", "status", "workers", "idle_workers", "running",
                                                "queued", "blocks")}

    def get_endpoint_metadata(self, endpoint_id: str) -> dict[str, Any]:
        """``hostname``, ``python_version``, ``fedexec_version``, ``provider``
        (what the endpoint said when it last connected), and ``id``, ``name``, ``owner``."""
        info = self.questions.endpoint(endpoint_id)
        return {"id": info["id"], "name": info["name"], "owner": info["owner"], "hostname": info.get("host"),
                "python_version": info["python_version"], "fedexec_version": info.get("fx"),
                "provider": info.get("provider")}

    # -- lifetime ----------------------------------------------------------------
    def close(self) -> None:
        """Close the connections, once the relay has every task this client
        submitted in its record (their results stay there: read them later,
        from here or any process, with :meth:`get_result`)."""
        executors, self._executors = self._executors, {}
        for executor in executors.values():
            executor._detach()
        links, self._links = self._links, None
        if links is not None:
            links.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _set_outcome(info: dict[str, Any], status: int | None, blob: bytes | None,
                 fetch_large: Callable[[bytes], Any]) -> None:
    """A finished task's ``result`` or ``exception`` from its stored outcome
    (a result over 16 MiB, a reference to an upload, fetched with ``fetch_large``)."""
    blob = blob or b""
    if blob.endswith(OUTPUT_MAGIC):   # (its captured output: output.py)
        blob, output = split_output(blob)
        blob = P.as_bytes(blob)
    try:
        if status == P.OK:
            if is_big(blob):
                try:
                    blob = fetch_large(blob)
                except Exception as exc:   # (its upload went meanwhile: expired or deleted)
                    info["exception"] = TaskLost(f"the result of task {info['task_id']} (over 16 MiB) could not be "
                                                 f"fetched from the relay: {type(exc).__name__}: {exc}")
                    return
            info["result"] = deserialize(blob)
        elif status == P.EXCEPTION:
            info["exception"] = deserialize_exception(blob)
        elif status == P.CANCELLED:
            info["exception"] = CancelledError(f"task {info['task_id']} was cancelled")
        else:
            from .dispatcher import _failure_exception

            info["exception"] = _failure_exception(blob)
    except Exception as exc:
        info["exception"] = DeserializationError(f"the result cannot be loaded here: {type(exc).__name__}: {exc}")


def task_id_bytes(task_id: Any) -> bytes:
    """A task id (a UUID string, or a UUID) as the relay knows it."""
    try:
        return task_id.bytes if isinstance(task_id, uuid.UUID) else uuid.UUID(str(task_id)).bytes
    except ValueError:
        raise ValueError(f"{task_id!r} is not a task id (a UUID string, as TaskFuture.task_id)") from None


def function_hash_bytes(function_id: str) -> bytes:
    """A function id (64 hex digits: the sha256 of its pickled body) as bytes."""
    try:
        digest = bytes.fromhex(str(function_id))
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ValueError(f"{function_id!r} is not a function id (64 hex digits, as register_function returns)")
    return digest


__all__ = ["Client", "Batch", "RelayQuestions", "FedexecError"]
