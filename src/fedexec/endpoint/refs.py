"""An endpoint agent's cache of DataRefs (see fedexec/dataref.py).

A task whose ``rf`` option names DataRefs gets each from here: fetched from
the relay once (for that task: the relay checks the task names the ref and
the ref is its user's) into a file of the agent's private spool directory,
and kept for later tasks *of the same user*: the cache is keyed by (user,
ref id, sha256), the user being the one the relay names for the task (``u``,
or the endpoint's owner), so a copy fetched for one user is never given to
another user's task, nor a copy of other bytes under the same id. The relay has already checked, when it accepted the task, that
the ref was a live ref of its user; a fetch checks the sha256.

The task's arguments then go to the worker wrapped with the files' paths
(dataref.wrap_arguments). Copies go when the relay says their ref is gone
(REFS_GONE), and, least recently used first, when the cache is over
``max_bytes`` (each copy counted COPY_COST beyond its bytes, so that tiny
refs cannot pile up files) or the disk is short of room; never while a queued or running
task uses them: a task whose refs do not fit beside those fails instead
(so that one user's tasks cannot fill a shared endpoint's disk).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections import OrderedDict
from typing import Any, Callable

from .. import protocol as P
from ..dataref import wrap_arguments
from ..transfer import TransferLink, big_ref

log = logging.getLogger("fedexec.endpoint")

CACHE_BYTES = 16 * 1024 ** 3      # bytes of cached refs kept at most
MIN_FREE_BYTES = 1024 ** 3        # below this much free disk, unused copies go first
COPY_COST = 64 * 1024             # what a copy costs against max_bytes beyond its bytes: a file, an inode


class _Copy:
    __slots__ = ("path", "size", "tasks", "used", "gone")

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self.tasks: set[bytes] = set()   # queued or running tasks that use it
        self.used = time.monotonic()
        self.gone = False                # the relay said its ref is gone: dropped once no task uses it


class RefCache:
    """DataRefs fetched by one endpoint agent, under ``directory`` (private)."""

    def __init__(self, link: Callable[[], TransferLink], directory: str, max_bytes: int = CACHE_BYTES) -> None:
        self.link = link
        self.directory = os.path.join(directory, "refs")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self.max_bytes = max_bytes
        # (user, ref id, sha256) -> its copy, least recently used first
        self.copies: OrderedDict[tuple[str, bytes, bytes], _Copy] = OrderedDict()
        self.bytes = 0
        self.by_task: dict[bytes, list[tuple[str, bytes, bytes]]] = {}   # task id -> the copies it holds
        self.fetches = 0   # refs fetched from the relay since the agent started

    def prepare(self, task_id: bytes, user: str, wire: list[Any], args: bytes,
                files: dict[bytes, str] | None = None) -> tuple[bytes | None, str, bytes]:
        """The task's arguments wrapped with the files of the refs it names
        (fetched now if not here yet), and ``files`` (other files of the
        task: its dependencies' results, bulk.py); or None, why not, and the
        ref at fault."""
        files = dict(files or {})
        held: list[tuple[str, bytes, bytes]] = []
        for ref_id, size, digest in wire:
            key = (user, ref_id, digest)
            copy = self.copies.get(key)
            if copy is None:
                copy, why = self._fetch(task_id, key, size)
                if copy is None:
                    self._release(task_id, held)
                    return None, why, ref_id
            copy.gone = False   # (the relay accepted the task: the ref is its user's now)
            self.copies.move_to_end(key)
            copy.tasks.add(task_id)
            copy.used = time.monotonic()
            held.append(key)
            files[ref_id] = copy.path
        self.by_task[task_id] = held
        return wrap_arguments(args, files), "", b""

    def _fetch(self, task_id: bytes, key: tuple[str, bytes, bytes], size: int) -> tuple[_Copy | None, str]:
        user, ref_id, digest = key
        short = self._make_room(size)
        if short:   # (the copies left are in use: fetching more would pass the limit, or fill the disk)
            return None, (f"the endpoint has no room for DataRef {ref_id.hex()} ({size:,} bytes) beside the "
                          f"{self.bytes:,} bytes of copies its tasks use now: {short}; try again later")
        name = f"{hashlib.sha256(user.encode()).hexdigest()[:16]}-{ref_id.hex()}-{digest[:8].hex()}"
        path = os.path.join(self.directory, name)
        try:
            self.link().fetch_file(big_ref(ref_id, size, digest), path, task_id)
        except Exception as exc:
            _unlink(path)
            return None, (f"the endpoint could not fetch DataRef {ref_id.hex()} for this task (deleted or expired "
                          f"since the task was accepted?): {exc}")
        self.fetches += 1
        copy = self.copies[key] = _Copy(path, size)
        self.bytes += size
        return copy, ""

    def done(self, task_id: bytes) -> None:
        """The task has an outcome: the copies it used may go again."""
        held = self.by_task.pop(task_id, None)
        if held is not None:
            self._release(task_id, held)

    def _release(self, task_id: bytes, keys: list[tuple[str, bytes, bytes]]) -> None:
        for key in keys:
            copy = self.copies.get(key)
            if copy is not None:
                copy.tasks.discard(task_id)
                if copy.gone and not copy.tasks:
                    self._drop(key)

    def gone(self, refs: Any) -> None:
        """The relay says these refs ([[user or "", ref id]]) are gone: their
        copies go (at once if no task uses them, else when the last one ends)."""
        if not isinstance(refs, list) or len(refs) > P.MAX_ITEMS:
            raise P.ProtocolError("REFS_GONE names a list of at most MAX_ITEMS [user, ref id]")
        named = set()
        for item in refs:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], bytes)):
                raise P.ProtocolError("REFS_GONE names [user, ref id] pairs")
            named.add((item[0], item[1]))
        for key in [k for k in self.copies if k[:2] in named]:
            copy = self.copies[key]
            copy.gone = True
            if not copy.tasks:
                self._drop(key)

    def _make_room(self, size: int) -> str:
        """Drop unused copies, least recently used first, until ``size``
        more bytes fit within max_bytes and the disk keeps MIN_FREE_BYTES;
        what is still short when they are all gone ("" when nothing)."""
        def short() -> str:
            if self.bytes + size + COPY_COST * (len(self.copies) + 1) > self.max_bytes:   # (tiny ones too)
                return f"the endpoint keeps at most {self.max_bytes:,} bytes of DataRefs (ref_cache_bytes)"
            try:
                free = shutil.disk_usage(self.directory).free
            except OSError:
                return ""
            return f"its disk has {free:,} bytes free" if free < size + MIN_FREE_BYTES else ""

        for key in [k for k, c in self.copies.items() if not c.tasks]:
            if not short():
                return ""
            self._drop(key)
        return short()

    def _drop(self, key: tuple[str, bytes, bytes]) -> None:
        copy = self.copies.pop(key)
        self.bytes -= copy.size
        _unlink(copy.path)

    def describe(self) -> dict[str, int]:
        """For the endpoint's status: cached refs, their bytes, fetches so far."""
        return {"cached_refs": len(self.copies), "cached_ref_bytes": self.bytes, "ref_fetches": self.fetches}

    def close(self) -> None:
        for key in list(self.copies):
            self._drop(key)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
