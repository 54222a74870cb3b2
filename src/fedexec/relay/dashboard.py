"""What the relay's dashboard shows, gathered on the relay's loop.

The loop owns all of the relay's state; the dashboard's HTTP server (web.py)
runs on threads of its own and must never read that state while the loop
changes it. So the loop feeds a :class:`DashboardFeed` through a few cheap
hooks (one call per message of results, not per task, and nothing at all
for a relay started without ``--http``), and about once a second
:meth:`DashboardFeed.publish` builds a :class:`Snapshot`: fresh dicts and
tuples, never changed after they are published, which the HTTP threads read
through :attr:`DashboardFeed.latest` (one attribute assignment: atomic).

Everything kept here is bounded: counters and latency histograms per user,
a ring of per-second samples per user, a few recent failures per user (so
one user's flood of failures never pushes another's out), and what each
endpoint last reported in its heartbeat (a bounded, checked field).

Error text is read from failure blobs without unpickling anything: a
fedexec failure is msgpack, an exception of a data-only endpoint is in the
data-only format (plain data), and an exception pickled by a worker is a
pickled dict whose first strings are its type name and message, read with
:func:`pickletools.genops`, which decodes opcodes and builds no object.
"""

from __future__ import annotations

import bisect
import io
import pickletools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

import msgpack

from .. import protocol as P
from ..endpoint_status import EndpointReport
from .endpoint_view import OwnCounts, for_non_owner, is_shared

# statuses as the dashboard and /metrics name them (fedexec_tasks_total{state=...})
STATE_NAMES = {P.OK: "success", P.EXCEPTION: "exception", P.FAILED: "failed", P.CANCELLED: "cancelled"}
PUBLISH_INTERVAL = 1.0        # seconds between snapshots
RATE_SAMPLES = 300            # per-second samples kept per user (5 minutes)
FAILURES_PER_USER = 20        # recent failures kept per user
FAILURE_BYTES = 16 * 1024     # of each failure's blob: the type and message come first
ERROR_TEXT = 2000             # characters of an error's text shown
MAX_USERS = 10_000            # users with statistics (the least recently active go first)
# latency: histograms with buckets growing by 2**(1/4) from 10 microseconds
# (about 19% wide: percentiles to within that), up to ~3 hours
LATENCY_BASE = 1e-5
LATENCY_BUCKETS = 120
_LATENCY_BOUNDS = tuple(LATENCY_BASE * 2 ** (i / 4) for i in range(LATENCY_BUCKETS))
_MIDDLE = 2 ** (-1 / 8)   # a bucket's (geometric) middle, from its upper bound
# fedexec_task_duration_seconds' buckets (Prometheus' usual ones, widened for long tasks)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 1800.0, 3600.0, 21600.0)
# the parts of a task's time the trace stages (protocol.TRACE_STAGES, and the
# relay's own stamp when the result came: "relay_result") mark
STAGE_SPANS = (
    ("client", "submit", "sent"),
    ("to relay", "sent", "relay_in"),
    ("queued at relay", "relay_in", "relay_out"),
    ("to endpoint", "relay_out", "endpoint_in"),
    ("at endpoint", "endpoint_in", "worker_in"),
    ("at worker", "worker_in", "start"),
    ("run", "start", "end"),
    ("result to endpoint", "end", "endpoint_out"),
    ("result to relay", "endpoint_out", "relay_result"),
)
_STAGE_INDEX = {name: i for i, name in enumerate(P.TRACE_STAGES)}
_SPAN_INDICES = tuple((_STAGE_INDEX[a], _STAGE_INDEX[b]) for _, a, b in STAGE_SPANS)
_RELAY_IN, _RELAY_RESULT = _STAGE_INDEX["relay_in"], _STAGE_INDEX["relay_result"]
# the opcodes a pickled dict of strings starts with, between its strings
_DICT_OPENING = frozenset({"PROTO", "FRAME", "EMPTY_DICT", "MEMOIZE", "MARK"})


def error_text(status: int, blob: bytes) -> str:
    """A failure's type and message, read without unpickling (see the
    module's docstring); a placeholder when it cannot be read."""
    try:
        if status == P.FAILED:
            info = msgpack.unpackb(blob, raw=False, strict_map_key=False, max_bin_len=0, max_ext_len=0)
            if isinstance(info, dict):
                return f"{info.get('kind', 'failed')}: {info.get('msg', '')}"[:ERROR_TEXT]
        elif blob[:1] == b"\x80":   # a pickled dict (serialize_exception): "type", its name, "msg", its text
            strings: list[str] = []
            for opcode, arg, _ in pickletools.genops(io.BytesIO(blob)):
                if "UNICODE" in opcode.name and isinstance(arg, str):
                    strings.append(arg)
                    if len(strings) == 4:
                        break
                elif opcode.name not in _DICT_OPENING:   # not the shape serialize_exception makes
                    break
            if len(strings) == 4 and strings[0] == "type" and strings[2] == "msg":
                return f"{strings[1]}: {strings[3]}"[:ERROR_TEXT]
        # (an exception from a data-only endpoint is plain data, but its decoder lives with the
        # pickling code, which relay code never imports: tests/test_security.py; it shows the placeholder)
    except Exception:   # a truncated or odd blob: the placeholder says so
        pass
    return "(an error the relay cannot read; the client that submitted the task gets it in full)"


