"""Data sent once: ``ref = ex.put(obj)``, then ``ex.submit(f, ref)`` any number of times.

``put`` pickles ``obj`` and uploads it to the relay like a large payload
(transfer.py: in chunks, into the user's private spool, charged to their byte
quota), then names it (a REF ``put`` message): the relay keeps that upload
until ``ref.delete()`` or its TTL (relay/refs.py), durably. The
:class:`DataRef` it returns is a small handle: its id, size and sha256.

A task whose arguments name DataRefs carries their ids in its ``rf`` option.
The relay accepts it only if every one is a live ref of the task's user; an
endpoint fetches each ref once per user into its private spool and keeps it
(endpoint/refs.py), and hands the worker the files with the task's arguments
(:func:`wrap_arguments`); where the worker loads the arguments, each DataRef
becomes the object itself (:func:`load_arguments`, :func:`_resolve`).

Finding the refs costs calls without them nothing: pickling a DataRef
outside :func:`collecting` raises, so the executor's ordinary pickling of
the arguments fails and its fallback (the one that also looks for futures,
dependencies.py) pickles them again while collecting.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import msgpack

from . import protocol as P
from .errors import DataRefError
from .transfer import LOCAL_MAGIC, TransferError, TransferLink, is_local, load_local

if TYPE_CHECKING:
    from .executor import FederatedExecutor

DEFAULT_TTL = 24 * 3600.0   # seconds a put lives unless ttl= says otherwise
REQUEST_TIMEOUT = 60.0      # seconds to wait for the relay's answer to a REF message
RESEND_AFTER = 5.0          # seconds before asking again (the relay may have restarted)

_local = threading.local()   # .found: DataRefs met while collecting; .files: {ref id: path} while loading


class _NotInTask(pickle.PicklingError):
    """A DataRef was pickled outside a task's arguments."""


class DataRef:
    """A handle to an object stored once at the relay by ``ex.put(obj)``.

    Pass it as an argument (also inside lists, tuples, dicts and keyword
    arguments) to any number of tasks of that executor's user: where a task
    runs, the worker gets the object itself. Only its id, size and sha256
    travel with a task; each endpoint fetches the object once and caches it.
    Only the user who put it can use it (another user's task naming it
    fails with :class:`~fedexec.DataRefError`) or delete it."""

    __slots__ = ("_executor", "_id", "size", "digest", "expires")

    def __init__(self, executor: "FederatedExecutor | None", ref_id: bytes, size: int, digest: bytes,
                 expires: float) -> None:
        self._executor = executor
        self._id = ref_id
        self.size = size          # bytes of the pickled object
        self.digest = digest      # its sha256
        self.expires = expires    # when the relay deletes it (seconds since the epoch)

    @property
    def id(self) -> str:
        """The ref's id, in hex."""
        return self._id.hex()

    def delete(self) -> None:
        """Remove it at the relay: tasks that name it from now on fail with
        DataRefError; endpoints drop their copies when they learn it."""
        self._owner()._ref_request(self, "del")

    def info(self) -> dict[str, Any]:
        """What the relay knows of it: ``size``, ``expires``, and
        ``fetches``, how many times each endpoint fetched it ({endpoint id:
        count})."""
        answer = self._owner()._ref_request(self, "info")
        return {"size": answer.get("n"), "expires": answer.get("e"), "fetches": dict(answer.get("fetches") or {})}

    def _owner(self) -> "FederatedExecutor":
        if self._executor is None:
            raise DataRefError(f"DataRef {self.id} was not made by an executor in this process", ref=self.id)
        return self._executor

    def wire(self) -> list[Any]:
        """How a task's ``rf`` option names it."""
        return [self._id, self.size, self.digest]

    def __reduce__(self) -> tuple[Any, ...]:
        found = getattr(_local, "found", None)
        if found is None:
            raise _NotInTask(f"a DataRef ({self.id}) is sent only as an argument of a task (submit, map), "
                             "not pickled otherwise (in a function's globals or closure, or by hand)")
        found.append(self)
        return (_resolve, (self._id, self.size, self.digest))

    def __copy__(self) -> "DataRef":
        return self

    def __deepcopy__(self, memo: dict) -> "DataRef":
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DataRef) and other._id == self._id

    def __hash__(self) -> int:
        return hash(self._id)

    def __repr__(self) -> str:
        return f"DataRef({self.id}, size={self.size})"


