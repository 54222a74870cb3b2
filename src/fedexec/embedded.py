"""The embedded default: a private relay and a local endpoint for one executor.

``FederatedExecutor()`` with nothing configured starts both as child
processes on ipc sockets in a private temporary directory, and stops them
when the executor shuts down. Each child also watches this process and stops
by itself if it disappears, so nothing outlives the program. The endpoint
runs its pool on a thread of its own (``--pools-in-process``,
endpoint/inprocess.py): a task crosses no hop to a pool process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from .auth import write_secret

# The private relay dies with its program, which then has nobody to send its
# tasks again to: committing its record sooner buys nothing. A longer window
# than a relay's default (relay/store.py) nets out, unwritten, nearly every
# quick task (its row, result and acknowledgement cancel within one commit),
# and sends ACCEPTED and the endpoint's ACKs once per window, not per task.
EMBEDDED_COMMIT_WINDOW = 0.01


class EmbeddedFederation:
    """A relay and an endpoint owned by this process."""

    def __init__(self, max_workers: int | None = None, *, prefetch: int = 1, worker_batch: int = 64,
                 max_payload: int | None = None) -> None:
        self.directory = tempfile.mkdtemp(prefix="fedexec-")
        os.chmod(self.directory, 0o700)
        self.relay_address = f"ipc://{self.directory}/relay.sock"
        # the private relay's secret: made here, so it is there before anyone connects
        self.secret_file = os.path.join(self.directory, "relay.secret")
        write_secret(Path(self.secret_file))
        self.endpoint_id = str(uuid.uuid4())
        self.max_workers = max_workers or 0
        self.prefetch = prefetch
        self.worker_batch = worker_batch
        self.max_payload = max_payload   # the relay's limit (None: its default)
        self.processes: list[subprocess.Popen] = []

    def start(self) -> None:
        # Like ProcessPoolExecutor's children, ours see the caller's sys.path,
        # so functions from the user's own (uninstalled) modules load there.
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
        common = {"stdin": subprocess.DEVNULL, "start_new_session": True, "env": env}
        parent = str(os.getpid())
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", "fedexec.relay", "--address", self.relay_address,
             "--data-dir", os.path.join(self.directory, "relay"), "--parent-pid", parent,
             "--remove-on-exit", self.directory, "--secret-file", self.secret_file,
             "--log-level", "WARNING", "--commit-window", str(EMBEDDED_COMMIT_WINDOW),
             *(["--max-payload", str(self.max_payload)] if self.max_payload is not None else [])], **common))
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", "fedexec.endpoint", "--name", "local", "--relay", self.relay_address,
             "--endpoint-id", self.endpoint_id, "--max-workers", str(self.max_workers),
             "--prefetch", str(self.prefetch), "--worker-batch", str(self.worker_batch), "--parent-pid", parent,
             "--secret-file", self.secret_file,
             "--pools-in-process",   # its pool on a thread of the endpoint: no hop of its own (inprocess.py)
             "--log-level", "WARNING"], **common))

    def failed(self) -> str | None:
        """Why a child process has already exited, if one has."""
        for proc, what in zip(self.processes, ("relay", "endpoint")):
            if proc.poll() is not None:
                return f"the embedded {what} exited with code {proc.returncode}"
        return None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the endpoint (and with it its workers), then the relay."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()
        shutil.rmtree(self.directory, ignore_errors=True)
