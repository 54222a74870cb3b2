"""Notices the relay holds back a little: ACCEPTED to clients, ACK to endpoints.

Once a commit puts a task or a result on disk the relay tells whoever held
it: the client may drop the task's arguments (ACCEPTED), the endpoint the
result (ACK). Neither waits on these: they only free memory. Sent the moment
the commit lands, each was a message of its own, and on a small machine a
wake-up of its own in the peer (and, over ZeroMQ, in both processes' I/O
threads), in the middle of the round trips that do wait. Held here (from
the turn the commit woke the relay), a notice goes with the next message
the relay sends its peer in a turn (a client's results, an endpoint's next
tasks), or on its own once the oldest held has waited ``delay`` seconds:
with no other traffic, it costs the relay one more turn and the peer
nothing more. Nothing is held for ever, and a peer's notices are never sent
to another.

Holding a notice only keeps an argument or a result a few milliseconds
longer where it already is: it never makes anything look stored sooner.
"""

from __future__ import annotations

from typing import Any, Iterator

from .. import protocol as P

NOTICE_DELAY = 0.005   # seconds a notice may wait for other traffic to its peer


class HeldNotices:
    """Committed notices by peer, until they are due."""

    def __init__(self, delay: float = NOTICE_DELAY) -> None:
        self.delay = delay
        self._held: dict[tuple[bytes, str], list[bytes]] = {}   # (peer, ACCEPTED or ACK) -> task ids
        self._since = 0.0   # when the oldest notice held now was held (monotonic)

    def __bool__(self) -> bool:
        return bool(self._held)

    def hold(self, peer: bytes, kind: str, task_ids: list[bytes], now: float) -> None:
        """Hold notices of ``kind`` (P.ACCEPTED or P.ACK) for these tasks, to ``peer``."""
        if not self._held:
            self._since = now
        held = self._held.get((peer, kind))
        if held is None:
            self._held[(peer, kind)] = list(task_ids)
        else:
            held += task_ids

    def wait_ms(self, now: float, default: int) -> int:
        """How long a poll may wait before some held notice is due (``default`` when none is held)."""
        if not self._held:
            return default
        return max(0, min(default, int((self._since + self.delay - now) * 1000) + 1))

    def due(self, sent_to: set[bytes], now: float) -> Iterator[tuple[bytes, list[Any]]]:
        """The messages to send now, as (peer, frames): every held notice once
        the oldest has waited ``delay``; else those of peers in ``sent_to``
        (sent something this turn) and those with a full message's worth."""
        if not self._held:
            return
        everything = now - self._since >= self.delay
        for key in list(self._held):
            peer, kind = key
            task_ids = self._held[key]
            if everything or peer in sent_to or len(task_ids) >= P.MAX_ITEMS:
                del self._held[key]
                for part in P.chunks(task_ids):
                    yield peer, P.encode(kind, {"tids": part})
        # what is left keeps the oldest time: it goes no later than the first would have
