"""How functions, arguments, results and exceptions become bytes and back.

cloudpickle carries code (lambdas, closures, functions from ``__main__`` by
value; importable functions by reference); tblib carries tracebacks, so an
exception raised on an endpoint is re-raised in the caller with its own type
and its remote frames, the way :class:`~concurrent.futures.ProcessPoolExecutor`
does it.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import struct
import sys
import threading
import traceback
from typing import Any, Callable

import cloudpickle
import msgpack
from tblib import Traceback

from . import protocol as P
from .errors import RemoteExecutionError, SerializationError
from .output import strip as strip_output
from .transfer import BIG_THRESHOLD, Pieces

PICKLE_PROTOCOL = 5


def _describe(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def serialize_function(fn: Callable[..., Any]) -> tuple[bytes, bytes]:
    """``(content_hash, body)`` of a function; the hash names it on the relay."""
    try:
        body = cloudpickle.dumps(fn, protocol=PICKLE_PROTOCOL)
    except Exception as exc:
        raise SerializationError(f"cannot serialize function {fn!r} ({_describe(fn)}): {exc}") from exc
    return hashlib.sha256(body).digest(), body


def function_hash(fn: Callable[..., Any]) -> str:
    """The hex hash a relay and endpoint know ``fn`` by, for an endpoint's
    ``allowed_functions``. Stable across runs for functions pickled by
    reference (importable from a module); a lambda or a function of
    ``__main__`` is pickled by value and may hash differently elsewhere."""
    return serialize_function(fn)[0].hex()


# Values that plain pickle writes exactly as cloudpickle does, and that can
# never refer to code in the caller's ``__main__``: the common no-frills call
# skips cloudpickle's (Python-level) pickler set-up.
_SIMPLE_TYPES = frozenset({int, float, str, bytes, bool, type(None), complex})


def serialize_arguments(fn: Callable[..., Any], args: tuple, kwargs: dict) -> bytes | Pieces:
    """Pickled ``(args, kwargs)`` (large ones with their big buffers out of
    band, as Pieces: see :func:`dumps_large`); errors name the function and
    the cause."""
    if not kwargs and all(type(a) in _SIMPLE_TYPES for a in args):
        return pickle.dumps((args, kwargs), protocol=PICKLE_PROTOCOL)
    try:
        return dumps_large(cloudpickle.dumps, (args, kwargs))
    except Exception as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        raise SerializationError(f"cannot serialize the arguments of {name}(): {exc}") from exc


def serialize_chunk(fn: Callable[..., Any], chunk: list[tuple]) -> bytes:
    """Pickled list of argument tuples for one ``map`` chunk."""
    try:
        return cloudpickle.dumps(chunk, protocol=PICKLE_PROTOCOL)
    except Exception as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        raise SerializationError(f"cannot serialize the arguments of {name}(): {exc}") from exc


def serialize_value(value: Any) -> bytes:
    """A result: plain pickle where it can (faster, for large data), else
    cloudpickle (values holding lambdas or classes that exist by value)."""
    try:
        return pickle.dumps(value, protocol=PICKLE_PROTOCOL)
    except Exception:
        return cloudpickle.dumps(value, protocol=PICKLE_PROTOCOL)


def serialize_result(value: Any) -> bytes | Pieces:
    """A worker's result as :func:`serialize_value` makes it, except that a
    large one keeps its big buffers out of band (Pieces, see
    :func:`dumps_large`): written to its file without a joined copy."""
    if type(value) in _SIMPLE_TYPES:   # (no buffers to take out: the common small result goes at once)
        return pickle.dumps(value, protocol=PICKLE_PROTOCOL)
    try:
        return dumps_large(pickle.dumps, value)
    except Exception:
        return dumps_large(cloudpickle.dumps, value)


def deserialize(blob: Any) -> Any:
    try:
        return pickle.loads(blob)
    except pickle.UnpicklingError:
        if bytes(memoryview(blob)[:len(OOB_MAGIC)]) != OOB_MAGIC:
            raise
    return deserialize_large(blob)   # a large payload with out-of-band buffers (fetched in chunks)


# -- large pickles: out-of-band buffers ------------------------------------------
# A large pickle whose big buffers (numpy arrays, bytearrays, PickleBuffers of
# at least OOB_MIN bytes, contiguous) were taken out of band (pickle protocol
# 5's buffer_callback) travels as: OOB_MAGIC, "<IQ" (buffer count, pickle
# length), "<Q" per buffer (its length), zeros up to a multiple of OOB_ALIGN,
# the pickle, then each buffer, each starting at a multiple of OOB_ALIGN. Its
# producer never joins them into one bytes object (Pieces: written or sent
# part by part), and its consumer loads the buffers as views of what it
# received (a copy-on-write mapping of the file, or the fetched bytearray):
# the data is not copied to pickle or unpickle it. Small payloads, and large
# ones without big buffers, stay plain pickles.
OOB_MAGIC = b"\x00fedexec-oob\x00"
OOB_MIN = 1 << 20
OOB_ALIGN = 64
_OOB_FIXED = struct.Struct("<IQ")


def _aligned(n: int) -> int:
    return n + (-n % OOB_ALIGN)


def dumps_large(dumps: Callable[..., bytes], obj: Any, every_buffer: bool = False) -> bytes | Pieces:
    """``dumps(obj)`` (pickle's or cloudpickle's), or, when that is over
    BIG_THRESHOLD bytes mostly because of big buffers, the same pickle with
    those buffers out of band, as Pieces (see above). ``every_buffer``
    (a DataRef's stored form, dataref.py): every contiguous buffer goes out
    of band, whatever the sizes."""
    buffers: list[memoryview] = []
    least = 0 if every_buffer else OOB_MIN

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        try:
            raw = buf.raw()
        except BufferError:   # not contiguous: in the pickle
            return True
        if raw.nbytes < least:
            return True
        buffers.append(raw)
        return False

    head = dumps(obj, protocol=PICKLE_PROTOCOL, buffer_callback=out_of_band)
    if not buffers:
        return head
    fixed = OOB_MAGIC + _OOB_FIXED.pack(len(buffers), len(head)) + struct.pack(f"<{len(buffers)}Q",
                                                                               *(b.nbytes for b in buffers))
    parts: list[Any] = [fixed + bytes(_aligned(len(fixed)) - len(fixed)), head]
    pos = _aligned(len(fixed)) + len(head)
    for buf in buffers:
        gap = -pos % OOB_ALIGN
        if gap:
            parts.append(bytes(gap))
        parts.append(buf)
        pos += gap + buf.nbytes
    pieces = Pieces(parts, lambda: dumps(obj, protocol=PICKLE_PROTOCOL))
    return pieces if every_buffer or len(pieces) > BIG_THRESHOLD else pieces.fallback()


def deserialize_large(blob: Any, shared: bool = False) -> Any:
    """A large payload (a plain pickle, or one made by :func:`dumps_large`),
    loaded from ``blob`` (a bytearray, or a mapping of its file); out-of-band
    buffers become views of ``blob`` when it is writable (the values may
    change them, as values unpickled the usual way may), else copies; with
    ``shared`` (a DataRef's copy, which many tasks map) views of a read-only
    ``blob`` too, so the values are read-only and nothing is copied."""
    view = memoryview(blob)
    if bytes(view[:len(OOB_MAGIC)]) != OOB_MAGIC:
        return pickle.loads(view)
    view = strip_output(view)   # (a task's output after it: output.py)
    try:
        count, head_len = _OOB_FIXED.unpack_from(view, len(OOB_MAGIC))
        start = len(OOB_MAGIC) + _OOB_FIXED.size
        if count > len(view) // OOB_MIN:
            raise ValueError(f"{count} buffers")
        lengths = struct.unpack_from(f"<{count}Q", view, start)
        pos = _aligned(start + 8 * count)
        head = view[pos:pos + head_len]
        pos += head_len
        buffers = []
        for n in lengths:
            pos += -pos % OOB_ALIGN
            buffers.append(view[pos:pos + n] if shared or not view.readonly else bytearray(view[pos:pos + n]))
            pos += n
        if pos != len(view) or len(head) != head_len:
            raise ValueError(f"its parts end at byte {pos} of {len(view)}")
    except (struct.error, ValueError) as exc:
        raise SerializationError(f"a malformed large payload (pickle with out-of-band buffers): {exc}") from None
    return pickle.loads(head, buffers=buffers)


content_hash = P.content_hash

class RemoteTraceback(Exception):
    """Carries the remote traceback text as the ``__cause__`` of a re-raised
    exception, as the standard ProcessPoolExecutor does."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def serialize_exception(exc: BaseException) -> bytes:
    """Blob describing an exception raised by user code on a worker.

    Holds the exception pickled the ordinary way (which keeps attributes such
    as ``SystemExit.code``), its traceback as tblib data, and always its type
    name, message and formatted traceback, so the caller gets something
    meaningful even when the type cannot be rebuilt there.
    """
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        message = str(exc)
    except Exception:  # as the traceback module does, rather than lose the worker
        message = "<exception str() failed>"
    info: dict[str, Any] = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "msg": message,
        "tb": text,
        "exc": None,
        "frames": None,
    }
    try:
        info["exc"] = cloudpickle.dumps(exc, protocol=PICKLE_PROTOCOL)  # the traceback is not pickled
        if exc.__traceback__ is not None:
            info["frames"] = Traceback(exc.__traceback__).as_dict()
    except Exception:
        pass  # the text form above still reaches the caller
    return pickle.dumps(info, protocol=PICKLE_PROTOCOL)


def deserialize_exception(blob: Any) -> BaseException:
    """The exception to raise in the caller for a remote exception blob."""
    info = pickle.loads(blob)
    exc: BaseException | None = None
    if info.get("exc") is not None:
        try:
            exc = pickle.loads(info["exc"])
        except BaseException:   # (SystemExit from a __setstate__ too: the type's name and message stand in)
            exc = None
    if not isinstance(exc, BaseException):
        return RemoteExecutionError(info["type"], info["msg"], info["tb"])
    if info.get("frames"):
        try:
            exc = exc.with_traceback(Traceback.from_dict(info["frames"]).as_traceback())
        except Exception:
            pass
    exc.__cause__ = RemoteTraceback(f'\n"""\n{info["tb"]}"""')
    return exc


# -- data-only format ----------------------------------------------------------------
# An endpoint with ``data_only`` set takes arguments and gives results only in
# this format, which runs no code when loaded (as Globus Compute's allowed
# serializers): msgpack, with extension types for the plain values msgpack
# has no type of its own for. A leading marker (never the start of a pickle)
# tells it apart from a pickle at a glance, so an endpoint refuses anything
# else before any worker loads it, and a client never unpickles what a
# data-only endpoint sends back.

DATA_MARKER = b"\xfeFXD\x01"
_EXT_TUPLE, _EXT_COMPLEX, _EXT_SET, _EXT_FROZENSET, _EXT_BIGINT, _EXT_NDARRAY = range(1, 7)
_COMPLEX = struct.Struct("<dd")
_HEAD_LENGTH = struct.Struct("<I")
# numpy dtype kinds that hold plain numbers, text or times (no objects, no records)
_ARRAY_KINDS = frozenset("biufcSUMm")
DATA_TYPES = ("None, bool, int, float, complex, str, bytes, and lists, tuples, dicts, sets and frozensets of "
              "them, and numpy arrays and scalars of numbers, text or times")


class NotData(ValueError):
    """A value that the data-only format cannot carry, or bytes that are not
    in that format; the message names the type or the fault."""


def is_data(blob: Any) -> bool:
    """Whether ``blob`` (bytes, or a zmq.Frame) is in the data-only format;
    looks at its first bytes only."""
    if type(blob) is bytes:
        return blob.startswith(DATA_MARKER)
    return bytes(P.as_buffer(blob)[:len(DATA_MARKER)]) == DATA_MARKER


def encode_data(value: Any) -> bytes:
    """``value`` in the data-only format; NotData naming the first value
    that is not plain data.

    Layout: the marker, the length of the msgpack part (4 bytes), the msgpack
    part, then the raw bytes of the numpy arrays in it, which the msgpack part
    refers to by offset (so an array is copied once, not once per layer)."""
    state = _state
    state.buffers, state.tail_size = [], 0
    try:
        head = _pack_data(value)
        return b"".join((DATA_MARKER, _HEAD_LENGTH.pack(len(head)), head, *state.buffers))
    except NotData:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise NotData(f"cannot encode as plain data: {exc}") from None
    finally:
        state.buffers = None


# Per thread: a Packer per nesting depth (one is costly to make, and an
# extension packs its contents while the outer Packer is busy); while
# encoding, the array bytes gathered; while decoding, the array bytes part.
_state = threading.local()


def _pack_data(value: Any) -> bytes:
    state = _state
    stack: list[msgpack.Packer] | None = getattr(state, "packers", None)
    if stack is None:
        stack = state.packers = []
        state.depth = 0
    depth = state.depth
    if depth == len(stack):
        stack.append(msgpack.Packer(default=_data_ext, strict_types=True, use_bin_type=True))
    state.depth = depth + 1
    try:
        return stack[depth].pack(value)   # the Packer resets itself, also when packing fails
    finally:
        state.depth = depth


def _data_ext(value: Any) -> msgpack.ExtType:
    kind = type(value)
    if kind is tuple:
        return msgpack.ExtType(_EXT_TUPLE, _pack_data(list(value)))
    if kind is complex:
        return msgpack.ExtType(_EXT_COMPLEX, _COMPLEX.pack(value.real, value.imag))
    if kind is set or kind is frozenset:
        return msgpack.ExtType(_EXT_SET if kind is set else _EXT_FROZENSET, _pack_data(list(value)))
    if kind is int:   # beyond 64 bits
        size = (value.bit_length() + 8) // 8
        return msgpack.ExtType(_EXT_BIGINT, value.to_bytes(size, "little", signed=True))
    numpy = sys.modules.get("numpy")   # a numpy value means numpy is imported
    if numpy is not None and isinstance(value, (numpy.ndarray, numpy.generic)):
        dtype = value.dtype
        if dtype.kind not in _ARRAY_KINDS or dtype.hasobject or dtype.fields is not None:
            raise NotData(f"a numpy {'array' if kind is numpy.ndarray else 'scalar'} of dtype {dtype} is not "
                          f"plain data (only numbers, text and times are)")
        raw = numpy.ascontiguousarray(value).reshape(-1).view(numpy.uint8)   # no copy when contiguous
        state = _state
        offset = state.tail_size
        state.buffers.append(raw)
        state.tail_size += raw.nbytes
        shape = list(value.shape) if kind is numpy.ndarray else None   # None: a numpy scalar
        return msgpack.ExtType(_EXT_NDARRAY, _pack_data([dtype.str, shape, offset, raw.nbytes]))
    raise NotData(f"a value of type {_describe(value)} is not plain data")


def decode_data(blob: Any) -> Any:
    """The value a data-only blob holds; NotData if it is not one (it is
    never unpickled, nor is anything in it)."""
    data = memoryview(P.as_buffer(blob)).cast("B")   # slices of it are not copies
    marker = len(DATA_MARKER)
    if bytes(data[:marker]) != DATA_MARKER:
        raise NotData("not in the data-only format (a pickle, or something else)")
    state = _state
    try:
        (length,) = _HEAD_LENGTH.unpack_from(data, marker)
        start = marker + _HEAD_LENGTH.size
        if start + length > len(data):
            raise NotData("malformed data-only value: truncated")
        state.tail = data[start + length:]
        return _unpack_data(data[start:start + length])
    except NotData:
        raise
    except Exception as exc:   # msgpack raises several unrelated types; deep nesting: RecursionError
        raise NotData(f"malformed data-only value: {type(exc).__name__}: {exc}") from None
    finally:
        state.tail = None


def _unpack_data(data: Any) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_data_from_ext)