class _UserStats:
    """One user's numbers, changed on the loop only."""

    __slots__ = ("counts", "samples", "failures", "stages", "duration", "duration_sum", "traced", "active")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(STATE_NAMES, 0)
        self.samples: deque[tuple[float, int, int]] = deque(maxlen=RATE_SAMPLES)  # (time, done, failed)
        self.failures: deque[tuple[float, str, str, int, bytes]] = deque(maxlen=FAILURES_PER_USER)
        self.stages = [[0] * (LATENCY_BUCKETS + 1) for _ in STAGE_SPANS]
        self.duration = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.traced = 0
        self.active = 0.0


def _percentile(buckets: list[int], total: int, q: float) -> float | None:
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        seen += count
        if seen >= rank and count:
            return _LATENCY_BOUNDS[min(i, LATENCY_BUCKETS - 1)] * _MIDDLE
    return _LATENCY_BOUNDS[-1]


@dataclass(frozen=True)
class Snapshot:
    """The relay as of ``time``; read-only once published (web.py filters it
    per user: :meth:`view`)."""

    time: float
    relay: dict[str, Any]
    endpoints: tuple[dict[str, Any], ...]
    users: dict[str, dict[str, Any]] = field(default_factory=dict)

    def view(self, user: str, groups: frozenset[str] = frozenset()) -> dict[str, Any]:
        """What ``user`` may see: endpoints they own or may use, and their
        own tasks' numbers (on a local-mode relay everything is its one
        user's)."""
        endpoints = []
        for e in self.endpoints:
            if not e["_access"].allows(user, groups):
                continue
            row = {key: value for key, value in e.items() if not key.startswith("_")}
            if e["_own"] is not None and user != e["owner"]:   # shared, not theirs: endpoint_view.py
                row = for_non_owner(row, e["_own"].get(user, (0, 0)), "queued_at_relay", "at_endpoint")
            endpoints.append(row)
        mine = self.users.get(user) or DashboardFeed.user_view(_UserStats(), 0)
        return {"time": self.time, "user": user, "relay": self.relay, "endpoints": endpoints, **mine}


