"""The relay's part of large payloads (see fedexec/transfer.py): UPLOAD,
FETCH and DROP messages, checks of the references tasks and results carry,
and the lifetime of the spool files (charged to their user's byte quota)."""

from __future__ import annotations

import hmac
import os
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import protocol as P
from ..transfer import LOCAL, LOCAL_OK, RELEASE, SECRET_NAME, MAX_LARGE_PAYLOAD, Spool, bound_to, is_big, parse_big
from .spares import Spares

if TYPE_CHECKING:
    from .access import Session
    from .registry import TaskRecord
    from .retained import RetainedResults
    from .server import Relay


TYPES = frozenset({P.UPLOAD, P.FETCH, P.DROP, LOCAL, RELEASE})
MAX_HANDED = 100_000   # uploads whose same-host hand-outs are counted (recycling needs exactly one)
MAX_PROVEN = 4096      # connections remembered as proven same-host (the oldest forgotten first)
EXPIRY_PERIOD = 60.0   # seconds between looks for stale spool files
NOT_BOUND = "not an upload the endpoint made for this task"   # (said to the task's user and the endpoint)


class BulkTransfers:
    """Chunked uploads and fetches at a relay, one message at a time, each
    answered at once (the sender paces itself by the answers: the relay
    never queues more than a few chunks per transfer)."""

    def __init__(self, relay: "Relay") -> None:
        self.relay = relay
        quotas = relay.quotas

        def charge(user: str, nbytes: int) -> None:
            if nbytes >= 0:
                quotas.charge(user, 0, nbytes)
            else:
                quotas.release(user, 0, -nbytes)

        def refusal(user: str, nbytes: int) -> str | None:
            over = quotas.refusal(user, 0, nbytes)
            return None if over is None else over[0]

        self.spool = Spool(relay.data_dir, charge, refusal, relay.max_payload)
        self.spares = self.spool.spares = Spares(relay.data_dir)   # recycled payload files (spares.py)
        # uploads of finished tasks, dropped once their task's record is committed (finished())
        self._finishing: list[tuple[str, bytes, bool]] = []
        self._after_commit: deque[tuple[int, list[tuple[str, bytes, bool]]]] = deque()
        # (user, upload id) -> times the same-host path handed its file to a reader to map
        self.handed: dict[tuple[str, bytes], int] = {}
        self.forgot = False   # entries were forgotten (MAX_HANDED): an unknown upload is then not recycled
        self.next_expiry = time.monotonic() + EXPIRY_PERIOD
        self.same_host = SameHost(self)

    def recover(self) -> None:
        self.spool.recover()

    # -- messages ---------------------------------------------------------------
    def handle(self, sender: bytes, session: "Session", msg: P.Message) -> None:
        fields = msg.fields
        echo = fields.get("q")   # the transfer's own id: answers to an earlier transfer are told apart
        if echo is not None and not (isinstance(echo, bytes) and len(echo) <= 16):
            raise P.ProtocolError("a transfer id (q) is at most 16 bytes")
        if msg.type == P.UPLOAD:
            if len(msg.blobs) != 1:
                raise P.ProtocolError("an UPLOAD carries one chunk frame")
            user, why = self._whose(session, fields, "upload a result for")
            why = why or unbound(fields)
            reply = {"b": fields.get("b"), "err": why} if why else self.spool.upload(user, fields, msg.blobs[0])
            reply["q"] = echo
            self.relay._send(sender, P.encode(P.UPLOADED, reply))
        elif msg.type == P.FETCH:
            user, why = self._whose(session, fields, "fetch the arguments of")
            if why:
                self.relay._send(sender, P.encode(P.CHUNK_MSG, {"b": fields.get("b"), "o": fields.get("o"),
                                                                "err": why, "q": echo}))
                return
            reply, frames = self.spool.read(user, fields)
            reply["q"] = echo
            self.relay._send(sender, P.encode(P.CHUNK_MSG, reply, frames))
        elif msg.type == LOCAL:
            self.same_host.handle(sender, session, fields, echo)
        elif msg.type == P.DROP:
            bid = fields.get("b")
            if not (isinstance(bid, bytes) and len(bid) == 16):
                raise P.ProtocolError("malformed DROP")
            retained = self.relay.quotas.retained
            if retained is not None and retained.holds_upload(session.user, bid):
                return   # a stored result's: it goes with the result (retained.py), read again until then
            if not self.relay.refs.holds(session.user, bid) \
                    and not self.relay.kept.put_off_drop(session.user, bid):   # (held tasks need it: kept.py)
                if fields.get("k") is True and self.mapped_once(session.user, bid):
                    # the client maps it: held for its RELEASE, then recycled (spares.py); not when it was
                    # handed to more than one reader (Client.get_result maps it too and releases nothing)
                    self.spool.recycle(session.user, bid, held=True)
                else:
                    self.spool.drop(session.user, bid)   # (the user's own tasks alone could miss it; a ref goes by REF del)
        elif msg.type == RELEASE:
            bids = fields.get("bs")
            if not (isinstance(bids, list) and len(bids) <= P.MAX_ITEMS
                    and all(isinstance(bid, bytes) and len(bid) == 16 for bid in bids)):
                raise P.ProtocolError(f"malformed RELEASE (a list of at most {P.MAX_ITEMS} upload ids)")
            for bid in bids:   # (looked up among the sender's own held files only)
                self.spares.release(session.user, bid)

    def attach_retained(self, retained: "RetainedResults") -> None:
        """The relay keeps results (retained.py): the uploads of results over
        16 MiB go with their rows, through here; one that tasks held at the
        relay still depend on waits for them (kept.py)."""
        spool, kept = self.spool, self.relay.kept

        def drop(user: str, bid: bytes) -> None:
            if not kept.put_off_drop(user, bid):
                spool.drop(user, bid)

        retained.drop_upload = drop
        retained.upload_exists = lambda user, bid: spool.complete(user, bid) is not None

    def _whose(self, session: "Session", fields: dict[str, Any], action: str) -> tuple[str, str]:
        """The user whose spool a transfer uses: the connection's own, or with
        ``tid`` (an endpoint's transfer for a task), the task's user, once the
        task is one submitted to an endpoint of the connection's user (a
        member's, for a group). Its state does not matter: after a relay
        restart an endpoint goes on with the tasks it holds before it has
        said hello again."""
        task_id = fields.get("tid")
        if task_id is None:
            return session.user, ""
        record = self.relay.tasks.get(task_id) if isinstance(task_id, bytes) else None
        if record is not None:
            members = (record.endpoint_id,) if record.endpoint_id else record.group or ()
            for member in members:
                state = self.relay.endpoints.get(member)
                if state is not None and state.access.owner == session.user:
                    if fields.get("b") is not None and action.startswith("fetch") and not (
                            is_big(record.args) and parse_big(record.args)[0] == fields["b"]
                            or self.relay.refs.fetchable(record, fields)
                            or self.relay.kept.fetchable(record, fields["b"])):
                        break   # an endpoint fetches a task's own arguments (or DataRefs, or the large
                        # results it depends on: kept.py), nothing else of its user
                    # a transfer for a task is a sign of life: its agent is busy with it, not gone
                    state.last_seen = time.monotonic()
                    return record.user, ""
        return "", (f"user {session.user!r} may not {action} task {P.shorten(task_id)}: it is not a task "
                    "submitted to one of their endpoints")

    # -- references in rows -------------------------------------------------------
    def check_arguments(self, user: str, blob: bytes) -> tuple[str, str, dict[str, int]] | None:
        """Why a task's arguments reference may not be accepted, as
        ``(kind, message, details)``; None when it names a complete upload
        of ``user`` within the limit."""
        try:
            bid, total, _ = parse_big(blob)
        except P.ProtocolError as exc:
            return P.REJECTED, str(exc), {}
        if total > self.relay.max_payload:
            message, details = P.too_large("the arguments", total, self.relay.max_payload)
            return P.TOO_LARGE, message, details
        if self.relay.refs.holds(user, bid):   # (its upload would go when the task ends)
            return (P.REJECTED, f"the task's arguments name upload {bid.hex()}, which is a DataRef: pass the "
                                "DataRef itself as an argument", {})
        if self.spool.complete(user, bid) is None:
            return (P.REJECTED, f"the task's arguments name upload {bid.hex()}, which user {user!r} has not "
                                "uploaded (unknown, incomplete, another user's, or expired)", {})
        return None

    def check_result(self, record: "TaskRecord", status: int, blob: Any, sender: bytes = b"",
                     endpoint_user: str = "") -> tuple[int, Any]:
        """A result row's status and blob: a reference to a complete upload
        of the task's user, made for this task (its id bound to the task:
        transfer.task_upload_id), stands; any other becomes a FAILED result.
        An endpoint that names an upload not made for the task is told so
        (an ERROR to ``sender``) and logged as refused (``endpoint_user``)."""
        try:
            bid, total, _ = parse_big(blob)
        except P.ProtocolError as exc:
            return P.FAILED, P.pack_failure(P.REJECTED, f"the endpoint sent a malformed result: {exc}")
        if self.relay.refs.holds(record.user, bid):   # (its user's fetch, then DROP, would delete the ref)
            return P.FAILED, P.pack_failure(P.REJECTED, f"the endpoint's result names a DataRef of the task's user "
                                                        f"({bid.hex()}), not an upload of its own; it was not taken")
        if (record.user, bid) in self.relay.kept.owners:   # (its client's DROP would delete it too)
            return P.FAILED, P.pack_failure(P.REJECTED, f"the endpoint's result names the result of another task "
                                                        f"({bid.hex()}), not an upload of its own; it was not taken")
        if not bound_to(bid, record.task_id):   # (another upload of its user: its DROP would delete that)
            message = (f"the endpoint's result names upload {bid.hex()}, {NOT_BOUND} "
                       f"({record.task_id.hex()}); it was not taken")
            self.relay._refused_task(endpoint_user, f"name as a task's result an upload that is {NOT_BOUND}",
                                     record.task_id)
            if sender:
                self.relay._send(sender, P.encode(P.ERROR, {"msg": message}))
            return P.FAILED, P.pack_failure(P.REJECTED, message)
        if total > self.relay.max_payload:
            message, details = P.too_large("the result", total, self.relay.max_payload)
            self.spool.drop(record.user, bid)
            return P.FAILED, P.pack_failure(P.TOO_LARGE, message, **details)
        if self.spool.complete(record.user, bid) is None:
            return P.FAILED, P.pack_failure(P.LOST, f"the endpoint's result names upload {bid.hex()}, which the "
                                                    "relay does not have for this task's user")
        return status, P.as_bytes(blob)

    def finished(self, record: "TaskRecord", ran: bool = False) -> None:
        """A task with a large argument left the relay: its upload goes too,
        once the record that replaces the task's row (its result, or its
        removal) is on disk (:meth:`committed`): a relay killed before that
        commit finds the task pending again at its restart, and needs it.
        Recycled (spares.py) when its worker ``ran`` it to a result (so no
        one maps it any more: transfer.privatize_leftovers) and it was handed
        out once, else unlinked (a cancelled task's worker may still be
        reading it). A private relay (the embedded default's: its record dies
        with its program, and nobody restarts it) lets go at once, so that the
        program's next payload finds the file."""
        if self.relay.remove_on_exit is not None:
            self._let_go(record.user, parse_big(record.args)[0], ran)
        else:
            self._finishing.append((record.user, parse_big(record.args)[0], ran))

    def flushed(self, seq: int) -> bool:
        """The relay handed its record the writes of this turn (commit
        ``seq``); whether an upload now waits for that commit to go."""
        if self._finishing:
            self._after_commit.append((seq, self._finishing))
            self._finishing = []
            return True
        return False

    def committed(self, seq: int) -> None:
        """The record's commits up to ``seq`` are on disk: the uploads of
        tasks that finished before them may go."""
        while self._after_commit and self._after_commit[0][0] <= seq:
            for user, bid, ran in self._after_commit.popleft()[1]:
                self._let_go(user, bid, ran)

    def _let_go(self, user: str, bid: bytes, ran: bool) -> None:
        if ran and self.mapped_once(user, bid):
            self.spool.recycle(user, bid, held=False)
        else:
            self.spool.drop(user, bid)
            self.handed.pop((user, bid), None)

    def handed_out(self, user: str, bid: bytes) -> None:
        """The same-host path gave a reader the file of upload ``bid`` to map."""
        key = (user, bid)
        self.handed[key] = self.handed.pop(key, 0) + 1
        while len(self.handed) > MAX_HANDED:   # (the oldest forgotten: they are then not recycled)
            self.handed.pop(next(iter(self.handed)))
            self.forgot = True

    def mapped_once(self, user: str, bid: bytes) -> bool:
        """Whether upload ``bid`` was handed out to map at most once (so the
        one it was handed to is the one whose release frees it); forgets it."""
        count = self.handed.pop((user, bid), 0)
        return 0 < count <= 1 or (count == 0 and not self.forgot)   # (0: never mapped, unless forgotten)

    def close(self) -> None:
        """The relay stops: its recycled files go (the uploads stay)."""
        self.spares.close()

    def _in_use(self) -> set[Path]:
        used = {self.spool.path(r.user, parse_big(r.args)[0]) for r in self.relay.tasks.values() if is_big(r.args)}
        # (and the uploads DataRefs keep, refs.py, and those of results held tasks need, kept.py)
        used |= self.relay.refs.in_use() | self.relay.kept.in_use()
        retained = self.relay.quotas.retained
        if retained is not None:   # (the uploads of stored results go with their rows: retained.py)
            used.update(self.spool.path(user, bid) for user, bid in retained.held_uploads())
        return used

    def maintenance(self, now: float) -> None:
        if now < self.next_expiry:
            return
        self.next_expiry = now + EXPIRY_PERIOD
        self.spool.expire(time.time(), self.relay.result_ttl, self._in_use)


