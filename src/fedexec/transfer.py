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
- ``DROP {b}``: the receiver of a result has it; the relay deletes the file.

Ownership: an upload lives in its user's directory (named by a hash of the
user name), and every name is looked up there: another user's upload id is
simply unknown. An endpoint names the task (``tid``) it uploads a result for
or fetches arguments of; the relay then uses the directory of that task's
user, once it checked the task went to an endpoint of the connection's user.
"""

from __future__ import annotations

import bisect
import hashlib
import mmap
import os
import threading
import time
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


class TransferError(FedexecError):
    """A chunked transfer failed; the message says why."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.details = details


# -- references ---------------------------------------------------------------
def big_ref(bid: bytes, total: int, digest: bytes) -> bytes:
    return REF_MAGIC + msgpack.packb({"b": bid, "n": total, "h": digest}, use_bin_type=True)


def is_big(blob: Any) -> bool:
    """Whether a payload (bytes, or a zmq.Frame) is a reference to an upload
    (cheap: a prefix test; a reference is small, so large frames are not)."""
    if type(blob) is bytes:
        return blob.startswith(REF_MAGIC)
    return len(blob) <= MAX_REF and bytes(P.as_buffer(blob)[:len(REF_MAGIC)]) == REF_MAGIC


def parse_big(blob: bytes) -> tuple[bytes, int, bytes]:
    """``(upload id, size, sha256)`` of a reference, checked."""
    try:
        fields = msgpack.unpackb(P.as_bytes(blob)[len(REF_MAGIC):], raw=False, max_map_len=8, max_bin_len=64, max_str_len=64)
        bid, total, digest = fields["b"], fields["n"], fields["h"]
    except Exception:
        raise P.ProtocolError("malformed large-payload reference") from None
    if not (isinstance(bid, bytes) and len(bid) == 16 and type(total) is int and 0 <= total <= MAX_LARGE_PAYLOAD
            and isinstance(digest, bytes) and len(digest) == 32):
        raise P.ProtocolError("malformed large-payload reference")
    return bid, total, digest


def local_ref(path: str, total: int, digest: bytes = b"") -> bytes:
    """A file on this machine: its path, size and (for a result) sha256."""
    return LOCAL_MAGIC + msgpack.packb({"p": path, "n": total, "h": digest}, use_bin_type=True)