@contextlib.contextmanager
def collecting() -> Iterator[list[DataRef]]:
    """While in it, DataRefs pickle (as a call of :func:`_resolve`), and each
    one pickled is appended to the list it gives (more than once if met
    more than once: see :func:`wire_refs`)."""
    outer = getattr(_local, "found", None)
    found: list[DataRef] = []
    _local.found = found
    try:
        yield found
    finally:
        _local.found = outer


def wire_refs(found: list[DataRef]) -> list[list[Any]]:
    """The ``rf`` option for the refs :func:`collecting` found, each once."""
    seen: dict[bytes, list[Any]] = {}
    for ref in found:
        seen.setdefault(ref._id, ref.wire())
    return list(seen.values())


# -- where the task runs ----------------------------------------------------------
def _resolve(ref_id: bytes, size: int, digest: bytes) -> Any:
    """(In the worker, while its arguments load) the object a DataRef names,
    from the file the endpoint fetched it into."""
    files = getattr(_local, "files", None)
    if files is _HANDLES:   # (in the client, rebuilding arguments: the handle again)
        return DataRef(None, ref_id, size, digest, 0.0)
    path = files.get(ref_id) if files is not None else None
    if path is None:
        raise DataRefError(f"DataRef {ref_id.hex()} is not available where this task runs: the endpoint did not "
                           "fetch it for this task", ref=ref_id.hex())
    if size == 0:
        raise DataRefError(f"DataRef {ref_id.hex()} is empty", ref=ref_id.hex())
    return loads_put(_mapped(path, size))


# -- the stored form --------------------------------------------------------------------
# A put object is pickled with protocol 5, its out-of-band buffers (numpy arrays'
# data, PickleBuffers) laid out after the pickle, each at an offset aligned to
# ALIGN: OOB_MAGIC, a 4-byte header length, msgpack {p: [offset, length] of the
# pickle, b: [[offset, length], ...] of the buffers}, then those. Where the task
# runs, the file is mapped and those buffers are views of the mapping: a large
# array is not copied or read until the task touches it, and it is read-only (a
# task cannot change what the next one sees). An object without such buffers is
# an ordinary pickle.
OOB_MAGIC = b"\x00fedexec-put5\x00"
ALIGN = 64
MAPPED = 16          # mappings of refs a worker keeps open
_mappings: "dict[tuple[str, int], tuple[mmap.mmap, int]]" = {}   # (path, size) -> its mapping, the file's inode


def dumps_put(obj: Any) -> Any:
    """``obj`` in the stored form (bytes-like); raises what pickling raises."""
    import cloudpickle

    from .serialize import PICKLE_PROTOCOL

    buffers: list[pickle.PickleBuffer] = []
    try:
        data = pickle.dumps(obj, protocol=PICKLE_PROTOCOL, buffer_callback=buffers.append)
    except Exception:
        buffers = []
        data = cloudpickle.dumps(obj, protocol=PICKLE_PROTOCOL, buffer_callback=buffers.append)
    try:
        views = [b.raw() for b in buffers]
    except BufferError:   # a non-contiguous buffer: all in band
        return cloudpickle.dumps(obj, protocol=PICKLE_PROTOCOL)
    if not views:
        return data
    header_room = len(OOB_MAGIC) + 4 + 32 + 24 * len(views)   # (the msgpack of the layout fits in this)
    offset = _aligned(header_room)
    layout = {"p": [offset, len(data)], "b": []}
    offset = _aligned(offset + len(data))
    for view in views:
        layout["b"].append([offset, view.nbytes])
        offset = _aligned(offset + view.nbytes)
    header = msgpack.packb(layout)
    assert len(OOB_MAGIC) + 4 + len(header) <= layout["p"][0]
    out = bytearray(offset)
    out[:len(OOB_MAGIC)] = OOB_MAGIC
    out[len(OOB_MAGIC):len(OOB_MAGIC) + 4] = len(header).to_bytes(4, "little")
    out[len(OOB_MAGIC) + 4:len(OOB_MAGIC) + 4 + len(header)] = header
    start, length = layout["p"]
    out[start:start + length] = data
    for (start, length), view in zip(layout["b"], views):
        out[start:start + length] = view.cast("B")
    return out


def loads_put(view: Any) -> Any:
    """The object in the stored form ``view`` (buffers are views of it)."""
    view = memoryview(view)
    if view[:len(OOB_MAGIC)] != OOB_MAGIC:
        return pickle.loads(view)
    at = len(OOB_MAGIC)
    length = int.from_bytes(view[at:at + 4], "little")
    layout = msgpack.unpackb(view[at + 4:at + 4 + length])
    start, size = layout["p"]
    return pickle.loads(view[start:start + size], buffers=[view[o:o + n] for o, n in layout["b"]])


