"""What a user may ask the relay about what is theirs (the Client API,
``fedexec.Client``, and the ``fedexec task`` commands; a dashboard can call
the same methods): their tasks' status and results (read without being
consumed), a page of their tasks, deleting their results, the functions
they registered, and the endpoints they may use.

One message type, ``INSPECT {op, q, ...}``, answered by ``INSPECTED {op, q,
...}`` (``q`` echoes the asker's number), called from ``Relay._handle``.
Who may see what: a task, result or function is its user's only (a
function also anyone's once its owner made it public); an id of another
user's is answered exactly as an unknown id (``"unknown"``), so no answer
tells whether an id exists. An endpoint is listed to those who may use it.

Limits: each question counts against its user's budget of queries a second
(reads.QueryBudget: QUERIES_PER_SECOND per user, the first QUERY_FLOOR of
them theirs whatever others ask, the rest from SHARED_QUERIES_PER_SECOND
all users share, and QUERY_CEILING for the whole relay as the last bound),
past which the answer is ``{busy: true}`` (ask again a moment later); at most MAX_ITEMS
ids a question, MAX_LIST tasks a page, ANSWER_BYTES of results and
HEADER_BUDGET of header an answer (the rest: ``more``, ask again). Nothing
here unpickles: results and function bodies are the opaque bytes stored.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .. import protocol as P
from .endpoint_view import OwnCounts, for_non_owner, is_shared
from .reads import QueryBudget
from .registry import DISPATCHED, QUEUED, EndpointState
from .store import FINISHED, KEPT, PENDING

if TYPE_CHECKING:
    from .access import Session
    from .server import Relay

log = logging.getLogger("fedexec.relay")

QUERIES_PER_SECOND = 50          # per user
QUERY_FLOOR = 10                 # of those, a user's whatever other users ask
SHARED_QUERIES_PER_SECOND = 200  # questions past their askers' floors, all users together
QUERY_CEILING = 2000             # all questions, the relay's last bound (200 users at their floor)
MAX_LIST = 1000                  # tasks in one page of a listing
ANSWER_BYTES = 16 * 1024 * 1024  # result bytes in one answer, within the relay's turn budget (the rest: ask again)
HEADER_BUDGET = 384 * 1024       # header bytes an answer's rows may take (MAX_HEADER is 512 KiB)
MAX_REGISTERED_PER_USER = 1000   # functions one user may keep registered
FUNCTION_BYTES_PER_SECOND = 64 << 20   # function bodies one user may register or read a second (then: busy)
MAX_DESCRIPTION = 1024

# Task statuses, as Globus Compute names them
WAITING_FOR_EP = "waiting-for-ep"          # queued for an endpoint not connected, or held for its dependencies
WAITING_FOR_LAUNCH = "waiting-for-launch"  # queued for a connected endpoint, or sent there and not started
RUNNING = "running"                        # a worker started it
SUCCESS = "success"
FAILED = "failed"                          # raised, or fedexec could not run it
CANCELLED = "cancelled"
UNKNOWN = "unknown"                        # no task of the asker's by that id (never, or no longer)
PENDING_STATUSES = (WAITING_FOR_EP, WAITING_FOR_LAUNCH, RUNNING)
STATUSES = (*PENDING_STATUSES, SUCCESS, FAILED, CANCELLED)
_FINAL = {P.OK: SUCCESS, P.EXCEPTION: FAILED, P.FAILED: FAILED, P.CANCELLED: CANCELLED}
# a listing's status filter as (states, statuses) of the record
_FILTERS: dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]] = {
    "pending": ((PENDING,), None), WAITING_FOR_EP: ((PENDING,), None), WAITING_FOR_LAUNCH: ((PENDING,), None),
    RUNNING: ((PENDING,), None), SUCCESS: ((FINISHED, KEPT), (P.OK,)),
    FAILED: ((FINISHED, KEPT), (P.EXCEPTION, P.FAILED)), CANCELLED: ((FINISHED, KEPT), (P.CANCELLED,)),
}
META_KEYS = {"host": 256, "fx": 64, "provider": 64}   # an endpoint's HELLO "meta": key -> longest value


def endpoint_meta(value: Any) -> dict[str, str]:
    """An endpoint HELLO's ``meta`` (where it runs: host name, fedexec
    version, provider type), checked: known keys, short strings."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not set(value) <= set(META_KEYS):
        raise P.ProtocolError(f"endpoint meta must be a map with keys among {', '.join(sorted(META_KEYS))}")
    return {key: P.text(text, f"meta {key}", META_KEYS[key]) for key, text in value.items()}


