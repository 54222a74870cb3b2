"""Worker process main loop.

A worker connects to its endpoint's worker socket, says READY, then runs the
tasks it is given, in order, one at a time. The endpoint sends fast tasks in
batches; the worker answers in batches too: it sends what it has finished
when its queue is empty, when the oldest unsent result is a millisecond old,
or when many have gathered. Between tasks it reads new messages, so a CANCEL
for a task still in its queue is honoured; while a task runs, a second
thread answers its pool on a connection of its own (``control.py``): it
gives back the tasks queued here not started yet (for a worker that is
idle) and cancels queued ones at once.

Before each task the worker writes that task's id into a small
memory-mapped *marker* file, so if the function kills the process (os._exit,
a signal, a segfault) the pool knows which task did it (the pool reads the
file without mapping it: ``MarkerFile``).

Deserialized functions stay cached by hash (warm), so a function body
reaches a worker once. Whatever the task writes to stdout/stderr (fd 1 and
2) is captured per task and goes back after its result's bytes
(``output.py``), never onto the protocol socket as a message of its own.

With a *task root* (sandboxed workers, see ``sandbox.py``), each task runs
in a fresh directory of its own under it, removed when the task ends, so
tasks leave nothing behind for the next one to find.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Iterator

import zmq

from .. import protocol as P
from ..dataref import load_arguments
from ..framelink import worker_socket
from ..output import OutputCapture, attach, configured_limit, output_of
from ..spare_taskdir import SPARE
from .chain import KeptResults, not_kept
from .control import ControlThread, TaskQueue
from .heldlog import HeldLog
from .outgoing import OutgoingResults
from .warmheap import WarmHeap
from ..transfer import BIG_THRESHOLD, is_local, privatize_leftovers, spill_result, unmap_leftovers
from ..serialize import (NotData, decode_data, deserialize, deserialize_large, encode_data, is_data,
                         serialize_data_exception, serialize_exception, serialize_result)

PARENT_CHECK_MS = 1000
# Results of quick tasks are sent together: when this many wait, when the
# oldest has waited FLUSH_DELAY, or when the queue is empty. The result of a
# task that took SLOW_RESULT or more goes at once (a message per task costs
# little beside it, and the endpoint learns sooner that the worker has room).
FLUSH_DELAY = 0.001
FLUSH_BATCH = 256
SLOW_RESULT = 0.0002
# ... unless its pool sent it with a low mark (TASKS option "lw": it keeps a
# few milliseconds of such tasks queued here, pool/stealing.py): then results
# wait until the tasks queued here are down to that many (the pool sends the
# next ones while those run; once asked so, until they come), until none is
# queued, or until the oldest has waited SLOW_HOLD. A message per several
# tasks, not per task, at every hop up to the client.
SLOW_HOLD = 0.005
MARKER_SIZE = 16
# After a shell task, the next one's directory is made once the worker has
# been idle this long: not at once, when its CPU would compete with the
# result's way to the caller (pool, agent, relay, client: on a 2-core
# machine, measured +0.4 ms for that step under load).
SPARE_AFTER_MS = 1
# Between tasks the worker looks for new messages (tasks, cancels) at most
# this often while it has tasks queued: the look (ZMQ_EVENTS) costs more than
# a no-op task. A cancel that arrives meanwhile finds its task run already,
# and cancel() says so (False): it stays truthful.
LOOK_INTERVAL = 0.0005
# plain ints: a pyzmq flag enum costs an object per operation
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


IDLE = b"\0" * MARKER_SIZE

# What a task running in this worker may ask about itself (shell.py does):
# the id of the task running now, and, in a sandbox, the fresh directory it
# runs in (removed after it). Module globals: setting one costs no more than
# a local, and a task's code finds them without a handle on the worker.
current_task_id: bytes | None = None
sandboxed_task_dir: str | None = None


class TaskMarker:
    """The worker's side of its marker file: the id of the task it is
    running, all zeros while idle. Written through a memory map, so marking a
    task costs no system call. The task runs in this process and may truncate
    the file under the map: the next write then faults (SIGBUS) and this
    worker dies, which only the task's own user pays for (a worker serves one
    user). The pool never maps the file: it reads it with ``MarkerFile``."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), MARKER_SIZE)

    def set(self, task_id: bytes) -> None:
        self.map[:MARKER_SIZE] = task_id

    def clear(self) -> None:
        self.map[:MARKER_SIZE] = IDLE

    def close(self) -> None:
        self.map.close()


