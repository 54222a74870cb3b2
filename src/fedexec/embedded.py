"""The embedded default: a private relay and a local endpoint for one executor.

``FederatedExecutor()`` with nothing configured starts both in one child
process (``fedexec.colocated``: the relay, the endpoint agent and its pool
on one loop, linked in memory), listening on an ipc socket in a private
temporary directory, and stops it when the executor shuts down. The
executor talks to the relay over a socketpair made here (no ZeroMQ I/O
thread on its way; payloads over the transfer threshold go through the ipc
socket; ``FEDEXEC_CLIENT_LINK=0``: the ipc socket for everything). The child also watches this
process and stops by itself if it disappears, so nothing outlives the
program. A task crosses no hop between relay, agent and pool.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from .auth import write_secret
from .config import DEFAULT_WORKER_BATCH
from .framelink import pair as link_pair
from .privatedir import make_private_directory

# The private relay dies with its program, which then has nobody to send its
# tasks again to: a durable record buys it nothing, so it keeps its record in
# memory only (relay/memstore.py: no writer thread, no SQL per task).
# EMBEDDED_COMMIT_WINDOW is what a SQLite record would use (a longer window
# than a relay's default nets out, unwritten, nearly every quick task), when
# MEMORY_RECORD is False.
EMBEDDED_COMMIT_WINDOW = 0.01
MEMORY_RECORD = True

# The executor's link to its colocated relay: a socketpair (relay/locallink.py ClientLink), unless
# FEDEXEC_CLIENT_LINK=0 (then the relay's ipc socket). It takes two thread wake-ups each way off a
# no-op's round trip (with the worker link, p50 0.91-1.10 -> 0.73-0.87 ms, session 30). It was
# opt-in in session 29, when its large messages were copied twice on each side (a 10 MB argument's
# round trip ~41 ms against ~21 ms over ZeroMQ); framelink.py's _Reader now reads them once.
CLIENT_LINK_VARIABLE = "FEDEXEC_CLIENT_LINK"


# Where the private directory goes when it can: a filesystem kept in memory.
# The relay, its record and every large payload's spool file live there; the
# record is not kept past the program, so a disk buys nothing, and a payload
# file recycled over and over (relay/spares.py) is then never written back to
# one. Only with room for two payloads at the limit (an argument and a
# result), and unless TMPDIR names where temporary files go; else the
# system's temporary directory, as before.
MEMORY_DIRECTORY = "/dev/shm"


def memory_directory(max_payload: int | None) -> str | None:
    """MEMORY_DIRECTORY when it is a memory filesystem we may write with room
    for two payloads of ``max_payload`` bytes, and TMPDIR does not say where
    temporary files go; None (the system's temporary directory) otherwise."""
    from .protocol import DEFAULT_MAX_PAYLOAD
    from .relay.spares import MEMORY_FILESYSTEMS, filesystem_type

    if os.environ.get("TMPDIR"):   # (the user's, or the batch system's, choice: node-local scratch, say)
        return None
    try:
        if filesystem_type(MEMORY_DIRECTORY) not in MEMORY_FILESYSTEMS or not os.access(MEMORY_DIRECTORY, os.W_OK):
            return None
        room = os.statvfs(MEMORY_DIRECTORY)
        if room.f_bavail * room.f_frsize < 2 * (max_payload or DEFAULT_MAX_PAYLOAD):
            return None
    except OSError:
        return None
    return MEMORY_DIRECTORY


class EmbeddedFederation:
    """A relay and an endpoint owned by this process."""

    def __init__(self, max_workers: int | None = None, *, prefetch: int = 1,
                 worker_batch: int = DEFAULT_WORKER_BATCH, max_payload: int | None = None) -> None:
        # marked as this program's, its lock held by this process and the colocated one: the next
        # embedded start removes it should both be killed (privatedir.py)
        self.directory, self.lock_fd = make_private_directory(memory_directory(max_payload))
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
        # the executor's link to the relay: a socketpair, one end for the colocated process
        # (relay/locallink.py ClientLink), the other for this program's dispatcher, which takes it
        self.client_socket: socket.socket | None = None

    def start(self) -> None:
        # Like ProcessPoolExecutor's children, ours see the caller's sys.path,
        # so functions from the user's own (uninstalled) modules load there.
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
        theirs = None
        if os.environ.get(CLIENT_LINK_VARIABLE, "1") != "0":   # (see CLIENT_LINK_VARIABLE)
            ours, theirs = link_pair()   # (as a worker's link: framelink.py)
        common = {"stdin": subprocess.DEVNULL, "start_new_session": True, "env": env,
                  "pass_fds": (self.lock_fd,) + ((theirs.fileno(),) if theirs is not None else ())}
        parent = str(os.getpid())
        # one process: the relay, the agent and its pool on one loop, linked
        # in memory (colocated.py, memlink.py, relay/locallink.py)
        self.processes.append(subprocess.Popen(
            [sys.executable, "-m", "fedexec.colocated", "--address", self.relay_address,
             "--data-dir", os.path.join(self.directory, "relay"), "--parent-pid", parent,
             "--remove-on-exit", self.directory, "--secret-file", self.secret_file,
             "--log-level", "WARNING", "--commit-window", str(EMBEDDED_COMMIT_WINDOW),
             *(["--memory-record"] if MEMORY_RECORD else []),
             *(["--max-payload", str(self.max_payload)] if self.max_payload is not None else []),
             "--endpoint-id", self.endpoint_id, "--max-workers", str(self.max_workers),
             "--prefetch", str(self.prefetch), "--worker-batch", str(self.worker_batch),
             *(["--client-fd", str(theirs.fileno())] if theirs is not None else [])], **common))
        if theirs is not None:
            theirs.close()
            self.client_socket = ours

    def failed(self) -> str | None:
        """Why the child process has already exited, if it has."""
        for proc in self.processes:
            if proc.poll() is not None:
                return f"the embedded relay and endpoint exited with code {proc.returncode}"
        return None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child: its endpoint (its workers finish what they run first,
        within stopgrace.STOP_GRACE), then its relay; killed after ``timeout``."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()
        if self.client_socket is not None:   # (the dispatcher's, if it never took it)
            self.client_socket.close()
            self.client_socket = None
        shutil.rmtree(self.directory, ignore_errors=True)
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