def is_local(blob: Any) -> bool:
    """Whether a payload (bytes, or a zmq.Frame) is a local reference."""
    if type(blob) is bytes:
        return blob.startswith(LOCAL_MAGIC)
    return len(blob) <= MAX_REF and bytes(P.as_buffer(blob)[:len(LOCAL_MAGIC)]) == LOCAL_MAGIC


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
    mapping stays while such a value lives, else it is closed at once."""
    path, total, _ = parse_local(blob)
    with open(path, "rb") as f:
        view = mmap.mmap(f.fileno(), total, access=mmap.ACCESS_COPY)
    try:
        return loads(view)
    finally:
        try:
            view.close()
        except BufferError:   # the value holds parts of it: unmapped when they go
            pass


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
        hasher = hashlib.sha256()
        for part in self.parts:
            hasher.update(part)
        return hasher.digest()


def write_private(path: str, data: Any) -> bytes:
    """``data`` (bytes-like, or Pieces) into a new file only this user can
    read; its sha256, computed chunk by chunk as it is written (one pass over
    the data, each chunk hashed while it is in the CPU's cache)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    hasher = hashlib.sha256()
    try:
        for part in (data.parts if isinstance(data, Pieces) else [data]):
            view = memoryview(part).cast("B")
            for off in range(0, len(view), CHUNK):
                piece = view[off:off + CHUNK]
                hasher.update(piece)
                written = 0
                while written < len(piece):
                    written += os.write(fd, piece[written:])
    finally:
        os.close(fd)
    return hasher.digest()


def spill_result(blob: Any, task_id: bytes) -> Any:
    """A worker's large result (bytes, or Pieces) as a local reference to a
    file in the agent's spool (SPOOL_ENV); small ones as they are; without a
    spool, as one bytes object."""
    spool = os.environ.get(SPOOL_ENV)
    if len(blob) <= BIG_THRESHOLD:
        return blob
    if spool is None:
        return blob.fallback() if isinstance(blob, Pieces) else blob
    path = os.path.join(spool, f"{task_id.hex()}.{os.getpid()}.result")
    digest = write_private(path, blob)
    return local_ref(path, len(blob), digest)


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

    def directory(self, user: str) -> Path:
        name = hashlib.sha256(user.encode()).hexdigest()[:32]
        path = self.root / name
        if name not in self.users:
            path.mkdir(mode=0o700, exist_ok=True)
            write_private(str(path / "user"), user.encode())
            self.users[name] = user
        return path

    def recover(self) -> None:
        """After a restart: charge each user for what is on disk."""
        for sub in self.root.iterdir():
            try:
                user = (sub / "user").read_text()
            except OSError:
                continue
            self.users[sub.name] = user
            for f in sub.iterdir():
                if f.name != "user":
                    self.charge(user, f.stat().st_size + FILE_COST)

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

    def read(self, user: str, fields: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        """Answer one FETCH: a CHUNK's fields and frames."""
        bid, off = fields["b"], fields["o"]
        if not (isinstance(bid, bytes) and len(bid) == 16 and type(off) is int and off >= 0):
            raise P.ProtocolError("malformed FETCH")
        path = self.complete(user, bid)
        if path is None:
            return {"b": bid, "o": off, "err": f"no upload {bid.hex()} of user {user!r} here (unknown, "
                                                 "another user's, or expired)"}, []
        with open(path, "rb") as f:
            f.seek(off)
            data = f.read(CHUNK)
        return {"b": bid, "o": off, "n": path.stat().st_size}, [data]

    def drop(self, user: str, bid: bytes) -> None:
        for path in (self.path(user, bid), self.path(user, bid).with_suffix(".part")):
            if path.exists():
                self._remove(user, path)

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


# -- a client's or endpoint's side ------------------------------------------------
class TransferLink:
    """A connection of its own to the relay for chunked transfers, used
    synchronously by one thread at a time."""

    def __init__(self, address: str, *, token: str | None = None, secret_file: str | Path | None = None,
                 relay_key: str | bytes | None = None, credentials: Credentials | None = None) -> None:
        """``credentials``: those to present (else found from ``token`` and
        ``secret_file`` as the executor finds them)."""
        self.ctx = zmq.Context()
        sock = P.limit_frames(self.ctx.socket(zmq.DEALER))
        sock.setsockopt(zmq.LINGER, 0)
        # never blocked for good on a connection that does not come up (refused credentials)
        sock.setsockopt(zmq.SNDTIMEO, int(GIVE_UP_AFTER * 1000))
        sock.setsockopt(zmq.IPV6, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, P.RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, P.RECONNECT_IVL_MAX_MS)
        key = secure(sock, address, relay_key)
        if credentials is None:
            credentials = find_credentials(address, token, secret_file)
        if credentials is not None:
            credentials.apply(sock, key)
        sock.connect(address)
        self.sock = sock

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
        if not self.sock.poll(int(timeout * 1000)):
            return None
        msg = P.decode(self.sock.recv_multipart(copy=False))
        if msg.type == P.ERROR:
            raise TransferError(f"the relay refused the transfer: {msg.fields.get('msg')}")
        return msg if msg.type == expected else None

    def upload(self, data: Any, task_id: bytes | None = None, digest: bytes = b"") -> bytes:
        """Upload ``data`` (bytes-like, Pieces, or the path of a file: read chunk by
        chunk, never mapped or read whole, so that the uploader's memory
        stays small; ``digest``, its sha256 if known); its reference.
        Resumes from what the relay has after lost messages (a relay
        restart)."""
        if isinstance(data, (str, Path)):
            fd = os.open(data, os.O_RDONLY)
            try:
                total = os.fstat(fd).st_size
                if len(digest) != 32:
                    hasher = hashlib.sha256()
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
        bid = os.urandom(16)
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
        ``sink(offset, data)`` (in order); checks its sha256; its size."""
        bid, total, digest = parse_big(ref)
        head: dict[str, Any] = {"b": bid, "q": os.urandom(8)}
        if task_id is not None:
            head["tid"] = task_id
        hasher = hashlib.sha256()
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
        if hasher.digest() != digest:
            raise TransferError("the payload fetched does not match its sha256")
        return total

    def fetch_bytes(self, ref: bytes, task_id: bytes | None = None) -> bytearray:
        """The whole payload in memory (the consumer's copy)."""
        _, total, _ = parse_big(ref)
        out = bytearray(total)
        view = memoryview(out)

        def put(off: int, data: Any) -> None:
            view[off:off + len(data)] = data

        self.fetch(ref, put, task_id)
        view.release()
        return out

    def fetch_file(self, ref: bytes, path: str, task_id: bytes | None = None) -> int:
        """The payload into a new private file at ``path``; its size."""
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

    def drop(self, ref: bytes) -> None:
        """Tell the relay the upload may go (a result received)."""
        self.sock.send_multipart(P.encode(P.DROP, {"b": parse_big(ref)[0]}))


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

    def get(self) -> TransferLink:
        link = getattr(self.local, "link", None)
        if link is None:
            link = self.local.link = TransferLink(self.address, relay_key=self.relay_key,
                                                  credentials=self.credentials)
            with self.lock:
                self.links.append(link)
        return link

    def upload(self, data: Any) -> bytes:
        """Upload a large payload; its reference. PayloadTooLarge when the
        relay refuses its size, TransferError for other failures."""
        try:
            return self.get().upload(data)
        except TransferError as exc:
            if exc.details.get("too_large"):
                raise PayloadTooLarge(str(exc), size=int(exc.details.get("size", 0)),
                                      limit=int(exc.details.get("limit", 0))) from None
            raise

    def fetch(self, ref: bytes) -> bytearray:
        """A large payload fetched into memory; the relay then deletes it."""
        link = self.get()
        data = link.fetch_bytes(ref)
        link.drop(ref)
        return data

    def close(self) -> None:
        with self.lock:
            links, self.links = self.links, []
        for link in links:
            link.close()
