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
# A put object is stored as serialize.dumps_large makes a large payload, with
# every contiguous buffer (numpy arrays' data, PickleBuffers) out of band. Where
# the task runs, the file is mapped and those buffers are views of the mapping
# (deserialize_large, shared): a large array is not copied or read until the
# task touches it, and it is read-only (a task cannot change what the next one
# sees). An object without such buffers is an ordinary pickle.
MAPPED = 16          # mappings of refs a worker keeps open
_mappings: "dict[tuple[str, int], tuple[mmap.mmap, int]]" = {}   # (path, size) -> its mapping, the file's inode


def dumps_put(obj: Any) -> Any:
    """``obj`` in the stored form (bytes, or Pieces to upload without
    joining them); raises what pickling raises."""
    import cloudpickle

    from .serialize import dumps_large

    try:
        return dumps_large(pickle.dumps, obj, every_buffer=True)
    except Exception:
        return dumps_large(cloudpickle.dumps, obj, every_buffer=True)


def loads_put(view: Any) -> Any:
    """The object in the stored form ``view`` (buffers are views of it)."""
    from .serialize import deserialize_large

    return deserialize_large(view, shared=True)


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
