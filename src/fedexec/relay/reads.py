"""The relay's budget for reading finished tasks' results back from its
record (server.Relay._recorded_result): a task naming a finished,
unacknowledged task whose result the relay no longer keeps in memory is
held only after such a read, and each read may wait on the relay's loop for
one group commit. So the reads are few, and fair: skipped at once when they
cannot help (the dependency failed, or its result is too large to feed a
dependent from the record), and counted per user and second, so that one
user's graph cannot spend the reads of another's, and for the whole relay
(USERS_PER_SECOND users' worth), so that many accounts together cannot make
the loop wait for a commit more often than that."""

from __future__ import annotations

import time

# Finished tasks remembered as hopeless to read back (the oldest forgotten
# first: one then costs a read again, still within its user's budget).
MAX_HOPELESS = 65536
# The relay's reads a second, all users together, in per-user budgets: one user spends at most one of them.
USERS_PER_SECOND = 4


class RecordReads:
    """Per-user, per-second budget of record reads, and the finished tasks
    not worth one."""

    def __init__(self, per_second: int) -> None:
        """``per_second``: reads a second per user (server.RECORD_READS_PER_SECOND)."""
        self.per_second = per_second
        self.second = 0
        self.spent: dict[str, int] = {}      # user -> reads in ``second``
        self.total = 0                       # reads in ``second``, all users
        self.hopeless: dict[bytes, None] = {}  # task ids, oldest first

    def hopeless_task(self, task_id: bytes) -> None:
        """Task ``task_id`` finished with a result that could never feed a
        dependent from the record (it failed, or its result is over
        graph.KEPT_IN_MEMORY, or an upload: the caller knows, at no cost on
        the hot path of small successful results, which are not remembered)."""
        hopeless = self.hopeless
        hopeless[task_id] = None
        if len(hopeless) > MAX_HOPELESS:
            del hopeless[next(iter(hopeless))]

    def take(self, task_id: bytes, user: str) -> bool:
        """Whether ``user`` may read task ``task_id``'s result back now: not
        when it is known to be hopeless (no budget spent), nor when the
        user's reads this second are spent."""
        if task_id in self.hopeless:
            return False
        return self.spend(user)

    def spend(self, user: str) -> bool:
        """Whether ``user`` may spend one of this second's reads (theirs,
        and the relay's)."""
        second = int(time.monotonic())
        if second != self.second:
            self.second = second
            self.spent = {}
            self.total = 0
        count = self.spent.get(user, 0)
        if count >= self.per_second or self.total >= USERS_PER_SECOND * self.per_second:
            return False
        self.spent[user] = count + 1
        self.total += 1
        return True


class QueryBudget:
    """Questions a second (the Client API's INSPECT, inspect.py), fair per
    user first: each user may ask ``per_user`` a second. Their first
    ``floor`` in a second are theirs whatever other users do; the rest draw
    on ``shared`` a second that all users share (so many accounts flooding
    together cannot ask more than that beyond their floors). The only bound
    on the floors is ``ceiling`` for the whole relay, the last guard of its
    loop, which flooding accounts reach only by the hundred: one user's (or a
    few users') flood never slows another user's questions."""

    def __init__(self, per_user: int, floor: int, shared: int, ceiling: int) -> None:
        if not 0 < floor <= per_user:
            raise ValueError("a user's floor of questions is more than 0 and at most their budget")
        self.per_user, self.floor, self.shared, self.ceiling = per_user, floor, shared, ceiling
        self.second = 0
        self.spent: dict[str, int] = {}   # user -> questions in ``second``
        self.shared_spent = 0             # questions past their askers' floors in ``second``
        self.total = 0                    # all questions in ``second``

    def spend(self, user: str) -> bool:
        """Whether ``user`` may ask one more question this second (counted if so)."""
        second = int(time.monotonic())
        if second != self.second:
            self.second, self.spent, self.shared_spent, self.total = second, {}, 0, 0
        count = self.spent.get(user, 0)
        if count >= self.per_user or self.total >= self.ceiling:
            return False
        if count >= self.floor:
            if self.shared_spent >= self.shared:
                return False
            self.shared_spent += 1
        self.spent[user] = count + 1
        self.total += 1
        return True
