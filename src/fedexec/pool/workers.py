"""The worker processes of a pool: start, watch, replace, stop.

Workers run directly, or inside the endpoint's sandbox (``worker/sandbox.py``):
then each worker also gets a task root of its own on the host, next to its
marker file, removed with it.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..worker import sandbox as sandboxes
from ..worker.process import TaskMarker, remove_tree


@dataclass
class WorkerSlot:
    """One worker process and what it holds.

    ``tasks`` are the rows sent to it and not yet answered, in the order it
    runs them: the first is running (or about to); ``announced`` is the one
    whose start was reported to the relay.
    """

    worker_id: bytes
    process: subprocess.Popen
    marker: TaskMarker
    ready: bool = False
    tasks: dict = field(default_factory=dict)           # task_id -> row
    announced: bytes | None = None
    known_functions: set = field(default_factory=set)
    running: bytes | None = None        # the task its marker last showed running, and since when
    running_since: float = 0.0
    timed_out: bytes | None = None      # the task it was killed for running past its walltime

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
    """``size`` worker processes on this machine, connected to ``address``."""

    def __init__(self, size: int, address: str, marker_dir: str, *, env: dict[str, str] | None = None,
                 sandbox: str = "none", sandbox_image: str = "") -> None:
        sandboxes.check(sandbox)  # a missing tool fails the endpoint's start, by name
        if sandbox != "none" and not address.startswith("ipc://"):
            raise sandboxes.SandboxUnavailable(f"sandboxed workers have no network: their endpoint must "
                                               f"listen on an ipc:// address, not {address!r}")
        self.sandbox = sandbox            # what the workers run inside (config.SANDBOXES)
        self.sandbox_image = sandbox_image
        self.size = size
        self.address = address
        self.marker_dir = marker_dir
        self.env = env
        self.slots: dict[bytes, WorkerSlot] = {}
        self._ids = itertools.count(1)

    def start(self) -> None:
        for _ in range(self.size - len(self.slots)):
            self.spawn()

    def spawn(self) -> WorkerSlot:
        worker_id = f"w{os.getpid()}-{next(self._ids)}".encode()
        marker = TaskMarker(os.path.join(self.marker_dir, worker_id.decode() + ".task"), create=True)
        args = ["--address", self.address, "--worker-id", worker_id.decode(), "--marker", marker.path]
        process: subprocess.Popen
        if self.sandbox == "none":
            process = subprocess.Popen([sys.executable, "-m", "fedexec.worker", *args, "--parent-pid",
                                        str(os.getpid())], stdin=subprocess.DEVNULL, env=self.env)
        else:
            task_dir = self.task_dir(worker_id)
            os.makedirs(task_dir, mode=0o700, exist_ok=True)
            name = f"fedexec-{worker_id.decode()}"
            command = sandboxes.worker_command(
                self.sandbox, args, socket_path=self.address[len("ipc://"):], marker_path=marker.path,
                task_dir=task_dir, image=self.sandbox_image, name=name)
            if self.sandbox == "podman":
                process = ContainerProcess(command, container=name, stdin=subprocess.DEVNULL, env=self.env)
            else:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=self.env)
        slot = WorkerSlot(worker_id, process, marker)
        self.slots[worker_id] = slot
        return slot

    def task_dir(self, worker_id: bytes) -> str:
        """The host directory a sandboxed worker sees as its task root."""
        return os.path.join(self.marker_dir, worker_id.decode() + ".tasks")

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
        """Release a dead worker's marker file (after it was read) and task root."""
        slot.marker.close()
        try:
            os.unlink(slot.marker.path)
        except OSError:
            pass
        if self.sandbox != "none":
            remove_tree(self.task_dir(slot.worker_id))

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