class Inspector:
    """Answers INSPECT messages for one relay."""

    def __init__(self, relay: "Relay") -> None:
        self.relay = relay
        self.own_counts = OwnCounts()   # a shared endpoint's counts per user (endpoint_view.py)
        self.budget = QueryBudget(QUERIES_PER_SECOND, QUERY_FLOOR, SHARED_QUERIES_PER_SECOND, QUERY_CEILING)
        # bytes of function bodies read (fn_get) or written (fn_put) this second, per user: a body
        # can be 32 MiB, and an answer nobody reads stays queued at the relay
        self.body_second = 0
        self.body_bytes: dict[str, int] = {}
        self.registered: dict[str, dict[bytes, int]] = {}   # user -> {function hash: bytes charged}
        for user, fn_hash, size in relay.store.registered_sizes():
            self.registered.setdefault(user, {})[fn_hash] = size
            relay.quotas.charge(user, 0, size)

    def handle(self, sender: bytes, session: "Session", msg: P.Message) -> None:
        fields = msg.fields
        q = fields.get("q", 0)
        if type(q) is not int:
            raise P.ProtocolError("q must be an integer")
        op = fields.get("op")
        handler = _OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            raise P.ProtocolError(f"unknown inspect op {P.shorten(op)}; one of {', '.join(_OPS)}")
        if not self.budget.spend(session.user):
            self._answer(sender, {"op": op, "q": q, "busy": True})
            return
        if op in ("fn_get", "fn_put") and not self._body_budget(session.user):
            self._answer(sender, {"op": op, "q": q, "busy": True})
            return
        answer, frames = handler(self, session, fields, msg.blobs)
        if frames:
            self._spend_body(session.user, sum(len(P.as_buffer(frame)) for frame in frames))
        self._answer(sender, {"op": op, "q": q, **answer}, frames)

    def _body_budget(self, user: str) -> bool:
        """Whether ``user`` may move another function body this second
        (FUNCTION_BYTES_PER_SECOND each)."""
        second = int(time.monotonic())
        if second != self.body_second:
            self.body_second, self.body_bytes = second, {}
        return self.body_bytes.get(user, 0) < FUNCTION_BYTES_PER_SECOND

    def _spend_body(self, user: str, nbytes: int) -> None:
        self.body_bytes[user] = self.body_bytes.get(user, 0) + nbytes

    def _answer(self, sender: bytes, fields: dict[str, Any], frames: list[Any] = ()) -> None:
        self.relay._send(sender, P.encode(P.INSPECTED, fields, frames))

    # -- tasks -----------------------------------------------------------------
    def pending_status(self, task_id: bytes, user: str) -> str | None:
        """The status of ``user``'s task the relay holds (None: not held)."""
        record = self.relay.tasks.get(task_id)
        if record is None or record.user != user:
            return None
        if record.state == DISPATCHED:
            return RUNNING if getattr(record, "started", False) else WAITING_FOR_LAUNCH
        if record.state == QUEUED:
            members = record.group or (record.endpoint_id,)
            if any((state := self.relay.endpoints.get(m)) is not None and state.connected for m in members):
                return WAITING_FOR_LAUNCH
        return WAITING_FOR_EP

    def _status(self, task_id: bytes, user: str, state: int, status: int | None) -> str:
        if state == PENDING:
            return self.pending_status(task_id, user) or WAITING_FOR_EP
        return _FINAL.get(status, FAILED)

    def task_info(self, user: str, task_ids: list[bytes], results: bool) -> tuple[list[list[Any]], list[Any]]:
        """Rows ``[task id, status, endpoint, submitted, finished, result
        status or None, result ref or None, more?]`` for ``user``'s tasks
        among ``task_ids`` (others, and unknown ids: status "unknown"), with
        their results (refs to the returned frames) if ``results``."""
        relay = self.relay
        store = relay.store
        task_ids = list(dict.fromkeys(task_ids))
        if any(task_id not in relay.tasks for task_id in task_ids):
            relay._wait_for_record()   # (a result may be on its way to disk)
        summaries = store.task_summaries(task_ids, user)
        blobs = P.Blobs()
        rows: list[list[Any]] = []
        # result bytes read from the record: this answer's, and the turn's (shared with RESUMEs, server.py)
        budget, header = min(ANSWER_BYTES, relay.record_budget), 0
        for task_id in task_ids:
            summary = summaries.get(task_id)
            pending = self.pending_status(task_id, user)
            if summary is None and pending is None:
                rows.append([task_id, UNKNOWN, "", 0.0, 0.0, None, None])
                continue
            endpoint, state, status, submitted, finished = summary or ("", PENDING, None, 0.0, None)
            if pending is not None:   # (held in memory: its record row may lag behind)
                state, status = PENDING, None
                record = relay.tasks[task_id]
                endpoint = record.endpoint_id or ",".join(record.group or ())
            row = [task_id, self._status(task_id, user, state, status), endpoint, submitted or 0.0,
                   finished or 0.0, None if state == PENDING else status, None]
            header += 96 + len(endpoint)
            if results and state != PENDING:
                if budget <= 0 or header >= HEADER_BUDGET:
                    row.append(True)   # more: ask again
                    rows.append(row)
                    continue
                outcome = store.task_outcome(task_id)
                if outcome is None or outcome[3] != user or outcome[0] == PENDING:   # gone meanwhile
                    rows.append([task_id, UNKNOWN, "", 0.0, 0.0, None, None])
                    continue
                result = outcome[2] or b""
                budget -= len(result)
                relay.record_budget -= len(result)
                header += min(len(result), P.INLINE_MAX)
                row[6] = blobs.ref(result)
            rows.append(row)
        return rows, blobs.frames

    def _op_tasks(self, session: "Session", f: dict[str, Any], _blobs: list[Any]) -> tuple[dict, list]:
        task_ids = P.task_ids(f.get("tids"))
        results = f.get("results", False)
        if type(results) is not bool:
            raise P.ProtocolError("results must be true or false")
        rows, frames = self.task_info(session.user, task_ids, results)
        return {"tasks": rows}, frames

    def list_tasks(self, user: str, *, status: str | None = None, endpoint: str | None = None,
                   since: float | None = None, before: tuple[float, bytes] | None = None,
                   limit: int = 100) -> tuple[list[list[Any]], list[Any] | None]:
        """A page of ``user``'s tasks, newest first: rows ``[task id, status,
        endpoint, submitted, finished]``, and the cursor of the next page
        (None: this was the last)."""
        relay = self.relay
        relay._wait_for_record()   # (tasks and results on their way to disk)
        states, statuses = _FILTERS[status] if status is not None else (None, None)
        found = relay.store.list_tasks(user, endpoint=endpoint, since=since, states=states, statuses=statuses,
                                       before=before, limit=limit)
        rows: list[list[Any]] = []
        header = 0
        last = None
        for task_id, ep, state, result_status, submitted, finished in found:
            header += 96 + len(ep)
            if header > HEADER_BUDGET:
                break
            last = [submitted, task_id]
            name = self._status(task_id, user, state, result_status)
            if status is not None and status in PENDING_STATUSES and name != status:
                continue
            rows.append([task_id, name, ep, submitted or 0.0, finished or 0.0])
        more = len(found) == limit or (last is not None and last[1] != found[-1][0])
        return rows, last if more and last is not None else None

    def _op_list(self, session: "Session", f: dict[str, Any], _blobs: list[Any]) -> tuple[dict, list]:
        status = f.get("status")
        if status is not None and status not in _FILTERS:
            raise P.ProtocolError(f"status must be one of {', '.join(_FILTERS)}, not {P.shorten(status)}")
        endpoint = f.get("ep")
        if endpoint is not None:
            P.text(endpoint, "endpoint id", 64 * 1024)
        since = f.get("since")
        if since is not None and type(since) not in (int, float):
            raise P.ProtocolError("since must be a time (seconds since the epoch)")
        limit = f.get("limit", 100)
        if type(limit) is not int or not 1 <= limit <= MAX_LIST:
            raise P.ProtocolError(f"limit must be an integer from 1 to {MAX_LIST}")
        before = f.get("before")
        if before is not None:
            if not (isinstance(before, list) and len(before) == 2 and type(before[0]) in (int, float)
                    and isinstance(before[1], bytes) and len(before[1]) == 16):
                raise P.ProtocolError("before must be a cursor [submitted, task id] from an earlier page")
            before = (before[0], before[1])
        rows, cursor = self.list_tasks(session.user, status=status, endpoint=endpoint, since=since, before=before,
                                       limit=limit)
        return {"tasks": rows, "next": cursor}, []

    def delete_results(self, user: str, task_ids: list[bytes]) -> int:
        """Forget ``user``'s results among ``task_ids`` (acknowledged or not);
        how many. Unfinished tasks, others' and unknown ids are left alone,
        and so are results tasks held at the relay still need."""
        relay = self.relay
        if any(task_id not in relay.tasks for task_id in task_ids):
            relay._wait_for_record()
        if relay.graph.refs:
            task_ids = [task_id for task_id in task_ids if task_id not in relay.graph.refs]
        unacked, kept = relay.store.delete_results(task_ids, user)
        relay.quotas.acknowledged(unacked, user, keep=False)
        if relay.quotas.retained is not None:
            relay.quotas.retained.results_gone(unacked, user)   # (their uploads, results over 16 MiB)
            if kept:
                relay.quotas.retained.forget(kept, user)
        return len(unacked) + len(kept)

    def _op_delete(self, session: "Session", f: dict[str, Any], _blobs: list[Any]) -> tuple[dict, list]:
        return {"deleted": self.delete_results(session.user, P.task_ids(f.get("tids")))}, []

    # -- registered functions ----------------------------------------------------
    def _op_fn_put(self, session: "Session", f: dict[str, Any], blobs: list[Any]) -> tuple[dict, list]:
        fn_hash = f.get("h")
        if not (isinstance(fn_hash, bytes) and len(fn_hash) == 32):
            raise P.ProtocolError("a function id (h) is 32 bytes")
        name = P.text(f.get("name", ""), "function name")
        description = P.text(f.get("desc", ""), "description", MAX_DESCRIPTION)
        public = f.get("public", False)
        if type(public) is not bool or len(blobs) != 1:
            raise P.ProtocolError("fn_put takes public (true or false) and one frame: the function body")
        body = P.as_bytes(blobs[0])
        user, relay = session.user, self.relay
        if len(body) > relay.max_function:
            return {"err": P.too_large("the function", len(body), relay.max_function)[0]}, []
        if P.content_hash(body) != fn_hash:
            return {"err": "the function body does not match its id (its sha256)"}, []
        mine = self.registered.setdefault(user, {})
        before = mine.get(fn_hash, 0)
        self._spend_body(user, len(body))
        if before:   # registered already: the same id is the same body (its first description stays)
            return {"h": fn_hash}, []
        if not before and len(mine) >= MAX_REGISTERED_PER_USER:
            return {"err": f"user {user!r} has {len(mine):,} functions registered, the most one user may "
                           f"({MAX_REGISTERED_PER_USER:,})"}, []
        over = relay.quotas.refusal(user, 0, len(body) - before) if len(body) > before else None
        if over is not None:
            return {"err": over[0]}, []
        relay.quotas.charge(user, 0, len(body) - before)
        mine[fn_hash] = len(body)
        relay.store.register_function(user, fn_hash, body, name, description, public)
        return {"h": fn_hash}, []

    def _op_fn_get(self, session: "Session", f: dict[str, Any], _blobs: list[Any]) -> tuple[dict, list]:
        fn_hash = f.get("h")
        if not (isinstance(fn_hash, bytes) and len(fn_hash) == 32):
            raise P.ProtocolError("a function id (h) is 32 bytes")
        found = self.relay.store.registered_function(fn_hash, session.user)
        if found is None:
            return {"found": False}, []
        owner, body, name, description, public, created = found
        return {"found": True, "h": fn_hash, "name": name, "desc": description, "public": bool(public),
                "yours": owner == session.user, "created": created}, [body]

    def _op_fn_del(self, session: "Session", f: dict[str, Any], _blobs: list[Any]) -> tuple[dict, list]:
        """Forget a function the asker registered (its owner only: another
        user's id, public or not, is answered as an unknown one). Tasks
        submitted with it keep running: each carried its body to the relay."""
        fn_hash = f.get("h")
        if not (isinstance(fn_hash, bytes) and len(fn_hash) == 32):
            raise P.ProtocolError("a function id (h) is 32 bytes")
        mine = self.registered.get(session.user)
        size = mine.pop(fn_hash, None) if mine else None
        if size is None:
            return {"deleted": False}, []
        if not mine:
            del self.registered[session.user]
        self.relay.store.unregister_function(session.user, fn_hash)
        self.relay.quotas.release(session.user, 0, size)
        return {"deleted": True}, []

    # -- endpoints -------------------------------------------------------------
    def describe_endpoint(self, state: EndpointState, user: str | None = None) -> dict[str, Any]:
        """An endpoint's status and metadata, as the Client API gives them
        (to ``user``: on an endpoint shared with them and not theirs, their
        own tasks' counts only, endpoint_view.py)."""
        row = self._describe_endpoint(state)
        if user is not None and user != state.access.owner and is_shared(state.access):
            own = self.own_counts.of(state, time.monotonic()).get(user, (0, 0))
            row = for_non_owner(row, own, "queued", "running")
        return row

    def _describe_endpoint(self, state: EndpointState) -> dict[str, Any]:
        running = len(state.dispatched)
        online = state.connected
        if state.report is not None and online:   # as the endpoint counts them, at its last heartbeat
            workers, idle, blocks = state.report.workers, state.report.idle, len(state.report.blocks)
        else:   # (an endpoint of an older fedexec, or offline)
            workers, idle, blocks = state.workers, max(0, state.workers - running) if online else 0, None
        return {"id": state.endpoint_id, "name": state.name, "status": "online" if online else "offline",
                "workers": workers, "idle_workers": idle, "blocks": blocks, "running": running,
                "queued": len(state.queue), "python_version": state.python, "owner": state.access.owner,
                "public": state.access.public, **state.meta}

    def endpoints(self, session: "Session") -> list[dict[str, Any]]:
        """The endpoints ``session``'s user may use (at most MAX_ITEMS)."""
        found = []
        for state in self.relay.endpoints.by_id.values():
            if state.access.allows(session.user, session.groups):
                found.append(self.describe_endpoint(state, session.user))
                if len(found) >= P.MAX_ITEMS:
                    break
        return found

    def _op_endpoints(self, session: "Session", _f: dict[str, Any], _blobs: list[Any]) -> tuple[dict, list]:
        return {"endpoints": self.endpoints(session)}, []

    def _op_endpoint(self, session: "Session", f: dict[str, Any], _blobs: list[Any]) -> tuple[dict, list]:
        state = self.relay.endpoints.get(P.text(f.get("ep"), "endpoint id"))
        if state is None or not state.access.allows(session.user, session.groups):
            return {"found": False}, []   # (one not shared with the asker is as unknown)
        return {"found": True, "endpoint": self.describe_endpoint(state, session.user)}, []


_OPS = {"tasks": Inspector._op_tasks, "list": Inspector._op_list, "delete": Inspector._op_delete,
        "fn_put": Inspector._op_fn_put, "fn_get": Inspector._op_fn_get, "fn_del": Inspector._op_fn_del,
        "endpoints": Inspector._op_endpoints,
        "endpoint": Inspector._op_endpoint}
