"""Results over 16 MiB that tasks held at the relay depend on: their uploads kept.

A task's result over ``transfer.BIG_THRESHOLD`` bytes is an upload in its
user's spool (bulk.py) and its result row a reference to that upload; the
client fetches it and then DROPs it. When a task the relay holds for its
dependencies (graph.py) depends on such a task, the relay cannot wrap the
value around the dependent's arguments: it sends the dependent with a
placeholder in the value's place (:func:`fedexec.dependencies.result_in_file`)
and option ``"dr"``: ``[[dependency id, upload id, size, sha256]]``. The
endpoint's agent reads that option (it unpickles nothing), fetches each
upload naming the dependent (``FETCH {b, tid}``) into a file, and hands the
worker the files as it does a DataRef's (dataref.wrap_arguments), so a
sandboxed worker gets them in its inbox too.

So such an upload stays while any unfinished task depends on it:

- it is kept from the moment its task finishes with tasks depending on it
  (or a restarted relay holds those tasks again, or a held task is released);
- a client's DROP of it meanwhile is put off, and noted in a marker file
  (``<data_dir>/kept/<user hash>-<upload id>``, 0600 in a 0700 directory),
  so that a relay killed and started again still deletes it;
- when the last task depending on it has finished (run, failed, cancelled),
  it goes if its client dropped it; if not, the client's DROP deletes it
  later, or, with no client coming, the spool's expiry (``result_ttl``).

Until it goes it stays in its user's spool, charged to their byte quota.

Who may fetch it (bulk.py asks :meth:`KeptResults.fetchable`): an endpoint,
naming a task of the upload's user submitted to one of its owner's
endpoints (bulk.py's check), unfinished and released by the relay (not
held), whose dependencies include the task whose result the upload is.
Anything else gets the refusal a task that is not theirs gets, whether the
upload exists or not.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from .. import protocol as P
from ..dependencies import result_in_file
from ..transfer import is_big, parse_big
from .graph import WAITING

if TYPE_CHECKING:
    from .registry import TaskRecord
    from .server import Relay

log = logging.getLogger("fedexec.relay")


class KeptResults:
    """The uploads of dependencies' results kept for tasks held at one relay."""

    def __init__(self, relay: "Relay") -> None:
        self.relay = relay
        self.root = Path(relay.data_dir) / "kept"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.uploads: dict[bytes, tuple[str, bytes]] = {}   # dependency id -> (user, upload id)
        self.owners: dict[tuple[str, bytes], bytes] = {}    # (user, upload id) -> dependency id
        self.dropped: set[tuple[str, bytes]] = set()        # of those, the ones their client dropped
        # after a restart: tasks whose client dropped their result (a marker says so) though the record
        # has them unfinished (killed before their result's commit): task id -> (user, upload id)
        self.again: dict[bytes, tuple[str, bytes]] = {}

    @property
    def spool(self):  # the upload store (bulk.py)
        return self.relay.bulk.spool

    def keep(self, dependency: bytes, user: str, result: Any) -> None:
        """Task ``dependency`` of ``user``, which unfinished tasks depend
        on, has a result that is a reference to an upload: it stays."""
        if dependency in self.uploads:
            return
        try:
            bid = parse_big(result)[0]
        except P.ProtocolError:
            return
        self.uploads[dependency] = (user, bid)
        self.owners[(user, bid)] = dependency

    def substitute(self, record: "TaskRecord", dependencies: list[bytes],
                   results: list[Any]) -> tuple[list[list[Any]], bytes | None]:
        """(Releasing a held task) each of its dependencies' results that is
        an upload replaced, in ``results``, by its placeholder, and the
        task's ``dr`` option naming them; or a failure naming one that is
        gone."""
        wire: list[list[Any]] = []
        for position, (dependency, result) in enumerate(zip(dependencies, results)):
            if not is_big(result):
                continue
            name = uuid.UUID(bytes=dependency)
            try:
                bid, size, digest = parse_big(result)
            except P.ProtocolError:
                return [], P.pack_failure(P.LOST, f"the result of task {name}, which this task depends on, is "
                                                  "a malformed reference")
            self.keep(dependency, record.user, result)
            if self.spool.complete(record.user, bid) is None:
                return [], P.pack_failure(P.LOST, f"the result of task {name}, which this task depends on, is no "
                                                  "longer at the relay (its upload is gone)", dep=dependency)
            results[position] = result_in_file(dependency, size)
            wire.append([dependency, bid, size, digest])
        return wire, None

    def fetchable(self, record: "TaskRecord", bid: Any) -> bool:
        """Whether an endpoint may fetch upload ``bid`` for the task
        ``record`` (already checked to be on one of its owner's endpoints):
        the task has left the relay's hold and depends on the task whose
        result that upload of the task's user is."""
        dependency = self.owners.get((record.user, bid)) if isinstance(bid, bytes) else None
        if dependency is None or record.state == WAITING:
            return False
        return dependency in (self.relay.graph.dependencies_of.get(record.task_id) or ())

    def put_off_drop(self, user: str, bid: bytes) -> bool:
        """A client's DROP of its upload ``bid``: True if tasks still need
        it (it goes when they are done, and a marker says so on disk)."""
        key = (user, bid)
        if key not in self.owners:
            return False
        if key not in self.dropped:
            self.dropped.add(key)
            path = self._marker(user, bid)
            try:   # (small, one write; like an upload, kept across a kill -9, not fsynced)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                try:
                    os.write(fd, msgpack.packb({"u": user, "b": bid, "t": self.owners[key]}, use_bin_type=True))
                finally:
                    os.close(fd)
            except OSError as exc:   # (it then goes with the spool's expiry, after a restart)
                log.warning("could not note a put-off DROP in %s: %s", path, exc)
        return True

    def released(self, dependency: bytes) -> None:
        """No unfinished task depends on ``dependency`` any more: its upload
        goes if its client dropped it (else its client's DROP deletes it)."""
        key = self.uploads.pop(dependency, None)
        if key is None:
            return
        del self.owners[key]
        if key in self.dropped:
            self.dropped.discard(key)
            self.spool.drop(*key)
            self._marker(*key).unlink(missing_ok=True)
            # its client fetched the result whole before dropping it, so the result goes from the record too
            # (as its acknowledgement, put off for the dependents, would have done: also when a restart lost
            # that put-off acknowledgement; one made already makes this a no-op)
            relay, user = self.relay, key[0]
            relay.graph.deferred.pop(dependency, None)
            relay.quotas.acknowledged(relay.store.acknowledge([dependency], user), user)

    def in_use(self) -> set[Path]:
        """The uploads kept (the spool's expiry leaves them alone)."""
        return {self.spool.path(user, bid) for user, bid in (*self.owners, *self.again.values())}

    def recover(self) -> None:
        """After a restart (once the held tasks are held again, and the
        spool charged): each DROP put off before is put off again if tasks
        still need its upload, else the upload goes now. Its client had the
        result (it fetched it whole before dropping it), so the result's
        acknowledgement, put off too and forgotten by the restart, is put
        off again or made now: the record does not keep it until it expires."""
        relay = self.relay
        for path in self.root.iterdir():
            try:
                fields = msgpack.unpackb(path.read_bytes(), raw=False)
                user, bid, task_id = fields["u"], fields["b"], fields["t"]
                if not (isinstance(user, str) and isinstance(bid, bytes) and len(bid) == 16
                        and isinstance(task_id, bytes) and len(task_id) == 16 and self._marker(user, bid) == path):
                    raise ValueError("fields of the wrong kind")
            except Exception:   # (spoiled: its upload goes with the spool's expiry)
                log.warning("removed unreadable marker %s", path)
                if not path.is_dir():
                    path.unlink(missing_ok=True)
                continue
            if self.owners.get((user, bid)) == task_id:
                self.dropped.add((user, bid))
                if task_id in relay.graph.refs:
                    relay.graph.deferred[task_id] = user
            elif task_id in relay.tasks and relay.tasks[task_id].user == user:
                # killed after its client had the result but before the result's commit: the task's
                # result comes again (the same upload, sent again, or a new one, run again): finished_again
                self.again[task_id] = (user, bid)
            else:
                self.spool.drop(user, bid)
                path.unlink(missing_ok=True)
                relay.quotas.acknowledged(relay.store.acknowledge([task_id], user), user)

    def finished_again(self, finished: list[tuple["TaskRecord", int, Any]]) -> None:
        """Tasks of :attr:`again` finished again after a restart. Their
        clients had their results and dropped them, so none will fetch,
        drop or acknowledge the result now: a result that is an upload
        tasks depend on is kept for them as a dropped one (it goes when they
        are done), any other goes now, and so does the upload dropped
        before if this result is not it; the result is acknowledged now, or
        with the tasks that depend on it."""
        relay = self.relay
        for record, status, result in finished:
            entry = self.again.pop(record.task_id, None)
            if entry is None:
                continue
            user, before = entry
            now_bid = None
            if status == P.OK and is_big(result):
                with contextlib.suppress(P.ProtocolError):
                    now_bid = parse_big(result)[0]
            if now_bid != before:
                self.spool.drop(user, before)
                self._marker(user, before).unlink(missing_ok=True)
            if now_bid is not None and (user, now_bid) in self.owners:   # kept for tasks that depend on it
                if now_bid != before:
                    self.put_off_drop(user, now_bid)
                self.dropped.add((user, now_bid))
                if record.task_id in relay.graph.refs:
                    relay.graph.deferred[record.task_id] = user
                    continue
            elif now_bid is not None:
                self.spool.drop(user, now_bid)
                self._marker(user, now_bid).unlink(missing_ok=True)
            relay.quotas.acknowledged(relay.store.acknowledge([record.task_id], user), user)

    def _marker(self, user: str, bid: bytes) -> Path:
        return self.root / f"{hashlib.sha256(user.encode()).hexdigest()[:32]}-{bid.hex()}"
