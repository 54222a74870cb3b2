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
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Iterable

from .quota import row_bytes

if TYPE_CHECKING:
    from .quota import Quotas
    from .store import RelayStore

DEFAULT_MAX_KEPT_PER_USER = 100_000


class RetainedResults:
    """Per user, the acknowledged results still kept, oldest acknowledged first."""

    def __init__(self, store: "RelayStore", quotas: "Quotas", max_per_user: int = DEFAULT_MAX_KEPT_PER_USER) -> None:
        if type(max_per_user) is not int or max_per_user <= 0:
            raise ValueError(f"max_kept_per_user must be an integer greater than 0, not {max_per_user!r}")
        self.store = store
        self.quotas = quotas
        self.max_per_user = max_per_user
        self.by_user: dict[str, OrderedDict[bytes, int]] = {}   # user -> {task id: bytes charged}
        self.order: deque[tuple[float, bytes, str]] = deque()   # (time.time() kept, task id, user), oldest first

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
        for task_id, size in mine.items():
            if freed >= nbytes:
                break
            due.append(task_id)
            freed += size
        self._drop(user, due)
        return freed

    def forget(self, task_ids: Iterable[bytes], user: str) -> None:
        """These kept results of ``user`` were deleted from the record."""
        mine = self.by_user.get(user)
        if not mine:
            return
        nbytes = 0
        for task_id in task_ids:
            nbytes += mine.pop(task_id, 0)
        if not mine:
            del self.by_user[user]
        self.quotas.release(user, 0, nbytes)

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
        """After a restart: the record's kept results, charged to their users again."""
        for task_id, user, size, finished in self.store.kept_results():
            size = row_bytes(size)
            self.quotas.charge(user, 0, size)
            self.keep([(task_id, size)], user, finished)

    def _drop(self, user: str, task_ids: list[bytes]) -> None:
        if task_ids:
            self.store.delete_results(task_ids, user)
            self.forget(task_ids, user)
