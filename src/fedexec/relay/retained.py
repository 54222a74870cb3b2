"""Results kept after their client acknowledged them, so that their owner can
read them again (the Client API: ``Client.get_result``, ``reattach``) until
they expire (``result_ttl``) or the owner deletes them.

Only a relay started from the command line keeps them (``Relay(...,
keep_acknowledged=True)``, the default unless the relay removes its data
when it stops): the embedded default's relay dies with its program, and its
hot path (a no-op task's row, result and acknowledgement netted out within
one commit, store.py) stays as it was.

What a kept result costs its user: its bytes (at least
``quota.MIN_ROW_BYTES``) stay charged to their byte quota, as they were
before the acknowledgement (the task no longer counts as one in flight);
at most ``max_per_user`` results of a user are kept. The oldest acknowledged
go first, when a user is over that count or needs the bytes for new work
(``Quotas.refusal`` asks :meth:`RetainedResults.free` before it refuses), so
kept results never stop anyone's submissions. Bookkeeping is in memory (per
result, no SQL); the record says which rows are kept (store.KEPT).

A result over 16 MiB is a reference to an upload in its user's spool
(transfer.py, bulk.py). Such an upload is *held* from the moment its result
is stored (:meth:`RetainedResults.hold_upload`) for as long as the result's
row is: its client's DROP (sent once it has fetched it) leaves it in place
(:meth:`holds_upload`, asked by bulk.py), so it is read again as a small
result is. It goes with its row (TTL, ``delete_result``, the per-user cap,
room for new work: :meth:`forget`, and an unacknowledged result's expiry or
deletion: :meth:`results_gone`); its bytes stay charged to its user by the
spool until then, and count when :meth:`free` makes room. After a restart
the record's rows say which uploads are held (:meth:`recover`); a kept row
whose upload is gone (killed between the two) goes too.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Callable, Iterable

from .. import protocol as P
from ..transfer import parse_big
from .quota import row_bytes

if TYPE_CHECKING:
    from .quota import Quotas
    from .memstore import Record

DEFAULT_MAX_KEPT_PER_USER = 100_000


class RetainedResults:
    """Per user, the acknowledged results still kept, oldest acknowledged first."""

    def __init__(self, store: "Record", quotas: "Quotas", max_per_user: int = DEFAULT_MAX_KEPT_PER_USER) -> None:
        if type(max_per_user) is not int or max_per_user <= 0:
            raise ValueError(f"max_kept_per_user must be an integer greater than 0, not {max_per_user!r}")
        self.store = store
        self.quotas = quotas
        self.max_per_user = max_per_user
        self.by_user: dict[str, OrderedDict[bytes, int]] = {}   # user -> {task id: bytes charged}
        self.order: deque[tuple[float, bytes, str]] = deque()   # (time.time() kept, task id, user), oldest first
        # results over 16 MiB (stored or kept): task id -> (user, upload id, its size), and the way back
        self.uploads: dict[bytes, tuple[str, bytes, int]] = {}
        self.upload_tasks: dict[tuple[str, bytes], bytes] = {}
        # set by the relay once its spool is made (bulk.py): deletes an upload, says whether one is there
        self.drop_upload: Callable[[str, bytes], None] = lambda user, bid: None
        self.upload_exists: Callable[[str, bytes], bool] = lambda user, bid: True

    def keep(self, entries: Iterable[tuple[bytes, int]], user: str, now: float | None = None) -> None:
        """``user`` acknowledged these results (task id, bytes still charged
        to them): kept; past ``max_per_user``, their oldest go."""
        now = time.time() if now is None else now
        mine = self.by_user.setdefault(user, OrderedDict())
        for task_id, nbytes in entries:
            mine[task_id] = nbytes
            self.order.append((now, task_id, user))
        over = len(mine) - self.max_per_user
        if over > 0:
            self._drop(user, [task_id for task_id, _ in zip(mine, range(over))])

    def free(self, user: str, nbytes: int) -> int:
        """Drop ``user``'s oldest kept results until ``nbytes`` are freed (or
        none is left); the bytes freed."""
        mine = self.by_user.get(user)
        if not mine:
            return 0
        freed, due = 0, []
        uploads = self.uploads
        for task_id, size in mine.items():
            if freed >= nbytes:
                break
            due.append(task_id)
            freed += size
            if uploads and task_id in uploads:   # its upload goes with it
                freed += uploads[task_id][2]
        self._drop(user, due)
        return freed

    def forget(self, task_ids: Iterable[bytes], user: str) -> None:
        """These kept results of ``user`` were deleted from the record."""
        mine = self.by_user.get(user)
        if not mine:
            return
        nbytes = 0
        gone = []
        for task_id in task_ids:
            nbytes += mine.pop(task_id, 0)
            gone.append(task_id)
        if not mine:
            del self.by_user[user]
        self.quotas.release(user, 0, nbytes)
        if self.uploads:
            self.results_gone(gone, user)

    # -- results over 16 MiB: their uploads ---------------------------------------
    def hold_upload(self, task_id: bytes, user: str, ref: bytes) -> None:
        """Task ``task_id`` of ``user`` has a stored result that is ``ref``, a
        reference to an upload in their spool: it stays while the result does."""
        try:
            bid, size, _ = parse_big(ref)
        except P.ProtocolError:
            return
        self.uploads[task_id] = (user, bid, size)
        self.upload_tasks[(user, bid)] = task_id

    def holds_upload(self, user: str, bid: bytes) -> bool:
        """Whether ``user``'s upload ``bid`` is a stored result's (a DROP of it then waits for the result to go)."""
        return (user, bid) in self.upload_tasks

    def results_gone(self, task_ids: Iterable[bytes], user: str) -> None:
        """These results of ``user`` left the record: the uploads they held go too."""
        uploads = self.uploads
        for task_id in task_ids:
            entry = uploads.get(task_id)
            if entry is None or entry[0] != user:
                continue
            del uploads[task_id]
            self.upload_tasks.pop((user, entry[1]), None)
            self.drop_upload(user, entry[1])

    def held_uploads(self) -> list[tuple[str, bytes]]:
        """``(user, upload id)`` of every upload held (the spool's expiry leaves them alone)."""
        return list(self.upload_tasks)

    def expire(self, before: float) -> None:
        """Kept results kept since before ``before`` (a time.time()): the
        record expires them (by their finishing time, a little sooner)."""
        order = self.order
        while order and order[0][0] < before:
            _, task_id, user = order.popleft()
            mine = self.by_user.get(user)
            if mine is not None and task_id in mine:
                self.forget([task_id], user)
        if len(order) > 2 * sum(len(mine) for mine in self.by_user.values()) + 1024:
            self.order = deque(item for item in order if item[1] in self.by_user.get(item[2], ()))

    def recover(self) -> None:
        """After a restart: the record's kept results, charged to their users
        again, and the uploads of its results over 16 MiB held again; a kept
        one whose upload is gone (the relay was killed after deleting it and
        before its row's deletion was committed) goes now."""
        for task_id, user, ref in self.store.result_references():
            self.hold_upload(task_id, user, ref)
        missing: dict[str, list[bytes]] = {}
        # as keep() of each row in turn, in bulk (a restart on 1M kept rows:
        # one quota charge per user, the cap applied once per user)
        by_user, order, uploads = self.by_user, self.order, self.uploads
        charged: dict[str, int] = {}
        for task_id, user, size, finished in self.store.kept_results():
            entry = uploads.get(task_id) if uploads else None
            if entry is not None and not self.upload_exists(user, entry[1]):
                missing.setdefault(user, []).append(task_id)
            size = row_bytes(size)
            charged[user] = charged.get(user, 0) + size
            mine = by_user.get(user)
            if mine is None:
                mine = by_user[user] = OrderedDict()
            mine[task_id] = size
            order.append((finished, task_id, user))
        for user, nbytes in charged.items():
            self.quotas.charge(user, 0, nbytes)
        for user in list(by_user):   # past max_per_user, the oldest go
            mine = by_user[user]
            over = len(mine) - self.max_per_user
            if over > 0:
                self._drop(user, [task_id for task_id, _ in zip(mine, range(over))])
        for user, task_ids in missing.items():
            mine = by_user.get(user, {})
            self._drop(user, [task_id for task_id in task_ids if task_id in mine])

    def _drop(self, user: str, task_ids: list[bytes]) -> None:
        if task_ids:
            self.store.delete_results(task_ids, user)
            self.forget(task_ids, user)
