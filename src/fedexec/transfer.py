"""Large payloads: chunked transfer through the relay, stored on disk.

A payload (pickled arguments or result) over BIG_THRESHOLD bytes does not
travel in a task or result row. Its sender uploads it to the relay first, in
chunks of at most CHUNK bytes (each a frame well under MAX_FRAME) with at most
WINDOW chunks unanswered, over a connection of its own (:class:`TransferLink`);
the relay appends them to a spool file in its data directory (:class:`Spool`),
and the row then carries a small *reference* (:func:`big_ref`) in place of the
payload. A receiver fetches the chunks back by the same kind of connection.
Small payloads never come here: their path is unchanged.

Between an endpoint agent and its workers on the same machine a payload
travels as a file: the agent fetches the arguments into its private spool
directory and the row carries a *local reference* (:func:`local_ref`), the
path; a worker writes a large result to a file there and sends its local
reference, which the agent uploads. Nobody holds a whole large payload in
memory but its producer and its consumer.

Messages (client/endpoint <-> relay, see protocol.py):

- ``UPLOAD {b: upload id, o: offset, n: total, h: sha256, tid?}`` + one chunk
  frame; answered ``UPLOADED {b, have, done?, err?}``: the bytes the relay
  has. A chunk at another offset than ``have`` is not written (the answer
  says where to go on from), so a sender whose messages were lost (the relay
  restarted) resumes from what is on disk.
- ``FETCH {b, o, tid?}``; answered ``CHUNK {b, o, n}`` + one frame, or
  ``CHUNK {b, o, err}``.
- ``DROP {b, k?}``: the receiver of a result has it; the relay deletes the
  file, or with ``k`` (the receiver maps it) holds it for a RELEASE.
- ``RELEASE {bs: [b, ...]}`` (at most MAX_ITEMS): the receiver no longer maps
  these results; the relay recycles their files (relay/spares.py): the next
  large payload of the same user on this machine is written over them.

Ownership: an upload lives in its user's directory (named by a hash of the
user name), and every name is looked up there: another user's upload id is
simply unknown. An endpoint names the task (``tid``) it uploads a result for
or fetches arguments of; the relay then uses the directory of that task's
user, once it checked the task went to an endpoint of the connection's user.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import hashlib
import mmap
import os
import stat
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import msgpack
import zmq

from . import protocol as P
from .auth import Credentials, find_credentials, find_relay_key, secure
from .errors import FedexecError, PayloadTooLarge

BIG_THRESHOLD = 16 * 1024 * 1024   # payloads larger than this travel in chunks
CHUNK = 8 * 1024 * 1024            # bytes of one chunk frame (< MAX_FRAME)
WINDOW = 4                         # chunks a sender or receiver keeps unanswered
RESEND_AFTER = 5.0                 # seconds without an answer before asking again from what is known
GIVE_UP_AFTER = 300.0              # seconds without any progress: the transfer fails
PARTIAL_TTL = 600.0                # an upload not written to for this long is deleted
DEFAULT_LARGE_MAX_PAYLOAD = 4 * 1024 ** 3   # the relay's default limit (bytes of pickled data)
MAX_LARGE_PAYLOAD = 1 << 40

REF_MAGIC = b"\x00fedexec-big\x00"      # + msgpack {b, n, h}: an upload at the relay
LOCAL_MAGIC = b"\x00fedexec-file\x00"   # + msgpack {p, n}: a file on this machine

MAX_REF = 4096   # bytes of a reference at most
# What a spool file costs its user's byte quota beyond its bytes (a disk
# block and an inode): so that many tiny uploads cannot pile up files (and
# exhaust the relay's inodes) within a byte quota meant for a few large ones.
FILE_COST = 4096

SPOOL_ENV = "FEDEXEC_SPOOL"   # where a worker writes large results (the agent's private spool)

# The same-host fast path (see SameHost): a sender that shows it runs as the relay's OS user on the relay's
# machine hands large payloads over as files in the relay's spool instead of chunks over the socket.
LOCAL = "local"          # client/endpoint -> relay {q, op, ...}; op: hello, prove, place, placed, where
LOCAL_OK = "local-ok"    # relay -> sender {q, ...}, or {q, err}
SECRET_NAME = "secret"   # in <relay data dir>/same-host/ (0700)
RELEASE = "release"      # client -> relay {bs}: results no longer mapped (see DROP above; relay/spares.py)
CHUNKS_ONLY_ENV = "FEDEXEC_CHUNKS_ONLY"   # set (to anything): transfers keep to chunks on the relay's machine too
LOCAL_ANSWER_WAIT = 10.0            # seconds a same-host request waits for its answer; then chunks
SAME_HOST_USES: dict[str, int] = {"upload": 0, "fetch": 0, "link": 0}   # this process's hand-overs (tests)
HASHED = {"bytes": 0}   # bytes this process ran through sha256 for transfers (tests: none on the same-host path)
DIGESTS_KEPT = 1024     # the relay's sha256s of unhashed uploads, computed for chunked fetchers (Spool.read)
GAP_PER_FETCH = 2 * CHUNK   # bytes the relay reads at most per FETCH to hash a part no fetcher read in order
# A complete same-host upload without a sha256 is marked by this mode (0600 otherwise; the sticky bit,
# which Linux ignores on a file: no one's access changes): after the machine restarted (its boot id
# changed), such files are deleted as the relay starts (Spool.recover), since nothing could tell one a
# power cut left cut or zeroed (none is fsynced) from a whole one.
UNHASHED_MODE = stat.S_ISVTX | 0o600
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


class TransferError(FedexecError):
    """A chunked transfer failed; the message says why."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.details = details


class Sha256:
    """hashlib's sha256 of a payload's bytes, counted in HASHED (so that a
    test can see which transfers hash and which do not)."""

    __slots__ = ("hasher",)

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()

    def update(self, data: Any) -> None:
        self.hasher.update(data)
        HASHED["bytes"] += memoryview(data).nbytes

    def digest(self) -> bytes:
        return self.hasher.digest()


# -- references ---------------------------------------------------------------
def task_upload_id(task_id: bytes | None) -> bytes:
    """A new upload id: for an upload made for a task (an endpoint's result),
    bound to that task (its first 8 bytes derived from the task id, see
    :func:`bound_to`), else random. The relay takes an upload for a task, and
    a task's large result, only under an id bound to it: so an endpoint
    running several tasks of a user cannot name another upload of that user
    (a big argument, a DataRef, another task's result) as a task's result,
    which the user's client would read as the value and then drop."""
    if task_id is None:
        return os.urandom(16)
    return _task_prefix(task_id) + os.urandom(8)