class SameHost:
    """The same-host fast path at the relay (a client or endpoint agent on
    this machine, running as this relay's OS user): large payloads handed
    over as files in the spool instead of chunks.

    The proof: at start the relay writes a random secret into a 0600 file in
    its private (0700) directory. ``hello`` answers that file's path;
    ``prove {s}`` with its content shows the connection can read the relay's
    private files, i.e. runs as its OS user (or root) on a machine that sees
    its files. The proof holds for that connection and its session only
    (remembered by routing id with the session's user and token), never
    for a claim in a message. Unproven, ``place``/``placed``/``where`` are refused (the
    sender then uses chunks). Even a proven peer gets only paths of its own
    user's uploads (the same checks as FETCH: ``_whose``), and the relay
    never opens, reads or deletes a path a peer sent: it names files by
    user and upload id as for chunks, and opens them with O_NOFOLLOW."""

    def __init__(self, bulk: BulkTransfers) -> None:
        self.bulk = bulk
        self.secret = os.urandom(32).hex().encode()
        private = bulk.spool.root.parent / "same-host"
        private.mkdir(mode=0o700, exist_ok=True)
        os.chmod(private, 0o700)
        self.secret_path = private / SECRET_NAME
        fd = os.open(self.secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, self.secret)
        finally:
            os.close(fd)
        self.proven: dict[bytes, tuple[str, str | None]] = {}   # routing id -> (user, token id)

    def handle(self, sender: bytes, session: "Session", fields: dict[str, Any], echo: Any) -> None:
        op = fields.get("op")
        reply: dict[str, Any]
        if op == "hello":
            reply = {"p": str(self.secret_path)}
        elif op == "prove":
            given = fields.get("s")
            if isinstance(given, bytes) and hmac.compare_digest(given, self.secret):
                self.proven.pop(sender, None)
                self.proven[sender] = (session.user, session.token_id)
                while len(self.proven) > MAX_PROVEN:
                    del self.proven[next(iter(self.proven))]
                reply = {"ok": True}
            else:
                reply = {"err": "wrong same-host secret: this connection keeps to chunks"}
        elif op in ("place", "placed", "where", "spare"):
            if self.proven.get(sender) != (session.user, session.token_id):
                reply = {"err": "this connection has not shown it runs as the relay's OS user on its machine"}
            else:
                reply = self._transfer(op, session, fields)
        else:
            raise P.ProtocolError("malformed same-host request")
        reply["q"] = echo
        self.bulk.relay._send(sender, P.encode(LOCAL_OK, reply))

    def _transfer(self, op: str, session: "Session", fields: dict[str, Any]) -> dict[str, Any]:
        bid, total = fields.get("b"), fields.get("n", 0)
        if not (isinstance(bid, bytes) and len(bid) == 16 and type(total) is int and 0 <= total <= MAX_LARGE_PAYLOAD):
            raise P.ProtocolError("malformed same-host request")
        spool = self.bulk.spool
        if op == "where":
            # (a hand-over is a fetch from the start: a DataRef's counts it, as refs.fetchable does for chunks)
            user, why = self.bulk._whose(session, {**fields, "o": 0}, "fetch the arguments of")
            path = None if why else spool.complete(user, bid)
            if path is None:
                return {"err": why or f"no upload {bid.hex()} of user {user!r} here"}
            self.bulk.handed_out(user, bid)
            return {"p": str(path)}
        user, why = self.bulk._whose(session, fields, "upload a result for")
        why = why or unbound(fields)
        if why:
            return {"err": why}
        if op == "place":
            return spool.place(user, bid, total)
        if op == "spare":   # an agent, for a task's large result (spares.py): a file of the task's user
            task_id = fields.get("tid")
            if not isinstance(task_id, bytes):
                raise P.ProtocolError("a spare is asked for a task (tid)")
            if user != session.user:   # (only the endpoint owner's own tasks: no user's old data to another)
                return {}
            path = self.bulk.spares.hand_out(user, total, task_id.hex())
            return {} if path is None else {"p": str(path)}
        return spool.placed(user, bid, total, unhashed=fields.get("u") is True)


def unbound(fields: dict[str, Any]) -> str:
    """Why an upload for a task (``tid``) may not go under the id it names:
    not an id made for that task (transfer.task_upload_id), as then an
    endpoint could write into another upload of the task's user still in
    progress, or name it as the task's result; "" when it may."""
    task_id, bid = fields.get("tid"), fields.get("b")
    if task_id is None or not isinstance(bid, bytes) or bound_to(bid, task_id):
        return ""
    named = task_id.hex() if isinstance(task_id, bytes) else P.shorten(task_id)
    return (f"upload id {bid.hex()} is not an id made for task {named}: an upload for a task "
            "goes under an id bound to it (fedexec.transfer.task_upload_id)")
