"""An endpoint agent's part of large payloads (see fedexec/transfer.py): it
fetches a task's uploaded arguments into a file in its private spool
directory, which the worker maps (the row carries a local reference), and
uploads a worker's large result (a file the worker wrote into that spool) to
the relay, handing on the reference in its place. The agent never holds a
whole payload: chunks go between the socket and the file.

Transfers run on the agent's thread, one at a time (a 1 GiB payload takes
seconds on one machine); the relay's heartbeat timeout is far longer. (A
relay sharing the agent's thread, the embedded default's, takes its turns
while the agent waits for its answers: ``wait``, fedexec.colocated.)"""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any, Callable

import zmq

from .. import protocol as P
from ..transfer import SPOOL_ENV, TransferLink, big_ref, local_ref, parse_local



class EndpointTransfers:
    """Large payloads of one endpoint agent, spooled under ``directory``
    (private: the agent's own temporary directory)."""

    def __init__(self, relay: str, secret_file: str | None, relay_key: str | None, directory: str) -> None:
        self.relay, self.secret_file, self.relay_key = relay, secret_file, relay_key
        self.spool = os.path.join(directory, "spool")
        os.makedirs(self.spool, mode=0o700, exist_ok=True)
        os.environ[SPOOL_ENV] = self.spool   # the pools and workers started from here write results there
        self.link: TransferLink | None = None
        #: how the link waits for the relay's answers (TransferLink.wait; None: a poll)
        self.wait: Callable[[zmq.Socket, int], bool] | None = None
        self.argument_files: dict[bytes, str] = {}   # task id -> its arguments' file, until its result
        # task id -> a recycled file of its user the relay gave for its large result (relay/spares.py),
        # which its worker writes into (transfer.spill_result); unlinked when the task is done if unused
        self.spare_files: dict[bytes, str] = {}
        # large results kept in their files after their upload, for tasks here that depend on
        # them (graph.py): until the relay has the result (it sends a dependent that reaches
        # it before then here, ahead of its acknowledgement) and each such task has a result:
        # task id -> [local reference, the tasks still needing it, acknowledged yet]; and each
        # such task -> the results it holds so
        self.kept: dict[bytes, list[Any]] = {}
        self.keeping: dict[bytes, list[bytes]] = {}
        # large results of tasks that ran elsewhere, fetched from the relay for tasks here that
        # depend on them (their "dr" option, relay/kept.py), while such tasks are here:
        # (user, upload id, sha256) -> [its file, the tasks using it]; and each task -> its keys
        self.fetched: dict[tuple[str, bytes, bytes], list[Any]] = {}
        self.fetched_for: dict[bytes, list[tuple[str, bytes, bytes]]] = {}

    def _link(self) -> TransferLink:
        if self.link is None:
            self.link = TransferLink(self.relay, secret_file=self.secret_file, relay_key=self.relay_key)
            self.link.wait = self.wait
        return self.link

    def fetch_arguments(self, task_id: bytes, ref: Any) -> tuple[bytes | None, str]:
        """A local reference to the task's arguments, fetched into the spool;
        or None and why it could not be."""
        path = os.path.join(self.spool, task_id.hex() + ".args")
        try:
            size = self._link().fetch_file(P.as_bytes(ref), path, task_id)
        except Exception as exc:
            _unlink(path)
            return None, f"the endpoint could not fetch the task's arguments from the relay: {exc}"
        self.argument_files[task_id] = path
        spare = os.path.join(self.spool, task_id.hex() + ".spare")
        try:   # (a task with large arguments may well have a large result: a file to recycle for it)
            if self._link().spare(task_id, size, spare):
                self.spare_files[task_id] = spare
        except Exception:   # (none: its result goes into a new file)
            pass
        return local_ref(path, size), ""

    def fetch_results(self, task_id: bytes, user: str, wire: list[Any]) -> tuple[dict[bytes, str] | None, str]:
        """The files of the dependencies' results a task's ``dr`` option
        names, ``{dependency id: path}`` (for dataref.wrap_arguments), each
        fetched from the relay for this task unless a task of the same user
        here has it already; or None and why one could not be had. They go
        when the last task using them is done (:meth:`done`). Named apart
        from any task's files, so that no worker can send one as its result."""
        files: dict[bytes, str] = {}
        keys: list[tuple[str, bytes, bytes]] = []
        self.fetched_for[task_id] = keys
        for dependency, bid, size, digest in wire:
            key = (user, bid, digest)
            entry = self.fetched.get(key)
            if entry is None:
                name = f"dep-{hashlib.sha256(user.encode()).hexdigest()[:16]}-{bid.hex()}-{digest[:8].hex()}"
                path = os.path.join(self.spool, name)
                try:
                    self._link().fetch_file(big_ref(bid, size, digest), path, task_id)
                except Exception as exc:
                    _unlink(path)
                    self.done(task_id)
                    return None, (f"the endpoint could not fetch the result of task {uuid.UUID(bytes=dependency)}, "
                                  f"which this task depends on, from the relay: {exc}")
                entry = self.fetched[key] = [path, set()]
            entry[1].add(task_id)
            keys.append(key)
            files[dependency] = entry[0]
        return files, ""

    def result(self, task_id: bytes, status: int, blob: Any, max_payload: int,
               keep_for: "list[bytes] | tuple[()]" = ()) -> tuple[int, Any]:
        """A worker's large result (a local reference) as the result row's
        ``(status, blob)``: uploaded for the task (its reference), or a
        failure. Only a file of this task in the spool is taken. A result
        uploaded stays in its file (:meth:`kept_result`) for ``keep_for``
        (tasks here that depend on it) and those that come until the relay
        acknowledges it, until each is done."""
        self.done(task_id)
        kept = False
        try:
            path, size, digest = parse_local(P.as_bytes(blob))
        except Exception:
            return P.FAILED, P.pack_failure(P.REJECTED, "the worker sent a malformed large-result reference")
        real = os.path.realpath(path)
        if (os.path.dirname(real) != os.path.realpath(self.spool)
                or not os.path.basename(real).startswith(task_id.hex() + ".")):
            return P.FAILED, P.pack_failure(P.REJECTED, "the worker's large result is not a file of this task in "
                                                        "the endpoint's spool; it was not sent")
        try:
            if size > max_payload:
                message, details = P.too_large("the task's result", size, max_payload)
                return P.FAILED, P.pack_failure(P.TOO_LARGE, message, **details)
            uploaded = self._link().upload(real, task_id, digest)
            if status == P.OK:
                self.keep(task_id, local_ref(real, size, digest), keep_for)
                kept = True
            return status, uploaded
        except Exception as exc:
            return P.FAILED, P.pack_failure(P.LOST, f"the endpoint could not upload the task's large result to "
                                                    f"the relay: {type(exc).__name__}: {exc}")
        finally:
            if not kept:
                _unlink(real)

    def keep(self, task_id: bytes, ref: bytes, dependents: list[bytes]) -> None:
        """Task ``task_id``'s result file (``ref``) stays for ``dependents`` too."""
        entry = self.kept.setdefault(task_id, [ref, set(), False])
        for dependent in dependents:
            if dependent not in entry[1]:
                entry[1].add(dependent)
                self.keeping.setdefault(dependent, []).append(task_id)

    def kept_result(self, task_id: bytes) -> bytes | None:
        """The local reference to a task's result kept by :meth:`keep`, or None."""
        entry = self.kept.get(task_id)
        return None if entry is None else entry[0]

    def done(self, task_id: bytes) -> None:
        """The task has an outcome: its arguments' file goes."""
        path = self.argument_files.pop(task_id, None)
        if path is not None:
            _unlink(path)
        spare = self.spare_files.pop(task_id, None) if self.spare_files else None
        if spare is not None:   # (its worker took it, or it goes: no one but this task's worker may write it)
            _unlink(spare)
        for dependency in self.keeping.pop(task_id, ()) if self.keeping else ():
            entry = self.kept.get(dependency)
            if entry is not None:
                entry[1].discard(task_id)
                self._release(dependency, entry)
        for key in self.fetched_for.pop(task_id, ()) if self.fetched_for else ():
            entry = self.fetched.get(key)
            if entry is not None:
                entry[1].discard(task_id)
                if not entry[1]:
                    del self.fetched[key]
                    _unlink(entry[0])

    def acknowledged(self, task_id: bytes) -> None:
        """The relay has this task's result: no dependent of it comes here after."""
        entry = self.kept.get(task_id)
        if entry is not None:
            entry[2] = True
            self._release(task_id, entry)

    def _release(self, task_id: bytes, entry: list[Any]) -> None:
        if entry[2] and not entry[1]:   # every task that needed it is done
            del self.kept[task_id]
            _unlink(parse_local(entry[0])[0])

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
