"""Deleting an endpoint at the relay: ``fedexec endpoint delete`` tells the
relay (message DEREGISTER), which forgets the endpoint for good.

Who may: the endpoint's owner only (the user whose credentials registered
it). Anyone else, a user it is shared with too, is answered exactly as for
an id the relay does not know (``known: false``); the attempt is logged as
a refusal.

What happens to what refers to it:

- *its tasks* (queued, held for their dependencies, or sent to it) fail at
  once with a REJECTED failure naming the deleted endpoint (their futures
  raise :class:`~fedexec.TaskRejected`; ``Client.get_task`` shows them
  failed); tasks depending on them fail in turn (DEPENDENCY), as after any
  failure: nothing is silently lost.
- *tasks for a group of endpoints* listing it stay with the group and go to
  its other members (those routed to it go back to the group's queue); a
  group left with no member the relay knows fails its tasks as above. A
  later submission naming the deleted id, alone or in a group, is refused
  as one naming an unknown endpoint; ``FederatedExecutor(id)`` raises
  :class:`~fedexec.UnknownEndpoint`. (Named groups live in each client's
  ``groups.toml``: the CLI takes the id out of this machine's.)
- *its sharing and allow-list* go with it. Memoized results computed on it
  are no longer served (their scope names it) and expire as usual;
  finished results stay readable by their users until they expire.
- *its id* is kept as deleted (durably, store.py ``deleted_endpoints``): a
  copy of the endpoint still running (or started again from a backup of
  its config) is refused with an ERROR saying it was deleted, logged on the
  relay, and stops; no one, its owner included, can register the id again
  (``fedexec endpoint configure`` makes a new one). Without that, another
  user could take the deleted id over, and clients still naming it would
  send their tasks to them.

Limits: at most DELETIONS_PER_SECOND deletions a second per user, and
reads.USERS_PER_SECOND times that for the whole relay (each waits for one
commit of the record on the relay's loop, and looks at the tasks held for
their dependencies), and at most
MAX_DELETED_PER_USER deleted ids kept per user (each deletion follows a
registration, which the endpoint quota bounds at any one time, not over
time).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from .. import protocol as P
from .reads import RecordReads
from .registry import DISPATCHED, QUEUED, EndpointState, TaskRecord

if TYPE_CHECKING:
    from .access import Session
    from .server import Relay

log = logging.getLogger("fedexec.relay")
refusals = logging.getLogger("fedexec.relay.refused")

DELETIONS_PER_SECOND = 2
MAX_DELETED_PER_USER = 100_000


class EndpointDeletions:
    """The relay's handling of DEREGISTER, and the ids of deleted endpoints."""

    def __init__(self, relay: "Relay") -> None:
        self.relay = relay
        self.deleted: dict[str, str] = {}      # endpoint id -> its owner, oldest first
        self.count: dict[str, int] = {}        # owner -> deleted ids kept
        for endpoint_id, owner in relay.store.deleted_endpoints():
            self._remember(endpoint_id, owner)
        self.budget = RecordReads(DELETIONS_PER_SECOND)

    def _remember(self, endpoint_id: str, owner: str) -> None:
        self.deleted[endpoint_id] = owner
        self.count[owner] = self.count.get(owner, 0) + 1

    def refuse_hello(self, sender: bytes, session: "Session", endpoint_id: str) -> bool:
        """Whether ``endpoint_id`` was deleted: then its HELLO is refused
        (and logged) with an ERROR that tells the endpoint to stop."""
        if endpoint_id not in self.deleted:
            return False
        refusals.warning("refused user %r: connect as endpoint %s: it was deleted by its owner "
                         "('fedexec endpoint delete'); a copy of it still runs somewhere", session.user, endpoint_id)
        self.relay._send(sender, P.encode(P.ERROR, {
            "msg": f"endpoint {endpoint_id} was deleted by its owner ('fedexec endpoint delete'): the relay no "
                   f"longer takes it; configure a new endpoint ('fedexec endpoint configure NAME')",
            "refused": True, "deleted": True}))
        return True

    def handle(self, sender: bytes, session: "Session", msg: P.Message) -> None:
        """DEREGISTER {ep}: delete the endpoint if ``session``'s user owns it."""
        endpoint_id = P.text(msg.fields.get("ep"), "endpoint id")
        if not P.is_endpoint_id(endpoint_id):
            raise P.ProtocolError(f"endpoint id {P.shorten(endpoint_id)} is not a UUID")
        user = session.user
        if not self.budget.spend(user):
            self.relay._send(sender, P.encode(P.ERROR, {
                "msg": f"too many endpoint deletions: at most {DELETIONS_PER_SECOND} a second per user; "
                       f"try again in a second"}))
            return
        state = self.relay.endpoints.get(endpoint_id)
        if state is None or state.access.owner != user:
            if state is not None:
                refusals.warning("refused user %r: delete endpoint %s: it is user %r's", user, endpoint_id,
                                 state.access.owner)
            self.relay._send(sender, P.encode(P.DEREGISTERED, {"ep": endpoint_id, "known": False}))
            return
        if self.count.get(user, 0) >= MAX_DELETED_PER_USER:
            self.relay._refuse(sender, session, f"delete endpoint {endpoint_id}",
                               f"user {user!r} has deleted {MAX_DELETED_PER_USER:,} endpoints at this relay, the "
                               f"most it keeps track of per user; ask the relay's administrator")
            return
        failed = self.delete(state)
        self.relay._send(sender, P.encode(P.DEREGISTERED, {"ep": endpoint_id, "known": True, "failed": failed}))

    def _its_tasks(self, state: EndpointState) -> list[TaskRecord]:
        """The tasks that cannot run once ``state``'s endpoint is gone (it is
        out of the registry already): those in its queue (its sent ones are
        back there), those held for their dependencies to go to it, and
        those of groups none of whose members is left. Found without a
        look at every task of the relay: its queue, the held tasks and the
        groups' keys (a deletion is rare, and bounded per user and second)."""
        relay = self.relay
        registry = relay.endpoints
        endpoint_id = state.endpoint_id
        doomed = [record for record in state.queue if record.group is None]
        for members, group in registry.groups.items():
            if endpoint_id in members and all(registry.get(member) is None for member in members):
                doomed += group.queue
        for held in relay.graph.waiting.values():   # one pass over the held tasks
            record = held.record
            if record.group is None:
                if record.endpoint_id == endpoint_id:
                    doomed.append(record)
            elif endpoint_id in record.group and all(registry.get(member) is None for member in record.group):
                doomed.append(record)
        return doomed

    def delete(self, state: EndpointState) -> int:
        """Forget ``state``'s endpoint for good (see the module's text);
        the number of its tasks failed. Written to the record before it returns."""
        relay = self.relay
        registry = relay.endpoints
        endpoint_id, owner = state.endpoint_id, state.access.owner
        if state.connected:   # a copy still running: told to stop (and refused should it say hello again)
            relay._send(state.routing_id, P.encode(P.ERROR, {
                "msg": f"endpoint {endpoint_id} was deleted by its owner ('fedexec endpoint delete')",
                "refused": True, "deleted": True}))
        registry.disconnect(state)   # (group tasks routed to it go back to their groups)
        del registry.by_id[endpoint_id]
        relay.drop_notes.forget(state)
        left = registry.owned.get(owner, 0) - 1
        if left > 0:
            registry.owned[owner] = left
        else:
            registry.owned.pop(owner, None)
        for sender in [s for s, known in relay.endpoint_senders.items() if known == endpoint_id]:
            del relay.endpoint_senders[sender]
        self._remember(endpoint_id, owner)
        doomed = self._its_tasks(state)
        failure = P.pack_failure(P.REJECTED, f"endpoint {state.name!r} ({endpoint_id}) was deleted by its owner "
                                             f"before this task ran: submit it to another endpoint",
                                 endpoint=endpoint_id)
        now = time.time()
        failed = 0
        for record in doomed:
            if relay.tasks.get(record.task_id) is not record:
                continue   # failed meanwhile (it depended on one failed before it), or a stale queue entry
            del relay.tasks[record.task_id]
            if record.state == QUEUED:
                relay._unqueue(record)    # (a group's queue; the endpoint's own goes below)
            elif record.state != DISPATCHED:   # held for its dependencies (graph.WAITING)
                relay.graph.drop(record.task_id)
            relay._fail_held(record, failure, now)
            failed += 1
        state.queue.clear()
        state.dispatched.clear()
        relay.store.delete_endpoint(endpoint_id, owner)
        log.info("user %r deleted endpoint %s (%s): %d task(s) failed", owner, state.name, endpoint_id, failed)
        return failed