def bound_to(bid: bytes, task_id: Any) -> bool:
    """Whether upload id ``bid`` was made for task ``task_id`` (:func:`task_upload_id`)."""
    return isinstance(task_id, bytes) and bid[:8] == _task_prefix(task_id)


def _task_prefix(task_id: bytes) -> bytes:
    return hashlib.sha256(b"fedexec upload for task " + task_id).digest()[:8]


def big_ref(bid: bytes, total: int, digest: bytes) -> bytes:
    """A reference to upload ``bid`` of ``total`` bytes. ``digest``: its
    sha256, or b"" for an *unhashed* upload (handed over on the same-host
    path, where sender, relay and receivers are one OS user and the file
    never leaves that user's 0700 directories: a hash there guards nothing,
    and cost a pass over the data at each end). A receiver that fetches an
    unhashed upload in chunks gets its sha256 from the relay (Spool.read)."""
    return REF_MAGIC + msgpack.packb({"b": bid, "n": total, "h": digest}, use_bin_type=True)


def is_big(blob: Any) -> bool:
    """Whether a payload (bytes, or a zmq.Frame) is a reference to an upload
    (cheap: a prefix test; a reference is small, so large frames are not)."""
    if type(blob) is bytes:
        return blob.startswith(REF_MAGIC)
    return len(blob) <= MAX_REF and bytes(P.as_buffer(blob)[:len(REF_MAGIC)]) == REF_MAGIC


def parse_big(blob: bytes) -> tuple[bytes, int, bytes]:
    """``(upload id, size, sha256 or b"" when unhashed)`` of a reference, checked."""
    try:
        fields = msgpack.unpackb(P.as_bytes(blob)[len(REF_MAGIC):], raw=False, max_map_len=8, max_bin_len=64, max_str_len=64)
        bid, total, digest = fields["b"], fields["n"], fields["h"]
    except Exception:
        raise P.ProtocolError("malformed large-payload reference") from None
    if not (isinstance(bid, bytes) and len(bid) == 16 and type(total) is int and 0 <= total <= MAX_LARGE_PAYLOAD
            and isinstance(digest, bytes) and len(digest) in (0, 32)):
        raise P.ProtocolError("malformed large-payload reference")
    return bid, total, digest


def local_ref(path: str, total: int, digest: bytes = b"") -> bytes:
    """A file on this machine: its path, size and (for a result) sha256."""
    return LOCAL_MAGIC + msgpack.packb({"p": path, "n": total, "h": digest}, use_bin_type=True)


def is_local(blob: Any) -> bool:
    """Whether a payload (bytes, or a zmq.Frame) is a local reference. Any
    size: a task's arguments wrapped with the files of the DataRefs they
    name (dataref.wrap_arguments) are one, inline arguments and all; and
    the agent must see a client's forged one however long it is."""
    if type(blob) is bytes:
        return blob.startswith(LOCAL_MAGIC)
    return bytes(P.as_buffer(blob)[:len(LOCAL_MAGIC)]) == LOCAL_MAGIC


def parse_local(blob: bytes) -> tuple[str, int, bytes]:
    fields = msgpack.unpackb(P.as_bytes(blob)[len(LOCAL_MAGIC):], raw=False)
    path, total, digest = fields["p"], fields["n"], fields.get("h", b"")
    if not (isinstance(path, str) and type(total) is int and total >= 0 and isinstance(digest, bytes)):
        raise ValueError("malformed local reference")
    return path, total, digest


def load_local(blob: bytes, loads: Callable[[Any], Any]) -> Any:
    """The value a local reference names, loaded by ``loads`` from its file
    mapped into memory, copy-on-write: a value that keeps parts of the
    mapping (pickle-5 out-of-band buffers, see serialize.py) uses the file's
    pages without copying them and may still change them (privately); the
    mapping stays while such a value lives, else it is closed at once. A
    mapping a value kept is held on to (:func:`privatize_leftovers`): once
    the value is gone, it is unmapped only after the task's result went
    (:func:`unmap_leftovers`), since unmapping a gigabyte whose pages the
    task read takes tens of milliseconds, hundreds on a loaded machine."""
    path, total, _ = parse_local(blob)
    with open(path, "rb") as f:
        view = mmap.mmap(f.fileno(), total, access=mmap.ACCESS_COPY)
    try:
        return loads(view)
    finally:
        try:
            view.close()
        except BufferError:   # the value holds parts of it: unmapped when they go (see privatize_leftovers)
            _LEFTOVER.append(view)


_LEFTOVER: list[mmap.mmap] = []   # (a worker) the mappings load_local could not close yet
_UNUSED: list[mmap.mmap] = []     # (a worker) mappings nothing uses any more, unmapped by unmap_leftovers
PAGE = mmap.PAGESIZE


def _in_use(mapping: mmap.mmap) -> bool:
    """Whether anything but the caller's one reference holds ``mapping``, or
    a buffer exported from it is still out (a value made of its pages)."""
    # (the caller's one reference, this function's argument and getrefcount's)
    if sys.getrefcount(mapping) > 3:
        return True
    try:   # (a copy-on-write mapping is never resized: BufferError while exported, else TypeError)
        mapping.resize(len(mapping))
    except BufferError:
        return True
    except (TypeError, ValueError, OSError):
        pass
    return False


def privatize_leftovers() -> int:
    """(A worker, after each task, before its result goes) Mappings of
    arguments' files (:func:`load_local`) that something the task left
    behind still uses are made private: every page is written once, so the
    mapping holds its own copy and no longer sees the file, which the relay
    may then recycle (relay/spares.py) and the user's next payload rewrite.
    Usually the task's values are gone with it: its mappings, which no
    value sees any more, are left for :func:`unmap_leftovers`. The number
    of mappings copied."""
    if not _LEFTOVER:
        return 0
    _sort_leftovers()
    if _LEFTOVER:
        gc.collect()   # (a cycle, as an exception's traceback makes, may hold the values)
        _sort_leftovers()
    alive = list(_LEFTOVER)
    _LEFTOVER.clear()
    for mapping in alive:
        try:
            for off in range(0, len(mapping), PAGE):
                mapping[off] = mapping[off]   # (a write fault: the page is copied, the file no longer seen)
        except ValueError:   # closed meanwhile
            pass
    return len(alive)