class MarkerFile:
    """The pool's side of a worker's marker file: made here (idle), read
    with ``pread`` on a descriptor, never through a map, so nothing a task
    does to the file (truncate it, grow it, fill it with junk) can fault the
    pool; anything but exactly one non-zero id reads as unknown (None)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.pwrite(self.fd, IDLE, 0)

    def read(self) -> bytes | None:
        """The id the worker last marked, or None: idle, or unknown."""
        try:
            value = os.pread(self.fd, MARKER_SIZE + 1, 0)
        except OSError:
            return None
        return value if len(value) == MARKER_SIZE and value != IDLE else None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Queued:
    __slots__ = ("row", "args")

    def __init__(self, row: list[Any], args: Any) -> None:
        self.row = row
        self.args = args


class WorkerProcess:
    """Runs tasks received from the endpoint at ``address`` until told to stop
    or until the endpoint process goes away."""

    def __init__(self, address: str, worker_id: bytes, marker: str | None = None,
                 parent_pid: int | None = None, *, task_root: str | None = None,
                 exit_on_disconnect: bool = False, data_only: bool = False, capture: bool = True,
                 held: str | None = None, link_fd: int | None = None) -> None:
        self.address = address
        # the results held, not sent yet, also where the pool reads them should this process die (heldlog.py)
        self.held_log = HeldLog(held) if held else None
        # a socketpair's end its pool gave it for tasks and results (framelink.py); None: over ZeroMQ,
        # at address (the control thread's connection is at address either way)
        self.link_fd = link_fd
        # what tasks write to fd 1 and 2 goes back with their results (output.py)
        self.capture = capture
        self.output: OutputCapture | None = None
        # a data-only endpoint's worker never unpickles arguments (serialize.py's
        # data-only format); any worker answers in the format the arguments
        # came in, so a client that sent plain data (to a data-only endpoint, or
        # a group with one) gets plain data back, never a pickle
        self.data_only = data_only
        self.worker_id = worker_id
        self.marker = TaskMarker(marker) if marker else None
        self.task_root = task_root
        # In a container the endpoint is not our parent (nor visible): its
        # socket closing is how we learn it is gone.
        self.exit_on_disconnect = exit_on_disconnect
        self.functions: dict[bytes, Callable[..., Any]] = {}
        self.bodies: dict[bytes, Any] = {}        # received, not yet loaded
        self.unloadable: dict[bytes, str] = {}    # hash -> why the function did not load
        # the endpoint's pid from its command line: os.getppid() here could
        # already be 1 if the endpoint died while this process was starting
        self.parent_pid = parent_pid if parent_pid is not None else os.getppid()
        # tasks not started; a second thread may give them back or cancel them (control.py)
        self.queue = TaskQueue()
        self.control: ControlThread | None = None
        # results not sent yet: the main thread sends them between tasks, the control thread
        # when a task runs long (outgoing.py)
        self.outgoing = OutgoingResults()
        self.chain = KeptResults()   # results that tasks queued here depend on (chain.py)
        # the low mark of the latest TASKS message (option "lw"), or None: results of slow tasks go
        # at once (see SLOW_HOLD)
        self.low_mark: int | None = None
        self.asked = False   # results sent at the low mark, no TASKS read since

    def run(self) -> None:
        global current_task_id
        # a context of its own: a task's sockets (on zmq.Context.instance())
        # cannot hold up the term() that sends our last results
        ctx = zmq.Context()
        monitor = None
        sock: Any
        if self.link_fd is not None:
            sock = worker_socket(self.link_fd)   # (the pool closing it reads as a STOP)
        else:
            sock = P.limit_frames(ctx.socket(zmq.DEALER))
            sock.setsockopt(zmq.LINGER, 2000)
            sock.setsockopt(zmq.IDENTITY, self.worker_id)
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED) if self.exit_on_disconnect else None
            sock.connect(self.address)
        self.sock = sock
        self.control = ControlThread(ctx, self.address, self.worker_id, self.queue, self.outgoing)
        self.control.start()
        if self.task_root is not None:
            os.chdir(self.task_root)
        limit = configured_limit() if self.capture else 0
        self.output = OutputCapture(self.task_root, limit) if limit else None
        # ready once the capture is in place: its pool holds the files from then on (output.HeldOutput)
        sock.send_multipart(P.encode(P.READY, {"pid": os.getpid(), "py": P.PYTHON_VERSION}))
        looked = 0.0   # time.perf_counter() of the last look for messages
        heap = WarmHeap()   # freed memory kept for the next task, given back when idle (warmheap.py)
        try:
            while True:
                if not self.queue:
                    self.flush()
                    # a shell task ran: the next one's directory is made while idle, once its result
                    # is on its way (spare_taskdir.py)
                    if SPARE.wanted and not sock.poll(SPARE_AFTER_MS):
                        SPARE.refill()
                    if not sock.poll(PARENT_CHECK_MS):
                        if os.getppid() != self.parent_pid:
                            return  # the endpoint died; nobody will read our results
                        if monitor is not None and monitor.poll(0):
                            return  # the endpoint closed its socket (it stopped or died)
                        heap.idle()
                        continue
                    looked = 0.0
                started = time.perf_counter()
                if started - looked >= LOOK_INTERVAL or not self.queue:
                    looked = started
                    if sock.getsockopt(_EVENTS) & _POLLIN:
                        if not self.read_messages():
                            return
                        started = time.perf_counter()
                task = self.queue.next()
                if task is None:
                    continue
                if self.marker is not None:
                    self.marker.set(task.row[0])
                current_task_id = task.row[0]
                wall_start = time.time() if len(task.row) == 7 else 0.0
                args = task.args
                if len(task.row) == 7 and "d" in task.row[6]:   # after tasks run here, with their values
                    args, missing = self.chain.arguments(task.row[6]["d"], args)
                if args is None:
                    status, blob = P.FAILED, not_kept(missing)
                elif self.task_root is None:
                    status, blob = self.run_task(task.row, args)
                else:
                    with self.task_directory(task.row[0]):
                        status, blob = self.run_task(task.row, args)
                privatize_leftovers()   # its large arguments' mapping, if it kept one, made private (recycling)
                if self.marker is not None:
                    self.marker.clear()
                self.chain.ran(task.row[0], status, blob)
                now = time.perf_counter()
                trace = None
                if len(task.row) == 7 and "tr" in task.row[6]:
                    trace = [*task.row[6]["tr"], wall_start, time.time()]
                self.add_result(task.row[0], status, blob, now - started, trace)
                if self.held_log is not None and now - started >= SLOW_RESULT:   # (never a quick task's: no cost)
                    self.held_log.record(task.row[0], status, blob, self.flush)   # read by the pool if we die
                if self.flush_due(now, now - started):
                    self.flush()
                unmap_leftovers()   # its large arguments' mapping, now the result went (transfer.load_local)
                heap.ran()
        finally:
            self.flush()
            SPARE.discard()
            if self.control is not None:
                self.control.close()
            if self.output is not None:
                self.output.close()
            if monitor is not None:
                sock.disable_monitor()
                monitor.close(linger=0)
            sock.close(linger=2000)
            ctx.term()   # our last results are out (or 2 s passed)

    @contextlib.contextmanager
    def task_directory(self, task_id: bytes) -> Iterator[None]:
        """With a task root: run the task in a fresh directory under it, then
        go back to the root and empty it (the directory, and whatever the task
        put beside it: the root is this worker's alone)."""
        assert self.task_root is not None
        global sandboxed_task_dir
        path = tempfile.mkdtemp(prefix=task_id.hex()[:16] + "-", dir=self.task_root)
        os.chdir(path)
        sandboxed_task_dir = path
        try:
            yield
        finally:
            sandboxed_task_dir = None
            os.chdir(self.task_root)
            for name in os.listdir(self.task_root):
                remove_tree(os.path.join(self.task_root, name))

    def flush_due(self, now: float, took: float) -> bool:
        """Whether the results held should go now, a task that took
        ``took`` seconds having just ended (the FLUSH_* and SLOW_* rules)."""
        outgoing = self.outgoing
        if len(outgoing) >= FLUSH_BATCH:
            return True
        if took < SLOW_RESULT:
            return now - outgoing.since >= FLUSH_DELAY
        low = self.low_mark
        if low is None or now - outgoing.since >= SLOW_HOLD:
            return True
        if self.asked or len(self.queue) > low:
            return False
        self.asked = True   # (the next TASKS message read clears it)
        return True

    def read_messages(self) -> bool:
        """Take every waiting message; False on STOP."""
        sock = self.sock
        while sock.getsockopt(_EVENTS) & _POLLIN:
            msg = P.decode(sock.recv_multipart(copy=False))
            if msg.type == P.TASKS:
                blobs = msg.blobs
                came = []
                for row in msg.fields["tasks"]:
                    if row[3] != -1:
                        self.bodies.setdefault(row[1], P.blob(blobs, row[3]))
                    if len(row) == 7 and "d" in row[6]:
                        self.chain.want(row[6]["d"])
                    came.append(_Queued(row, P.blob(blobs, row[2])))
                self.queue.add(came, msg.fields.get("q"))
                low = msg.fields.get("lw")
                self.asked = False
                self.low_mark = low if type(low) is int and 0 <= low <= P.MAX_ITEMS else None
            elif msg.type == P.CANCEL:
                for task in self.queue.remove_where(set(msg.fields["tids"]), chained=True):
                    if len(task.row) == 7 and "d" in task.row[6]:
                        self.chain.unwant(task.row[6]["d"])
                    self.add_result(task.row[0], P.CANCELLED, b"", 0.0)
            elif msg.type == P.STOP:
                return False
        return True

    def add_result(self, task_id: bytes, status: int, blob: Any, seconds: float,
                   trace: list[float] | None = None) -> None:
        if len(blob) > P.MAX_PAYLOAD_LIMIT:  # it would not pass the pool's socket (MAX_FRAME): say so instead
            message, details = P.too_large("the task's result" if status == P.OK else "the task's exception",
                                           len(blob), P.MAX_PAYLOAD_LIMIT)
            status, blob = P.FAILED, attach(P.pack_failure(P.TOO_LARGE, message, **details), output_of(blob))
        if len(self.outgoing) >= P.MAX_ITEMS:  # (FLUSH_BATCH sends sooner; a message's limit all the same)
            self.flush()
        self.outgoing.add(task_id, status, blob, seconds, trace)

    def flush(self) -> None:
        frames = self.outgoing.take()
        if frames is not None:
            self.sock.send_multipart(frames, copy=False)

    def load_function(self, fn_hash: bytes) -> Callable[..., Any]:
        fn = self.functions.get(fn_hash)
        if fn is not None:
            return fn
        if fn_hash in self.unloadable:  # the endpoint sends a body once per worker
            raise _LoadFailure(self.unloadable[fn_hash])
        body = self.bodies.pop(fn_hash, None)
        if body is None:
            raise _LoadFailure("the endpoint did not send this task's function")
        mismatch = P.body_mismatch(fn_hash, body)   # checked at the endpoint too; here once per function
        if mismatch:
            self.unloadable[fn_hash] = mismatch
            raise _LoadFailure(mismatch)
        try:
            fn = deserialize(body)
        except Exception as exc:
            self.unloadable[fn_hash] = _why(exc)
            raise _LoadFailure(self.unloadable[fn_hash]) from None
        self.functions[fn_hash] = fn
        return fn

    def run_task(self, row: list[Any], args_blob: Any) -> tuple[int, Any]:
        """``(status, blob)`` of one task."""
        if len(row) == 7 and "env" in row[6]:   # what its pool gave it (accelerators, MPI launcher: placement.py)
            with task_environment(row[6]["env"]):
                return self.run_task([*row[:6], {k: v for k, v in row[6].items() if k != "env"}], args_blob)
        fn_hash, kind = row[1], row[4]
        data = self.data_only or is_data(args_blob)
        try:
            fn = self.load_function(fn_hash)
            if is_local(args_blob):   # large arguments: a file the endpoint fetched, mapped (transfer.py),
                #                       or arguments with the files of the DataRefs they name (dataref.py)
                as_data: list[bool] = []   # (the format is the file's: a reference is in neither)

                def loads(buffer: Any) -> Any:
                    as_data.append(data or is_data(buffer))
                    return decode_data(buffer) if as_data[-1] else deserialize_large(buffer)

                payload = load_arguments(P.as_bytes(args_blob), loads)
                data = data or any(as_data)   # (answered in the format the arguments came in)
            else:
                payload = decode_data(args_blob) if data else deserialize(args_blob)
        except _LoadFailure as exc:
            if self.output is not None:
                self.output.discard()
            return _load_failure(str(exc))
        except Exception as exc:
            if self.output is not None:
                self.output.discard()
            return _load_failure(_why(exc))
        try:
            if kind == P.TASK_CHUNK:
                value: Any = [fn(*a) for a in payload]
            else:
                args, kwargs = payload
                value = fn(*args, **kwargs)
        except BaseException as exc:  # SystemExit too, as the standard executors do
            captured = self.output.take(_output_limit(row)) if self.output is not None else None
            return self.raised(exc, data, captured)
        captured = self.output.take(_output_limit(row)) if self.output is not None else None
        try:
            blob = attach(encode_data(value) if data else serialize_result(value), captured)
            if len(blob) > BIG_THRESHOLD:   # a large result goes to the endpoint as a file (transfer.py)
                blob = spill_result(blob, row[0])
            return P.OK, blob
        except NotData as exc:
            return P.FAILED, attach(P.pack_failure(
                P.SERIALIZATION, f"the task's arguments came as plain data (for a data-only endpoint), so its "
                                 f"result must be plain data too, and it is not: {exc}"), captured)
        except Exception as exc:
            return P.FAILED, attach(P.pack_failure(
                P.SERIALIZATION,
                f"cannot serialize the result of type {type(value).__module__}."
                f"{type(value).__qualname__}: {exc}",
            ), captured)
        except BaseException as exc:   # SystemExit from a __reduce__: the task's exception, as in ProcessPoolExecutor
            return self.raised(exc, data, captured)

    @staticmethod
    def raised(exc: BaseException, data: bool, captured: Any) -> tuple[int, Any]:
        """``(status, blob)`` of a task that raised ``exc`` (while it ran, or
        while its result was pickled), with its output ``captured``."""
        try:
            return P.EXCEPTION, attach(serialize_data_exception(exc) if data else serialize_exception(exc), captured)
        except BaseException as failure:
            return P.FAILED, attach(P.pack_failure(
                P.SERIALIZATION, f"the task raised {type(exc).__qualname__}, which could not be "
                                 f"serialized: {type(failure).__name__}"), captured)


@contextlib.contextmanager
def task_environment(env: Any) -> Iterator[None]:
    """Environment variables set for one task (its accelerators, its MPI
    launcher), as they were again after it; the subprocesses it starts see
    them too."""
    if not isinstance(env, dict):
        yield
        return
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update({str(name): str(value) for name, value in env.items()})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def remove_tree(path: str) -> None:
    """Remove ``path`` (a file, or a directory and everything under it), even
    what a task made read-only (the owner may always make it writable again)."""
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    for directory, subdirs, _ in os.walk(path):
        for name in [".", *subdirs]:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(directory, name), 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _output_limit(row: list[Any]) -> int | None:
    """The output limit a task asks (its executor's ``output_limit``: option ``ol``), or None."""
    return row[6].get("ol") if len(row) == 7 else None


class _LoadFailure(Exception):
    pass


def _load_failure(why: str) -> tuple[int, bytes]:
    return P.FAILED, P.pack_failure(P.SERIALIZATION, f"the endpoint could not load the task: {why}", remote=True)


def _why(exc: BaseException) -> str:
    hint = " (install that module on the endpoint too)" if isinstance(exc, ImportError) else ""
    return f"{type(exc).__name__}: {exc}{hint}"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedexec.worker")
    parser.add_argument("--address", required=True, help="endpoint worker socket")
    parser.add_argument("--worker-id", default=None,
                        help="this worker's routing id, in hex; by default read from the first line of stdin, "
                             "so that no other process can read it on this one's command line")
    parser.add_argument("--marker", help="file to record the running task's id in")
    parser.add_argument("--held", default=None,
                        help="file to write the results held, not sent yet, in (its pool reads it if we die)")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process is gone")
    parser.add_argument("--link-fd", type=int, default=None,
                        help="an inherited socketpair's end to take tasks on and send results to, instead of "
                             "--address (which the control connection uses still)")
    parser.add_argument("--task-root", default=None,
                        help="run each task in a fresh directory under this one, removed after it")
    parser.add_argument("--data-only", action="store_true",
                        help="load arguments and give results in the data-only format only, never pickles")
    parser.add_argument("--exit-on-disconnect", action="store_true",
                        help="stop when the endpoint's socket closes (for workers the endpoint is not the "
                             "parent of, as in a container)")
    ns = parser.parse_args(argv)
    from ..private import restore_user_umask

    restore_user_umask()   # the files a task writes follow the user's umask, not the pool's private one
    # Ctrl-C in the user's terminal is for the endpoint to handle; it stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_id = bytes.fromhex(ns.worker_id if ns.worker_id is not None else sys.stdin.readline().strip())
    if not worker_id:
        sys.exit("fedexec worker: no worker id (--worker-id, or a line of hex on stdin)")
    # stdin has done its job: tasks get /dev/null there
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    code = 0
    try:
        WorkerProcess(ns.address, worker_id, ns.marker, ns.parent_pid, task_root=ns.task_root,
                      exit_on_disconnect=ns.exit_on_disconnect, data_only=ns.data_only, held=ns.held,
                      link_fd=ns.link_fd).run()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        # os._exit, not a return: a thread a task left running (not a
        # daemon) would keep this process alive after its results went out
        # and its pool let it go; the pool kills a worker that lingers anyway
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
