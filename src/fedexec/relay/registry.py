"""In-memory state of the relay: tasks in flight and the endpoints they go to."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack

# task states while the relay holds a task
QUEUED = 0
DISPATCHED = 1


class TaskRecord:
    """A task the relay accepted and has not yet seen finish.

    ``args`` is the opaque argument blob, kept until the task finishes so that
    the task can be sent again if its endpoint goes away.

    A task submitted to a group of endpoints has ``group`` (the members' ids,
    sorted); its ``endpoint_id`` is the member it was last routed to ("" until
    then, or after a relay restart), whose results alone are taken for it.
    """

    __slots__ = ("task_id", "client", "endpoint_id", "fn_hash", "kind", "python", "args", "state", "options",
                 "user", "group", "started")   # started: set once a worker started it (never read before)

    def __init__(self, task_id: bytes, client: bytes, endpoint_id: str, fn_hash: bytes,
                 kind: int, python: str, args: Any, options: dict | None = None, user: str = "local",
                 group: tuple[str, ...] | None = None) -> None:
        self.task_id = task_id
        self.client = client
        self.user = user          # who submitted it: only they may see, cancel or reattach it
        self.endpoint_id = endpoint_id
        self.group = group
        self.fn_hash = fn_hash
        self.kind = kind
        self.python = python
        self.args = args
        self.state = QUEUED
        self.options = options   # memo key and/or trace, when the client asked for them

    def row(self, args_ref: bytes | int, fn_ref: bytes | int, owner: str = "") -> list[Any]:
        """The row sent to an endpoint owned by ``owner``: a task of another
        user says whose it is ("u"), so that its pool runs it in a worker
        serving that user only (a client's own "u" is never passed on)."""
        row = [self.task_id, self.fn_hash, args_ref, fn_ref, self.kind, self.python]
        options = self.options
        if options is not None and ("tr" in options or "u" in options):  # a copy: a re-dispatch stamps afresh
            options = {key: value for key, value in options.items() if key != "u"}
            if "tr" in options:
                options["tr"] = [*options["tr"], time.time()]
        if self.user != owner:
            options = {**(options or {}), "u": self.user}
        if options:
            row.append(options)
        return row


@dataclass
class EndpointAccess:
    """Who may use an endpoint: its owner (the user it first connected as),
    the users and Globus groups it is shared with, or everyone; which
    functions it runs (None: any); and whether its memoized results are
    shared among all its users (``share_memo``, the owner's opt-in: by
    default a memoized result is served only to the user it was computed for).
    """

    owner: str = ""
    public: bool = False
    users: set = field(default_factory=set)
    groups: set = field(default_factory=set)
    functions: frozenset | None = None      # function hashes the endpoint allows
    share_memo: bool = False
    data_only: bool = False                 # it takes and gives plain data only (clients must not pickle)

    def allows(self, user: str, groups: frozenset = frozenset()) -> bool:
        return self.public or user == self.owner or user in self.users or bool(self.groups & groups)

    def pack(self) -> bytes:
        return msgpack.packb({"public": self.public, "users": sorted(self.users), "groups": sorted(self.groups),
                              "functions": None if self.functions is None else sorted(self.functions),
                              "share_memo": self.share_memo, "data_only": self.data_only})

    @classmethod
    def unpack(cls, owner: str | None, blob: bytes | None) -> "EndpointAccess":
        data = msgpack.unpackb(blob) if blob else {}
        functions = data.get("functions")
        return cls(owner or "", bool(data.get("public")), set(data.get("users") or ()),
                   set(data.get("groups") or ()), None if functions is None else frozenset(functions),
                   data.get("share_memo") is True, data.get("data_only") is True)

    def describe(self) -> dict[str, Any]:
        return {"owner": self.owner, "public": self.public, "users": sorted(self.users),
                "groups": sorted(self.groups),
                "functions": None if self.functions is None else len(self.functions),
                "share_memo": self.share_memo}


@dataclass
class EndpointState:
    """One endpoint as the relay sees it: identity, connection and credit."""

    endpoint_id: str
    name: str
    python: str
    workers: int = 0
    routing_id: bytes | None = None
    credit: int = 0
    heartbeat_period: float = 2.0
    heartbeats_missed: int = 3        # disconnected after this many periods of silence (+ 1 s)
    last_seen: float = 0.0
    queue: deque = field(default_factory=deque)            # TaskRecords waiting for credit
    dispatched: dict = field(default_factory=dict)          # task_id -> TaskRecord
    known_functions: set = field(default_factory=set)       # hashes this connection has
    access: EndpointAccess = field(default_factory=EndpointAccess)
    reported_backlog: int = -1                              # queue length last told the endpoint
    hello_at: float = 0.0                                   # time.monotonic() of this connection's HELLO
    stale: int = 0          # entries of `queue` taken back by a HOLDING (skipped when met; see Relay)
    meta: dict = field(default_factory=dict)   # where it runs, from its HELLO (inspect.endpoint_meta)
    report: Any = None   # what its last heartbeat said of it (endpoint_status.EndpointReport)
    # tasks it was told to drop (Relay._take_back_held), whose CANCELLED answer is not yet in: that
    # answer is no outcome (task id -> time.monotonic() told; kept over reconnections: DropNotes)
    dropping: dict = field(default_factory=dict)

    @property
    def connected(self) -> bool:
        return self.routing_id is not None

    def expired(self, now: float) -> bool:
        return self.connected and now - self.last_seen > self.heartbeats_missed * self.heartbeat_period + 1.0

    def disconnect(self) -> list[TaskRecord]:
        """Forget the connection and put its unfinished tasks back in front of
        the queue, in their original order, for when it comes back. Tasks
        routed here from a group are not kept for this endpoint: they are
        returned (in order), for their group's queue."""
        self.routing_id = None
        self.credit = 0
        self.reported_backlog = -1
        self.known_functions.clear()
        grouped: list[TaskRecord] = []
        for record in reversed(list(self.dispatched.values())):
            record.state = QUEUED
            if record.group is None:
                self.queue.appendleft(record)
            else:
                grouped.append(record)
        self.dispatched.clear()
        grouped.reverse()
        if any(record.group is not None for record in self.queue):  # routed, not yet sent (rare)
            grouped += [record for record in self.queue if record.group is not None]
            self.queue = deque(record for record in self.queue if record.group is None)
        return grouped

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.endpoint_id,
            "name": self.name,
            "py": self.python,
            "workers": self.workers,
            "status": "connected" if self.connected else "disconnected",
            "queued": len(self.queue),
            "running": len(self.dispatched),
            "last_seen": self.last_seen,
            "owner": self.access.owner,
            "public": self.access.public,
            "share_memo": self.access.share_memo,
            "data_only": self.access.data_only,
        }