def _sort_leftovers() -> None:
    """The mappings of _LEFTOVER that nothing uses go to _UNUSED; those in use stay."""
    used = []
    while _LEFTOVER:
        mapping = _LEFTOVER.pop()
        if _in_use(mapping):
            used.append(mapping)
        else:
            _UNUSED.append(mapping)
        del mapping
    _LEFTOVER.extend(used)


def unmap_leftovers() -> None:
    """(A worker, once a task's result went) Unmap the task's argument
    mappings that nothing uses (:func:`privatize_leftovers` put them
    aside), off the way of its result."""
    while _UNUSED:
        _UNUSED.pop().close()


class Pieces:
    """A large payload as the buffers it is made of, not joined into one
    (a pickle and its out-of-band buffers, see serialize.py): sent and
    written piece by piece, so that the producer never copies the data into
    one bytes object. ``len()`` is its size in bytes; ``fallback()`` makes
    it one bytes object (for where no large-payload path exists)."""

    __slots__ = ("parts", "starts", "nbytes", "fallback")

    def __init__(self, parts: list[Any], fallback: Callable[[], bytes]) -> None:
        self.parts = [memoryview(p).cast("B") for p in parts]
        self.starts: list[int] = []
        total = 0
        for part in self.parts:
            self.starts.append(total)
            total += len(part)
        self.nbytes = total
        self.fallback = fallback

    def __len__(self) -> int:
        return self.nbytes

    def read(self, off: int, end: int) -> Any:
        """Bytes ``off:end``: a view of one part, or (across parts) a copy."""
        i = bisect.bisect_right(self.starts, off) - 1
        start = self.starts[i]
        if end - start <= len(self.parts[i]):
            return self.parts[i][off - start:end - start]
        out = bytearray()
        while off < end:
            part, start = self.parts[i], self.starts[i]
            take = part[off - start:min(end, start + len(part)) - start]
            out += take
            off += len(take)
            i += 1
        return out

    def sha256(self) -> bytes:
        hasher = Sha256()
        for part in self.parts:
            hasher.update(part)
        return hasher.digest()


