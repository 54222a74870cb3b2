"""Local worker processes of an endpoint: start, watch, replace, stop."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..worker.process import TaskMarker


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
        process = subprocess.Popen(
            [sys.executable, "-m", "fedexec.worker", "--address", self.address, "--worker-id", worker_id.decode(),
             "--marker", marker.path, "--parent-pid", str(os.getpid())],
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        slot = WorkerSlot(worker_id, process, marker)
        self.slots[worker_id] = slot
        return slot

    def reap(self) -> list[WorkerSlot]:
        """Slots whose process has exited, removed from the pool."""
        dead = [slot for slot in self.slots.values() if slot.process.poll() is not None]
        for slot in dead:
            del self.slots[slot.worker_id]
        return dead

    @staticmethod
    def forget(slot: WorkerSlot) -> None:
        """Release a dead worker's marker file (after it was read)."""
        slot.marker.close()
        try:
            os.unlink(slot.marker.path)
        except OSError:
            pass

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