@dataclass
class GroupQueue:
    """Tasks submitted to a group of endpoints, waiting to be routed to one
    member (see ``Relay._route_group``)."""

    members: tuple[str, ...]                          # endpoint ids, sorted
    queue: deque = field(default_factory=deque)       # TaskRecords, oldest first
    hold_until: float = 0.0                           # time.monotonic() before which none is routed
    stale: int = 0                                    # entries taken back by a HOLDING (skipped when met)


class EndpointRegistry:
    """Endpoints by id and by the ZeroMQ routing id of their connection, and
    the queues of endpoint groups (by their sorted member ids)."""

    def __init__(self) -> None:
        self.by_id: dict[str, EndpointState] = {}
        self.by_routing: dict[bytes, EndpointState] = {}
        self.groups: dict[tuple[str, ...], GroupQueue] = {}
        self.owned: dict[str, int] = {}   # user -> endpoints registered to them

    def group(self, members: tuple[str, ...]) -> GroupQueue:
        queue = self.groups.get(members)
        if queue is None:
            queue = self.groups[members] = GroupQueue(members)
        return queue

    def requeue(self, records: list[TaskRecord]) -> None:
        """Group tasks a member lost (it disconnected) go back to the front of
        their group's queue, in order, for a live member to run. Their
        ``endpoint_id`` still names that member: its result, should it come
        after all before the task is routed again, is taken."""
        for record in reversed(records):
            record.state = QUEUED
            self.group(record.group).queue.appendleft(record)

    def get(self, endpoint_id: str) -> EndpointState | None:
        return self.by_id.get(endpoint_id)

    def add(self, state: EndpointState) -> None:
        """A new endpoint (its owner set): counted as theirs."""
        self.by_id[state.endpoint_id] = state
        owner = state.access.owner
        self.owned[owner] = self.owned.get(owner, 0) + 1

    def connect(self, state: EndpointState, routing_id: bytes) -> None:
        if state.connected:
            self.disconnect(state)  # a restarted endpoint: its old session is gone
        other = self.by_routing.pop(routing_id, None)
        if other is not None and other is not state:
            self.requeue(other.disconnect())
        state.routing_id = routing_id
        state.last_seen = time.monotonic()
        self.by_routing[routing_id] = state

    def disconnect(self, state: EndpointState) -> None:
        if state.routing_id is not None:
            self.by_routing.pop(state.routing_id, None)
        self.requeue(state.disconnect())

    def connected(self) -> list[EndpointState]:
        return list(self.by_routing.values())