def write_private(path: str, data: Any, hashed: bool = True) -> bytes:
    """``data`` (bytes-like, or Pieces) into a new file only this user can
    read; its sha256, computed chunk by chunk as it is written (one pass over
    the data, each chunk hashed while it is in the CPU's cache); without
    ``hashed``, b"" (not computed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return _write_hashing(fd, data, hashed)
    finally:
        os.close(fd)


def spill_result(blob: Any, task_id: bytes) -> Any:
    """A worker's large result (bytes, or Pieces) as a local reference to a
    file in the agent's spool (SPOOL_ENV); small ones as they are; without a
    spool, as one bytes object. Not hashed here: the agent hands the file
    to a relay on its machine as it is (TransferLink.upload), and hashes it
    only when it must send it in chunks."""
    spool = os.environ.get(SPOOL_ENV)
    if len(blob) <= BIG_THRESHOLD:
        return blob
    if spool is None:
        return blob.fallback() if isinstance(blob, Pieces) else blob
    path = os.path.join(spool, f"{task_id.hex()}.{os.getpid()}.result")
    try:   # a recycled file the agent got for this task (relay/spares.py): written over its pages
        os.rename(os.path.join(spool, f"{task_id.hex()}.spare"), path)
    except OSError:   # (none)
        write_private(path, blob, hashed=False)
        return local_ref(path, len(blob))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except OSError:   # (not a regular file: never written through)
        os.unlink(path)
        write_private(path, blob, hashed=False)
    else:
        try:
            _write_hashing(fd, blob, hashed=False)
            os.ftruncate(fd, len(blob))
        finally:
            os.close(fd)
    return local_ref(path, len(blob))


# -- the relay's side -----------------------------------------------------------
class Spool:
    """The relay's uploads: ``<data_dir>/spool/<user hash>/<upload id>`` (a
    ``.part`` suffix until complete and verified), directories 0700, files
    0600. Charges ``charge(user, +-bytes)`` as files grow and go; refuses a
    chunk ``refusal(user, bytes)`` gives a reason for (the byte quota). It
    never reads what it stores: whoever fetches an upload checks its sha256."""

    def __init__(self, data_dir: Path, charge: Callable[[str, int], None],
                 refusal: Callable[[str, int], str | None], max_payload: int) -> None:
        self.root = Path(data_dir) / "spool"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.charge = charge
        self.refusal = refusal
        self.max_payload = max_payload
        self.users: dict[str, str] = {}      # directory name -> user
        self.spares: Any = None              # recycled files (relay/spares.py Spares), set by the relay
        self.digests = UploadDigests()
        self.lost: set[bytes] = set()        # unhashed uploads deleted as the relay started after a reboot

    def directory(self, user: str) -> Path:
        name = hashlib.sha256(user.encode()).hexdigest()[:32]
        path = self.root / name
        if name not in self.users:
            path.mkdir(mode=0o700, exist_ok=True)
            write_private(str(path / "user"), user.encode())
            self.users[name] = user
        return path

    def recover(self) -> None:
        """After a restart: charge each user for what is on disk; after a
        restart of the machine, first delete the unhashed uploads (see
        UNHASHED_MODE): their tasks fail saying why, not run on bad data."""
        rebooted = self._rebooted()
        for sub in self.root.iterdir():
            try:
                user = (sub / "user").read_text()
            except OSError:
                continue
            self.users[sub.name] = user
            for f in sub.iterdir():
                if f.name == "user":
                    continue
                info = f.stat()
                if rebooted and f.suffix != ".part" and stat.S_IMODE(info.st_mode) == UNHASHED_MODE:
                    f.unlink()
                    with contextlib.suppress(ValueError):
                        self.lost.add(bytes.fromhex(f.name))
                    continue
                self.charge(user, info.st_size + FILE_COST)

    def _rebooted(self) -> bool:
        """Whether the machine restarted since this data directory's relay
        last started (its boot id, kept beside the spool, changed)."""
        try:
            with open(BOOT_ID_FILE) as f:
                now = f.read().strip()
        except OSError:   # (not Linux: no boot id; then every start counts as after a reboot)
            now = os.urandom(16).hex()
        kept = self.root.parent / "boot-id"
        try:
            before = kept.read_text().strip()
        except OSError:
            before = now   # (a new data directory, or one of a version before unhashed uploads)
        write_private(str(kept), now.encode(), hashed=False)
        return before != now

    def path(self, user: str, bid: bytes) -> Path:
        return self.directory(user) / bid.hex()

    def complete(self, user: str, bid: bytes) -> Path | None:
        path = self.path(user, bid)
        return path if path.exists() else None

    def upload(self, user: str, fields: dict[str, Any], chunk: Any) -> dict[str, Any]:
        """Take one UPLOAD chunk; the UPLOADED answer's fields."""
        bid, off, total, digest = fields["b"], fields["o"], fields["n"], fields["h"]
        if not (isinstance(bid, bytes) and len(bid) == 16 and type(off) is int and type(total) is int
                and isinstance(digest, bytes) and len(digest) == 32 and 0 <= off <= total):
            raise P.ProtocolError("malformed UPLOAD")
        if total > self.max_payload:
            message, details = P.too_large("the payload", total, self.max_payload)
            return {"b": bid, "err": message, "too_large": True, **details}
        final = self.path(user, bid)
        if final.exists():
            return {"b": bid, "have": total, "done": True}
        part = final.with_suffix(".part")
        have = part.stat().st_size if part.exists() else 0
        data = P.as_buffer(chunk)
        size = len(data)
        if off == have and size and off + size <= total:
            cost = size if have or part.exists() else size + FILE_COST   # (a new file: its FILE_COST too)
            why = self.refusal(user, cost)
            if why is not None:
                return {"b": bid, "err": why, "quota": True}
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                view = memoryview(data).cast("B")
                written = 0
                while written < size:
                    written += os.write(fd, view[written:])
            finally:
                os.close(fd)
            self.charge(user, cost)
            have += size
        if have == total:   # (its sha256 is checked by whoever fetches it, not here: the relay never reads it)
            # Not fsynced: the relay's record (SQLite, WAL, synchronous=NORMAL) survives a kill -9 of the
            # relay, not a power cut, and so does this file (a page-cache write is kept when the process
            # dies). An fsync here cost 0.2 s per 100 MB; a file cut by a power cut fails its sha256
            # check where it is fetched, so its task fails saying so instead of running on bad data.
            os.rename(part, final)
            return {"b": bid, "have": have, "done": True}
        return {"b": bid, "have": have}

    def place(self, user: str, bid: bytes, total: int) -> dict[str, Any]:
        """Same-host upload, first step: a new ``.part`` file of ``total``
        bytes (holes) made here (O_EXCL, 0600, in the user's directory) and
        charged in full now, for a proven same-user sender to fill; the
        answer's fields (its path, or why not)."""
        if total > self.max_payload:
            message, details = P.too_large("the payload", total, self.max_payload)
            return {"err": message, "too_large": True, **details}
        part = self.path(user, bid).with_suffix(".part")
        why = self.refusal(user, total + FILE_COST)
        if why is not None:
            return {"err": why, "quota": True}
        spare = None if self.spares is None or part.exists() else self.spares.take(user, total)
        if spare is not None:   # a recycled file of this user (relay/spares.py): written over its pages
            try:
                os.rename(spare, part)
                os.utime(part)   # (a .part's age is its idleness: PARTIAL_TTL)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(spare)
        fd = os.open(part, os.O_WRONLY | os.O_NOFOLLOW | (0 if spare is not None and part.exists()
                                                           else os.O_CREAT | os.O_EXCL), 0o600)
        try:
            os.ftruncate(fd, total)
        finally:
            os.close(fd)
        self.charge(user, total + FILE_COST)
        return {"p": str(part)}

    def placed(self, user: str, bid: bytes, total: int, unhashed: bool = False) -> dict[str, Any]:
        """Same-host upload, last step: the ``.part`` file (opened here by
        the relay's own path, never a symlink) must be a regular file of
        ``total`` bytes; then it is complete (as a chunked
        upload's last chunk makes it). Its sha256 is checked by whoever
        fetches it, as for chunks; an ``unhashed`` one (its reference has
        none) is marked so (UNHASHED_MODE)."""
        final = self.path(user, bid)
        if final.exists():
            return {"done": True}
        part = final.with_suffix(".part")
        try:
            fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                self.drop(user, bid)   # (not a file: a symlink put in its place, say)
            return {"err": f"no same-host upload {bid.hex()} of user {user!r} in progress here"}
        try:
            st = os.fstat(fd)
            regular = stat.S_ISREG(st.st_mode) and st.st_size == total
            if regular and unhashed:
                os.fchmod(fd, UNHASHED_MODE)
        finally:
            os.close(fd)
        if not regular:
            self.drop(user, bid)
            return {"err": f"the same-host upload {bid.hex()} is not a regular file of {total} bytes; dropped"}
        os.rename(part, final)
        return {"done": True}

    def read(self, user: str, fields: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        """Answer one FETCH: a CHUNK's fields and frames."""
        bid, off = fields["b"], fields["o"]
        if not (isinstance(bid, bytes) and len(bid) == 16 and type(off) is int and off >= 0):
            raise P.ProtocolError("malformed FETCH")
        path = self.complete(user, bid)
        if path is None:
            if bid in self.lost:
                return {"b": bid, "o": off, "err": f"upload {bid.hex()} was handed over on the relay's machine "
                                                     "without a sha256, and the machine restarted since: it was "
                                                     "deleted, as a power cut may have cut it; submit again"}, []
            return {"b": bid, "o": off, "err": f"no upload {bid.hex()} of user {user!r} here (unknown, "
                                                 "another user's, or expired)"}, []
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), CHUNK, off)
            info = os.fstat(f.fileno())
            reply = {"b": bid, "o": off, "n": info.st_size}
            if fields.get("d") is True and stat.S_IMODE(info.st_mode) == UNHASHED_MODE:
                # the fetcher of an unhashed upload: the last chunk brings its sha256 (asked of a hashed
                # upload, nothing: its fetcher has the sha256, and the relay's loop hashes no more than it must)
                digest = self.digests.advance(str(path), f.fileno(), off, data, info.st_size)
                if digest is not None:
                    reply["h"] = digest
        return reply, [data]

    def drop(self, user: str, bid: bytes) -> None:
        for path in (self.path(user, bid), self.path(user, bid).with_suffix(".part")):
            if path.exists():
                self._remove(user, path)

    def recycle(self, user: str, bid: bytes, held: bool) -> None:
        """As :meth:`drop`, but the complete upload's file goes to the
        user's recycled files (relay/spares.py) instead: held for its
        client's release (``held``), or spare at once; unlinked if it cannot."""
        path = self.path(user, bid)
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        if size >= 0 and self.spares is not None and self.spares.keep(user, path, bid, held):
            self.charge(user, -(size + FILE_COST))
        self.drop(user, bid)   # (what is left: a .part, or the file if it was not kept)

    def _remove(self, user: str, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            return
        self.charge(user, -(size + FILE_COST))

    def expire(self, now: float, complete_ttl: float, in_use: Callable[[], set[Path]]) -> None:
        """Delete partial uploads not written to for PARTIAL_TTL, and complete
        ones older than ``complete_ttl`` that no task refers to (``in_use()``,
        asked only once a file is old enough: it looks at every task)."""
        used: set[Path] | None = None
        for name, user in list(self.users.items()):
            for path in (self.root / name).iterdir():
                if path.name == "user":
                    continue
                try:
                    age = now - path.stat().st_mtime
                except OSError:
                    continue
                if age > (PARTIAL_TTL if path.suffix == ".part" else complete_ttl):
                    if used is None:
                        used = in_use()
                    if path not in used:
                        self._remove(user, path)


class UploadDigests:
    """The relay's sha256s of unhashed uploads (see :func:`big_ref`), for
    receivers that fetch them in chunks (another OS user's, or another
    machine's). Computed lazily, as such a fetch reads the file in order:
    each chunk read for the fetcher is hashed too, so no extra pass over the
    data; a part before the chunk asked that was not (as after a restart
    mid-fetch) is read to be hashed, at most GAP_PER_FETCH bytes per FETCH
    (so that no message holds the relay's loop long: the fetcher asks
    again, at the end, until the sha256 comes). Kept once complete (the
    last DIGESTS_KEPT), so a later fetch of the same file (a DataRef's, a
    retry's) is checked against what the first saw: a file changed since
    is refused by its fetcher."""

    def __init__(self) -> None:
        self.partial: dict[str, list[Any]] = {}   # upload's path -> [Sha256, bytes hashed so far]
        self.done: dict[str, bytes] = {}          # upload's path -> its sha256

    def advance(self, key: str, fd: int, off: int, data: bytes, total: int) -> bytes | None:
        """Chunk ``data`` at ``off`` of the file ``fd`` (``total`` bytes,
        ``key``: its path, which names one upload only) was read for a
        fetcher; the file's sha256 when this chunk is its last (or past it)
        and all of it has been hashed, else None."""
        end = off + len(data)
        digest = self.done.get(key)
        if digest is None:
            state = self.partial.pop(key, None) or [Sha256(), 0]
            self.partial[key] = state   # (the most recent last: the oldest goes first)
            while len(self.partial) > DIGESTS_KEPT:
                del self.partial[next(iter(self.partial))]
            hasher, upto = state
            budget = GAP_PER_FETCH
            while upto < min(off, total) and budget > 0:   # bytes before this chunk not hashed yet: read for it
                piece = os.pread(fd, min(CHUNK, off - upto, budget), upto)
                if not piece:
                    break
                hasher.update(piece)
                upto += len(piece)
                budget -= len(piece)
            if off <= upto < end:
                hasher.update(memoryview(data)[upto - off:])
                upto = end
            state[1] = upto
            if upto < total:
                return None
            digest = hasher.digest()
            del self.partial[key]
            self.done[key] = digest
            while len(self.done) > DIGESTS_KEPT:
                del self.done[next(iter(self.done))]
        return digest if end >= total else None


# -- a client's or endpoint's side ------------------------------------------------
class TransferLink:
    """A connection of its own to the relay for chunked transfers, used
    synchronously by one thread at a time."""

    def __init__(self, address: str, *, token: str | None = None, secret_file: str | Path | None = None,
                 relay_key: str | bytes | None = None, credentials: Credentials | None = None) -> None:
        """``credentials``: those to present (else found from ``token`` and
        ``secret_file`` as the executor finds them)."""
        self.ctx = zmq.Context()
        sock = P.dealer(self.ctx, 0, queues=False)
        # never blocked for good on a connection that does not come up (refused credentials)
        sock.setsockopt(zmq.SNDTIMEO, int(GIVE_UP_AFTER * 1000))
        key = secure(sock, address, relay_key)
        if credentials is None:
            credentials = find_credentials(address, token, secret_file)
        if credentials is not None:
            credentials.apply(sock, key)
        sock.connect(address)
        self.sock = sock
        # None: not asked yet (see _same_host); False: chunks only (so with CHUNKS_ONLY_ENV set, for tests and
        # benchmarks of the chunked path on one machine)
        self.same_host: bool | None = False if os.environ.get(CHUNKS_ONLY_ENV) else None
        #: how to wait for the relay's answer, ``wait(sock, timeout_ms) -> readable``: by default a poll;
        #: an agent sharing its thread with the relay (fedexec.colocated) gives the relay its turns meanwhile
        self.wait: Callable[[zmq.Socket, int], bool] | None = None

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def _send(self, frames: list[Any]) -> None:
        try:
            self.sock.send_multipart(frames, copy=False)
        except zmq.Again:
            raise TransferError(f"could not send to the relay for {GIVE_UP_AFTER:g} s (no connection: is it "
                                "running, and does it accept these credentials?)") from None

    def _answer(self, expected: str, timeout: float) -> P.Message | None:
        ms = int(timeout * 1000)
        if not (self.wait(self.sock, ms) if self.wait is not None else self.sock.poll(ms)):
            return None
        msg = P.decode(self.sock.recv_multipart(copy=False))
        if msg.type == P.ERROR:
            raise TransferError(f"the relay refused the transfer: {msg.fields.get('msg')}")
        return msg if msg.type == expected else None

    def upload(self, data: Any, task_id: bytes | None = None, digest: bytes = b"", hashed: bool = True) -> bytes:
        """Upload ``data`` (bytes-like, Pieces, or the path of a file: read chunk by
        chunk, never mapped or read whole, so that the uploader's memory
        stays small; ``digest``, its sha256 if known); its reference.
        Resumes from what the relay has after lost messages (a relay
        restart). On the relay's machine as its OS user, the payload goes
        as a file instead (:meth:`_upload_local`), else in chunks. A file
        handed over so keeps the ``digest`` it came with (b"": unhashed,
        see :func:`big_ref`); bytes handed over so are hashed only with
        ``hashed`` (a DataRef's are: its sha256 names its copies). Chunks
        always carry a sha256."""
        ref = self._upload_local(data, task_id, digest, hashed)
        if ref is not None:
            return ref
        if isinstance(data, (str, Path)):
            fd = os.open(data, os.O_RDONLY)
            try:
                total = os.fstat(fd).st_size
                if len(digest) != 32:
                    hasher = Sha256()   # (a worker's result file: hashed only now that chunks need it)
                    for off in range(0, total, CHUNK):
                        hasher.update(os.pread(fd, CHUNK, off))
                    digest = hasher.digest()
                return self._upload(lambda off, end: os.pread(fd, end - off, off), total, digest, task_id)
            finally:
                os.close(fd)
        if isinstance(data, Pieces):
            return self._upload(data.read, len(data), data.sha256(), task_id)
        view = memoryview(data).cast("B")
        try:
            return self._upload(lambda off, end: view[off:end], len(view), hashlib.sha256(view).digest(), task_id)
        finally:
            view.release()

    def _upload(self, read: Callable[[int, int], Any], total: int, digest: bytes, task_id: bytes | None) -> bytes:
        bid = task_upload_id(task_id)
        head = {"b": bid, "n": total, "h": digest, "q": os.urandom(8)}
        if task_id is not None:
            head["tid"] = task_id
        have = sent = 0
        progress = asked = time.monotonic()
        while True:
            while sent < total and sent - have < WINDOW * CHUNK:
                end = min(total, sent + CHUNK)
                self._send(P.encode(P.UPLOAD, {**head, "o": sent}, [read(sent, end)]))
                sent = end
                asked = time.monotonic()
            msg = self._answer(P.UPLOADED, 1.0)
            now = time.monotonic()
            if msg is None or msg.fields.get("q") != head["q"]:
                if now - progress > GIVE_UP_AFTER:
                    self.sock.send_multipart(P.encode(P.DROP, {"b": bid}))
                    raise TransferError(f"the relay took no part of the upload for {GIVE_UP_AFTER:g} s")
                if now - asked > RESEND_AFTER:
                    # lost on the way (the relay restarted?): again from what it has; all of it
                    # written, the last chunk goes again, and its answer says the upload is done
                    sent = have if have < total else max(0, total - 1 - (total - 1) % CHUNK)
                continue
            fields = msg.fields
            if "err" in fields:   # what reached the relay of it goes at once
                self.sock.send_multipart(P.encode(P.DROP, {"b": bid}))
                raise TransferError(str(fields["err"]), too_large=bool(fields.get("too_large")),
                                    **{k: fields[k] for k in ("size", "limit") if k in fields})
            if fields.get("done"):
                return big_ref(bid, total, digest)
            new = fields.get("have", 0)
            if new > have:
                progress = now
            have = new
            if sent > have and now - asked > RESEND_AFTER:
                sent = have

    def fetch(self, ref: bytes, sink: Callable[[int, Any], None], task_id: bytes | None = None) -> int:
        """Fetch the upload ``ref`` names, handing each chunk to
        ``sink(offset, data)`` (in order); checks its sha256 (an unhashed
        upload's, the relay sends with the last chunk); its size."""
        bid, total, digest = parse_big(ref)
        head: dict[str, Any] = {"b": bid, "q": os.urandom(8)}
        if task_id is not None:
            head["tid"] = task_id
        if not digest:
            head["d"] = True
        hasher = Sha256()
        have = asked_upto = 0
        progress = asked = time.monotonic()
        while have < total:
            while asked_upto < total and asked_upto - have < WINDOW * CHUNK:
                self._send(P.encode(P.FETCH, {**head, "o": asked_upto}))
                asked_upto += CHUNK
                asked = time.monotonic()
            msg = self._answer(P.CHUNK_MSG, 1.0)
            now = time.monotonic()
            if msg is None or msg.fields.get("q") != head["q"]:
                if now - progress > GIVE_UP_AFTER:
                    raise TransferError(f"the relay sent no part of the payload for {GIVE_UP_AFTER:g} s")
                if now - asked > RESEND_AFTER:
                    asked_upto = have
                continue
            fields = msg.fields
            if "err" in fields:
                raise TransferError(str(fields["err"]))
            if fields.get("o") != have or not msg.blobs:
                continue   # a late answer to a request asked again
            data = P.as_buffer(msg.blobs[0])
            if len(data) == 0 or have + len(data) > total:
                raise TransferError("the relay sent a chunk that does not fit the payload")
            hasher.update(data)
            sink(have, data)
            have += len(data)
            progress = now
            if have == total and not digest:
                digest = self._relay_digest(head, total, fields)
        if hasher.digest() != digest:
            raise TransferError("the payload fetched does not match its sha256")
        return total

    def _relay_digest(self, head: dict[str, Any], total: int, last: dict[str, Any]) -> bytes:
        """An unhashed upload's sha256 from the relay: with its last chunk
        (``last``: that answer's fields), or, when the relay had not hashed
        all of it yet (it restarted mid-fetch), asked for past its end until
        it has (see UploadDigests)."""
        digest, started = last.get("h"), time.monotonic()
        answers = total // GAP_PER_FETCH + 2   # (each answer without it hashed GAP_PER_FETCH bytes more)
        while not (isinstance(digest, bytes) and len(digest) == 32):
            if answers <= 0 or time.monotonic() - started > GIVE_UP_AFTER:
                raise TransferError("the relay sent no sha256 of the unhashed upload fetched")
            self._send(P.encode(P.FETCH, {**head, "o": total}))
            msg = self._answer(P.CHUNK_MSG, RESEND_AFTER)
            if msg is None or msg.fields.get("q") != head["q"] or msg.fields.get("o") != total:
                continue
            if "err" in msg.fields:
                raise TransferError(str(msg.fields["err"]))
            digest = msg.fields.get("h")
            answers -= 1
        return digest

    def fetch_bytes(self, ref: bytes, task_id: bytes | None = None) -> bytearray:
        """The whole payload in memory (the consumer's copy)."""
        _, total, _ = parse_big(ref)
        out = bytearray(total)
        view = memoryview(out)
        fd = self._open_local(ref, task_id)
        if fd is not None:
            try:
                _read_checked(fd, ref, view, always=True)
            finally:
                os.close(fd)
                view.release()
            SAME_HOST_USES["fetch"] += 1
            return out

        def put(off: int, data: Any) -> None:
            view[off:off + len(data)] = data

        self.fetch(ref, put, task_id)
        view.release()
        return out

    def fetch_mapped(self, ref: bytes, task_id: bytes | None = None) -> Any:
        """The whole payload for its consumer: on the relay's machine as its
        OS user, the relay's own file mapped copy-on-write (an mmap: no
        copy, and no read until its pages are used; values loaded from it
        may keep views of it, and may change them privately; the file may
        be deleted meanwhile); its sha256 is checked only if the reference
        has one (a hashed upload). Elsewhere fetched in chunks into a
        bytearray (:meth:`fetch_bytes`)."""
        fd = self._open_local(ref, task_id)
        if fd is None:
            return self.fetch_bytes(ref, task_id)
        try:
            mapped = mmap.mmap(fd, parse_big(ref)[1], access=mmap.ACCESS_COPY)
            _read_checked(fd, ref, None)
        finally:
            os.close(fd)
        SAME_HOST_USES["fetch"] += 1
        return mapped

    def fetch_file(self, ref: bytes, path: str, task_id: bytes | None = None) -> int:
        """The payload into a new private file at ``path``; its size. On the
        relay's machine as its OS user, a hard link to the relay's own file
        (checked: its sha256, read once), not a copy."""
        local = self._open_local(ref, task_id, with_path=True)
        if local is not None:
            fd, source = local
            try:
                os.link(source, path, follow_symlinks=False)
                opened, linked = os.fstat(fd), os.stat(path, follow_symlinks=False)
                if (linked.st_dev, linked.st_ino) != (opened.st_dev, opened.st_ino):
                    raise OSError("the relay's file changed between its check and its link")
                _read_checked(fd, ref, None)   # (nothing to read for an unhashed upload)
                SAME_HOST_USES["link"] += 1
                return parse_big(ref)[1]
            except OSError:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            finally:
                os.close(fd)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            def put(off: int, data: Any) -> None:
                view = memoryview(data).cast("B")
                written = 0
                while written < len(view):
                    written += os.pwrite(fd, view[written:], off + written)

            return self.fetch(ref, put, task_id)
        finally:
            os.close(fd)

    # -- the same-host fast path (see relay/bulk.py SameHost) ------------------------
    def _local_request(self, fields: dict[str, Any]) -> dict[str, Any] | None:
        """A same-host request's answer fields; None without one in time."""
        q = os.urandom(8)
        self._send(P.encode(LOCAL, {**fields, "q": q}))
        deadline = time.monotonic() + LOCAL_ANSWER_WAIT
        while (left := deadline - time.monotonic()) > 0:
            msg = self._answer(LOCAL_OK, left)
            if msg is not None and msg.fields.get("q") == q:
                return msg.fields
        return None

    def _same_host(self) -> bool:
        """Whether this connection has shown the relay it runs as the
        relay's OS user on its machine (asked once per link: the relay
        names a private file, this link sends back what it holds)."""
        if self.same_host is None:
            self.same_host = False
            try:
                where = self._local_request({"op": "hello"})
                if where is None:   # no answer (the relay is down?): asked again next time
                    self.same_host = None
                    return False
                if not isinstance(where.get("p"), str):
                    return False
                fd = os.open(where["p"], os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    secret = os.read(fd, 128)
                finally:
                    os.close(fd)
                answer = self._local_request({"op": "prove", "s": secret})
                self.same_host = bool(answer and answer.get("ok"))
            except (OSError, TransferError):   # another user or machine, or a relay without it: chunks
                pass
        return self.same_host

    def _upload_local(self, data: Any, task_id: bytes | None, digest: bytes, hashed: bool) -> bytes | None:
        """``data`` (bytes-like or Pieces, hashed while written if
        ``hashed``; or a file with its known ``digest``, b"" if none: then
        moved, not copied) written straight into a spool file the relay
        made; its reference, or None when the fast path is not open (then
        chunks go). A quota or size refusal is final, as for chunks."""
        if not self._same_host():
            return None
        total = os.stat(data).st_size if isinstance(data, (str, Path)) else len(data)
        bid = task_upload_id(task_id)
        head: dict[str, Any] = {"b": bid, "n": total}
        if task_id is not None:
            head["tid"] = task_id
        try:
            answer = self._local_request({**head, "op": "place"})
        except TransferError:
            answer = None
        if answer is None or not isinstance(answer.get("p"), str):
            if answer is not None and (answer.get("too_large") or answer.get("quota")):
                raise TransferError(str(answer["err"]), too_large=bool(answer.get("too_large")),
                                    **{k: answer[k] for k in ("size", "limit") if k in answer})
            self.same_host = None   # (a restarted relay forgot the proof: asked again next time)
            return None
        target = answer["p"]
        try:
            if isinstance(data, (str, Path)):
                # the agent's own file of a worker's result (same filesystem): a second name of it
                # takes the relay's placeholder's place, the first stays for chunks should this fail.
                # Not renamed over the placeholder: ext4 (auto_da_alloc) then starts writing the whole
                # file to disk at once, which held a 1 GB result here for 0.4-2.3 s
                os.unlink(target)
                os.link(data, target, follow_symlinks=False)
            else:
                fd = os.open(target, os.O_WRONLY | os.O_NOFOLLOW)
                try:
                    digest = _write_hashing(fd, data, hashed)
                finally:
                    os.close(fd)
            answer = self._local_request({**head, "op": "placed", **({} if digest else {"u": True})})
        except (OSError, TransferError):
            answer = None
        if not (answer and answer.get("done")):
            self.sock.send_multipart(P.encode(P.DROP, {"b": bid}))
            self.same_host = None
            return None
        SAME_HOST_USES["upload"] += 1
        return big_ref(bid, total, digest)

    def _open_local(self, ref: bytes, task_id: bytes | None, with_path: bool = False) -> Any:
        """The relay's own file of the upload ``ref`` names, opened (never
        through a symlink) and checked to be a regular file of its size: its
        fd (and with ``with_path``, ``(fd, path)``); None when the fast path
        is not open (then chunks go)."""
        if not self._same_host():
            return None
        bid, total, _ = parse_big(ref)
        fields: dict[str, Any] = {"op": "where", "b": bid}
        if task_id is not None:
            fields["tid"] = task_id
        try:
            answer = self._local_request(fields)
            if answer is None or not isinstance(answer.get("p"), str):
                return None
            fd = os.open(answer["p"], os.O_RDONLY | os.O_NOFOLLOW)
        except (OSError, TransferError):
            return None
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size == total:
            return (fd, answer["p"]) if with_path else fd
        os.close(fd)
        return None

    def drop(self, ref: bytes, mapped: bool = False) -> None:
        """Tell the relay the upload may go (a result received); ``mapped``:
        this process maps it, the relay recycles it once it is RELEASEd."""
        self.sock.send_multipart(P.encode(P.DROP, {"b": parse_big(ref)[0], **({"k": True} if mapped else {})}))

    def release(self, bids: list[bytes]) -> None:
        """Tell the relay these results (DROPped ``mapped``) are mapped no more."""
        for start in range(0, len(bids), P.MAX_ITEMS):
            self.sock.send_multipart(P.encode(RELEASE, {"bs": bids[start:start + P.MAX_ITEMS]}))

    def spare(self, task_id: bytes, size: int, path: str) -> bool:
        """(An agent on the relay's machine) a recycled file of the task's
        user (relay/spares.py) moved to ``path``, for the task's worker to
        write a large result into (spill_result); whether there was one."""
        if not self.same_host:
            return False
        answer = self._local_request({"op": "spare", "b": task_upload_id(task_id), "n": size, "tid": task_id})
        if not (answer and isinstance(answer.get("p"), str)):
            return False
        try:
            os.rename(answer["p"], path)
            if stat.S_ISREG(os.lstat(path).st_mode):
                return True
            os.unlink(path)   # (only ever a regular file of the relay's: nothing else is written through)
        except OSError:
            pass
        return False


def _write_hashing(fd: int, data: Any, hashed: bool = True) -> bytes:
    """``data`` (bytes-like, or Pieces) written to ``fd`` from its start;
    its sha256, each chunk hashed while it is in the CPU's cache (without
    ``hashed``: not computed, b"")."""
    hasher = Sha256() if hashed else None
    off = 0
    for part in (data.parts if isinstance(data, Pieces) else [data]):
        view = memoryview(part).cast("B")
        for start in range(0, len(view), CHUNK):
            piece = view[start:start + CHUNK]
            if hasher is not None:
                hasher.update(piece)
            done = 0
            while done < len(piece):
                done += os.pwrite(fd, piece[done:], off + done)
            off += len(piece)
    return b"" if hasher is None else hasher.digest()


def _read_checked(fd: int, ref: bytes, into: memoryview | None, always: bool = False) -> None:
    """Read the file ``fd`` (of the size ``ref`` says), into ``into`` if
    given, checking its sha256 if ``ref`` has one: TransferError if it does
    not match. An unhashed upload's file is not read (unless ``always``)."""
    _, total, digest = parse_big(ref)
    if not (digest or always):
        return
    hasher = Sha256() if digest else None
    scratch = None if into is not None else bytearray(CHUNK)
    off = 0
    while off < total:
        end = min(total, off + CHUNK)
        piece = into[off:end] if into is not None else memoryview(scratch)[:end - off]
        got = os.preadv(fd, [piece], off)
        if got <= 0:
            raise TransferError("the payload's file is shorter than its reference says")
        if hasher is not None:
            hasher.update(piece[:got])
        off += got
    if hasher is not None and hasher.digest() != digest:
        raise TransferError("the payload read does not match its sha256")


class LinkPool:
    """TransferLinks to one relay, one per thread that uses them (made on
    first use), for a client: uploads from the threads that submit, fetches
    from its dispatcher thread."""

    def __init__(self, address: str, token: str | None = None, secret_file: str | Path | None = None,
                 relay_key: str | bytes | None = None) -> None:
        # found now, as the executor's own connection found them: not when a first transfer comes,
        # by then $FEDEXEC_HOME or the environment may say something else
        self.address = address
        self.relay_key = find_relay_key(address, relay_key)
        self.credentials = find_credentials(address, token, secret_file)
        self.local = threading.local()
        self.links: list[TransferLink] = []
        self.lock = threading.Lock()
        self.released: list[bytes] = []   # results fetched mapped whose mapping went (sent with the next transfer)

    def get(self) -> TransferLink:
        link = getattr(self.local, "link", None)
        if link is None:
            link = self.local.link = TransferLink(self.address, relay_key=self.relay_key,
                                                  credentials=self.credentials)
            with self.lock:
                self.links.append(link)
        if self.released:   # (ahead of this transfer: a placement then finds the files released)
            with self.lock:
                bids, self.released = self.released, []
            link.release(bids)
        return link

    def _unmapped(self, bid: bytes) -> None:
        """weakref.finalize of a fetched result's mapping: it is gone (any
        thread; no socket here: the next transfer sends it)."""
        with self.lock:
            self.released.append(bid)

    def upload(self, data: Any, hashed: bool = True) -> bytes:
        """Upload a large payload; its reference (``hashed``: see
        :meth:`TransferLink.upload`). PayloadTooLarge when the relay refuses
        its size, TransferError for other failures."""
        try:
            return self.get().upload(data, hashed=hashed)
        except TransferError as exc:
            if exc.details.get("too_large"):
                raise PayloadTooLarge(str(exc), size=int(exc.details.get("size", 0)),
                                      limit=int(exc.details.get("limit", 0))) from None
            raise

    def fetch(self, ref: bytes) -> Any:
        """A large payload fetched for its consumer (mapped on the same
        host, else in memory: :meth:`TransferLink.fetch_mapped`); the relay
        then deletes it."""
        link = self.get()
        data = link.fetch_mapped(ref)
        mapped = isinstance(data, mmap.mmap)
        if mapped:   # recycled by the relay once it is unmapped (relay/spares.py)
            weakref.finalize(data, self._unmapped, parse_big(ref)[0])
        link.drop(ref, mapped=mapped)
        return data

    def close(self) -> None:
        with self.lock:
            links, self.links = self.links, []
        for link in links:
            link.close()
