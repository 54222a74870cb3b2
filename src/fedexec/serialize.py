"""How functions, arguments, results and exceptions become bytes and back.

cloudpickle carries code (lambdas, closures, functions from ``__main__`` by
value; importable functions by reference); tblib carries tracebacks, so an
exception raised on an endpoint is re-raised in the caller with its own type
and its remote frames, the way :class:`~concurrent.futures.ProcessPoolExecutor`
does it.
"""

from __future__ import annotations

import hashlib
import pickle
import traceback
from typing import Any, Callable

import cloudpickle
from tblib import Traceback

from . import protocol as P
from .errors import RemoteExecutionError, SerializationError

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


def serialize_arguments(fn: Callable[..., Any], args: tuple, kwargs: dict) -> bytes:
    """Pickled ``(args, kwargs)``; errors name the function and the cause."""
    if not kwargs and all(type(a) in _SIMPLE_TYPES for a in args):
        return pickle.dumps((args, kwargs), protocol=PICKLE_PROTOCOL)
    try:
        return cloudpickle.dumps((args, kwargs), protocol=PICKLE_PROTOCOL)
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


def deserialize(blob: Any) -> Any:
    return pickle.loads(blob)


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
        except Exception:
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
