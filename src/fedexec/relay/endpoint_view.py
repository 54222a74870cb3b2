"""What a user sees of an endpoint that is shared with them (README,
"Sharing an endpoint") but is not theirs: the Client API's endpoint rows
(inspect.py) and the dashboard's (dashboard.py).

The rule: an endpoint's owner sees everything of it, every user's tasks
included (it is their machine). Any other user who may use it sees its
identity and whether it is online, and the counts of *their own* tasks on
it only: queued at the relay for it, and sent to it and not finished. The
numbers that count every user's work there (workers busy and idle, the
worker count itself, which scales with the load, tasks queued at the
endpoint, its blocks and their scheduler job ids) are the owner's only:
any of them minus one's own tasks tells what the others run, exactly so
with two users. They are None (blocks: an empty list) for the others.

Cost: the own counts take one pass over the endpoint's queue at the relay
(its first SCAN_LIMIT entries: past that, a lower bound) and over the tasks
sent to it, made at most once a second per shared endpoint and only when
someone asks (the dashboard's snapshot, a Client API question), never on
the path of a task.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from .registry import QUEUED

if TYPE_CHECKING:
    from .registry import EndpointState

SCAN_LIMIT = 200_000   # entries of a shared endpoint's queue counted per user (about 10 ms)
RECOUNT_AFTER = 1.0    # seconds a count is reused
# an endpoint row's fields that count every user's work there (the owner's only), Client API and dashboard
OWNER_ONLY = ("workers", "idle_workers", "busy_workers", "queued_at_endpoint", "blocks")


def is_shared(access: Any) -> bool:
    """Whether users other than the owner may use an endpoint (``access``: its EndpointAccess)."""
    return bool(access.public or access.users or access.groups)


class OwnCounts:
    """Per user, their tasks queued at the relay for a shared endpoint and
    sent to it unfinished, counted at most once a RECOUNT_AFTER per endpoint."""

    def __init__(self) -> None:
        self.cache: dict[str, tuple[float, dict[str, tuple[int, int]]]] = {}

    def of(self, state: "EndpointState", now: float) -> dict[str, tuple[int, int]]:
        """``{user: (queued at the relay, sent and unfinished)}`` for the
        endpoint ``state`` (``now``: time.monotonic())."""
        cached = self.cache.get(state.endpoint_id)
        if cached is not None and now - cached[0] < RECOUNT_AFTER:
            return cached[1]
        queued: dict[str, int] = {}
        endpoint_id = state.endpoint_id
        for record in itertools.islice(state.queue, SCAN_LIMIT):
            if record.state == QUEUED and record.endpoint_id == endpoint_id:   # (not taken back since)
                queued[record.user] = queued.get(record.user, 0) + 1
        sent: dict[str, int] = {}
        for record in state.dispatched.values():
            sent[record.user] = sent.get(record.user, 0) + 1
        counts = {user: (queued.get(user, 0), sent.get(user, 0)) for user in queued.keys() | sent.keys()}
        if len(self.cache) > 4096:   # (endpoints forgotten since: a fresh start)
            self.cache.clear()
        self.cache[endpoint_id] = (now, counts)
        return counts


def for_non_owner(row: dict[str, Any], own: tuple[int, int], queued_key: str, sent_key: str) -> dict[str, Any]:
    """An endpoint row as a user who is not its owner sees it: their own
    counts (``own``: queued, sent) under ``queued_key`` and ``sent_key``, and
    the owner-only fields blanked."""
    view = dict(row)
    for key in OWNER_ONLY:
        if key in view:
            view[key] = [] if key == "blocks" and isinstance(view[key], list) else None
    view[queued_key], view[sent_key] = own
    return view