class DropNotes:
    """The tasks endpoints were told to drop, whose answers (CANCELLED) are
    no outcome, kept in each ``EndpointState.dropping``: the first CANCELLED
    from that endpoint for one is that answer (``Relay._on_results``).

    Bounded, as the ids come from what an endpoint says it holds (its owner's
    to make up; ``P.task_ids`` has checked they are 16 bytes): at most
    PER_OWNER at once over all the endpoints of one owner (an owner may
    register many), and a note counts for AFTER seconds only (an answer
    comes within a round trip; one that never comes, for a task the endpoint
    did not have after all, swallows nothing later). Stale notes go when
    their endpoint is told to drop more, or is deleted."""

    PER_OWNER = 65536
    AFTER = 300.0

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}   # owner -> notes over their endpoints

    def note(self, state: EndpointState, task_ids: list[bytes]) -> None:
        now = time.monotonic()
        dropping = state.dropping
        self._expire(state, now)
        count = self.counts.get(state.access.owner, 0)
        added = 0
        for task_id in task_ids:
            if task_id in dropping:
                del dropping[task_id]   # (noted again: the newest, last)
            elif count + added >= self.PER_OWNER:
                if not dropping:
                    break   # (this owner's other endpoints hold the rest)
                del dropping[next(iter(dropping))]   # its oldest goes
            else:
                added += 1
            dropping[task_id] = now
        if added:
            self.counts[state.access.owner] = count + added

    def answered(self, state: EndpointState, task_id: bytes) -> bool:
        """Forget ``task_id``'s note at ``state`` (an outcome came from there,
        or its client cancelled it); whether there was one, made less than
        AFTER seconds ago."""
        noted = state.dropping.pop(task_id, None)
        if noted is None:
            return False
        self._uncount(state, 1)
        return time.monotonic() - noted < self.AFTER

    def forget(self, state: EndpointState) -> None:
        """``state``'s endpoint is deleted: its notes go."""
        self._uncount(state, len(state.dropping))
        state.dropping.clear()

    def _expire(self, state: EndpointState, now: float) -> None:
        dropping = state.dropping
        gone = 0
        while dropping:
            task_id = next(iter(dropping))
            if now - dropping[task_id] < self.AFTER:
                break
            del dropping[task_id]
            gone += 1
        self._uncount(state, gone)

    def _uncount(self, state: EndpointState, gone: int) -> None:
        if not gone:
            return
        owner = state.access.owner
        count = self.counts.get(owner, 0) - gone
        if count > 0:
            self.counts[owner] = count
        else:
            self.counts.pop(owner, None)
