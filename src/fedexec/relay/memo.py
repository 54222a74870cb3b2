"""Memoized results the relay keeps in memory, bounded by bytes.

The record (store.py, table ``memo``) keeps every memoized result until it
expires; this keeps the newest small ones at hand so that a hit costs no
SQL. A result larger than ``MEMO_ENTRY_IN_MEMORY`` is never kept here (a hit
on it reads it from the record), and the total stays under
``MEMO_IN_MEMORY_BYTES``: many large memoized results cannot pin the relay's
memory.

A memoized result is kept without the output its task printed (the
trailer, ``output.py``): a hit did not run the task for its caller, so its
future has no output (another user's printout, or what a thread left
running by an earlier task printed meanwhile, must not reach a user
through a shared memoized result; :func:`without_output`).
"""

from __future__ import annotations

from ..output import strip

MEMO_ENTRY_IN_MEMORY = 64 * 1024          # larger results are read from the record on a hit
MEMO_IN_MEMORY_BYTES = 64 * 1024 * 1024   # all the results kept in memory together


class RecentResults:
    """Memoized results by key, the newest first to stay, at most
    ``max_bytes`` together and ``max_entry`` each."""

    def __init__(self, max_bytes: int = MEMO_IN_MEMORY_BYTES, max_entry: int = MEMO_ENTRY_IN_MEMORY) -> None:
        self.max_bytes = max_bytes
        self.max_entry = max_entry
        self.results: dict[bytes, bytes] = {}   # insertion order: oldest first
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.results)

    def get(self, key: bytes) -> bytes | None:
        return self.results.get(key)

    def put(self, key: bytes, result: bytes) -> None:
        """Keep ``result`` if it is small enough, dropping the oldest to make room."""
        if len(result) > self.max_entry or key in self.results:
            return
        results = self.results
        while results and self.nbytes + len(result) > self.max_bytes:
            self.nbytes -= len(results.pop(next(iter(results))))
        results[key] = result
        self.nbytes += len(result)

    def discard(self, key: bytes) -> None:
        result = self.results.pop(key, None)
        if result is not None:
            self.nbytes -= len(result)


def without_output(result: bytes) -> bytes:
    """``result`` without the output trailer of the run that made it."""
    bare = strip(result)
    return result if bare is result else bytes(bare)
