"""Worker process main loop.

A worker connects to its endpoint's worker socket, says READY, then runs the
tasks it is given one at a time. Deserialized functions stay cached by hash
(warm), so a function body reaches a worker once. Whatever the function
prints goes to the worker's own stdout/stderr, never onto the protocol
socket.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable

import zmq

from .. import protocol as P
from ..serialize import deserialize, serialize_exception, serialize_value

PARENT_CHECK_MS = 1000


class WorkerProcess:
    """Runs tasks received from the endpoint at ``address`` until told to stop
    or until the endpoint process goes away."""

    def __init__(self, address: str, worker_id: bytes) -> None:
        self.address = address
        self.worker_id = worker_id
        self.functions: dict[bytes, Callable[..., Any]] = {}
        self.unloadable: dict[bytes, str] = {}   # hash -> why the function did not load
        self.parent_pid = os.getppid()

    def run(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.setsockopt(zmq.IDENTITY, self.worker_id)
        sock.connect(self.address)
        sock.send_multipart(P.encode(P.READY, {"pid": os.getpid(), "py": P.PYTHON_VERSION}))
        try:
            while True:
                if not sock.poll(PARENT_CHECK_MS):
                    if os.getppid() != self.parent_pid:
                        return  # the endpoint died; nobody will read our results
                    continue
                msg = P.decode(sock.recv_multipart(copy=False))
                if msg.type == P.STOP:
                    return
                if msg.type == P.TASK:
                    sock.send_multipart(self.run_task(msg), copy=False)
        finally:
            sock.close(linger=2000)

    def run_task(self, msg: P.Message) -> list[Any]:
        task_id, fn_hash, args_index, fn_index, kind, _py = msg.fields["task"]
        try:
            fn = self.functions.get(fn_hash)
            if fn is None:
                if fn_hash in self.unloadable:  # the endpoint sends a body once per worker
                    return self._load_failure(task_id, self.unloadable[fn_hash])
                try:
                    fn = deserialize(P.blob_at(msg.blobs, fn_index))
                except Exception as exc:
                    self.unloadable[fn_hash] = _why(exc)
                    raise
                self.functions[fn_hash] = fn
            payload = deserialize(P.blob_at(msg.blobs, args_index))
        except Exception as exc:
            return self._load_failure(task_id, _why(exc))
        try:
            if kind == P.TASK_CHUNK:
                value: Any = [fn(*a) for a in payload]
            else:
                args, kwargs = payload
                value = fn(*args, **kwargs)
        except BaseException as exc:  # SystemExit too, as the standard executors do
            try:
                return P.encode(P.RESULT, {"row": [task_id, P.EXCEPTION, 0]}, [serialize_exception(exc)])
            except BaseException as failure:
                return P.encode(P.RESULT, {"row": [task_id, P.FAILED, 0]}, [P.pack_failure(
                    P.SERIALIZATION, f"the task raised {type(exc).__qualname__}, which could not be "
                                     f"serialized: {type(failure).__name__}")])
        try:
            blob = serialize_value(value)
        except Exception as exc:
            failure = P.pack_failure(
                P.SERIALIZATION,
                f"cannot serialize the result of type {type(value).__module__}."
                f"{type(value).__qualname__}: {exc}",
            )
            return P.encode(P.RESULT, {"row": [task_id, P.FAILED, 0]}, [failure])
        return P.encode(P.RESULT, {"row": [task_id, P.OK, 0]}, [blob])


    @staticmethod
    def _load_failure(task_id: bytes, why: str) -> list[Any]:
        failure = P.pack_failure(P.SERIALIZATION, f"the endpoint could not load the task: {why}", remote=True)
        return P.encode(P.RESULT, {"row": [task_id, P.FAILED, 0]}, [failure])


def _why(exc: BaseException) -> str:
    hint = " (install that module on the endpoint too)" if isinstance(exc, ImportError) else ""
    return f"{type(exc).__name__}: {exc}{hint}"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedexec.worker")
    parser.add_argument("--address", required=True, help="endpoint worker socket")
    parser.add_argument("--worker-id", required=True)
    ns = parser.parse_args(argv)
    # Ctrl-C in the user's terminal is for the endpoint to handle; it stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    WorkerProcess(ns.address, ns.worker_id.encode()).run()
    sys.stdout.flush()
