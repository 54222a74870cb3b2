"""Recycled payload files: a relay's per-user free list of large-payload files.

On this project's machines, writing a large payload into *new* pages costs
far more CPU than writing it over pages already in the page cache (a VM that
hands memory free for ~2 s back to its host makes fresh pages ~1 s per GB;
benchmarks/results/large-payloads-s24-2026-12-01.md). So on the same-host
path (transfer.py, SameHost in bulk.py) a spool file whose payload nobody
needs any more is not unlinked but kept here, and the next large payload of
the same user is written INTO it: a client's arguments (``place``) or a
worker's result (the agent asks for a ``spare`` as it fetches the task's
arguments; the worker writes its result into it, transfer.spill_result).

Ownership and safety (a file may be rewritten only when no one maps it: a
private copy-on-write mapping sees later writes to pages it has not copied):

- *held*: a large result its client fetched mapped and DROPped with ``k``
  (keep): the client still maps it. It becomes spare only on that client's
  RELEASE (the mapping is gone: weakref.finalize in transfer.LinkPool), looked
  up in the releasing user's own directory, so another user's or a repeated
  release finds nothing.
- *spare*: free; a task's arguments once its worker returned a result
  (the worker made any mapping its task kept private first:
  transfer.privatize_leftovers), or a released result.
- A spare with another name (st_nlink > 1: an endpoint agent still holds it,
  for a task that depends on it, say) is never handed out: it is unlinked.
- Per user: ``<data_dir>/spares/<user hash>/`` (0700, files 0600), never
  another user's file for a user's payload (a user who lies in a release can
  only change their own data). Bounded: at most MAX_FILES files and MAX_BYTES
  bytes per user, MAX_TOTAL_FILES and MAX_TOTAL_BYTES in all; the oldest goes first (unlinked: no
  recycling, never unsafe). Not charged to the user's quota (bounded here).
- Deleted as the relay starts (after a kill -9 too) and stops: only the
  in-memory lists say what may be reused.
- Only where the relay's data directory is on a filesystem kept in memory
  (tmpfs: the embedded default's, embedded.py): a kept file on a disk stays
  dirty, and the kernel writes it back, 0.2-0.8 GB per 1 GB trip measured,
  where a file unlinked within seconds is never written. The environment
  variable FEDEXEC_RECYCLE_PAYLOADS (``on``/``off``; unset: ``auto``, that
  rule) decides otherwise for a relay.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import OrderedDict
from pathlib import Path

from ..transfer import BIG_THRESHOLD

MIN_BYTES = BIG_THRESHOLD        # smaller files are not kept
MAX_FILES = 3                    # held and spare files of one user
MAX_BYTES = 3 * 1024 ** 3        # their bytes
MAX_TOTAL_FILES = 12             # of all users
MAX_TOTAL_BYTES = 8 * 1024 ** 3  # their bytes


class Spares:
    """The relay's recycled payload files, per user (see the module's doc)."""

    def __init__(self, data_dir: Path, enabled: bool | None = None) -> None:
        self.root = Path(data_dir) / "spares"
        shutil.rmtree(self.root, ignore_errors=True)   # (what a killed relay left: nothing says it is free)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        # whether files are recycled at all (None: FEDEXEC_RECYCLE_PAYLOADS, or on a memory filesystem)
        self.enabled = recycling_wanted(self.root) if enabled is None else enabled
        # user -> {file name -> size}, oldest first; names "h-<upload id>" (held) or "s-<random>" (spare)
        self.files: dict[str, OrderedDict[str, int]] = {}
        self.count = 0
        self.bytes = 0
        self.handed: dict[str, list[Path]] = {}   # user -> files handed to an agent, not taken yet

    def directory(self, user: str) -> Path:
        path = self.root / hashlib.sha256(user.encode()).hexdigest()[:32]
        if user not in self.files:
            path.mkdir(mode=0o700, exist_ok=True)
            self.files[user] = OrderedDict()
        return path

    def keep(self, user: str, path: Path, bid: bytes, held: bool) -> bool:
        """Take the spool file ``path`` (moved here, 0600): held for its
        client's release of upload ``bid``, or spare at once. False when it
        could not be (the caller unlinks it)."""
        size = path.stat().st_size
        if not self.enabled or not MIN_BYTES <= size <= MAX_BYTES:   # (a small file is cheap to make anew)
            return False
        name = ("h-" if held else "s-") + (bid.hex() if held else os.urandom(8).hex())
        target = self.directory(user) / name
        try:
            os.rename(path, target)
            os.chmod(target, 0o600, follow_symlinks=False)   # (an unhashed upload's mode is not a spare's)
        except OSError:
            return False
        files = self.files[user]
        self._forget(user, name)
        files[name] = size
        self.count += 1
        self.bytes += size
        while len(files) > MAX_FILES or sum(files.values()) > MAX_BYTES:
            self._drop(user, next(iter(files)))
        while self.count > MAX_TOTAL_FILES or self.bytes > MAX_TOTAL_BYTES:   # (from the user who has most)
            most = max(self.files, key=lambda u: (sum(self.files[u].values()), len(self.files[u])))
            self._drop(most, next(iter(self.files[most])))
        return True

    def release(self, user: str, bid: bytes) -> bool:
        """The client of ``user`` no longer maps its result ``bid``: spare now.
        Only a held file of that user is found (a forged, another user's or
        repeated release finds none)."""
        files = self.files.get(user)
        name = "h-" + bid.hex()
        if files is None or name not in files:
            return False
        spare = "s-" + os.urandom(8).hex()
        directory = self.directory(user)
        try:
            os.rename(directory / name, directory / spare)
        except OSError:
            self._forget(user, name)
            return False
        files[spare] = files.pop(name)
        return True

    def take(self, user: str, size: int) -> Path | None:
        """A spare file of ``user`` for a payload of about ``size`` bytes (the
        closest in size), no longer listed here: the caller renames it
        where it writes (and so owns it); None if there is none."""
        files = self.files.get(user)
        self._unhanded(user)
        while files:
            spares = [name for name in files if name.startswith("s-")]
            if not spares:
                return None
            name = min(spares, key=lambda n: abs(files[n] - size))
            path = self.directory(user) / name
            try:
                shared = os.stat(path, follow_symlinks=False).st_nlink != 1
            except OSError:
                self._forget(user, name)
                continue
            if shared:   # (another name of it is in use somewhere: never rewritten)
                self._drop(user, name)
                continue
            self._forget(user, name)
            return path
        return None

    def hand_out(self, user: str, size: int, tag: str) -> Path | None:
        """A spare of ``user`` renamed to ``o-<tag>`` in its directory, for an
        endpoint agent of the user (same OS user) to move into its own
        spool; one not moved by the next hand-out of the user is unlinked."""
        path = self.take(user, size)
        if path is None:
            return None
        out = path.with_name("o-" + tag)
        try:
            os.rename(path, out)
        except OSError:
            _unlink(path)
            return None
        self.handed.setdefault(user, []).append(out)
        return out

    def _unhanded(self, user: str) -> None:
        for path in self.handed.pop(user, ()):
            _unlink(path)   # (taken by its agent already: no such name any more)

    def _forget(self, user: str, name: str) -> None:
        size = self.files[user].pop(name, None)
        if size is not None:
            self.count -= 1
            self.bytes -= size

    def _drop(self, user: str, name: str) -> None:
        self._forget(user, name)
        _unlink(self.directory(user) / name)

    def close(self) -> None:
        """The relay stops: every recycled file goes."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.files.clear()
        self.handed.clear()
        self.count = self.bytes = 0


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def recycling_wanted(path: Path) -> bool:
    """Whether to recycle payload files kept under ``path``: as
    FEDEXEC_RECYCLE_PAYLOADS says (``on``/``off``), else (``auto``) when
    ``path`` is on a filesystem kept in memory."""
    setting = os.environ.get("FEDEXEC_RECYCLE_PAYLOADS", "auto").strip().lower()
    if setting in ("on", "1", "yes", "true"):
        return True
    if setting in ("off", "0", "no", "false"):
        return False
    return filesystem_type(path) in MEMORY_FILESYSTEMS


def filesystem_type(path: Path | str) -> str:
    """The type of the filesystem ``path`` is on ("tmpfs", "ext4", ...; ""
    when it cannot be told), from the longest mount point above it."""
    real = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                try:
                    point = fields[4].replace("\\040", " ")
                    fstype = fields[fields.index("-", 6) + 1]
                except (IndexError, ValueError):
                    continue
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fstype
    except OSError:
        return ""
    return kind