def _aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def _mapped(path: str, size: int) -> mmap.mmap:
    """A read-only mapping of a ref's file, kept open for later tasks of this
    worker (a mapping a loaded object still uses stays until it is freed)."""
    _forget_gone()
    key = (path, size)
    found = _mappings.get(key)
    if found is not None:
        return found[0]
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        inode = os.fstat(f.fileno()).st_ino
    if len(_mappings) >= MAPPED:
        _close(_mappings.pop(next(iter(_mappings)))[0])
    _mappings[key] = (mapping, inode)
    return mapping


def _forget_gone() -> None:
    """Let go of the mappings of copies the endpoint has deleted (their ref
    went) or replaced: a mapping keeps its file's disk space taken, unseen
    by the endpoint's count, until it is closed."""
    for key, (mapping, inode) in list(_mappings.items()):
        try:
            same = os.stat(key[0]).st_ino == inode
        except OSError:
            same = False
        if not same:
            del _mappings[key]
            _close(mapping)


def _close(mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    except BufferError:   # an object the task kept still uses it: it goes with that object
        pass


_HANDLES: dict = {}


@contextlib.contextmanager
def as_handles() -> Iterator[None]:
    """While in it, unpickling a DataRef gives a DataRef (in the client, for
    arguments pickled while collecting and rebuilt there: dependencies.py)."""
    outer = getattr(_local, "files", None)
    _local.files = _HANDLES
    try:
        yield
    finally:
        _local.files = outer


def wrap_arguments(args: bytes, files: dict[bytes, str]) -> bytes:
    """(The endpoint agent) a task's arguments (inline, or a local reference
    to the file it fetched them into) with the files of the DataRefs they
    name: a local reference (so only the agent can make one) with ``r``."""
    return LOCAL_MAGIC + msgpack.packb({"a": args, "r": files}, use_bin_type=True)


def named_refs(blob: bytes) -> tuple[bytes, dict[bytes, str]] | None:
    """A local reference made by :func:`wrap_arguments`: its arguments and
    the files of the DataRefs they name; None for any other local reference."""
    fields = msgpack.unpackb(blob[len(LOCAL_MAGIC):], raw=False)
    files = fields.get("r") if isinstance(fields, dict) else None
    if files is None:
        return None
    if not (isinstance(files, dict) and isinstance(fields.get("a"), bytes)):
        raise ValueError("malformed local reference to DataRef files")
    return fields["a"], files


def load_arguments(blob: bytes, loads: Callable[[Any], Any]) -> Any:
    """(The worker) the value of a local reference: a file the endpoint
    fetched, or arguments naming DataRefs (:func:`wrap_arguments`)."""
    refs = named_refs(blob)
    if refs is None:
        return load_local(blob, loads)
    args, files = refs
    outer = getattr(_local, "files", None)
    _local.files = files
    try:
        return load_local(args, loads) if is_local(args) else loads(args)
    finally:
        _local.files = outer


# -- the client's requests ------------------------------------------------------------
def request(link: TransferLink, fields: dict[str, Any], timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
    """Send a REF message on ``link`` and wait for its answer (asked again
    every RESEND_AFTER seconds: put and info are idempotent); the answer's
    fields. DataRefError when the relay refuses, TransferError when it does
    not answer within ``timeout``."""
    q = os.urandom(8)
    frames = P.encode(P.REF, {**fields, "q": q})
    deadline = time.monotonic() + timeout
    link.sock.send_multipart(frames)
    asked = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise TransferError(f"the relay did not answer a DataRef {fields.get('op')} within {timeout:g} s")
        if now - asked > RESEND_AFTER and fields.get("op") != "del":
            link.sock.send_multipart(frames)
            asked = now
        if not link.sock.poll(int(min(1.0, deadline - now) * 1000) + 1):
            continue
        msg = P.decode(link.sock.recv_multipart(copy=False))
        if msg.type == P.ERROR:
            raise DataRefError(f"the relay refused the DataRef {fields.get('op')}: {msg.fields.get('msg')}",
                               ref=_hex(fields.get("b")))
        if msg.type != P.REF_ANSWER or msg.fields.get("q") != q:
            continue   # a late answer to something else
        if "err" in msg.fields:
            raise DataRefError(str(msg.fields["err"]), ref=_hex(fields.get("b")))
        return msg.fields


def _hex(value: Any) -> str:
    return value.hex() if isinstance(value, bytes) else ""
