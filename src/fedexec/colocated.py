"""``python -m fedexec.colocated``: the embedded default's relay and endpoint
agent in one process.

The embedded default's relay is private (its only client is the program
that started it) and its endpoint runs on the same machine and dies with
the same program. As two processes, every task crossed an ipc hop between
them each way, each about three thread wake-ups through both processes'
ZeroMQ I/O threads on a small machine. Here the relay and the agent
share one loop on the main thread (the agent's pool driven by it too,
endpoint/inprocess.py), linked in memory (memlink.py) with a trust rule of
its own (relay/locallink.py); the real listening socket, which the program's
executor and the agent's large-payload transfers still use, keeps every
check it had. (On two threads, each task crossed the interpreter lock and a
thread wake-up each way between them: ~0.1 ms each on 2 cores.)

The process stops on SIGTERM (the agent first, then the relay), when its
parent is gone, or when the agent ends by itself (the relay then has no
endpoint to run anything). On SIGTERM the relay's turns keep serving while
the agent leaves (its pool's workers finish what they run, within
``stopgrace.STOP_GRACE``, and their results reach the program:
endpoint/leaving.py); the agent's end then stops the relay. A second
SIGTERM stops the relay at once.

``fedexec relay start --endpoint NAME`` runs the same pairing for a relay
started from the CLI (:func:`host_configured_endpoint`): its durable record,
and one configured endpoint of its owner on its loop. Only in ``local``
mode, where every session is the owner's (relay/locallink.py): the link in
memory gives its agent the owner's session, as the secret file would.
Without ``--endpoint``, ``fedexec relay start`` and ``fedexec endpoint start``
stay processes of their own.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import select
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import zmq

from . import protocol as P
from .config import ConfigError, EndpointConfig, endpoint_dir, endpoint_lock
from .endpoint.agent import EndpointAgent
from .gcpolicy import for_service
from .logs import configure as configure_logging
from .pidfile import PidFile
from .private import make_private, private_dir
from .privatedir import remove_stale_private_dirs
from .relay.server import Relay
from .worker import sandbox as sandboxes
from .worker.warmheap import ENV as WARM_HEAP_ENV

log = logging.getLogger("fedexec.colocated")

FINAL_FLUSH = 2.0   # seconds the relay may take, once its agent has stopped, to pass on what it sent last


class _RelayFailed(BaseException):
    """A relay turn failed inside the agent's wait for a transfer: not an
    Exception, so that the transfer's error handling lets it through to
    :meth:`Colocated.run`, which stops the process."""


class _RelayStopped(BaseException):
    """The relay was stopped (a second signal, its parent gone) while the
    agent waited for a transfer: as :class:`_RelayFailed`, it ends the loop
    at once rather than when the transfer gives up (minutes later)."""


class Colocated:
    """A relay and an endpoint agent linked in this process, on one thread:
    one poll loop gives each a turn (the relay's, the agent's, then the
    relay's again if the agent wrote to it), so a task or its result passes
    between them with no thread wake-up and no handing over of the
    interpreter lock."""

    def __init__(self, relay: Relay, config: EndpointConfig, *, parent_pid: int | None,
                 secret_file: str | None, state_dir: Path | None = None,
                 on_connected: Callable[[EndpointAgent], None] | None = None) -> None:
        self.relay = relay
        link = relay.open_local_link()
        self.agent = EndpointAgent(config, parent_pid=parent_pid, secret_file=secret_file, relay_link=link,
                                   state_dir=state_dir, on_connected=on_connected)
        self.agent.bulk.wait = self._relay_turns_while_waiting   # (its large-payload transfers ask the relay)
        self.agent_running = False   # between the agent's begin() and its shutdown
        self.exit_code = 0
        self.leaving = False   # asked to stop (a signal); the relay stops once the agent has left
        self._wait_poller: tuple[zmq.Socket, zmq.Poller] | None = None   # (_relay_turns_while_waiting's)

    def _on_signal(self, *_: object) -> None:
        """SIGTERM / SIGINT: the agent leaves first while the relay's turns
        still carry its results (its end stops the relay); a second signal,
        or one with no agent running, stops the relay at once."""
        if self.leaving or not self.agent_running:
            self.relay.stop()
        else:
            self.leaving = True
            self.agent.stop()

    def _relay_turns_while_waiting(self, sock: zmq.Socket, timeout_ms: int) -> bool:
        """The agent waits for the relay's answer on ``sock`` (a transfer
        link's, over the relay's real socket): the relay, on this same
        thread, takes its turns meanwhile, else it never answers. (Never
        called inside a relay turn: only the agent's turns transfer.)
        Whether the answer came within ``timeout_ms``. A relay turn that
        fails here stops the process (:class:`_RelayFailed`), as it would in
        the loop: the transfer's own error handling must not swallow it."""
        relay = self.relay
        if self._wait_poller is None or self._wait_poller[0] is not sock:   # (one link: made once)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            relay.register(poller)
            self._wait_poller = (sock, poller)
        poller = self._wait_poller[1]
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            left = max(0, math.ceil((deadline - time.monotonic()) * 1000))
            events = dict(poller.poll(min(left, relay.wait_ms())))
            if sock in events:
                return True
            try:
                relay.turn(events)
            except BaseException as exc:
                relay.stop()
                raise _RelayFailed(f"the relay failed during a transfer: {type(exc).__name__}: {exc}") from exc
            if relay.stopping:
                raise _RelayStopped()
            if time.monotonic() >= deadline:
                return bool(sock.poll(0))

    def _agent_turn(self, poller: zmq.Poller, events: dict) -> None:
        """The agent's turn; its end (it stopped, or failed) ends the relay's loop."""
        try:
            self.agent.turn(poller, events)
        except Exception:
            log.exception("the colocated endpoint agent failed")
            self.exit_code = 1
            self._end_agent()
            return
        if self.agent.stopping:
            self.exit_code = self.agent.exit_code
            self._end_agent()

    def _end_agent(self) -> None:
        """Shut the agent down, hand the relay what it sent last, and stop
        the relay: without its endpoint it runs nothing (the program sees the
        process end)."""
        self._shut_agent_down()
        try:
            self._last_turns()
        finally:
            self.relay.stop()

    def _shut_agent_down(self) -> None:
        self.agent_running = False
        try:
            self.agent._shutdown()
        except Exception:
            log.exception("the colocated endpoint agent did not stop cleanly")
            self.exit_code = 1

    def _last_turns(self) -> None:
        """Relay turns until what the agent sent last (results, its BYE) has
        gone to the program, or FINAL_FLUSH has passed."""
        relay = self.relay
        deadline = time.monotonic() + FINAL_FLUSH
        while True:
            relay.turn({})
            link, client = relay.local_link, relay.client_link
            waiting = client is not None and client.end.wants_write()
            if not ((link is not None and link.readable()) or waiting) or time.monotonic() >= deadline:
                return
            if waiting:   # (the program reads slowly: wait until its socket takes more)
                select.select([], [client.end.fileno()], [], 0.05)

    def run(self) -> int:
        """Serve until stopped; the exit code."""
        relay, agent = self.relay, self.agent
        link = relay.local_link
        assert link is not None
        relay.begin_serving(on_signal=self._on_signal)
        poller = zmq.Poller()
        try:
            relay.register(poller)
            agent.register(poller)
            self.agent_running = True   # (before begin: should it fail, the agent's sockets are closed below)
            agent.begin()
            while not relay.stopping:
                wait = relay.wait_ms()
                if self.agent_running:
                    wait = min(wait, agent.wait_ms())
                events = dict(poller.poll(wait))
                relay.turn(events)
                if self.agent_running and not relay.stopping:
                    self._agent_turn(poller, events)
                    if self.agent_running and link.readable():
                        relay.turn({})   # what the agent sent this turn goes on now, not after a poll
        except _RelayStopped:
            log.info("stopped during the endpoint's transfer")
        except _RelayFailed as exc:
            log.error("%s", exc)
            self.exit_code = 1
        finally:
            if self.agent_running:   # (the relay's loop has ended: nobody would read the agent's results)
                agent.stop_now()
                self._shut_agent_down()
            relay.end_serving()
        return self.exit_code


def configured_endpoint(name: str, address: str, auth: str, *, hold: bool) -> EndpointConfig:
    """The configured endpoint ``name``, checked for running inside the
    relay at ``address`` (``fedexec relay start --endpoint``); ValueError
    saying what stands in the way: another mode than ``local``, an address
    without a fixed port, a config that is missing or for another relay, a
    sandbox this machine cannot run, the endpoint already running.
    ``hold``: take the endpoint's lock for this process's life (the relay
    that will run it, before it takes its address); else only a check (the
    CLI's, before it starts the relay)."""
    if auth != "local":
        raise ValueError(f"--endpoint runs the endpoint inside the relay, linked as the relay's owner: only with "
                         f"--auth local, not {auth}")
    if address.rsplit(":", 1)[-1] in ("0", "*"):
        raise ValueError(f"--endpoint needs the relay on a fixed port (not {address}): its endpoint's config names "
                         "the relay's address")
    try:
        config = EndpointConfig.load(name)
    except ConfigError as exc:
        raise ValueError(f"--endpoint {name}: {exc}") from None
    if config.relay != address:
        raise ValueError(f"--endpoint {name}: it is configured for the relay at {config.relay}, not this one at "
                         f"{address} ('fedexec endpoint configure {name} --relay {address}' changes it)")
    try:
        sandboxes.check(config.sandbox)
    except sandboxes.SandboxUnavailable as exc:
        raise ValueError(f"--endpoint {name}: {exc}") from None
    running = PidFile(endpoint_dir(name) / "endpoint.json").read()
    if running:
        where = "inside a relay" if running.get("in_relay") else "on its own"
        raise ValueError(f"--endpoint {name}: it is already running {where} (pid {running['pid']})")
    if not endpoint_lock(name, hold=hold):
        raise ValueError(f"--endpoint {name}: it is already running (its lock is held)")
    return config


def host_configured_endpoint(relay: Relay, config: EndpointConfig, secret_file: str | None,
                             log_file: Path | None) -> int:
    """Serve ``relay`` with the configured endpoint ``config`` on its loop
    (``fedexec relay start --endpoint``), its lock held since
    :func:`configured_endpoint` (it runs once: config.py ``endpoint_lock``);
    the exit code.

    The endpoint's ``endpoint.json`` names this process, marked
    ``in_relay``, while it runs: ``fedexec endpoint status`` and ``list``
    show it, ``endpoint logs`` reads ``log_file`` (the relay's log),
    ``endpoint stop`` points at ``relay stop``. An endpoint its owner
    deleted is refused before anything is served. When the endpoint fails
    later, the relay stops too (as the embedded default's): the durable
    record keeps every task for the next start."""
    def refuse(why: str) -> SystemExit:
        relay.end_serving()   # (its discovery files and sockets go: nothing was served)
        return SystemExit(f"fedexec relay: --endpoint {config.name}: {why}")

    if config.endpoint_id in relay.deletions.deleted:
        raise refuse(f"endpoint {config.endpoint_id} was deleted by its owner at this relay "
                     "('fedexec endpoint delete'); configure a new one")
    pidfile = PidFile(endpoint_dir(config.name) / "endpoint.json")
    logged = {"log": str(log_file.resolve())} if log_file is not None else {}

    def write(agent: EndpointAgent, status: str) -> None:
        pidfile.write(endpoint_id=config.endpoint_id, relay=config.relay, status=status, workers=agent.workers,
                      in_relay=True, **logged)

    try:
        host = Colocated(relay, config, parent_pid=None, secret_file=secret_file,
                         state_dir=private_dir(endpoint_dir(config.name)),
                         on_connected=lambda agent: write(agent, "connected"))
    except Exception as exc:
        log.exception("endpoint %s could not start", config.name)
        raise refuse(f"could not start: {type(exc).__name__}: {exc}") from None
    write(host.agent, "connecting")
    log.info("endpoint %s (%s) runs inside the relay", config.name, config.endpoint_id)
    try:
        return host.run()
    finally:
        pidfile.remove()


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
    parser.add_argument("--client-fd", type=int, default=None,
                        help="the program's end of a socketpair: its executor's link to the relay (embedded.py)")
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
    if ns.client_fd is not None:
        relay.open_client_link(ns.client_fd)
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