def _data_from_ext(code: int, data: bytes) -> Any:
    if code == _EXT_TUPLE:
        return tuple(_unpack_list(data))
    if code == _EXT_COMPLEX:
        real, imag = _COMPLEX.unpack(data)
        return complex(real, imag)
    if code == _EXT_SET:
        return set(_unpack_list(data))
    if code == _EXT_FROZENSET:
        return frozenset(_unpack_list(data))
    if code == _EXT_BIGINT:
        return int.from_bytes(data, "little", signed=True)
    if code == _EXT_NDARRAY:
        return _numpy_from_ext(_unpack_list(data))
    raise NotData(f"unknown data-only extension type {code}")


def _unpack_list(data: bytes) -> list:
    items = _unpack_data(data)
    if type(items) is not list:
        raise NotData("malformed data-only value: an extension that should hold a list does not")
    return items


def _numpy_from_ext(fields: list) -> Any:
    """A numpy array (or scalar: shape None) from its dtype, shape and where
    its bytes are; only plain dtypes, and the sizes must match."""
    try:
        import numpy
    except ImportError:
        raise NotData("the value holds a numpy array, and numpy is not installed here") from None
    if len(fields) != 4:
        raise NotData("malformed data-only numpy value")
    dtype_str, shape, offset, size = fields
    tail = _state.tail
    if not (type(dtype_str) is str and len(dtype_str) <= 16 and (shape is None or (
            type(shape) is list and all(type(n) is int and n >= 0 for n in shape)))
            and type(offset) is int and type(size) is int and 0 <= offset <= offset + size <= len(tail)):
        raise NotData("malformed data-only numpy value")
    dtype = numpy.dtype(dtype_str)
    if dtype.kind not in _ARRAY_KINDS or dtype.hasobject or dtype.fields is not None:
        raise NotData(f"a numpy value of dtype {dtype} is not plain data")
    if math.prod(shape or ()) * dtype.itemsize != size:
        raise NotData(f"a numpy value of dtype {dtype} and shape {shape} cannot be {size} bytes")
    raw = tail[offset:offset + size]
    if shape is None:
        return numpy.frombuffer(raw, dtype)[0]
    return numpy.frombuffer(raw, dtype).reshape(shape).copy()   # writable, as an unpickled array is


