"""An endpoint's status in its heartbeats to the relay (the ``st`` field):
its workers, idle workers, tasks queued at it, and its blocks with their
scheduler job ids, for the relay's dashboard (relay/dashboard.py). The
endpoint builds it (:func:`report_of`), the relay checks it
(:func:`parse_report`): this module is the one definition of the field, and
light, as the endpoint imports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import protocol as P

# what an endpoint reports in its heartbeats, at most
MAX_REPORTED_BLOCKS = 64
MAX_REPORTED_TEXT = 128


@dataclass
class EndpointReport:
    """What an endpoint said of itself in its latest heartbeat."""

    workers: int
    idle: int
    queued: int
    blocks: tuple[tuple[str, str, str], ...]   # (block id, scheduler job id, state)


def parse_report(value: Any) -> EndpointReport:
    """Check a heartbeat's ``st`` field: ``{"w": workers, "iw": idle workers,
    "q": tasks queued at the endpoint, "b": [[block, job, state], ...]}``;
    ProtocolError naming what is wrong."""
    if not isinstance(value, dict):
        raise P.ProtocolError("endpoint status must be a map")
    counts = [P.count(value.get(key, 0), what) for key, what in (("w", "workers"), ("iw", "idle workers"),
                                                                 ("q", "queued tasks"))]
    blocks = value.get("b", [])
    if not isinstance(blocks, list) or len(blocks) > MAX_REPORTED_BLOCKS:
        raise P.ProtocolError(f"endpoint status: blocks must be a list of at most {MAX_REPORTED_BLOCKS}")
    parsed = []
    for block in blocks:
        if not (isinstance(block, list) and len(block) == 3):
            raise P.ProtocolError("endpoint status: a block is [id, job id, state]")
        parsed.append(tuple(P.text(part, "block field", MAX_REPORTED_TEXT) for part in block))
    return EndpointReport(counts[0], min(counts[1], counts[0]), counts[2], tuple(parsed))


def report_of(status: dict[str, Any]) -> dict[str, Any]:
    """The ``st`` field an endpoint sends, from its status (agent.status):
    what :func:`parse_report` takes."""
    blocks = [[str(b.get("id", ""))[:MAX_REPORTED_TEXT], str(b.get("job") or "")[:MAX_REPORTED_TEXT],
               str(b.get("state", ""))[:MAX_REPORTED_TEXT]] for b in status.get("blocks", ())[:MAX_REPORTED_BLOCKS]]
    return {"w": int(status.get("workers", 0)), "iw": int(status.get("idle_workers", 0)),
            "q": int(status.get("queued", 0)), "b": blocks}
