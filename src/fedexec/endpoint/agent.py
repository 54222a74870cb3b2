"""The endpoint agent: connects out to the relay and feeds its worker pools.

One poll loop serves two sockets: a DEALER to the relay and a ROUTER its
pools connect to. A pool (``fedexec.pool``, one process per node) runs the
workers; the agent does not care whether it runs beside it or on a cluster
node in a batch job: blocks of pools are started by the endpoint's provider
(``providers.py``) and their number follows the load (``scaling.py``).

*Credit.* The agent tells the relay how many more tasks it may send (a grant
in HELLO, then grants riding on RESULTS or in CREDIT messages), keeping as
many tasks here and at pools as its pools' workers can hold plus
``prefetch`` per worker, so a worker that finishes finds its next task
already at hand.

*Pools.* Tasks go to the pools with room, least loaded first. A pool that
goes quiet for ``heartbeats_missed`` heartbeat periods, whose job ended, or
that said BYE, is gone: the tasks it held go to other pools (those it had
started count as lost once, and fail with WorkerLost past
``worker_lost_retries``). A draining pool (its job's walltime is near) gets
no more tasks and gives back those it had not started.

*Resources.* A task asking for cores, memory or GPUs goes only to a pool
whose node could hold it (one no node could ever hold fails at once); one
asking for several nodes waits for that many pools of one block, kept for
it (``placement.py``).
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import math
import os
import secrets
import shutil
import signal
import threading
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import zmq

from .. import protocol as P
from .. import samehost
from ..framelink import StreamEnd, keep_polled
from ..memlink import MemoryEnd, memory_link
from ..outbox import ResultOutbox
from ..stopgrace import STOP_GRACE, stop_message
from ..auth import REFUSED_GRACE, HandshakeWatch, NoHandshake
from ..config import ConfigError, EndpointConfig
from ..dataref import wrap_arguments as wrap_with_files
from ..dispatch import QueuedTask, held_per_worker, take_out, worker_batch_size
from ..endpoint_status import report_of
from ..serialize import is_data
from ..worker import sandbox as sandboxes
from ..transfer import is_big, is_local
from .bulk import EndpointTransfers
from .graph import HeldTasks
from .refs import RefCache
from . import placement
from .pools import PoolLink
from .inprocess import InProcessProvider
from .leaving import AgentLeaving
from .providers import make_provider, pool_command
from .scaling import BlockScaler
from .sockdir import make_socket_dir, remove_stale_socket_dirs

log = logging.getLogger("fedexec.endpoint")

POLL_MS = 100
MAX_MESSAGES_PER_TURN = 2000
TICK_INTERVAL = 0.1
SCALE_INTERVAL = 0.25
STATUS_INTERVAL = 1.0
HANDSHAKE_CHECK = 1.0
POOL_SECRET_ENV = "FEDEXEC_POOL_SECRET"
UNREACHABLE_PAUSE = 0.5   # seconds a pool we could not send to gets no tasks
HELLO_ANSWER_WAIT = 1.0   # at most this long (or a heartbeat period) a HELLO waits for its WELCOME before an
                          # "unknown" beat calls for another (those answering beats from an outage come in a burst)


class EndpointAgent(AgentLeaving):
    """Runs one configured endpoint until stopped."""

    def __init__(self, config: EndpointConfig, *, parent_pid: int | None = None,
                 on_connected: Callable[["EndpointAgent"], None] | None = None,
                 secret_file: str | None = None, state_dir: Path | None = None,
                 relay_link: tuple[zmq.Context, MemoryEnd] | None = None) -> None:
        """``relay_link``: (context, the agent's end of a link in memory) of
        a relay in this process whose loop runs this agent's turns
        (``Relay.open_local_link``, the embedded default's
        ``fedexec.colocated``): the agent talks to it there, its sockets in
        that context, instead of at ``config.relay`` (still where large
        payloads travel, relay/bulk.py)."""
        config.validate()
        sandboxes.check(config.sandbox)  # a missing tool fails the endpoint's start, by name
        self.config = config
        self.secret_file = secret_file
        self.state_dir = state_dir          # where status.json (and block scripts) go; None: embedded
        self.started_at = time.monotonic()
        self.exit_code = 0
        self.parent_pid = parent_pid
        self.on_connected = on_connected
        self.workers_per_pool = config.max_workers or None   # None: each pool's cores
        self.task_seconds: float | None = None   # moving average of run time, from the pools
        self.relay_link = relay_link
        self.ctx = relay_link[0] if relay_link is not None else zmq.Context()   # (the relay's ends with it)
        self.relay = self._relay_socket()
        # a same-host link to the relay when it is this user's local-mode relay on this host (samehost.py):
        # everything to and from the relay goes over it, ZeroMQ's socket beside it (used if no link is made)
        self.stream: StreamEnd | None = None
        # may look for a same-host link: until a HELLO finds none (ZeroMQ from then on, see _hello)
        self.same_host = relay_link is None
        self.stream_ended = False   # no link now, though one is expected: nothing goes to the relay until a HELLO
        self.link_grace_until = time.monotonic() + samehost.LINK_GRACE   # (see _hello)
        self._ended_streams: list[StreamEnd] = []   # links that ended, open until off the poller
        self._stream_poller: zmq.Poller | None = None   # the loop's (register)
        self.stream_polled: tuple[int, int] | None = None   # (descriptor, events) it is polled for
        remove_stale_socket_dirs()   # those of agents killed before they could remove theirs
        self._sock_dir = make_socket_dir()
        self.pool_sock = P.limit_frames(self.ctx.socket(zmq.ROUTER))
        self.pool_sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.pool_sock.setsockopt(zmq.LINGER, 0)
        self.pool_sock.setsockopt(zmq.SNDHWM, 0)
        self.pool_sock.setsockopt(zmq.RCVHWM, 0)
        self.pool_secret = secrets.token_urlsafe(24)
        self.pool_key = ""   # the pool socket's CURVE public key (Z85); "" over ipc
        try:
            self.pool_address = self._bind_pool_socket()
            self.scaler = self._make_scaler()
        except Exception:  # leave nothing behind
            self.pool_sock.close(linger=0)
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            raise
        self.bulk = EndpointTransfers(config.relay, secret_file, config.relay_public_key or None, self._sock_dir)
        self.refs = RefCache(self.bulk._link, self.bulk.spool,   # DataRefs, fetched once per user (refs.py)
                             config.ref_cache_bytes)
        self.pools: dict[bytes, PoolLink] = {}
        # pools this agent's loop steps (inprocess.py): the agent's end of each one's link in memory
        self.linked_pools: dict[bytes, MemoryEnd] = {}
        self.queue: deque[QueuedTask] = deque()
        self.multi = placement.MultiNode()   # tasks asking for several nodes of a block (placement.py)
        self.caps = placement.UserCaps(config.max_cores_per_user, config.max_gpus_per_user,   # (other users')
                                       config.max_nodes_per_user, config.multi_node_for_others, config.name)
        self.functions: dict[bytes, Any] = {}
        self.at_pool: dict[bytes, PoolLink] = {}        # task_id -> the pool holding it
        self.relay_credit = 0                           # tasks the relay may still send us
        self.relay_backlog = 0                          # tasks waiting at the relay for us, as it last said
        self.outbox = ResultOutbox()   # results and start notices for the relay
        # results sent to the relay that it has not stored yet: sent again if
        # the relay restarts before its ACK
        self.unstored: dict[bytes, tuple[int, Any, list[float] | None]] = {}
        self.max_payload = P.DEFAULT_MAX_PAYLOAD   # the relay's, from its WELCOME
        self.graph = HeldTasks()   # tasks held for dependencies running here (graph.py)
        self.allowed_functions: frozenset[bytes] | None = (
            frozenset(bytes.fromhex(h) for h in config.allowed_functions) if config.allowed_functions else None)
        self.data_only = config.takes_data_only()   # arguments and results as plain data, never pickles
        self.holding: set[bytes] = set()   # ids of the tasks here (queued or at pools) until their outcome
        # when the HELLO not yet answered by a WELCOME went (None: none is): the relay's "unknown"
        # answers to the heartbeats sent before it, while the relay was down, call for no other
        self.hello_sent_at: float | None = None
        self.stopping = False
        self.connected = False
        self._init_leaving()   # a graceful stop (leaving.py)

    @property
    def workers(self) -> int:
        """Workers this endpoint may run at once: those of its pools now, or
        if more, those of ``max_blocks`` full blocks (what clients size their
        concurrency by; Dask reads it)."""
        provider = self.config.provider
        most = provider.max_blocks * provider.nodes_per_block * self.config.workers() \
            if provider.type != "manual" else 0
        return max(most, sum(pool.workers for pool in self.pools.values()))

    def _relay_socket(self) -> zmq.Socket | MemoryEnd:
        if self.relay_link is not None:   # in memory: no handshake to watch, nothing to encrypt (locallink.py)
            self.handshake: HandshakeWatch | NoHandshake = NoHandshake()
            return self.relay_link[1]
        self.routing_id = P.new_endpoint_routing_id()
        sock = P.dealer(self.ctx, 1000, self.routing_id)
        self.handshake = HandshakeWatch(sock, self.config.relay, secret_file=self.secret_file,
                                        relay_key=self.config.relay_public_key or None)
        return sock

    def _bind_pool_socket(self) -> str:
        """Pools on threads of this process reach the agent over inproc, other
        local pools over ipc, pools on other nodes over TCP
        at the provider's ``address`` (default: this host's address)."""
        provider = self.config.provider
        if provider.pools_in_process:   # pools on threads of this process (inprocess.py): reachable from nowhere else
            self.pool_sock.bind(f"inproc://fedexec-pools-{secrets.token_hex(8)}")
        elif provider.type == "local" and not provider.address:
            self.pool_sock.bind(f"ipc://{self._sock_dir}/pools")
        else:
            host = provider.address or socket.gethostbyname(socket.gethostname())
            if not provider.address and provider.type in ("slurm", "parsl") and host.startswith("127."):
                log.warning("pools will be told to connect to %s, a loopback address: pools on other nodes "
                            "cannot reach it; set [provider] address (--pool-address) to this host's address "
                            "on the cluster network", host)
            self.pool_sock.setsockopt(zmq.IPV6, 1)
            # over the network pools get the endpoint's public key: they talk
            # only to it, and nothing (tasks, results, the pool secret) is in
            # clear text on the wire
            public, secret = zmq.curve_keypair()
            self.pool_key = public.decode()
            self.pool_sock.curve_server = True
            self.pool_sock.curve_secretkey = secret
            bracketed = f"[{host}]" if ":" in host else host
            address = f"tcp://{bracketed}:{provider.port or '*'}"
            try:
                self.pool_sock.bind(address)
            except zmq.ZMQError as exc:
                raise ConfigError(f"cannot listen for pools on {address}: {exc}; check [provider] address and "
                                  "port") from None
        return self.pool_sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def _make_scaler(self) -> BlockScaler | None:
        provider_config = self.config.provider
        script_dir = (self.state_dir / "blocks") if self.state_dir is not None else Path(self._sock_dir)
        script_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(script_dir, 0o700)   # batch scripts carry the pool secret
        if provider_config.type == "manual":
            self._publish_pool_address()
        provider = (InProcessProvider(self.ctx, self.pool_address, self.pool_secret, self.config.max_workers,
                                      link=self._link_pool)
                    if provider_config.pools_in_process
                    else make_provider(provider_config, script_dir, self.config.name, self.config.max_workers))
        # pools in this process are stepped by this agent's loop (inprocess.py)
        self.local_pools = provider if isinstance(provider, InProcessProvider) else None
        if provider is None:
            return None
        parent = os.getpid() if provider_config.type == "local" else None
        return BlockScaler(
            provider_config, provider,
            lambda block_id: pool_command(provider_config.python, self.pool_address, self.pool_key, block_id,
                                          self.config.max_workers, provider_config.drain, parent,
                                          logging.getLevelName(logging.getLogger().getEffectiveLevel())),
            {POOL_SECRET_ENV: self.pool_secret}, self.workers_per_pool)

    def _publish_pool_address(self) -> None:
        """For pools started by hand (provider ``manual``): where to connect
        and the secret to show, readable by this user only."""
        if self.state_dir is None:
            return
        path = self.state_dir / "pools.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"address": self.pool_address, "key": self.pool_key, "secret": self.pool_secret}, f)

    def _check_handshake(self) -> None:
        if self.handshake.read():   # reconnected with other credentials: what was sent went with the old
            self._hello()
        refusal = self.handshake.refused_for(REFUSED_GRACE)
        if refusal and not self.connected:
            log.error("%s", refusal)  # never got in: retrying will not help
            self.exit_code = 2
            self.stopping = True

    # -- main loop -----------------------------------------------------------
    def run(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        self.begin()
        poller = zmq.Poller()
        try:
            self.register(poller)
            while not self.stopping:
                self.turn(poller, dict(poller.poll(self.wait_ms())))
        finally:
            self._shutdown()

    # -- the loop in parts: run's, or the one it shares with a relay in this process (colocated.py) -----------
    def begin(self) -> None:
        """Before the first turn: the scaler started, the relay greeted."""
        if self.scaler is not None:
            self.scaler.start()
        self._hello()
        self.next_tick = self.next_beat = self.next_scale = self.next_status = self.next_handshake = \
            time.monotonic()

    def register(self, poller: zmq.Poller) -> None:
        """Put what the agent's turns read on ``poller`` (in-process pools add
        theirs as they start; a link in memory is looked at every turn instead)."""
        if self.relay_link is None:
            poller.register(self.relay, zmq.POLLIN)
            self._stream_poller = poller
            self._poll_stream()
        poller.register(self.pool_sock, zmq.POLLIN)
        if self.handshake.monitor is not None:
            poller.register(self.handshake.monitor, zmq.POLLIN)

    def wait_ms(self) -> int:
        """How long the poll before the next turn may wait."""
        if (self.relay_link is not None and self.relay.readable()) or self._linked_pools_readable():
            return 0
        wait = self.outbox.wait_ms(time.monotonic(), POLL_MS)
        if self.local_pools is not None:
            wait = self.local_pools.wait_ms(wait)
        return wait

    def turn(self, poller: zmq.Poller, events: dict[Any, int]) -> None:
        """One turn of the loop: what ``events`` (a poll's on ``poller``)
        says is ready, then whatever is due. With a relay in this process
        (``relay_link``), the link is read whenever it holds messages: the
        relay shares this thread, and wrote them since the poll."""
        workers_read = self.local_pools is not None and self.local_pools.step_results(poller, events)
        pool_sock_ready = self.pool_sock in events or bool(
            workers_read and self.pool_sock.getsockopt(P.EVENTS) & P.POLLIN)
        if pool_sock_ready or self._linked_pools_readable():
            self._read_pools(pool_sock_ready)
        if (self.relay.readable() if self.relay_link is not None else self.relay in events) or (
                self.stream_polled is not None and events.get(self.stream_polled[0], 0) & P.POLLIN):
            self._read_relay()
        now = time.monotonic()
        if self.leave_asked:   # stopping: the pools finish what they run first (leaving.py)
            self._leave_turn(now)
        if self.handshake.monitor in events or now >= self.next_handshake:
            self.next_handshake = now + HANDSHAKE_CHECK
            self._check_handshake()
        if not self.leaving:
            self._assign()
        if now >= self.next_tick:
            self.next_tick = now + TICK_INTERVAL
            if self.stream_ended:   # no link, one expected: introduced over the next link, or ZeroMQ (_hello)
                self._hello()
            self._drop_silent_pools(now)
            if self.parent_pid and os.getppid() != self.parent_pid:
                log.info("parent process %d is gone; stopping", self.parent_pid)
                self.stopping = True
        if now >= self.next_scale and self.scaler is not None and not self.leaving:
            self.next_scale = now + SCALE_INTERVAL
            self._scale(now)
        if now >= self.next_beat:
            self.next_beat = now + self.config.heartbeat_period
            self._send_relay(P.encode(P.HEARTBEAT, {"st": self._beat_status()}))
            beat = P.encode(P.HEARTBEAT)
            for pool_id in self.pools:
                self._send_pool(pool_id, beat)
        if now >= self.next_status:
            self.next_status = now + STATUS_INTERVAL
            self._write_status(now)
        if self.stream is not None or self.stream_polled is not None or self._ended_streams:
            self._poll_stream()
        if self.local_pools is not None:   # this turn's tasks reach their workers now
            self.local_pools.step(poller, events, workers_read)
        if self._flush_due(now):   # last: the relay, woken by it, waits for nothing more here
            self._flush()
        elif not self.outbox.rows:   # (start notices alone wait: outbox.START_DELAY)
            self._offer_spare_credit()

    def _hello(self) -> None:
        """Introduce this endpoint: what it holds is every task here without
        an outcome and every outcome the relay has not stored yet (those the
        relay counts as sent here, so that it sends none of them again; the
        outcomes follow after its WELCOME)."""
        if self.same_host and self.stream is None:   # (the relay's, on this host; a new one after a restart)
            self.stream = samehost.connect(self.config.relay, self.routing_id, secret_file=self.secret_file)
            if self.stream is None:
                if time.monotonic() < self.link_grace_until and samehost.expected(
                        self.config.relay, secret_file=self.secret_file):
                    self.stream_ended = True   # its relay is starting: nothing yet, tried again next tick
                    return
                self.same_host = False   # ZeroMQ for good (never from ZeroMQ to a link: samehost.py)
        self.stream_ended = False
        holding = list(self.holding | self.unstored.keys()) if self.unstored else list(self.holding)
        more = holding[P.MAX_ITEMS:]   # a message's limit: the rest follow in HOLDING messages
        holding = holding[:P.MAX_ITEMS]
        sent = self._send_relay(P.encode(P.HELLO, {
            "role": "endpoint", "id": self.config.endpoint_id, "name": self.config.name,
            "py": P.PYTHON_VERSION, "workers": self.workers, "capacity": self._reset_credit(),
            "hb": self.config.heartbeat_period, "hbm": self.config.heartbeats_missed, "holding": holding,
            "functions": sorted(self.allowed_functions) if self.allowed_functions is not None else None,
            "data_only": self.data_only, "meta": self._meta(),
        }))
        self.hello_sent_at = time.monotonic() if sent else None   # (not sent: the next "unknown" sends one)
        for part in P.chunks(more):
            self._send_relay(P.encode(P.HOLDING, {"tids": part}))
        self._poll_stream()

    def _meta(self) -> dict[str, str]:
        """Where this endpoint runs, for its users (Client.get_endpoint_metadata)."""
        from .. import __version__
        return {"host": socket.gethostname()[:256], "fx": str(__version__)[:64],
                "provider": str(self.config.provider.type)[:64]}

    def _beat_status(self) -> dict[str, Any]:
        """What a heartbeat tells the relay of this endpoint, for its users
        (Client.get_endpoint_status) and the dashboard: workers, idle
        workers, tasks queued here, blocks and their scheduler job ids
        (endpoint_status.py)."""
        pools = self.pools.values()
        blocks = self.scaler.describe() if self.scaler is not None else []
        return report_of({"workers": sum(pool.workers for pool in pools),
                          "idle_workers": sum(pool.idle_workers for pool in pools),
                          "queued": len(self.queue), "blocks": blocks})

    def _send_relay(self, frames: list[Any]) -> bool:
        """Send to the relay without ever blocking the loop: with no
        connection to queue on (the relay is down, or refused our handshake,
        which libzmq does not retry), the message is not sent. Nothing is
        lost by that: results wait in ``unstored`` and go again after the
        next WELCOME, HELLO resets the credit, and beats are just skipped."""
        if self.stream is not None:
            if self.stream.send_message(frames):
                return True
            self._drop_stream()
        if self.stream_ended:   # (until the next HELLO has chosen the transport: _drop_stream)
            return False
        try:
            self.relay.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def _drop_stream(self) -> None:
        """The same-host link ended (its relay stopped or restarted). Nothing
        goes to the relay until the HELLO of a later tick takes a new relay's
        link, or ZeroMQ's socket for good (samehost.py; dispatcher.py
        ``_drop_link`` says why); results wait in ``unstored`` meanwhile. It
        stays open until it is off the poller (_poll_stream), so that its
        descriptor's number is not a new one's meanwhile."""
        if self.stream is not None:
            self._ended_streams.append(self.stream)
            self.stream = None
            self.stream_ended = True
            self.link_grace_until = time.monotonic() + samehost.LINK_GRACE

    def _poll_stream(self) -> None:
        """Write what waits on the same-host link, and keep the loop's poller
        on it as it is now: for writing too while its socket has not taken
        everything, off it once it has ended."""
        if self.stream is not None:
            self.stream.flush()
            if self.stream.closed:
                self._drop_stream()
        poller = self._stream_poller
        if poller is None:
            return
        self.stream_polled = keep_polled(poller, self.stream_polled, self.stream)
        for old in self._ended_streams:
            old.close()
        self._ended_streams.clear()

    # -- credit ----------------------------------------------------------------
    def batch_size(self) -> int:
        """Tasks a pool hands a worker at once now (``dispatch.worker_batch_size``)."""
        return worker_batch_size(self.task_seconds, self.config.worker_batch)

    def worker_depth(self) -> int:
        """Tasks to keep per worker at the pools: what a worker may hold at
        once in batches (see ``PoolManager._assign``), or, for tasks going one
        at a time, a few milliseconds of them (``dispatch.held_per_worker``)."""
        size = self.batch_size()
        return 2 * size if size > 1 else held_per_worker(self.task_seconds)

    def capacity(self) -> int:
        """Tasks to keep here and at pools: what each worker may hold, plus
        ``prefetch`` more per worker waiting at its pool."""
        return self.open_workers() * (self.worker_depth() + self.config.prefetch)

    def open_workers(self) -> int:
        return sum(pool.workers for pool in self.pools.values() if not pool.draining)

    def _reset_credit(self) -> int:
        """On (re)introduction the relay's credit for us becomes this."""
        self.relay_credit = max(0, self.capacity() - self._occupied())
        return self.relay_credit

    def _occupied(self) -> int:
        """Tasks here that take up capacity: those held for dependencies
        (graph.py), up to ``graph.extra(capacity)`` of them, do not, so that
        the tasks after them in a chain can be here before they are due."""
        held = len(self.graph.held)
        occupied = len(self.holding) - (min(held, self.graph.extra(self.capacity())) if held else 0)
        if self.caps.parked or self.caps.ready:   # over their user's cap: none of them do either, so that they
            # hold up no other user's tasks (the relay's queue for this endpoint is first come, first served:
            # counted, they would stop the credit that brings the next user's task); how many one user can
            # have parked here is bounded by what their quota lets them have waiting at the relay
            occupied -= self.caps.parked_count()
        return occupied

    def _offer_spare_credit(self) -> None:
        """When capacity grew (tasks turned out fast), say so without waiting
        for results to carry the grant."""
        spare = self.capacity() - self._occupied() - self.relay_credit
        if spare >= max(1, self.capacity() // 4):
            self._send_relay(P.encode(P.CREDIT, {"n": self._grant()}))

    def _grant(self) -> int:
        """Credit to give the relay now, and count it as given."""
        grant = self.capacity() - self._occupied() - self.relay_credit
        if grant <= 0:
            return 0
        self.relay_credit += grant
        return grant

    def _shutdown(self) -> None:
        log.info("endpoint %s stopping", self.config.name)
        self._flush()
        self._send_relay(P.encode(P.BYE))
        stop = P.encode(P.STOP)
        for pool_id in self.pools:
            self._send_pool(pool_id, stop)
        if self.scaler is not None:
            self.scaler.shutdown()
        self.pools.clear()
        self._write_status(time.monotonic(), final=True)
        self.handshake.close()
        if self.stream is not None:
            self.stream.flush()   # (its BYE: what the socket takes now)
            self._drop_stream()
        for old in self._ended_streams:
            old.close()
        self.relay.close(linger=500)
        self.pool_sock.close(linger=1000)
        self.refs.close()
        self.bulk.close()
        if self.relay_link is None:   # (a relay's context is the relay's to end)
            self.ctx.term()
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    # -- relay side ----------------------------------------------------------
    def _read_relay(self) -> None:
        stream = self.stream
        if stream is not None:
            self._on_relay_frames(stream.read())
            if stream.closed and self.stream is stream:   # the relay stopped: nothing goes until a HELLO
                self._drop_stream()
        self._on_relay_frames(P.waiting_messages(self.relay, MAX_MESSAGES_PER_TURN))

    def _on_relay_frames(self, messages: Any) -> None:
        for frames in messages:
            try:
                msg = P.decode(frames)
                self._on_relay_message(msg)
            except Exception as exc:  # never let one message stop the endpoint
                log.warning("ignored a malformed message from the relay: %s: %s", type(exc).__name__, exc)

    def _well_formed(self, rows: list[Any], blobs: Any) -> list[Any]:
        """The rows of a TASKS message that are well formed; each other one
        with a task id fails alone, saying why, so that one malformed row (a
        user's odd option, a relay of another version) never holds up the
        other tasks of its message, other users' among them."""
        good = []
        for row in rows:
            try:
                P.task_row(row, P.TRACE_AT_ENDPOINT)
                if type(row[2]) is not bytes:   # (inline bytes refer to no frame)
                    P.blob_at(blobs, row[2])
                if row[3] != -1:
                    P.blob(blobs, row[3])
            except P.ProtocolError as exc:
                task_id = row[0] if isinstance(row, list) and row and isinstance(row[0], bytes) else None
                log.warning("refused a malformed task row from the relay (%s): %s",
                            task_id.hex() if task_id else "no task id", exc)
                if task_id is not None and len(task_id) == 16 and task_id not in self.holding:
                    self._result(task_id, P.FAILED,
                                 P.pack_failure(P.REJECTED, f"the endpoint refused the task as malformed: {exc}"))
                continue
            good.append(row)
        return good

    def _on_relay_message(self, msg: P.Message) -> None:
        t = msg.type
        if t == P.TASKS:
            blobs = msg.blobs
            rows = msg.fields["tasks"]
            if not isinstance(rows, list):
                raise P.ProtocolError("tasks must be a list")
            self.relay_credit = max(0, self.relay_credit - len(rows))
            rows = self._well_formed(rows, blobs)
            self._note_backlog(msg.fields)
            now = time.time()
            for row in rows:
                if len(row) == 7 and "tr" in row[6]:
                    row[6]["tr"].append(now)
                if len(row) == 7 and "nl" in row[6]:   # a node list is the endpoint's to give
                    del row[6]["nl"]
                fn_hash, args_index, fn_index = row[1], row[2], row[3]
                mismatch = ""
                if fn_index != -1:   # a body that is not what its hash names is never stored, forwarded or run
                    body = P.blob(blobs, fn_index)
                    mismatch = P.body_mismatch(fn_hash, body)
                    if not mismatch:
                        self.functions[fn_hash] = body
                if row[0] in self.holding:  # sent twice (the relay re-sent it): one copy runs
                    log.info("ignored a second copy of task %s, which is here already", row[0].hex())
                    continue
                if row[0] in self.unstored and self._ran_here(row[0]):
                    continue
                if mismatch:
                    log.warning("refused task %s: %s", row[0].hex(), mismatch)
                    self._result(row[0], P.FAILED, P.pack_failure(
                        P.REJECTED, f"endpoint {self.config.name!r} refused the task: {mismatch}"))
                    continue
                if self.allowed_functions is not None and fn_hash not in self.allowed_functions:
                    # the relay checks this too; a relay that did not is not trusted with it
                    log.warning("refused task %s: function %s is not on this endpoint's allow-list",
                                row[0].hex(), fn_hash.hex())
                    self._result(row[0], P.FAILED, P.pack_failure(
                        P.NOT_ALLOWED, f"function {fn_hash.hex()} is not on the allow-list of endpoint "
                                       f"{self.config.name!r}"))
                    continue
                args = args_index if type(args_index) is bytes else P.blob_at(blobs, args_index)
                if self.data_only and not is_data(args):
                    # refused before any worker could load it: a pickle can run code as it loads
                    log.warning("refused task %s: its arguments are not plain data", row[0].hex())
                    self._result(row[0], P.FAILED, P.pack_failure(
                        P.NOT_ALLOWED, f"endpoint {self.config.name!r} takes only plain data (data_only), and this "
                                       f"task's arguments are not in the data-only format (a pickle?); they "
                                       f"were not loaded"))
                    continue
                if is_local(args):
                    # only this agent makes local references (to files it fetched): one from
                    # the relay would have a worker load a file of the client's choosing
                    log.warning("refused task %s: its arguments name a local file", row[0].hex())
                    self._result(row[0], P.FAILED, P.pack_failure(
                        P.REJECTED, f"endpoint {self.config.name!r} refused the task: its arguments are a "
                                    "reference to a file on the endpoint, which only the endpoint makes"))
                    continue
                if is_big(args):   # uploaded to the relay: fetched into a file here, read by the worker
                    args, why = self.bulk.fetch_arguments(row[0], args)
                    if args is None:
                        log.warning("task %s failed: %s", row[0].hex(), why)
                        self._result(row[0], P.FAILED, P.pack_failure(P.LOST, why))
                        continue
                if len(row) == 7 and "d" in row[6]:   # waits here for tasks sent before it
                    self._hold_dependent(QueuedTask(row, args))
                    continue
                self._admit(QueuedTask(row, args))
        elif t == P.CANCEL:
            self._cancel(set(P.task_ids(msg.fields["tids"])))
        elif t == P.REFS_GONE:
            self.refs.gone(msg.fields.get("refs"))
        elif t == P.HEARTBEAT:
            self._note_backlog(msg.fields)
            if msg.fields.get("unknown") and not self._hello_unanswered():
                log.warning("the relay no longer knows this endpoint; introducing it again")
                self._hello()
        elif t == P.WELCOME:
            self.hello_sent_at = None
            limit = msg.fields.get("max_payload")
            if type(limit) is int and limit > 0:
                self.max_payload = limit
            self._resend_unstored()
            if not self.connected:
                self.connected = True
                if self.on_connected is not None:
                    self.on_connected(self)
        elif t == P.ACK:
            for task_id in P.task_ids(msg.fields["tids"]):
                self.unstored.pop(task_id, None)
                if self.bulk.kept:
                    self.bulk.acknowledged(task_id)
        elif t == P.ERROR:
            if msg.fields.get("deleted"):   # its owner deleted it at the relay: retrying will never help
                log.error("the relay at %s refused this endpoint: %s; stopping", self.config.relay,
                          P.clip(str(msg.fields.get("msg")), 500))
                self.exit_code = 2
                self.stopping = True
            elif msg.fields.get("auth") and self.connected and self.handshake.renew():
                log.warning("the relay ended this endpoint's session (%s); reconnected with renewed credentials",
                            msg.fields.get("msg"))
                self._hello()
            elif msg.fields.get("auth") or msg.fields.get("refused"):
                why = f"the relay at {self.config.relay} refused this endpoint: {msg.fields.get('msg')}"
                if self.connected:
                    log.warning("%s; trying again", why)
                else:  # never got in: retrying will not help
                    log.error("%s", why)
                    self.exit_code = 2
                    self.stopping = True
            else:
                log.warning("relay reported an error: %s", msg.fields.get("msg"))
        else:
            raise P.ProtocolError(f"unexpected message type {t!r} from the relay")

    def _ran_here(self, task_id: bytes) -> bool:
        """A task sent again whose outcome here the relay has not stored (it
        restarted): if it ran, that outcome goes again instead of a second
        run; if it was only dropped (cancelled, or failed for a dependency
        dropped here, both as the relay asked after its restart), it runs
        now. Whether it ran."""
        status, blob, trace = self.unstored[task_id]
        if status == P.CANCELLED:
            ran = False
        elif status == P.FAILED:
            try:
                ran = P.unpack_failure(blob).get("kind") != P.DEPENDENCY
            except Exception:
                ran = True
        else:
            ran = True
        if ran:
            log.info("task %s came again after it ran here: its outcome goes again", task_id.hex())
            self.outbox.add(task_id, status, blob, trace)
        else:
            del self.unstored[task_id]
        return ran

    def _hello_unanswered(self) -> bool:
        """Whether a HELLO went a moment ago and its WELCOME has not come
        (another would make the relay take this endpoint for a new
        connection again, and put back in its queue what was sent here
        since the first)."""
        sent = self.hello_sent_at
        return sent is not None and time.monotonic() - sent < min(HELLO_ANSWER_WAIT, self.config.heartbeat_period)

    def _cancel(self, task_ids: set[bytes]) -> None:
        """Drop those queued here; pass the rest on to the pools holding them
        (which drop them, or say again that they are running: the client's
        cancel() waits for one answer or the other). One that has run here
        keeps its outcome."""
        if self.unstored:
            task_ids = task_ids - self.unstored.keys()
        ask: dict[bytes, list[bytes]] = {}
        for task_id in task_ids:
            pool = self.at_pool.get(task_id) or (self.graph.pool_of(task_id) if self.graph else None)
            if pool is not None:
                ask.setdefault(pool.pool_id, []).append(task_id)
        for pool_id, tids in ask.items():
            for part in P.chunks(tids):
                self._send_pool(pool_id, P.encode(P.CANCEL, {"tids": part}))
        for task in take_out(self.queue, task_ids):
            self._result(task.row[0], P.CANCELLED, b"")
        if self.multi.waiting:
            for task in take_out(self.multi.waiting, task_ids):
                self._result(task.row[0], P.CANCELLED, b"")
        if self.caps.parked or self.caps.ready:   # waiting for their user's share (placement.UserCaps)
            for task in self.caps.take_out(task_ids):
                self._result(task.row[0], P.CANCELLED, b"")
        if self.graph:
            for task_id in self.graph.cancel(task_ids):
                self._result(task_id, P.CANCELLED, b"")

    def _note_backlog(self, fields: dict[str, Any]) -> None:
        backlog = fields.get("backlog")
        if type(backlog) is int and backlog >= 0:
            self.relay_backlog = backlog

    def _resend_unstored(self) -> None:
        """After (re)introduction: results the relay may have lost go again
        (it ignores those it has, and acknowledges them all)."""
        if not self.unstored:
            return
        blobs = P.Blobs()
        rows = [blobs.result_row(task_id, *outcome) for task_id, outcome in self.unstored.items()]
        log.info("sending %d result(s) again that the relay had not stored", len(rows))
        for frames in P.results_messages(rows, blobs.frames):
            self._send_relay(frames)

    def _result(self, task_id: bytes, status: int, blob: Any, trace: list[float] | None = None,
                local: bytes | None = None) -> None:
        """(``local``: a large result's file, kept for the tasks held here for it, bulk.py)"""
        self.outbox.add(task_id, status, blob, trace)
        self.unstored[task_id] = (status, blob, trace)
        self.holding.discard(task_id)
        if self.multi.pools:   # the nodes kept for a multi-node task (running or waiting) take others again
            self.multi.release(task_id)
        if self.caps.held:   # its user's share of the endpoint (placement.UserCaps)
            self.caps.release(task_id)
        if self.graph.waiting_on:   # tasks held here may wait for it
            self._dependency_finished(task_id, status, blob if local is None else local)
        if self.bulk.argument_files or self.bulk.keeping or self.bulk.fetched_for:   # its large files go
            self.bulk.done(task_id)
        if self.refs.by_task:   # the DataRefs it used may go again
            self.refs.done(task_id)

    def _hold_dependent(self, task: QueuedTask) -> None:
        """A task whose dependencies were sent here before it: queued once
        their results are here (at once, if they are), held until then."""
        task_id = task.row[0]
        dependencies = task.row[6]["d"]
        finished: Any = self.unstored
        kept = [d for d in dependencies if d in self.bulk.kept] if self.bulk.kept else None
        if kept:   # large results kept in their files here: this task takes those too (bulk.py)
            finished = {d: self.unstored[d] for d in dependencies if d in self.unstored}
            for dependency in kept:
                if dependency in finished:
                    finished[dependency] = (P.OK, self.bulk.kept_result(dependency), None)
                self.bulk.keep(dependency, self.bulk.kept_result(dependency), [task_id])
        ready, failure = self.graph.hold(task, dependencies, self.holding, finished)
        if failure is not None:
            self._result(task_id, P.FAILED, failure)
            return
        self.holding.add(task_id)
        if ready is not None:
            self._admit(ready)
        else:
            self._to_pool_held(task)

    def _admit(self, task: QueuedTask) -> None:
        """Queue a task whose arguments are complete (its dependencies'
        results wrapped in, if it had any); one naming DataRefs gets their
        files first (refs.py), or fails if they cannot be had."""
        row = task.row
        if len(row) == 7 and ("rf" in row[6] or "dr" in row[6]):
            task = self._with_files(task)
            if task is None:
                return
        if len(row) == 7 and "rs" in row[6] and self._placed_apart(task):
            return
        self.holding.add(row[0])
        self.queue.append(task)

    def _with_files(self, task: QueuedTask) -> QueuedTask | None:
        """A task naming DataRefs (``rf``) or its dependencies' large results
        held at the relay (``dr``, relay/kept.py) with their files (fetched
        now, if not here yet) wrapped around its arguments; None if it
        failed because one could not be had."""
        row = task.row
        options = row[6]
        user = options.get("u") or ""
        files = None
        if "dr" in options:
            files, why = self.bulk.fetch_results(row[0], user, options["dr"])
            if files is None:
                log.warning("task %s failed: %s", row[0].hex(), why)
                self._result(row[0], P.FAILED, P.pack_failure(P.LOST, why))
                return None
            rest = {key: value for key, value in options.items() if key != "dr"}   # (the agent's alone)
            row = row[:6] + [rest] if rest else row[:6]
        if "rf" in options:
            args, why, ref_id = self.refs.prepare(row[0], user, options["rf"], P.as_bytes(task.args), files)
            if args is None:
                log.warning("task %s failed: %s", row[0].hex(), why)
                self._result(row[0], P.FAILED, P.pack_failure(P.REF_MISSING, why, ref=ref_id))
                return None
        else:
            args = wrap_with_files(P.as_bytes(task.args), files or {})
        return QueuedTask(row, args)

    def _placed_apart(self, task: QueuedTask) -> bool:
        """A task asking for resources: True if it was dealt with here
        (failed: no node could ever hold it, or it asks more than the
        owner allows another user; or waiting for several nodes), False if
        it goes to the queue as any task."""
        row = task.row
        refused = self.caps.refusal(row)   # (another user's task asking more than the owner allows them)
        if refused is not None:
            log.warning("refused task %s: %s", row[0].hex(), refused)
            self._result(row[0], P.FAILED, P.pack_failure(P.REJECTED, refused))
            return True
        if self._never_fits(row):
            return True
        if placement.several_nodes(row):
            self.holding.add(row[0])
            self.multi.waiting.append(task)
            return True
        return False

    def _never_fits(self, row: list[Any]) -> bool:
        """A task asking for resources no node here could ever hold fails
        at once, saying why (placement.py); True if it did."""
        why = placement.why_never(row[6]["rs"], self.pools.values(), self.config.provider.nodes_per_block,
                                  self.config.name)
        if why is None:
            return False
        log.warning("refused task %s: %s", row[0].hex(), why)
        self._result(row[0], P.FAILED, P.pack_failure(P.REJECTED, why))
        return True

    def _dependency_finished(self, task_id: bytes, status: int, blob: Any) -> None:
        """A task finished: the tasks held here for it go, or fail (and so
        on down the graph: a loop, not a recursion)."""
        self.graph.settle(task_id, status, blob, self._admit, self._failed_held)

    def _failed_held(self, task_id: bytes, failure: bytes) -> None:
        self._result(task_id, P.FAILED, failure)

    def _to_pool_held(self, task: QueuedTask) -> None:
        """A task just held here whose dependencies all went to one pool
        (or wait there) goes to that pool to wait there instead (see
        graph.py), so that their results release it without a trip here."""
        if _released_here(task):
            return
        pool = self.graph.send_to_pool(task.row[0], self.at_pool)
        if pool is not None:
            self._held_to_pool(pool, [task])

    def _follow_to_pool(self, pool: PoolLink, task_ids: list[bytes]) -> None:
        """Tasks just sent to ``pool``: the tasks held here for them whose
        dependencies are now all there follow them (and theirs, and so on)."""
        graph = self.graph
        while task_ids:
            follow = []
            for task_id in task_ids:
                for waiting_id in graph.waiting_on.get(task_id, ()):
                    entry = graph.held.get(waiting_id)   # (None: failed or cancelled meanwhile; the graph
                    if entry is None:                    # keeps such ids in waiting_on, as finished() skips them)
                        continue
                    if (entry.pool is None and not _released_here(entry.task)
                            and graph.send_to_pool(waiting_id, self.at_pool) is pool):
                        follow.append(entry.task)
            task_ids = self._held_to_pool(pool, follow)

    def _held_to_pool(self, pool: PoolLink, tasks: list[QueuedTask]) -> list[bytes]:
        """Send held tasks to wait at ``pool``; the ids of those sent."""
        if not tasks or pool.draining or self.pools.get(pool.pool_id) is not pool:
            return []
        sent: list[bytes] = []
        for part in range(0, len(tasks), P.MAX_ITEMS):
            blobs = P.Blobs()
            rows = []
            bodies: list[bytes] = []
            for task in tasks[part:part + P.MAX_ITEMS]:
                fn_hash = task.row[1]
                fn_ref: bytes | int = -1
                if fn_hash not in pool.known_functions:
                    body = self.functions.get(fn_hash)
                    if body is None:
                        continue
                    fn_ref = blobs.ref(body)
                    pool.known_functions.add(fn_hash)
                    bodies.append(fn_hash)
                rows.append([task.row[0], fn_hash, blobs.ref(task.args), fn_ref, *task.row[4:]])
            if rows and not self._send_pool(pool.pool_id, P.encode(P.TASKS, {"tasks": rows}, blobs.frames)):
                pool.known_functions.difference_update(bodies)
                break
            for row in rows:
                self.graph.waits_at(row[0], pool)
                sent.append(row[0])
        return sent

    def _back_from_pool(self, pool: PoolLink, task_ids: list[bytes] | None) -> None:
        """Tasks that waited at a pool (``task_ids``, or all: it is gone)
        wait here again, or go now."""
        ready, failed = self.graph.back_from(pool, task_ids)
        for task in ready:
            self._admit(task)
        for failed_id, failure in failed:
            self._result(failed_id, P.FAILED, failure)

    def _flush_due(self, now: float) -> bool:
        # Nothing left here, or (for tasks that go one at a time) nothing
        # queued: the credit these results carry is what brings more work.
        return self.outbox.due(now, nothing_else=not (self.queue or self.at_pool)
                               or (not self.queue and self.batch_size() == 1))

    def _flush(self) -> None:
        """Send the results gathered so far with the credit they free and, in
        the same message, start notices for tasks that have not finished."""
        if not self.outbox:
            return
        now = time.time()
        for row in self.outbox.rows:
            if len(row) == 4:
                row[3].append(now)
        for frames in self.outbox.take(credit=self._grant()):
            self._send_relay(frames)

    # -- pool side -------------------------------------------------------------
    def _link_pool(self, pool_id: bytes) -> MemoryEnd:
        """A link in memory to a pool this agent's loop steps (inprocess.py):
        the pool's end. (On the loop's thread, as the pool begins.)"""
        ours, theirs = memory_link(zmq.ROUTER, zmq.DEALER)
        self.linked_pools[pool_id] = ours
        return theirs

    def _linked_pools_readable(self) -> bool:
        return any(end.inbox for end in self.linked_pools.values())

    def _read_pools(self, pool_sock_ready: bool) -> None:
        """What the pools sent: on the pools' socket (read only when the poll
        showed something there: a read finding nothing raises zmq.Again, a
        cost per turn when every pool is linked in memory), and on the links."""
        if pool_sock_ready:
            for frames in P.waiting_messages(self.pool_sock, MAX_MESSAGES_PER_TURN):
                self._on_pool_message(frames[0].bytes, frames[1:])
        for pool_id, end in list(self.linked_pools.items()):
            finished = end.peer is None or end.peer.closed   # (first: its last messages come before it closes,
            for frames in end.messages(MAX_MESSAGES_PER_TURN):   # from the thread finishing it, inprocess.py)
                self._on_pool_message(pool_id, frames)
            if finished and not end.inbox:
                del self.linked_pools[pool_id]

    def _on_pool_message(self, pool_id: bytes, frames: list[Any]) -> None:
        """One message from a pool (its routing id taken off)."""
        try:
            msg = P.decode(frames)
            pool = self.pools.get(pool_id)
            if msg.type == P.HELLO:
                self._on_pool_hello(pool_id, msg.fields)
            elif pool is None:
                if msg.type != P.BYE:  # a pool we gave up on, or from before a restart: introduce yourself
                    self._send_pool(pool_id, P.encode(P.HEARTBEAT, {"unknown": True}))
            else:
                pool.last_seen = time.monotonic()
                if msg.type == P.RESULTS:
                    self._on_pool_results(pool, msg)
                elif msg.type == P.HEARTBEAT:
                    self._on_pool_load(pool, msg.fields)
                elif msg.type == P.HOLDING:   # more of what its HELLO said it holds
                    self._take_back_held(pool, P.task_ids(msg.fields["tids"]))
                elif msg.type == P.BYE:
                    self._pool_gone(pool, "stopped")
        except Exception as exc:
            log.warning("ignored a malformed message from pool %r: %s: %s", pool_id, type(exc).__name__, exc)

    def _on_pool_hello(self, pool_id: bytes, fields: dict[str, Any]) -> None:
        secret = fields.get("secret")
        if not (isinstance(secret, str) and hmac.compare_digest(secret.encode(), self.pool_secret.encode())):
            log.warning("refused a pool from %s: wrong or missing pool secret", P.text(fields.get("host", "?"), "host"))
            self._send_pool(pool_id, P.encode(P.ERROR, {"msg": "wrong pool secret"}))
            return
        P.count(fields["workers"], "workers")
        if pool_id in self.pools:
            # the same pool process introducing itself again (it was told it is
            # unknown: replies to heartbeats it sent while this agent was
            # stalled): what it still holds comes back in "holding" and stays
            # with it; nothing it held was lost, so nothing counts as lost
            self._pool_gone(self.pools[pool_id], "reintroduced itself", lost=False)
        if self.leaving:
            self._refuse_pool_leaving(pool_id)
            return
        pool = PoolLink(pool_id, fields)
        if self.config.available_accelerators:   # the config's, not what the node found (placement.py)
            pool.gpus = len(self.config.available_accelerators)
        if self.scaler is not None and not self.scaler.pool_connected(pool):
            log.info("pool %s from %s belongs to no live block (%r); told to stop", pool_id.decode(),
                     pool.host, pool.block_id)
            self._send_pool(pool_id, P.encode(P.STOP))
            return
        self.pools[pool_id] = pool
        self._take_back_held(pool, P.task_ids(fields.get("holding", [])))
        c = self.config
        self._send_pool(pool_id, P.encode(P.WELCOME, {"settings": {
            "hb": c.heartbeat_period, "hbm": c.heartbeats_missed, "worker_batch": c.worker_batch,
            "worker_lost_retries": c.worker_lost_retries, "sandbox": c.sandbox, "sandbox_image": c.sandbox_image,
            "endpoint": c.name, "data_only": self.data_only, "accel": c.available_accelerators,
            "accel_shared": c.accelerators_shared, "task_ttl": c.task_dir_ttl,
            "mpi": c.mpi_launcher or ("srun" if c.provider.type == "slurm" else "mpiexec")}}))
        log.info("pool %s connected from %s (block %s): %d workers, %d cores, %d GPUs", pool_id.decode(),
                 pool.host, pool.block_id or "-", pool.workers, pool.cores, pool.gpus)

    def _take_back_held(self, pool: PoolLink, held: list[bytes]) -> None:
        """A pool (re)introducing itself still holds these tasks. Those waiting
        here again (it was given up on, then came back) stay with it, as
        started: they are not sent anywhere else. The rest (another pool has
        them, or they are not this agent's: it restarted) it must drop."""
        if not held:
            return
        for task in take_out(self.queue, set(held)):
            pool.tasks[task.row[0]] = task
            pool.started.add(task.row[0])
            self.at_pool[task.row[0]] = pool
            pool.known_functions.add(task.row[1])
        foreign = [t for t in held if t not in pool.tasks]
        for part in P.chunks(foreign):
            self._send_pool(pool.pool_id, P.encode(P.CANCEL, {"tids": part}))
        pool.note_load()

    def _on_pool_load(self, pool: PoolLink, fields: dict[str, Any]) -> None:
        idle = fields.get("idle")
        if type(idle) is int:
            pool.idle_workers = idle
        if fields.get("draining") is True and not pool.draining:
            pool.draining = True
            log.info("pool %s (block %s) is draining: its job ends soon", pool.pool_id.decode(), pool.block_id)

    def _on_pool_results(self, pool: PoolLink, msg: P.Message) -> None:
        fields = msg.fields
        average = fields.get("avg")
        if isinstance(average, float):
            self.task_seconds = average
        for row in fields["rows"]:
            task_id, status, index = P.result_row(row, P.TRACE_FROM_WORKER)
            task = pool.tasks.pop(task_id, None)
            if task is None and not (self.graph and self.graph.from_pool(task_id, pool)):
                continue  # a task taken back from it meanwhile (it was lost, then came back)
            self.at_pool.pop(task_id, None)
            pool.started.discard(task_id)
            blob = index if type(index) is bytes else P.blob_at(msg.blobs, index)
            local = None
            if is_local(blob):   # a large result in a file: uploaded in chunks, its reference goes on
                dependents = [d for d in self.graph.waiting_on.get(task_id, ()) if d in self.graph.held]
                status, blob = self.bulk.result(task_id, status, blob, self.max_payload, dependents)
                local = self.bulk.kept_result(task_id)   # (the file, for tasks that depend on it: bulk.py)
            size = len(blob) if type(blob) is bytes else len(P.as_buffer(blob))
            if size > self.max_payload:
                message, details = P.too_large(f"the task's {'result' if status == P.OK else 'exception'}", size,
                                               self.max_payload)
                status, blob = P.FAILED, P.pack_failure(P.TOO_LARGE, message, **details)
            self._result(task_id, status, blob, row[3] if len(row) == 4 else None, local)
        for task_id in P.task_ids(fields.get("started", [])):
            if task_id in pool.tasks:
                pool.started.add(task_id)
                self.outbox.start(task_id)
        if fields.get("draining") is True:
            self._on_pool_load(pool, fields)
        returned = P.task_ids(fields.get("returned", []))
        if returned and self.graph:   # tasks that waited there, given back (draining, or too late)
            self._back_from_pool(pool, returned)
        returned = [t for t in returned if t in pool.tasks]
        if returned:
            self._take_back(pool, returned, "stopped with its job")
        pool.note_load()

    def _pool_gone(self, pool: PoolLink, why: str, lost: bool = True) -> None:
        """A pool left (said BYE, went silent, its job ended): the tasks it
        held run elsewhere; those it had started count as lost unless ``lost``
        is False."""
        self.pools.pop(pool.pool_id, None)
        if self.graph:
            self._back_from_pool(pool, None)
        count = self._take_back(pool, list(pool.tasks), why, lost)
        level = logging.INFO if why == "stopped" and not count else logging.WARNING
        log.log(level, "pool %s on %s (block %s) %s; %d task(s) it held go to other pools",
                pool.pool_id.decode(), pool.host, pool.block_id or "-", why, count)

    def _take_back(self, pool: PoolLink, task_ids: list[bytes], why: str, lost: bool = True) -> int:
        """Put these tasks of a pool back in front of the queue. One it had
        started counts as lost once: past ``worker_lost_retries`` it fails
        with WorkerLost (a task longer than its blocks' walltime does not
        start over on block after block). How many went back."""
        again: list[QueuedTask] = []
        retries = self.config.worker_lost_retries
        for task_id in task_ids:
            task = pool.tasks.pop(task_id)
            self.at_pool.pop(task_id, None)
            if self.caps.held:   # (counted again once placed again)
                self.caps.release(task_id)
            if task_id in pool.started and lost:
                pool.started.discard(task_id)
                task.lost += 1
                if task.lost > retries:
                    self._result(task_id, P.FAILED, P.pack_failure(
                        P.WORKER_LOST, f"the pool on {pool.host} (pid {pool.pid}) of endpoint {self.config.name!r} "
                                       f"{why} while running this task, {task.lost} time(s) (a task longer than "
                                       f"its blocks' walltime never finishes)", endpoint=self.config.name,
                        host=pool.host))
                    continue
            again.append(task)
        self.queue.extendleft(reversed(again))
        return len(again)

    def _drop_silent_pools(self, now: float) -> None:
        """Pools silent for ``heartbeats_missed`` periods (and 1 s) are gone.
        Not one this process runs (in_process): it speaks only when this
        loop steps it, after this check, so a stall of this process (a
        paused VM, a loaded machine: 1.2 s was enough) made it look silent,
        and its tasks, running, were taken back and counted lost. Its end
        comes through its provider (the scaler's tick)."""
        limit = self.config.heartbeats_missed * self.config.heartbeat_period + 1.0
        for pool in [p for p in self.pools.values() if now - p.last_seen > limit]:
            if self.local_pools is not None and self.local_pools.runs(pool.pool_id):
                pool.last_seen = now
                continue
            self._pool_gone(pool, f"sent nothing for {now - pool.last_seen:.1f} s")

    def _scale(self, now: float) -> None:
        assert self.scaler is not None
        demand = len(self.holding) + self.relay_backlog
        if self.caps.parked or self.caps.ready:   # (over their user's cap: more blocks would not run them sooner)
            demand -= self.caps.parked_count()
        ended, to_stop = self.scaler.tick(now, demand, self.pools)
        ended_set, stop_set = set(ended), set(to_stop)
        stop = stop_message(STOP_GRACE)   # (what its workers run still finishes: pool/leaving.py)
        for pool in list(self.pools.values()):
            if pool.block_id in ended_set:
                self._pool_gone(pool, "ended with its job")
            elif pool.block_id in stop_set:
                pool.draining = True   # no more tasks; it leaves with BYE
                self._send_pool(pool.pool_id, stop)

    def _assign(self) -> None:
        """Send queued tasks to the pools with room, least loaded first."""
        if self.caps.ready:   # parked over their user's cap, they fit again (placement.UserCaps)
            for task in reversed(self.caps.ready):
                (self.multi.waiting if placement.several_nodes(task.row) else self.queue).appendleft(task)
            self.caps.ready = []
        if self.multi.waiting and self.pools:
            self._place_multi_node()
        if not self.queue or not self.pools:
            return
        per_worker = self.worker_depth() + self.config.prefetch
        now = time.monotonic()
        taken = self.multi.pools
        open_pools = [pool for pool in self.pools.values()
                      if pool.room(per_worker) > 0 and pool.unreachable_until <= now
                      and (not taken or pool.pool_id not in taken)]
        if not open_pools:
            return
        if len(open_pools) > 1:
            open_pools.sort(key=lambda pool: len(pool.tasks) / pool.workers)
        for position, pool in enumerate(open_pools):
            if not self.queue:
                return
            share = math.ceil(len(self.queue) / (len(open_pools) - position))
            self._send_to_pool(pool, min(pool.room(per_worker), share))

    def _send_to_pool(self, pool: PoolLink, count: int) -> None:
        while count > P.MAX_ITEMS:   # a message's limit: more go in more messages
            self._send_to_pool(pool, P.MAX_ITEMS)
            count -= P.MAX_ITEMS
        rows: list[list[Any]] = []
        blobs = P.Blobs()
        bodies_sent: list[bytes] = []
        elsewhere: list[QueuedTask] = []   # tasks asking for more than this pool's node has
        while self.queue and len(rows) < count:
            task = self.queue.popleft()
            task_id, fn_hash = task.row[0], task.row[1]
            if len(task.row) == 7 and "rs" in task.row[6]:
                if placement.several_nodes(task.row) and self.multi.placing is not task:
                    self.multi.waiting.appendleft(task)   # back from a pool that was lost: placed afresh
                    continue
                if not placement.fits(task.row[6]["rs"], pool):
                    if not self._never_fits(task.row):
                        elsewhere.append(task)
                    continue
                if self.multi.placing is not task and not self.caps.allows(task.row):
                    self.caps.park(task)   # over its user's cap: waits apart until their tasks free some
                    continue
                self.caps.hold(task.row)
            fn_ref: bytes | int = -1
            if fn_hash not in pool.known_functions:
                body = self.functions.get(fn_hash)
                if body is None:
                    self._result(task_id, P.FAILED, P.pack_failure(
                        P.REJECTED, "the endpoint was not given this task's function"))
                    continue
                fn_ref = blobs.ref(body)
                pool.known_functions.add(fn_hash)
                bodies_sent.append(fn_hash)
            row = [task_id, fn_hash, blobs.ref(task.args), fn_ref, task.row[4], task.row[5]]
            if len(task.row) == 7:
                row.append(task.row[6])
            rows.append(row)
            pool.tasks[task_id] = task
            self.at_pool[task_id] = pool
        if elsewhere:
            self.queue.extendleft(reversed(elsewhere))
        if rows and not self._send_pool(pool.pool_id, P.encode(P.TASKS, {"tasks": rows}, blobs.frames)):
            # no connection to it right now: they go to other pools, or to it
            # again once it is back (or is given up on)
            pool.known_functions.difference_update(bodies_sent)
            pool.unreachable_until = time.monotonic() + UNREACHABLE_PAUSE
            self._take_back(pool, [row[0] for row in rows], "could not be reached")
        elif rows and self.graph.waiting_on:   # tasks held here for these may follow them
            self._follow_to_pool(pool, [row[0] for row in rows])
        pool.note_load()

    def _place_multi_node(self) -> None:
        """The first task waiting for several nodes: its nodes (pools of one
        block) are kept for it, taking no more tasks, and once they have
        finished what they held it goes to the first of them with the node
        list; other tasks use the block's other nodes meanwhile."""
        while self.multi.waiting and not self.caps.allows(self.multi.waiting[0].row):
            task = self.multi.waiting.popleft()   # over its user's cap: waits apart, keeping no nodes
            self.multi.release(task.row[0])
            self.caps.park(task)
        if not self.multi.waiting:
            return
        task, pools = self.multi.ready(self.pools)
        if task is None:
            return
        row = task.row
        task.row = [*row[:6], {**row[6], "nl": [pool.node for pool in pools]}]
        self.multi.placing = task
        queue, self.queue = self.queue, deque([task])
        try:
            self._send_to_pool(pools[0], 1)
        finally:
            self.multi.placing = None
            self.queue = queue
        if task.row[0] in pools[0].tasks:
            self.multi.started(task.row[0], pools)
        else:   # not sent (the pool could not be reached): it waits again
            self.multi.waiting.appendleft(task)

    def _send_pool(self, pool_id: bytes, frames: list[Any]) -> bool:
        """Send to a pool; False when it has no connection now (its tasks are
        the caller's to place again)."""
        try:
            linked = self.linked_pools.get(pool_id)
            if linked is not None:
                linked.send_multipart(frames)
            else:
                self.pool_sock.send_multipart([pool_id, *frames], copy=False)
        except zmq.ZMQError as exc:
            log.debug("could not send to pool %r: %s", pool_id, exc)
            return False
        return True

    # -- status ----------------------------------------------------------------
    def status(self, now: float) -> dict[str, Any]:
        """What ``fedexec endpoint status`` shows."""
        pools = [pool.describe(now) for pool in self.pools.values()]
        return {
            "endpoint": self.config.name, "id": self.config.endpoint_id, "pid": os.getpid(),
            "time": time.time(), "connected": self.connected, "provider": self.config.provider.type,
            "pool_address": self.pool_address,
            "blocks": self.scaler.describe() if self.scaler is not None else [],
            "provider_error": self.scaler.error if self.scaler is not None else None,
            "pools": pools, "workers": sum(p["workers"] for p in pools),
            "idle_workers": sum(p["idle_workers"] for p in pools),
            "queued": len(self.queue) + self.relay_backlog, "held": len(self.holding),
            "at_pools": len(self.at_pool), **self.refs.describe(),
            "settings": dataclasses.asdict(self.config),   # as it runs: 'endpoint status' compares the file's
        }

    def _write_status(self, now: float, final: bool = False) -> None:
        if self.state_dir is None:
            return
        path = self.state_dir / "status.json"
        try:
            if final:
                path.unlink(missing_ok=True)
                return
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.status(now)))
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("could not write %s: %s", path, exc)


def _released_here(task: QueuedTask) -> bool:
    """Whether a task waits for its dependencies here, not at a pool: one
    naming DataRefs (the agent fetches its refs' files when it is released,
    :meth:`EndpointAgent._admit`), or asking for resources (placed when it
    is released: on nodes that can hold it, within its user's caps)."""
    row = task.row
    return len(row) == 7 and ("rf" in row[6] or "rs" in row[6])