def _not_data_error(fn: Callable[..., Any], exc: NotData) -> SerializationError:
    name = getattr(fn, "__qualname__", repr(fn))
    return SerializationError(f"cannot send the arguments of {name}() to a data-only endpoint: {exc}; a data-only "
                              f"endpoint takes {DATA_TYPES}")


def serialize_data_arguments(fn: Callable[..., Any], args: tuple, kwargs: dict) -> bytes:
    """``(args, kwargs)`` in the data-only format, for a data-only endpoint."""
    try:
        return encode_data((args, kwargs))
    except NotData as exc:
        raise _not_data_error(fn, exc) from None


def serialize_data_chunk(fn: Callable[..., Any], chunk: list[tuple]) -> bytes:
    """One ``map`` chunk's argument tuples in the data-only format."""
    try:
        return encode_data(chunk)
    except NotData as exc:
        raise _not_data_error(fn, exc) from None


def serialize_data_exception(exc: BaseException) -> bytes:
    """An exception from a data-only endpoint's worker: only its type name,
    message and traceback text (the caller raises RemoteExecutionError)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        message = str(exc)
    except Exception:
        message = "<exception str() failed>"
    return encode_data({"type": f"{type(exc).__module__}.{type(exc).__qualname__}", "msg": message, "tb": text})


def deserialize_data_exception(blob: Any) -> BaseException:
    """The RemoteExecutionError for an exception blob of a data-only endpoint."""
    info = decode_data(blob)
    if not (isinstance(info, dict) and all(isinstance(info.get(key), str) for key in ("type", "msg", "tb"))):
        raise NotData("malformed data-only exception")
    return RemoteExecutionError(info["type"], info["msg"], info["tb"])