class DashboardFeed:
    """The loop's side: hooks that count, and :meth:`publish`."""

    def __init__(self) -> None:
        self.users: dict[str, _UserStats] = {}
        self.reports: dict[str, EndpointReport] = {}    # endpoint id -> its latest heartbeat's status
        self.latest: Snapshot | None = None
        self.next_publish = 0.0
        self.own_counts = OwnCounts()

    def _user(self, user: str) -> _UserStats:
        stats = self.users.get(user)
        if stats is None:
            if len(self.users) >= MAX_USERS:   # the least recently active user's numbers go
                del self.users[min(self.users, key=lambda name: self.users[name].active)]
            stats = self.users[user] = _UserStats()
            stats.samples.append((time.time(), 0, 0))   # rates count from here
        return stats

    # -- hooks (the loop) ------------------------------------------------------
    def finished(self, finished: Iterable[tuple[Any, int, Any]], now: float) -> None:
        """Tasks that finished (records, statuses, result blobs), as
        Relay._finished_all has them."""
        last_user, stats = None, None
        for record, status, result in finished:
            if record.user != last_user:
                last_user, stats = record.user, self._user(record.user)
                stats.active = now
            stats.counts[status] = stats.counts.get(status, 0) + 1
            if status == P.EXCEPTION or status == P.FAILED:
                stats.failures.append((now, record.task_id.hex(), record.endpoint_id or ",".join(record.group or ()),
                                       status, bytes(P.as_buffer(result)[:FAILURE_BYTES])))

    def traces(self, finished: Iterable[tuple[Any, int, Any]], traces: dict[bytes, list[float]]) -> None:
        """The stage times of traced tasks (task id -> trace stamps, the
        relay's ``relay_result`` last)."""
        for record, _, _ in finished:
            trace = traces.get(record.task_id)
            if trace is None or len(trace) <= _RELAY_RESULT:
                continue
            stats = self._user(record.user)
            stats.traced += 1
            for (a, b), buckets in zip(_SPAN_INDICES, stats.stages):
                seconds = trace[b] - trace[a]
                buckets[bisect.bisect_left(_LATENCY_BOUNDS, seconds) if seconds > 0 else 0] += 1
            seconds = max(0.0, trace[_RELAY_RESULT] - trace[_RELAY_IN])
            stats.duration[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
            stats.duration_sum += seconds

    def endpoint_report(self, endpoint_id: str, report: EndpointReport) -> None:
        """An endpoint's latest heartbeat status (checked by the relay: endpoint_status.parse_report)."""
        self.reports[endpoint_id] = report

    # -- publishing --------------------------------------------------------------
    def due(self, now: float) -> bool:
        return now >= self.next_publish

    def publish(self, relay: Any, now: float) -> Snapshot:
        """A new snapshot of ``relay`` (the Relay, read here on its loop)."""
        self.next_publish = now + PUBLISH_INTERVAL
        wall = time.time()
        endpoints = []
        known = relay.endpoints.by_id
        for endpoint_id in [e for e in self.reports if e not in known]:
            del self.reports[endpoint_id]
        for state in known.values():
            report = self.reports.get(state.endpoint_id) if state.connected else None
            workers = report.workers if report is not None else state.workers if state.connected else 0
            idle = report.idle if report is not None else 0
            endpoints.append({
                "id": state.endpoint_id, "name": state.name, "owner": state.access.owner,
                "status": "online" if state.connected else "offline", "python": state.python,
                "workers": workers, "busy_workers": workers - idle, "idle_workers": idle,
                "queued_at_relay": max(0, len(state.queue) - state.stale),
                "at_endpoint": len(state.dispatched),
                "queued_at_endpoint": report.queued if report is not None else 0,
                "blocks": [{"id": b, "job": j, "state": s} for b, j, s in report.blocks] if report else [],
                "_access": _FrozenAccess(state.access),
                # on a shared endpoint, each user's own counts (others see theirs only: endpoint_view.py)
                "_own": dict(self.own_counts.of(state, now)) if is_shared(state.access) else None,
            })
        users = {}
        usage = relay.quotas.usage
        for name, stats in self.users.items():
            done = sum(stats.counts.values())
            failed = stats.counts[P.EXCEPTION] + stats.counts[P.FAILED]
            stats.samples.append((wall, done, failed))
            users[name] = self.user_view(stats, usage.get(name, (0, 0))[0])
        for name in usage.keys() - users.keys():   # tasks in flight, none finished yet
            users[name] = self.user_view(_UserStats(), usage[name][0])
        # (relay-wide: nothing that counts other users' tasks or endpoints, but the record's backlog,
        # which every user's tasks wait behind)
        snapshot = Snapshot(wall, {"address": relay.address, "auth": relay.auth_mode,
                                   "store_backlog": relay.store.backlog}, tuple(endpoints), users)
        self.latest = snapshot
        return snapshot

    @staticmethod
    def user_view(stats: _UserStats, in_flight: int) -> dict[str, Any]:
        samples = list(stats.samples)
        rates = []
        for (t0, d0, f0), (t1, d1, f1) in zip(samples, samples[1:]):
            span = t1 - t0
            if span > 0:
                rates.append({"time": t1, "done": (d1 - d0) / span, "failed": (f1 - f0) / span})
        failures = [{"time": t, "task": task, "endpoint": endpoint, "state": STATE_NAMES[status],
                     "error": error_text(status, blob)} for t, task, endpoint, status, blob in reversed(stats.failures)]
        latency = []
        for (name, _, _), buckets in zip(STAGE_SPANS, stats.stages):
            total = sum(buckets)
            latency.append({"stage": name, "count": total, **{f"p{round(q * 100)}": _percentile(buckets, total, q)
                                                               for q in (0.5, 0.9, 0.99)}})
        return {"tasks": {"counts": {STATE_NAMES[s]: c for s, c in stats.counts.items() if s in STATE_NAMES},
                          "in_flight": in_flight},
                "rates": rates, "failures": failures, "latency": latency,
                "duration": {"buckets": list(DURATION_BUCKETS), "counts": list(stats.duration),
                             "sum": stats.duration_sum, "count": sum(stats.duration)}}


class _FrozenAccess:
    """Who may use an endpoint, copied for a snapshot (the loop changes the
    original when its owner shares it)."""

    __slots__ = ("owner", "public", "users", "groups")

    def __init__(self, access: Any) -> None:
        self.owner, self.public = access.owner, access.public
        self.users, self.groups = frozenset(access.users), frozenset(access.groups)

    def allows(self, user: str, groups: frozenset[str] = frozenset()) -> bool:
        return self.public or user == self.owner or user in self.users or bool(self.groups & groups)

