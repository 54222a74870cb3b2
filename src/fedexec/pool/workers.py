"""The worker processes of a pool: start, watch, replace, stop.

Workers run directly, or inside the endpoint's sandbox (``worker/sandbox.py``):
then each worker also gets a task root of its own on the host, next to its
marker file, removed with it.

*Worker identity.* A task must not be able to pose as a worker of its pool
(and so receive other tasks, other users' among them, and answer them).
Each worker has a channel of its own: the pool's worker socket listens on
one ipc path per worker, and a sandbox sees only its own worker's path, so a
task cannot even reach its neighbours' channels. On it the worker presents a
routing id of 16 random bytes that the pool hands it on its stdin (never on
a command line, which /proc shows to every local account); the pool takes
messages only from the ids it handed out, and a second connection under an
id in use is refused (no ROUTER handover). Files, container names and logs
use the worker's public ``name`` (``w<n>``), never its id.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from .. import taskdirs
from ..framelink import PoolLinks, pair as link_pair
from ..worker import sandbox as sandboxes
from ..worker import heldlog
from ..worker.process import MarkerFile, remove_tree

log = logging.getLogger(__name__)

RECALLABLE_BATCHES = 32   # a worker's latest batches whose tasks may be recalled (stealing.py)


@dataclass
class WorkerSlot:
    """One worker process and what it holds.

    ``tasks`` are the rows sent to it and not yet answered, in the order it
    runs them: the first is running (or about to); ``announced`` is the one
    whose start was reported to the relay.
    """

    worker_id: bytes                    # its routing id: secret, random
    name: str                           # public, for files and logs
    address: str                        # the ipc channel of its own
    process: subprocess.Popen
    marker: MarkerFile
    ready: bool = False
    tasks: dict = field(default_factory=dict)           # task_id -> row
    announced: bytes | None = None
    known_functions: set = field(default_factory=set)
    running: bytes | None = None        # the task its marker last showed running, and since when
    running_since: float = 0.0
    timed_out: bytes | None = None      # the task it was killed for running past its walltime
    timed_out_output: bytes | None = None   # ... and that task's output, read just before
    held_output: Any = None             # its capture files, held from its READY on (output.HeldOutput)
    user: str | None = None             # the one user whose tasks it runs ("": the endpoint's owner); None: fresh
    retiring: bool = False              # told to stop: a fresh worker takes its place, for another user
    retired_at: float = 0.0             # when it was told (monotonic): past a grace period, it is killed
    bound_at: float = 0.0               # when it took its user (monotonic)
    yielding: bool = False              # given no more tasks: once idle it retires, for a user waiting
    # work stealing (stealing.py)
    control: bool = False               # its control thread is connected (it answers while a task runs)
    seen_running: bytes | None = None   # the task its marker showed running when last looked at, and since when
    seen_since: float = 0.0
    recalled_at: float = 0.0            # when it was asked for the tasks it has not started (unanswered)
    recalling: dict = field(default_factory=dict)   # task id -> to cancel: asked back, not answered yet
    stuck: bytes | None = None          # the long task it runs, tasks recalled from behind it: it gets no more
    unrecallable: bytes | None = None   # the task it runs, with none of those behind it to be asked back
    sent: int = 0                       # TASKS messages sent to it; the latest ones' (number, rows):
    batches: deque = field(default_factory=lambda: deque(maxlen=RECALLABLE_BATCHES))

    @property
    def pid(self) -> int:
        return self.process.pid

    def head(self) -> bytes | None:
        return next(iter(self.tasks), None)


class ContainerProcess(subprocess.Popen):
    """A ``podman run`` client whose signals go to its container too: killed
    alone, the client would leave the container (and its task) running."""

    def __init__(self, args: list[str], *, container: str, **kwargs: Any) -> None:
        self.kill_command = [args[0], "kill", "--signal"]   # args[0]: the podman found on PATH
        self.container = container
        super().__init__(args, **kwargs)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                subprocess.run([*self.kill_command, str(int(sig)), self.container],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        super().send_signal(sig)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class LocalWorkerPool:
    """``size`` worker processes on this machine, each on a channel of its
    own that ``sock`` (the pool's ROUTER) listens on, in ``marker_dir``."""

    def __init__(self, size: int, sock: zmq.Socket, marker_dir: str, *, env: dict[str, str] | None = None,
                 sandbox: str = "none", sandbox_image: str = "", data_only: bool = False,
                 links: PoolLinks | None = None) -> None:
        sandboxes.check(sandbox)  # a missing tool fails the endpoint's start, by name
        self.sandbox = sandbox            # what the workers run inside (config.SANDBOXES)
        self.sandbox_image = sandbox_image
        self.data_only = data_only        # the endpoint takes and gives only plain data
        self.size = size
        self.sock = sock
        self.marker_dir = marker_dir
        self.env = env
        # unsandboxed workers take tasks and send results on a socketpair of their own (framelink.py; FEDEXEC_WORKER_LINK=0: ZeroMQ)
        self.links = links if sandbox == "none" and links is not None and links.wanted else None
        self.slots: dict[bytes, WorkerSlot] = {}
        self._numbers = itertools.count(1)
        self.kept: dict[str, str] = {}   # sandboxed worker's name -> the path of its directory for shell tasks' output
        self.kept_fds: dict[str, int] = {}   # ... and a descriptor of it, held open (in use) until the worker goes

    def start(self) -> None:
        for _ in range(self.size - len(self.slots)):
            self.spawn()

    def spawn(self) -> WorkerSlot:
        number = next(self._numbers)
        name = f"w{number}"
        worker_id = secrets.token_bytes(16)
        path = os.path.join(self.marker_dir, name + ".sock")
        self.sock.bind(f"ipc://{path}")
        address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        marker = MarkerFile(os.path.join(self.marker_dir, name + ".task"))
        args = ["--address", address, "--marker", marker.path]   # the id comes on stdin
        if self.data_only:
            args.append("--data-only")
        process: subprocess.Popen
        link = None
        try:
            if self.sandbox == "none":
                held = heldlog.path_for(marker.path)   # its results held, read if it dies (heldlog.py)
                if heldlog.create(held):
                    args += ["--held", held]
                link = link_pair() if self.links is not None else None
                if link:
                    args += ["--link-fd", str(link[1].fileno())]
                try:
                    process = subprocess.Popen([sys.executable, "-m", "fedexec.worker", *args, "--parent-pid",
                                                str(os.getpid())], stdin=subprocess.PIPE, env=self.env,
                                               pass_fds=(link[1].fileno(),) if link else ())
                finally:
                    if link:
                        link[1].close()   # (the worker's now)
                if link:
                    assert self.links is not None
                    self.links.add(worker_id, link[0])
                    link = None
            else:
                task_dir = self.task_dir(name)
                for directory in (task_dir, self.inbox(name), self.outbox(name)):
                    os.makedirs(directory, mode=0o700, exist_ok=True)
                container = f"fedexec-w{os.getpid()}-{number}"
                command = sandboxes.worker_command(
                    self.sandbox, args, socket_path=path, marker_path=marker.path,
                    task_dir=task_dir, image=self.sandbox_image, name=container,
                    inbox=self.inbox(name), outbox=self.outbox(name), kept=self._kept_dir(name))
                if self.sandbox == "podman":
                    process = ContainerProcess(command, container=container, stdin=subprocess.PIPE, env=self.env)
                else:
                    process = subprocess.Popen(command, stdin=subprocess.PIPE, env=self.env)
        except BaseException:
            if self.sandbox == "none" and link:
                link[0].close()
            self._release(address, marker, name)
            raise
        assert process.stdin is not None
        with contextlib.suppress(OSError):   # it died at once: reaped and replaced as any other
            with process.stdin:
                process.stdin.write(worker_id.hex().encode() + b"\n")
        slot = WorkerSlot(worker_id, name, address, process, marker)
        self.slots[worker_id] = slot
        return slot

    def _kept_dir(self, name: str) -> str:
        """A fresh directory under the task directories' base for sandboxed
        worker ``name``'s shell tasks to leave their output in, bound into
        its sandbox alone (taskdirs.py); "" (their output then goes with
        the sandbox's task directory) when the base cannot be used, said in
        the log."""
        try:
            base = taskdirs.base_path(self.env)
            base_fd = taskdirs.open_base(base)
            try:
                kept, fd = taskdirs.make_dir(base_fd, taskdirs.SANDBOX_PREFIX)
                taskdirs.spread_subdirectories(fd)   # (its tasks' directories are made in it)
                self.kept_fds[name] = fd   # (open, so held in use, while the worker lives: taskdirs.hold)
            finally:
                os.close(base_fd)
        except OSError as exc:
            log.warning("shell tasks of sandboxed worker %s keep no output files: %s", name, exc)
            return ""
        self.kept[name] = os.path.join(base, kept)
        return self.kept[name]

    def kept_names(self) -> set[str]:
        """The names (in the base) of the live sandboxed workers' directories
        of kept task dirs: never removed whole while in use. (Called from the
        cleaner's thread: a copy of the dict, taken at once.)"""
        return {os.path.basename(path) for path in self.kept.copy().values()}

    def task_dir(self, name: str) -> str:
        """The host directory a sandboxed worker sees as its task root."""
        return os.path.join(self.marker_dir, name + ".tasks")

    def inbox(self, name: str) -> str:
        """The host directory a sandboxed worker sees, read-only, as
        sandbox.TASK_IN: its tasks' large arguments."""
        return os.path.join(self.marker_dir, name + ".in")

    def outbox(self, name: str) -> str:
        """The host directory a sandboxed worker sees as sandbox.TASK_OUT,
        where it writes large results."""
        return os.path.join(self.marker_dir, name + ".out")

    def task_arguments(self, slot: WorkerSlot, task_id: bytes, blob: Any) -> Any:
        """A task's arguments as ``slot``'s worker is sent them: large ones
        (a local file) put where its sandbox sees them (sandbox.py)."""
        if self.sandbox == "none":
            return blob
        try:
            return sandboxes.share_arguments(self.inbox(slot.name), task_id, blob)
        except (OSError, ValueError) as exc:   # the worker then fails the task, naming the file it could not read
            log.warning("could not share the large arguments of task %s with its worker: %s", task_id.hex(), exc)
            return blob

    def task_result(self, slot: WorkerSlot, task_id: bytes, status: int, blob: Any) -> tuple[int, Any]:
        """A task's outcome from ``slot``'s worker: its arguments leave the
        worker's inbox, and a large result leaves its outbox for the agent's
        spool (sandbox.py)."""
        if self.sandbox == "none":
            return status, blob
        sandboxes.unshare_arguments(self.inbox(slot.name), task_id)
        return sandboxes.take_result(self.outbox(slot.name), task_id, status, blob)

    def reap(self) -> list[WorkerSlot]:
        """Slots whose process has exited, removed from the pool."""
        dead = [slot for slot in self.slots.values() if slot.process.poll() is not None]
        for slot in dead:
            del self.slots[slot.worker_id]
            code = slot.process.returncode
            if self.sandbox != "none" and code > 128:
                # bwrap and podman exit with 128 + N when their worker was
                # killed by signal N; say so as Popen would for the worker
                slot.process.returncode = -(code - 128)
        return dead

    def forget(self, slot: WorkerSlot) -> None:
        """Release a dead worker's channel, marker file (after it was read),
        task root and capture files held."""
        self._release(slot.address, slot.marker, slot.name)
        if self.links is not None:
            self.links.drop(slot.worker_id)
        if slot.held_output is not None:
            slot.held_output.close()
            slot.held_output = None

    def _release(self, address: str, marker: MarkerFile, name: str) -> None:
        try:
            self.sock.unbind(address)
        except zmq.ZMQError:
            pass
        with contextlib.suppress(OSError):
            os.unlink(address[len("ipc://"):])
        marker.close()
        with contextlib.suppress(OSError):
            os.unlink(marker.path)
        with contextlib.suppress(OSError):
            os.unlink(heldlog.path_for(marker.path))
        if self.sandbox != "none":
            for directory in (self.task_dir(name), self.inbox(name), self.outbox(name)):
                remove_tree(directory)
            kept = self.kept.pop(name, None)
            kept_fd = self.kept_fds.pop(name, None)
            if kept_fd is not None:
                os.close(kept_fd)
            if kept is not None:   # it stays, with its tasks' output, until it expires; gone at once if empty
                with contextlib.suppress(OSError):
                    os.rmdir(kept)

    def stop(self, send_stop: Any, timeout: float = 3.0) -> None:
        """Ask every worker to stop, then terminate and kill what is left."""
        for slot in self.slots.values():
            if slot.process.poll() is None:
                send_stop(slot.worker_id)
        deadline = time.monotonic() + timeout
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            for slot in self.slots.values():
                if sig is not None and slot.process.poll() is None:
                    slot.process.send_signal(sig)
            for slot in self.slots.values():
                try:
                    slot.process.wait(max(0.05, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if all(slot.process.poll() is not None for slot in self.slots.values()):
                break
            deadline = time.monotonic() + 1.0
        for slot in self.slots.values():
            self.forget(slot)
        self.slots.clear()
