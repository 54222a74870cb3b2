"""``python -m fedexec.colocated``: the embedded default's relay and endpoint
agent in one process.

The embedded default's relay is private (its only client is the program
that started it) and its endpoint runs on the same machine and dies with
the same program. As two processes, every task crossed an ipc hop between
them each way, each about three thread wake-ups through both processes'
ZeroMQ I/O threads on a small machine. Here the relay's loop runs on the
main thread and the agent's on a second one (its pool driven by the
agent's loop, endpoint/inprocess.py), linked over ``inproc://`` with a
trust rule of its own (relay/locallink.py); the real listening socket, which the program's
executor and the agent's large-payload transfers still use, keeps every
check it had.

The process stops on SIGTERM (the agent first, then the relay), when its
parent is gone, or when the agent ends by itself (the relay then has no
endpoint to run anything). On SIGTERM the relay's loop keeps serving while
the agent leaves (its pool's workers finish what they run, within
``stopgrace.STOP_GRACE``, and their results reach the program:
endpoint/leaving.py); the agent's end then stops the relay. A second
SIGTERM stops the relay at once. ``fedexec relay start`` and ``fedexec endpoint
start`` are not this: they stay processes of their own.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path

from . import protocol as P
from .config import EndpointConfig
from .endpoint.agent import EndpointAgent
from .gcpolicy import for_service
from .logs import configure as configure_logging
from .private import make_private
from .privatedir import remove_stale_private_dirs
from .relay.server import Relay
from .worker.warmheap import ENV as WARM_HEAP_ENV

log = logging.getLogger("fedexec.colocated")

AGENT_JOIN_TIMEOUT = 20.0   # seconds the relay waits for its agent to stop (it stops its pool and workers)


class Colocated:
    """A relay and an endpoint agent linked in this process."""

    def __init__(self, relay: Relay, config: EndpointConfig, *, parent_pid: int | None,
                 secret_file: str) -> None:
        self.relay = relay
        link = relay.open_local_link()
        self.agent = EndpointAgent(config, parent_pid=parent_pid, secret_file=secret_file, relay_link=link)
        self.thread = threading.Thread(target=self._run_agent, name="fedexec-colocated-agent", daemon=True)
        assert relay.local_link is not None
        relay.local_link.on_close(self._stop_agent)
        self.exit_code = 0
        self.leaving = False   # asked to stop (a signal); the relay stops once the agent has left

    def _run_agent(self) -> None:
        try:
            self.agent.run()
        except Exception:
            log.exception("the colocated endpoint agent failed")
            self.exit_code = 1
        else:
            self.exit_code = self.agent.exit_code
        finally:
            self.relay.stop()   # a relay without its endpoint runs nothing: the program sees the process end

    def _on_signal(self, *_: object) -> None:
        """SIGTERM / SIGINT: the agent leaves first while the relay's loop
        still carries its results (its end stops the relay); a second signal,
        or one with no agent running, stops the relay at once."""
        if self.leaving or not self.thread.is_alive():
            self.relay.stop()
        else:
            self.leaving = True
            self.agent.stop()

    def _stop_agent(self) -> None:
        self.agent.stop_now()   # (the relay's loop has ended: nobody would read its results)
        self.thread.join(AGENT_JOIN_TIMEOUT)
        if self.thread.is_alive():   # (stuck in a system call: its sockets would hold up the context's end)
            log.error("the colocated endpoint agent did not stop within %.0f s: this process ends now",
                      AGENT_JOIN_TIMEOUT)
            logging.shutdown()
            os._exit(1)   # its private directory goes at the next start (privatedir.py)

    def run(self) -> int:
        """Serve until stopped; the exit code."""
        self.thread.start()
        self.relay.serve_forever(on_signal=self._on_signal)
        return self.exit_code


def main(argv: list[str] | None = None) -> None:
    make_private()   # the record holds the program's arguments and results
    parser = argparse.ArgumentParser(prog="python -m fedexec.colocated")
    parser.add_argument("--address", required=True, help="the relay's ipc:// or tcp:// address")
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--remove-on-exit", required=True, type=Path,
                        help="delete this directory when the process stops (it is private)")
    parser.add_argument("--secret-file", required=True, type=Path)
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process is gone")
    parser.add_argument("--commit-window", type=float, required=True)
    parser.add_argument("--memory-record", action="store_true",
                        help="keep the relay's record in memory only (it dies with its program)")
    parser.add_argument("--max-payload", type=int, default=P.DEFAULT_MAX_PAYLOAD)
    parser.add_argument("--endpoint-id", required=True)
    parser.add_argument("--max-workers", type=int, default=0)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--worker-batch", type=int, default=None)
    parser.add_argument("--log-level", default="WARNING")
    ns = parser.parse_args(argv)
    configure_logging(ns.log_level, None)
    # the agent's spool (its socket directory, endpoint/sockdir.py) beside the private directory, on one
    # filesystem with the relay's spool, so large payloads pass between them as files (hard links,
    # recycled files: relay/spares.py), also when embedded.py chose /dev/shm; this process's own
    # temporary files only (workers keep the program's TMPDIR). (Not inside it: ipc:// socket paths
    # must stay short.)
    tempfile.tempdir = str(ns.remove_on_exit.parent)
    # its workers run one user's tasks: they keep freed memory for the next task (worker/warmheap.py)
    os.environ.setdefault(WARM_HEAP_ENV, "on")
    # private directories beside ours whose program and colocated process were both killed (possibly
    # gigabytes of spool in /dev/shm): removed on a thread of their own, not in the way of starting
    threading.Thread(target=remove_stale_private_dirs, args=(tempfile.tempdir,), name="fedexec-stale-dirs",
                     daemon=True).start()
    if not 0 <= ns.commit_window <= 1:
        parser.error("--commit-window must be between 0 and 1 second")
    try:
        P.check_payload_limit(ns.max_payload)
    except ValueError as exc:
        parser.error(f"--max-payload: {exc}")
    try:
        relay = Relay(ns.address, ns.data_dir, parent_pid=ns.parent_pid, remove_on_exit=ns.remove_on_exit,
                      max_payload=ns.max_payload, secret_file=ns.secret_file, commit_window=ns.commit_window,
                      durable=not ns.memory_record)
    except OSError as exc:   # the address is in use, or not this machine's (as relay/__main__.py says it)
        sys.exit(f"fedexec colocated relay: {exc.strerror or exc}")
    config = EndpointConfig(name="local", relay=relay.address, max_workers=ns.max_workers, prefetch=ns.prefetch)
    if ns.worker_batch is not None:
        config.worker_batch = ns.worker_batch
    config.endpoint_id = ns.endpoint_id
    config.provider.in_process = True   # its pool in this process too (endpoint/inprocess.py)
    host = Colocated(relay, config, parent_pid=ns.parent_pid, secret_file=str(ns.secret_file))
    for_service()
    sys.exit(host.run())


if __name__ == "__main__":
    main()
