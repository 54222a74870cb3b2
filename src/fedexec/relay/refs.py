"""The relay's part of data sent once (see fedexec/dataref.py): named uploads.

``ex.put(obj)`` uploads the pickled object like any large payload (into the
user's spool, relay/bulk.py, charged to their byte quota) and then sends
``REF {op: "put", b: upload id, ttl}``: from then on that upload is a *ref*
of its user, kept until ``REF {op: "del"}`` or its expiry, whichever comes
first. A small metadata file per ref (``<data_dir>/refs/<user hash>/<id>``,
0600 in 0700 directories) keeps its expiry across a relay restart.

Ownership: every lookup is in the caller's own refs (another user's id is
simply unknown, and the answers do not say whether it exists elsewhere). A
task naming refs (option ``rf``) is accepted only when each is a live ref of
the task's user with the size and sha256 named; an endpoint fetches a ref
(``FETCH {b: ref id, tid}``) only for a task that names it and was sent to
one of its owner's endpoints (bulk.py checks the task, this module the ref).
Limits: MAX_REFS_PER_USER refs each, a TTL of at most ``max_ttl``; their
bytes (and a FILE_COST each) count against the byte quota.

Each ref's fetches are counted per endpoint (``REF {op: "info"}`` answers
them; kept in its metadata file, so a restart forgets neither the counts
nor whom to tell), and when a ref goes, the connected endpoints that fetched
it are told (REFS_GONE) so that they drop their cached copies. Expiry looks
only at the refs that are due (a heap by expiry time), never at them all.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from .. import protocol as P

if TYPE_CHECKING:
    from .access import Session
    from .registry import TaskRecord
    from .server import Relay

log = logging.getLogger("fedexec.relay")

TYPES = frozenset({P.REF})
MAX_REFS_PER_USER = 10_000
DEFAULT_MAX_TTL = 30 * 24 * 3600.0   # seconds a ref may live at most
EXPIRY_PERIOD = 5.0                  # seconds between looks for expired refs (a lookup checks too)
MAX_COUNTED_ENDPOINTS = 1024         # endpoints whose fetches of one ref are counted (and told when it goes)


class RefEntry:
    __slots__ = ("size", "digest", "expires", "fetches")

    def __init__(self, size: int, digest: bytes, expires: float) -> None:
        self.size = size
        self.digest = digest
        self.expires = expires
        self.fetches: dict[str, int] = {}   # endpoint id -> fetches (kept across restarts)


class DataRefs:
    """Every user's refs at one relay: in memory, and a metadata file each."""

    def __init__(self, relay: "Relay", max_ttl: float = DEFAULT_MAX_TTL) -> None:
        self.relay = relay
        self.max_ttl = max_ttl
        self.root = Path(relay.data_dir) / "refs"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.refs: dict[str, dict[bytes, RefEntry]] = {}   # user -> ref id -> entry
        # (expires, user, ref id) of every ref put, gone or not: expiry pops what is due and skips
        # entries whose ref went already or lives on under a later expiry
        self.expiries: list[tuple[float, str, bytes]] = []
        self.next_expiry = time.monotonic() + EXPIRY_PERIOD

    @property
    def spool(self):  # the upload store the refs live in (bulk.py)
        return self.relay.bulk.spool

    def _meta(self, user: str, ref_id: bytes) -> Path:
        return self.root / hashlib.sha256(user.encode()).hexdigest()[:32] / ref_id.hex()

    # -- restart ---------------------------------------------------------------------
    def recover(self) -> None:
        """After a restart: the refs whose metadata and upload are both on disk
        (a ref whose upload is gone, or that expired meanwhile, goes)."""
        now = time.time()
        for sub in self.root.iterdir():
            if not sub.is_dir():   # (nothing of ours: a user's directory goes here)
                log.warning("removed %s, not a directory of DataRef metadata", sub)
                sub.unlink(missing_ok=True)
                continue
            for path in sub.iterdir():
                try:
                    fields = msgpack.unpackb(path.read_bytes(), raw=False)
                    user, ref_id = fields["u"], bytes.fromhex(path.name)
                    entry = RefEntry(fields["n"], fields["h"], fields["e"])
                    fetches = fields.get("f", {})
                    if not (isinstance(user, str) and len(ref_id) == 16 and self._meta(user, ref_id) == path
                            and type(entry.size) is int
                            and isinstance(entry.digest, bytes) and len(entry.digest) == 32
                            and type(entry.expires) is float and math.isfinite(entry.expires)
                            and isinstance(fetches, dict) and len(fetches) <= MAX_COUNTED_ENDPOINTS
                            and all(isinstance(k, str) and type(v) is int for k, v in fetches.items())):
                        raise ValueError("fields of the wrong kind")
                    entry.fetches = fetches
                except Exception:   # (spoiled on disk: its upload goes with the spool's expiry)
                    log.warning("removed unreadable DataRef metadata %s", path)
                    if not path.is_dir():
                        path.unlink(missing_ok=True)
                    continue
                if entry.expires <= now or self.spool.complete(user, ref_id) is None:
                    self._remove(user, ref_id)
                    continue
                self._keep(user, ref_id, entry)

    # -- messages ------------------------------------------------------------------------
    def handle(self, sender: bytes, session: "Session", msg: P.Message) -> None:
        fields = msg.fields
        op, ref_id, echo = fields.get("op"), fields.get("b"), fields.get("q")
        if not (isinstance(ref_id, bytes) and len(ref_id) == 16 and isinstance(echo, bytes) and len(echo) <= 16
                and op in ("put", "del", "info")):
            raise P.ProtocolError("malformed REF: {op: put|del|info, b: 16 bytes, q: at most 16 bytes}")
        user = session.user
        reply: dict[str, Any] = {"b": ref_id, "q": echo}
        if op == "put":
            reply.update(self._put(user, ref_id, fields.get("ttl"), fields.get("n"), fields.get("h")))
            if "err" in reply and not self.holds(user, ref_id):
                self.spool.drop(user, ref_id)   # refused: the upload made for it goes at once (not a ref's own)
        else:
            entry = self.lookup(user, ref_id)
            if entry is None:
                reply["err"] = self.unknown(user, ref_id)
            elif op == "del":
                self.delete(user, ref_id)
            else:
                reply.update({"n": entry.size, "e": entry.expires, "fetches": dict(entry.fetches)})
        self.relay._send(sender, P.encode(P.REF_ANSWER, reply))

    def _put(self, user: str, ref_id: bytes, ttl: Any, size: Any, digest: Any) -> dict[str, Any]:
        if not (type(size) is int and isinstance(digest, bytes) and len(digest) == 32):
            return {"err": "a DataRef put names its upload's size (n) and sha256 (h)"}
        if not (type(ttl) in (int, float) and ttl > 0):
            return {"err": "a DataRef's ttl is a positive number of seconds"}
        if ttl > self.max_ttl:
            return {"err": f"a DataRef's ttl is at most {self.max_ttl:g} s at this relay (asked for {ttl:g} s)"}
        existing = self.lookup(user, ref_id)
        if existing is not None:   # asked again (the answer was lost): the same answer
            return {"e": existing.expires, "n": existing.size}
        mine = self.refs.get(user, {})
        if len(mine) >= MAX_REFS_PER_USER:
            return {"err": f"user {user!r} has {len(mine)} DataRefs at this relay, the most it keeps per user; "
                           "delete some (ref.delete())", "quota": True}
        path = self.spool.complete(user, ref_id)
        if path is None:
            return {"err": f"no complete upload {ref_id.hex()} of user {user!r} to name as a DataRef"}
        if path.stat().st_size != size:
            return {"err": f"upload {ref_id.hex()} of user {user!r} is not of the size the put names"}
        # (its sha256 is the uploader's word: the relay never reads an upload; an endpoint checks
        # what it fetches against the sha256 a task names, so a wrong one fails only its user's tasks)
        entry = RefEntry(size, digest, time.time() + float(ttl))
        self._write_meta(user, ref_id, entry, durable=True)   # (on disk before the put is answered)
        self._keep(user, ref_id, entry)
        return {"e": entry.expires, "n": size}

    def _keep(self, user: str, ref_id: bytes, entry: RefEntry) -> None:
        self.refs.setdefault(user, {})[ref_id] = entry
        live = sum(len(mine) for mine in self.refs.values()) if len(self.expiries) > 4096 else 0
        if len(self.expiries) > 2 * live + 4096:
            # (refs deleted before their expiry leave entries behind: put and delete in a loop must
            # not grow the heap without bound, so it is rebuilt from the live refs now and then)
            self.expiries = [(e.expires, u, r) for u, mine in self.refs.items() for r, e in mine.items()]
            heapq.heapify(self.expiries)
        else:
            heapq.heappush(self.expiries, (entry.expires, user, ref_id))

    def _write_meta(self, user: str, ref_id: bytes, entry: RefEntry, durable: bool) -> None:
        """A ref's metadata file (0600, replaced whole): with ``durable``, on
        disk before this returns (a put); else left to the page cache (fetch
        counts: a power cut may lose a few, a kill -9 of the relay loses none)."""
        meta = self._meta(user, ref_id)
        meta.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = meta.with_suffix(".tmp")
        record = msgpack.packb({"u": user, "n": entry.size, "h": entry.digest, "e": entry.expires,
                                "f": entry.fetches}, use_bin_type=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:   # (small: one write)
            os.write(fd, record)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, meta)

    # -- lookups -------------------------------------------------------------------------
    def lookup(self, user: str, ref_id: bytes) -> RefEntry | None:
        """``user``'s live ref ``ref_id``; an expired one goes now."""
        entry = self.refs.get(user, {}).get(ref_id)
        if entry is not None and entry.expires <= time.time():
            self.delete(user, ref_id)
            return None
        return entry

    def holds(self, user: str, upload_id: bytes) -> bool:
        """Whether ``user``'s upload ``upload_id`` is one of their refs (live
        or not yet expired away): a result must not name it, or the drop of
        that result (relay or client) would delete the ref."""
        return upload_id in self.refs.get(user, ())

    @staticmethod
    def unknown(user: str, ref_id: bytes) -> str:
        return (f"DataRef {ref_id.hex()} is not a DataRef of user {user!r} at this relay (unknown, deleted, "
                "expired, or another user's)")

    def check_task(self, user: str, wire: Any) -> tuple[str, bytes] | None:
        """Why a task of ``user`` naming the refs ``wire`` (its ``rf``
        option) may not be accepted, and the first ref at fault; None when
        every one is a live ref of ``user`` with the size and sha256 named."""
        for ref_id, size, digest in wire:
            entry = self.lookup(user, ref_id)
            if entry is None:
                return self.unknown(user, ref_id), ref_id
            if entry.size != size or entry.digest != digest:
                return (f"DataRef {ref_id.hex()} named with another size or sha256 than user {user!r} put",
                        ref_id)
        return None

    def fetchable(self, record: "TaskRecord", fields: dict[str, Any]) -> bool:
        """Whether an endpoint's FETCH ``fields`` (for the task ``record``,
        already checked to be its owner's) is of a live ref of the task's
        user that the task names; counts a fetch from its start."""
        ref_id = fields.get("b")
        options = record.options
        if not (options and "rf" in options and any(r[0] == ref_id for r in options["rf"])):
            return False
        entry = self.lookup(record.user, ref_id)
        if entry is None:
            return False
        if fields.get("o") == 0:
            endpoint = record.endpoint_id or ""
            if endpoint in entry.fetches or len(entry.fetches) < MAX_COUNTED_ENDPOINTS:
                entry.fetches[endpoint] = entry.fetches.get(endpoint, 0) + 1
                # (one small write per fetch of a whole ref, not per chunk: kept for info and REFS_GONE)
                self._write_meta(record.user, ref_id, entry, durable=False)
        return True

    def in_use(self) -> set[Path]:
        """The uploads refs keep (the spool's expiry leaves them alone)."""
        return {self.spool.path(user, ref_id) for user, mine in self.refs.items() for ref_id in mine}

    # -- going ---------------------------------------------------------------------------
    def delete(self, user: str, ref_id: bytes) -> None:
        """Remove a ref: its upload (its bytes leave the user's quota), its
        metadata; endpoints that fetched it are told."""
        entry = self.refs.get(user, {}).pop(ref_id, None)
        if not self.refs.get(user, True):
            del self.refs[user]
        self._remove(user, ref_id)
        if entry is not None and entry.fetches:
            self._tell_endpoints(user, ref_id, entry.fetches)

    def _remove(self, user: str, ref_id: bytes) -> None:
        self.spool.drop(user, ref_id)
        self._meta(user, ref_id).unlink(missing_ok=True)

    def _tell_endpoints(self, user: str, ref_id: bytes, fetched_by: dict[str, int]) -> None:
        for endpoint_id in fetched_by:
            state = self.relay.endpoints.get(endpoint_id)
            routing = state.routing_id if state is not None else None
            if routing is None:
                continue   # not connected: it drops its copy when the copy is evicted
            key = "" if state.access.owner == user else user
            self.relay._send(routing, P.encode(P.REFS_GONE, {"refs": [[key, ref_id]]}))

    def maintenance(self, now: float) -> None:
        if now < self.next_expiry:
            return
        self.next_expiry = now + EXPIRY_PERIOD
        wall = time.time()
        while self.expiries and self.expiries[0][0] <= wall:
            expires, user, ref_id = heapq.heappop(self.expiries)
            entry = self.refs.get(user, {}).get(ref_id)
            if entry is not None and entry.expires == expires:   # (else gone already)
                self.delete(user, ref_id)
