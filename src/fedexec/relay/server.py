"""The relay server: one ROUTER socket, one poll loop.

Clients and endpoints both connect to the relay's single address with DEALER
sockets and introduce themselves with HELLO. Each turn of the loop reads
every message that is waiting, updates the in-memory state, commits the
turn's writes to the store in one transaction, and only then sends what the
turn produced (tasks to endpoints, results to clients). User payloads are
forwarded as the frames they arrived in; the relay never unpickles them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from .. import protocol as P
from ..auth import new_secret, public_key_path, read_secret, secret_path, write_secret_value
from ..pidfile import PidFile
from .access import AccessControl, AccessDenied, GlobusTokenCheck, Session, TokenBook, ZapHandler, \
    load_or_create_curve_keys
from .quota import DEFAULT_FUNCTION_GRACE, DEFAULT_MAX_BYTES_PER_USER, DEFAULT_MAX_ENDPOINTS_PER_USER, \
    DEFAULT_MAX_GROUPS_PER_USER, DEFAULT_MAX_TASKS_PER_USER, MIN_ROW_BYTES, FunctionBodies, Quotas, row_bytes
from .memo import RecentResults, without_output
from .listening import AddressInUse, check_address_free, in_use_message
from .registry import (DISPATCHED, QUEUED, DropNotes, EndpointAccess, EndpointRegistry, EndpointState, GroupQueue,
                       TaskRecord)
from .memstore import MemoryStore, Record
from .store import FINISHED, GROUP_COMMIT_WINDOW, KEPT, RelayStore, durable_options
from .inspect import Inspector, endpoint_meta
from ..endpoint_status import parse_report
from .retained import DEFAULT_MAX_KEPT_PER_USER, RetainedResults
from ..transfer import MAX_REF, REF_MAGIC, is_big
from .bulk import TYPES as BULK_TYPES, BulkTransfers
from .refs import TYPES as REF_TYPES, DataRefs
from .graph import OPTION_BYTES_PER_MESSAGE, WAITING, DependencyGraph, envelope, in_memory, open_envelope, \
    option_bytes
from .kept import KeptResults
from .deregister import EndpointDeletions
from .reads import RecordReads
from ..memlink import MemoryEnd
from ..samehost import supported as same_host_supported
from .locallink import INTRO_TIMEOUT, MAX_SAME_HOST_LINKS, ClientLink, LocalLink, SameHostListener, StreamLink
from .notices import HeldNotices
from .graph import KEPT_IN_MEMORY
from ..dependencies import wrap_arguments

if TYPE_CHECKING:
    from .dashboard import DashboardFeed   # (imported with --http only: relays without it stay as light)

log = logging.getLogger("fedexec.relay")
refusals = logging.getLogger("fedexec.relay.refused")   # who was refused what, and when (the log's time)

MAX_MESSAGES_PER_TURN = 2000
# A turn reads messages for at most this long before it commits and sends what
# it has: a stream of costly messages (one user's large headers) delays the
# others' results by one turn's worth, not by all of them.
TURN_READ_BUDGET = 0.05
MAINTENANCE_INTERVAL = 0.5
# While this many rows wait for the store's writer, no more tasks go out to
# endpoints: results then come back no faster than they can be recorded, and
# the writer's backlog (memory) stays bounded.
MAX_STORE_BACKLOG = 100_000
EXPIRY_INTERVAL = 60.0
DEFAULT_RESULT_TTL = 7 * 24 * 3600.0   # results nobody fetched are kept this long
# How tasks submitted to a group of endpoints pick a member ($FEDEXEC_ROUTING):
# "warm" prefers members the function is warm on, then the most free capacity;
# "capacity" ignores warmth (a baseline, for benchmarks/routing.py).
ROUTINGS = ("warm", "capacity")
# Most group tasks passed over in one turn because no member with capacity
# may run their function (allow-lists); the rest wait for the next turn.
MAX_PASSED_OVER = 10_000
# After a restart, group tasks from the record wait this long before they are
# routed: members reconnect meanwhile (within the 2 s reconnect interval), say
# which of them they hold and send the results the record lacks, so that a task
# one member has is not routed to another and run twice.
RECOVERY_GRACE = 3.0
# Result bytes read from the record in one turn to answer RESUMEs and resent
# tasks (at most this plus one result): the rest wait for the next turns, so
# a few small messages cannot make the relay read gigabytes at once.
RECORD_BYTES_PER_TURN = 64 * 1024 * 1024
# An endpoint names the tasks it still holds in its HELLO and in HOLDING
# messages right after it, on the same connection, within this many seconds.
HOLDING_WINDOW = 30.0
# Results of finished, unacknowledged tasks read back from the record for a
# task naming them that came just after they finished (_recorded_result), at
# most this many a second per user (reads.py): each read may wait for a group
# commit on the loop, and a chain needs one when it starts; past it, such a
# task is refused for its client to send it with the values, as before.
RECORD_READS_PER_SECOND = 8


class Relay:
    """A relay bound to ``address`` keeping its record under ``data_dir``."""

    def __init__(self, address: str, data_dir: Path, *, parent_pid: int | None = None,
                 remove_on_exit: Path | None = None, result_ttl: float = DEFAULT_RESULT_TTL,
                 max_payload: int = P.DEFAULT_MAX_PAYLOAD, secret_file: Path | None = None,
                 auth: str = "local", curve: bool | None = None, globus: GlobusTokenCheck | None = None,
                 routing: str | None = None, max_tasks_per_user: int = DEFAULT_MAX_TASKS_PER_USER,
                 max_bytes_per_user: int = DEFAULT_MAX_BYTES_PER_USER,
                 max_endpoints_per_user: int = DEFAULT_MAX_ENDPOINTS_PER_USER,
                 max_groups_per_user: int = DEFAULT_MAX_GROUPS_PER_USER,
                 function_grace: float = DEFAULT_FUNCTION_GRACE,
                 commit_window: float = GROUP_COMMIT_WINDOW, keep_acknowledged: bool | None = None,
                 max_kept_per_user: int = DEFAULT_MAX_KEPT_PER_USER,
                 http: tuple[Any, ...] | None = None, durable: bool = True) -> None:
        """``keep_acknowledged``: results stay readable after their client
        acknowledged them, until ``result_ttl`` or their user deletes them
        (retained.py); by default, unless the relay removes its data when it
        stops (the embedded default's, whose program is its only client).
        ``http``: (host, port) to serve the dashboard, /api/ and /metrics on
        (web.py), and its ssl.SSLContext (web.tls_context) for HTTPS, or None.
        ``durable=False``: the record is kept in memory only (memstore.py), for
        a relay that dies with its one program (the embedded default's)."""
        if result_ttl <= 0:
            raise ValueError("result_ttl must be greater than 0 seconds")
        self.routing = routing or os.environ.get("FEDEXEC_ROUTING") or "warm"
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, not {self.routing!r}")
        P.check_payload_limit(max_payload)
        self.quotas = Quotas(max_tasks_per_user, max_bytes_per_user)
        for name, value in (("max_endpoints_per_user", max_endpoints_per_user),
                            ("max_groups_per_user", max_groups_per_user)):
            if type(value) is not int or value <= 0:
                raise ValueError(f"{name} must be an integer greater than 0, not {value!r}")
        self.max_endpoints_per_user = max_endpoints_per_user
        self.max_groups_per_user = max_groups_per_user
        # user -> {group: their unfinished tasks submitted to it}
        self.user_groups: dict[str, dict[tuple[str, ...], int]] = {}
        self.result_ttl = result_ttl
        self.max_payload = max_payload
        self.max_function = min(max_payload, P.MAX_PAYLOAD_LIMIT)   # a function body travels in one frame
        self.incarnation = os.urandom(8)   # tells clients and endpoints that the relay restarted
        self.data_dir = Path(data_dir)
        self.remove_on_exit = remove_on_exit
        self.parent_pid = parent_pid
        # On an address in use, fail before any file is touched: the
        # discovery files of the relay already there above all (its clients
        # would be refused). So: ask now; then make the access control (a
        # new secret or key pair kept in memory), start the ZAP handler
        # before the socket binds (a PLAIN or CURVE server without one
        # accepts anyone), bind, and only then write files.
        check_address_free(address, self.data_dir)
        self.ctx = zmq.Context()
        # Every connection authenticates before its messages are read (see
        # access.py). The local secret is kept with the record (the same
        # after a restart, so clients and endpoints reconnect with what they
        # have) in a file only this user can read.
        self.auth_mode = auth
        self.secret_file = Path(secret_file) if secret_file else self.data_dir / "relay.secret"
        self.local_secret = read_secret(self.secret_file) if auth == "local" else ""
        secret_is_new = auth == "local" and not self.local_secret
        if secret_is_new:
            self.local_secret = new_secret()
        self.tokens = TokenBook(self.data_dir) if auth == "token" else None
        self.access = AccessControl(auth, local_secret=self.local_secret, tokens=self.tokens, globus=globus)
        self._bind_dashboard(http)
        self.zap = ZapHandler(self.ctx, self.access)
        self.zap.start()
        self.sock = P.limit_frames(self.ctx.socket(zmq.ROUTER))
        # Encrypted (CURVE) unless asked otherwise, when anyone but this
        # machine could listen in.
        self.curve = curve if curve is not None else not P.is_loopback(address)
        self.public_key = b""
        curve_file = self.data_dir / "relay.curve"
        new_keys = self.curve and not curve_file.exists()
        if new_keys:
            self.public_key, secret_key = zmq.curve_keypair()
        elif self.curve:
            self.public_key, secret_key = load_or_create_curve_keys(curve_file)
        if self.curve:
            self.sock.curve_secretkey = secret_key
            self.sock.curve_publickey = self.public_key
            self.sock.curve_server = True
        else:
            self.sock.plain_server = True
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if "[" in address:  # an IPv6 host such as tcp://[::1]:55700
            self.sock.setsockopt(zmq.IPV6, 1)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 1000)
        try:
            self.sock.bind(address)
        except zmq.ZMQError as exc:   # taken since check_address_free asked, or a host not this machine's
            self.sock.close(linger=0)
            self.zap.stop()
            self.ctx.term()
            if self.web is not None:
                self.web.server_close()
            if self.tokens is not None:
                self.tokens.close()
            if exc.errno == zmq.EADDRINUSE:
                raise AddressInUse(in_use_message(address, self.data_dir)) from None
            raise OSError(exc.errno, f"the relay cannot listen on {address}: {exc}") from None
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if secret_is_new:
            write_secret_value(self.secret_file, self.local_secret)
        if new_keys:
            write_secret_value(curve_file, f"{self.public_key.decode()}\n{secret_key.decode()}\n")
        # Copies by address, where this user's executors and endpoints look
        # (not for a private relay, whose owner was given secret_file): under
        # the address asked for and the one it reports, if that differs (a
        # port chosen at bind time, a host name resolved). A client that
        # connected meanwhile finds them when it looks again after the refusal.
        self.discovery_files: list[Path] = []
        publish = not secret_file and (auth == "local" or self.curve)
        if publish and not address.endswith(":*"):
            self._publish_secret(address)
        if publish and secret_path(self.address) not in self.discovery_files:
            self._publish_secret(self.address)
        if not secret_file and not self.curve:
            # a public key kept by an earlier, encrypted relay on this address (see stop) is stale
            for stale in {address, self.address}:
                public_key_path(stale).unlink(missing_ok=True)
        # the owner's programs on this host: a Unix socket beside the secret (samehost.py)
        self.same_host: SameHostListener | None = None
        if publish and auth == "local" and same_host_supported():
            try:
                self.same_host = SameHostListener(self.address, [address] if not address.endswith(":*") else [])
            except OSError as exc:
                log.warning("no same-host links (programs on this host use ZeroMQ): %s", exc)
        if self.curve and secret_file:  # beside the private secret, for its owner
            self.discovery_files.append(Path(str(secret_file) + ".pub"))
            write_secret_value(self.discovery_files[-1], self.public_key.decode())
        if keep_acknowledged is None:
            keep_acknowledged = remove_on_exit is None
        self.store: Record = (RelayStore if durable else MemoryStore)(self.data_dir, commit_window,
                                                                      keep_acknowledged=keep_acknowledged)
        if keep_acknowledged:
            self.quotas.retained = RetainedResults(self.store, self.quotas, max_kept_per_user)
        self.endpoint_senders: dict[bytes, str] = {}   # routing id -> endpoint id, for every HELLO it made
        self.endpoints = EndpointRegistry()
        self.route_turn = 0   # rotates which group member wins a tie (see _route_group)
        self.tasks: dict[bytes, TaskRecord] = {}
        self.graph = DependencyGraph()   # tasks held until the tasks they depend on finish
        self._record_reads = RecordReads(RECORD_READS_PER_SECOND)   # _recorded_result's budget
        self._cascade: list[tuple[TaskRecord, int, Any]] | None = None   # see _dependencies_finished
        if function_grace < 0:
            raise ValueError("function_grace must be 0 seconds or more")
        self.functions = FunctionBodies(self.store, self.quotas, function_grace)
        self.stopping = False
        self.client_results: dict[bytes, tuple[list, P.Blobs]] = defaultdict(lambda: ([], P.Blobs()))
        self.client_started: dict[bytes, list] = defaultdict(list)
        self.endpoint_cancels: dict[str, list] = defaultdict(list)
        self.drop_notes = DropNotes()   # tasks endpoints were told to drop: their answers are no outcome
        # Notices that wait for the store: ACCEPTED to clients and ACK (results
        # stored) to endpoints, sent once the commit holding them is on disk.
        self.turn_accepted: dict[bytes, list] = defaultdict(list)
        self.turn_stored: dict[bytes, list] = defaultdict(list)
        # RESUMEd tasks the record shows unfinished though they are not here:
        # their result is on its way to disk; answered after that commit
        self.turn_resumed: dict[bytes, list] = defaultdict(list)
        self.after_commit: deque[tuple[int, dict[bytes, list], dict[bytes, list], dict[bytes, list]]] = deque()
        self.notices = HeldNotices()   # committed ACCEPTED and ACK notices, until their peer's next message
        self.sent_to: set[bytes] = set()   # the peers sent something this turn
        self.memo_keys: set[bytes] = set()          # results memoized in the store (until they expire)
        self.memo_recent = RecentResults()          # the newest small ones, in memory
        # finished tasks to answer from the record, over a turn's RECORD_BYTES_PER_TURN: per client, in order
        self.record_waiting: dict[bytes, dict[bytes, Session]] = {}
        self.record_budget = RECORD_BYTES_PER_TURN
        # refusals of single tasks this turn, logged once per user and action: (user, action) -> [count, first id]
        self.refused_tasks: dict[tuple[str, str], list] = {}
        self.refused_unauthenticated: dict[str, int] = {}   # messages refused this turn, by why
        self.bulk = BulkTransfers(self)   # large payloads, in chunks
        self.kept = KeptResults(self)     # uploads of large results that held tasks depend on
        self._recover()
        self.bulk.recover()
        self.kept.recover()
        self.refs = DataRefs(self)        # data sent once: named uploads (put)
        self.refs.recover()
        if self.quotas.retained is not None:
            self.bulk.attach_retained(self.quotas.retained)   # (results over 16 MiB kept too)
            self.quotas.retained.recover()
        self.inspector = Inspector(self)  # the Client API's questions (task status, listing, functions, endpoints)
        self.deletions = EndpointDeletions(self)   # endpoints their owners deleted (DEREGISTER)
        self.local_link: LocalLink | None = None   # a colocated endpoint agent's link (open_local_link)
        self.client_link: ClientLink | None = None   # the embedded default's program's (open_client_link)
        # stream links to the owner's programs (the client link, same-host links), by descriptor and
        # by routing id once introduced, and the pollers their descriptors are on (register)
        self.stream_links: dict[int, StreamLink] = {}
        self.stream_peers: dict[bytes, StreamLink] = {}
        self.pollers: list[zmq.Poller] = []
        self.links_read_first = 0   # which link a turn reads first (each in turn: none waits behind a busy one)
        self.listener_paused_until: float | None = None   # the listener off the pollers (accept failed)

    def _bind_dashboard(self, http: tuple[Any, ...] | None) -> None:
        """With ``http`` (host, port): bind the dashboard's port (web.py;
        served from serve_forever) and make the feed the loop publishes
        snapshots through. Before anything else binds: a port in use or a
        refused host leaves nothing behind."""
        self.dashboard: DashboardFeed | None = None
        self.web: Any = None
        if http is None:
            return
        from .dashboard import DashboardFeed
        from .web import DashboardServer
        host, port, *tls = http   # (and the TLS context, web.tls_context, when given)
        self.dashboard = DashboardFeed()
        try:
            self.web = DashboardServer(self.dashboard, self.access, host, port, *tls)
        except OSError as exc:
            self.ctx.term()
            if self.tokens is not None:
                self.tokens.close()
            raise OSError(exc.errno, f"the dashboard cannot listen on {host}:{port}: {exc.strerror or exc}") from None

    def _publish_secret(self, address: str) -> None:
        """Where this user's programs look for the relay by address: the
        local secret (local mode) and the public key (CURVE)."""
        if self.auth_mode == "local":
            path = secret_path(address)
            write_secret_value(path, self.local_secret)
            self.discovery_files.append(path)
        if self.curve:
            path = public_key_path(address)
            write_secret_value(path, self.public_key.decode())
            self.discovery_files.append(path)

    # -- lifecycle ---------------------------------------------------------
    def _recover(self) -> None:
        """Reload endpoints and unfinished tasks from the store after a restart."""
        for endpoint_id, name, python, workers, _last, owner, access in self.store.endpoints():
            self.endpoints.add(EndpointState(endpoint_id, name, python, workers,
                                             access=EndpointAccess.unpack(owner, access)))
        count = 0
        users_by_function: dict[bytes, list[str]] = defaultdict(list)
        held: list[tuple[TaskRecord, list[bytes]]] = []   # tasks with dependencies: held again below
        for task_id, client, endpoint_id, fn_hash, kind, python, user, args, options in self.store.pending_tasks():
            opened = open_envelope(args) if args[:1] == b"\x00" else None
            if opened is not None:
                args = opened[1]
            if "," in endpoint_id:  # submitted to a group: it waits for any member again
                group = tuple(endpoint_id.split(","))
                record = TaskRecord(task_id, client, "", fn_hash, kind, python, args, options, user=user, group=group)
                mine = self.user_groups.setdefault(user, {})
                mine[group] = mine.get(group, 0) + 1
                queue = self.endpoints.group(group)
                if opened is None:
                    queue.queue.append(record)
                queue.hold_until = time.monotonic() + RECOVERY_GRACE
            else:
                state = self.endpoints.get(endpoint_id)
                if state is None:
                    continue
                record = TaskRecord(task_id, client, endpoint_id, fn_hash, kind, python, args, options, user=user)
                if opened is None:
                    state.queue.append(record)
            self.tasks[task_id] = record
            if opened is not None:
                held.append((record, opened[0]))
            users_by_function[fn_hash].append(user)
            self.quotas.charge(user, 1, row_bytes(len(args)))
            count += 1
        self.functions.recover(users_by_function)
        for task_id, user, size, finished in self.store.unacknowledged_results():
            self.quotas.result_stored(task_id, user, size, finished)
        for key, user, size, created in self.store.memo_entries():
            self.memo_keys.add(key)
            self.quotas.memo_stored(key, user, size, created)
        self._hold_recovered(held)
        if count:
            log.info("recovered %d unfinished task(s) from %s", count, self.store.path)

    @property
    def pidfile(self) -> PidFile:
        """``relay.json``: address and pid, so the CLI and executors can find
        a running relay."""
        return PidFile(self.data_dir / "relay.json")

    def stop(self, *_: Any) -> None:
        self.stopping = True

    def open_local_link(self) -> tuple[zmq.Context, MemoryEnd]:
        """Open the link for an endpoint agent running in this process and
        on this thread's loop (the embedded default's, ``fedexec.colocated``):
        the context for its sockets and its end of the link. Its peer is
        trusted as this relay's owner (locallink.py)."""
        if self.local_link is None:
            self.local_link = LocalLink(self.auth_mode)
        return self.ctx, self.local_link.agent_end

    def open_client_link(self, fd: int) -> None:
        """Serve the program that started this relay over ``fd``, its end of
        a socketpair it made (the embedded default's: embedded.py); its peer
        is trusted as this relay's owner (locallink.py)."""
        self.client_link = ClientLink(fd, self.auth_mode, self.pollers)
        self._add_link(self.client_link)

    def serve_forever(self, on_signal: Callable[..., Any] | None = None) -> None:
        """Serve until stopped; SIGTERM and SIGINT call ``on_signal`` (by
        default :meth:`stop`; the embedded default's lets its agent leave
        first, colocated.py)."""
        self.begin_serving(on_signal)
        poller = zmq.Poller()
        try:
            self.register(poller)
            while not self.stopping:
                self.turn(dict(poller.poll(self.wait_ms())))
        finally:
            self.end_serving()

    # -- the loop in parts: serve_forever's, or one a colocated agent shares (colocated.py) -----------
    def begin_serving(self, on_signal: Callable[..., Any] | None = None) -> None:
        """Before the first turn: signal handlers, the pid file, the web server."""
        signal.signal(signal.SIGTERM, on_signal or self.stop)
        signal.signal(signal.SIGINT, on_signal or self.stop)
        self.pidfile.write(address=self.address, auth=self.auth_mode, public_key=self.public_key.decode(),
                           **({"http": self.web.url} if self.web is not None else {}))
        if self.web is not None:
            self.dashboard.publish(self, time.monotonic())
            self.web.start()
        log.info("relay listening on %s (data in %s)", self.address, self.data_dir)
        self.next_maintenance = time.monotonic() + MAINTENANCE_INTERVAL
        self.next_expiry = time.monotonic()

    def register(self, poller: zmq.Poller) -> None:
        """Put what the relay's turns read on ``poller``."""
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.store.commit_fd, zmq.POLLIN)
        poller.register(self.access.wake_fd, zmq.POLLIN)
        if self.same_host is not None and self.listener_paused_until is None:
            poller.register(self.same_host.fileno(), zmq.POLLIN)
        for link in self.stream_links.values():
            poller.register(link.fd, zmq.POLLIN | (zmq.POLLOUT if link.polling_writes else 0))
        self.pollers.append(poller)   # (links accepted later go on it too)

    def wait_ms(self) -> int:
        """How long the poll before the next turn may wait."""
        if self.record_waiting or (self.local_link is not None and self.local_link.readable()):
            return 0
        return self.notices.wait_ms(time.monotonic(), int(MAINTENANCE_INTERVAL * 1000))

    def turn(self, events: dict[Any, int]) -> None:
        """One turn of the loop: what ``events`` (a poll's) says is ready is
        read and handled, then whatever is due, and what the colocated
        agent (sharing this thread) sent on the local link."""
        self.record_budget = RECORD_BYTES_PER_TURN
        self.sent_to.clear()
        if self.record_waiting:
            self._answer_waiting()
        if self.access.wake_fd in events:
            self._read_checked()
        if self.sock in events:
            self._read_messages()
        if self.same_host is not None and self.same_host.fileno() in events:
            self._accept_links()
        if self.stream_links:
            self._read_links(events)
        link = self.local_link
        if link is not None and link.readable():
            self._read_local()
        if self.store.commit_fd in events:
            self.store.drain_commit_notices()
        self._after_reads()
        if self.stream_links:   # what a link's socket did not take goes as soon as it takes more
            for stream in list(self.stream_links.values()):
                stream.end.flush()
                if stream.end.closed:
                    self._drop_link(stream)
                else:
                    stream.poll_writes(stream.end.wants_write())
        if self.refused_tasks or self.refused_unauthenticated:
            self._log_refused_tasks()
        now = time.monotonic()
        if now >= self.next_maintenance:
            self.next_maintenance = now + MAINTENANCE_INTERVAL
            self._maintenance(now)
        if now >= self.next_expiry:
            self.next_expiry = now + min(EXPIRY_INTERVAL, max(0.5, self.result_ttl / 2))
            cutoff = time.time() - self.result_ttl
            self.store.expire_results(cutoff)
            for key in self.quotas.expire(cutoff):   # memoized results gone from the record
                self.memo_keys.discard(key)
                self.memo_recent.discard(key)
        if self.dashboard is not None and self.dashboard.due(now):
            self.dashboard.publish(self, now)

    def end_serving(self) -> None:
        """After the last turn: close everything (a colocated agent first) and leave nothing behind."""
        log.info("relay stopping")
        if self.web is not None:
            self.web.stop()
        if self.local_link is not None:
            self.local_link.close()
        for stream in self.stream_links.values():
            stream.close()
        if self.same_host is not None:
            self.same_host.close()
        self.bulk.close()
        self.store.close()
        self.sock.close(linger=500)
        self.zap.stop()
        self.access.close()
        if self.local_link is not None:   # (a colocated agent's sockets share the context: any it could not
            self.ctx.destroy(linger=500)  # close, its shutdown having failed, are closed here, not waited on)
        else:
            self.ctx.term()
        if self.tokens is not None:
            self.tokens.close()
        for path in self.discovery_files:
            if path.suffix == ".pub" and self.remove_on_exit is None:
                # the public key stays (the same after a restart: it is kept in the
                # data dir), so this user's programs keep requiring it while the relay
                # is down, and whatever else listens on the address cannot pass for
                # it (without the key they would connect plainly, credentials and all)
                continue
            try:  # ours only: a relay started since on this address keeps its own
                if path.read_text() in (self.local_secret, self.public_key.decode()):
                    path.unlink()
            except OSError:
                pass
        self.pidfile.remove()
        if self.remove_on_exit is not None:  # a private relay leaves nothing behind
            shutil.rmtree(self.remove_on_exit, ignore_errors=True)

    def _after_reads(self) -> None:
        """The rest of a turn once its messages are read: the record's
        writes handed to its writer, what waits for their commit noted,
        tasks placed and everything due sent."""
        seq = self.store.flush()
        if self.bulk.flushed(seq) and seq > self.store.committed_seq:
            # an upload's file waits for this commit to be used again or dropped (bulk.py): the
            # next large payload should find it, not wait out the group commit's window
            self.store.hurry()
        if self.turn_accepted or self.turn_stored or self.turn_resumed:
            self.after_commit.append((seq, self.turn_accepted, self.turn_stored, self.turn_resumed))
            self.turn_accepted, self.turn_stored = defaultdict(list), defaultdict(list)
            self.turn_resumed = defaultdict(list)
        self._dispatch()
        self._send_all()
        self._send_committed()
        if self.notices:
            for peer, frames in self.notices.due(self.sent_to, time.monotonic()):
                self._send(peer, frames)

    def _maintenance(self, now: float) -> None:
        self.access.refresh(time.time())
        self.functions.expire_idle(now)
        for state in self.endpoints.connected():
            if state.expired(now):
                log.warning("endpoint %s (%s) missed its heartbeats; marked disconnected, "
                            "%d task(s) re-queued", state.name, state.endpoint_id, len(state.dispatched))
                self.endpoints.disconnect(state)
        self._report_backlogs()
        if self.stream_links or self.listener_paused_until is not None:
            self._link_maintenance(now)
        self.bulk.maintenance(now)
        self.refs.maintenance(now)
        if self.parent_pid and os.getppid() != self.parent_pid:
            log.info("parent process %d is gone; stopping", self.parent_pid)
            self.stopping = True

    def _report_backlogs(self) -> None:
        """Tell each endpoint how many tasks wait here for it, when that
        changed: what its scaler asks for blocks by (an endpoint with no
        pools has no credit, so no task would tell it)."""
        shares: dict[str, int] = defaultdict(int)   # group tasks waiting, shared among connected members
        for group in self.endpoints.groups.values():
            if group.queue:
                live = [m for m in group.members if (known := self.endpoints.get(m)) is not None and known.connected]
                for member in live:
                    shares[member] += -(-len(group.queue) // len(live))
        for state in self.endpoints.connected():
            backlog = len(state.queue) + shares.get(state.endpoint_id, 0)
            if backlog != state.reported_backlog:
                state.reported_backlog = backlog
                self._send(state.routing_id, P.encode(P.HEARTBEAT, {"backlog": backlog}))

    # -- input ---------------------------------------------------------------
    def _read_messages(self) -> None:
        sock = self.sock
        deadline = time.monotonic() + TURN_READ_BUDGET
        for frames in P.waiting_messages(sock, MAX_MESSAGES_PER_TURN):
            try:
                session = self.access.session(frames, time.time())
            except AccessDenied as exc:
                self._refuse_unauthenticated(frames[0].bytes, exc)
                continue
            if session is not None:   # None: held while its connection's token is checked (_read_checked)
                self._take(frames, session)
            if time.monotonic() > deadline:
                break   # the rest wait for the next turn, after this one's results have gone

    def _add_link(self, link: StreamLink) -> None:
        self.stream_links[link.fd] = link
        if link.peer is not None:
            self.stream_peers[link.peer] = link

    def _drop_link(self, link: StreamLink) -> None:
        """A stream link whose program is gone (or closed its end, or broke
        the framing): off the pollers (its end-of-file would spin them) and
        forgotten; its routing id reaches the program over ZeroMQ again,
        where a same-host program goes on (the embedded default's has no
        other way: it is gone)."""
        link.close()
        self.stream_links.pop(link.fd, None)
        if link.peer is not None and self.stream_peers.get(link.peer) is link:
            del self.stream_peers[link.peer]

    def _accept_links(self) -> None:
        """Same-host connections of the relay's owner (samehost.py): each a
        link once accepted, a routing id once introduced."""
        assert self.same_host is not None
        conns, failed = self.same_host.accept(MAX_SAME_HOST_LINKS - len(self.stream_links))
        for conn in conns:
            self._add_link(StreamLink(conn, None, self.pollers))
        if failed:   # (still readable, it would spin the loop: polled again after the next maintenance)
            self.listener_paused_until = time.monotonic() + MAINTENANCE_INTERVAL
            for poller in self.pollers:
                poller.unregister(self.same_host.fileno())

    def _read_links(self, events: dict[Any, int]) -> None:
        """Messages on the stream links the poll found readable: each
        program's in order, with the owner's session (locallink.py); each
        turn starts with the link after the one the last turn started with."""
        deadline = time.monotonic() + TURN_READ_BUDGET
        links = list(self.stream_links.values())
        self.links_read_first = first = (self.links_read_first + 1) % len(links)
        for link in links[first:] + links[:first]:
            if not events.get(link.fd, 0) & P.POLLIN:
                continue
            for frames in link.read():
                if not link.active:
                    if link.peer is None:   # its first message: who it is
                        if not link.introduce(frames, {other.peer for other in links}):
                            if not link.end.closed:   # (else it was gone before its answer could go)
                                log.warning("closed a same-host link that did not introduce itself with a "
                                            "routing id of its own")
                            link.end.closed = True
                            break
                        continue
                    # its program's first message: what goes to its routing id goes here from now on
                    link.active = True
                    self.stream_peers[link.peer] = link
                self._take(link.framed(frames), link.session)
            if link.end.closed:
                self._drop_link(link)
            if time.monotonic() > deadline:
                break   # the rest wait for the next turn, after this one's results have gone

    def _link_maintenance(self, now: float) -> None:
        """Close same-host links that never introduced themselves (each holds
        one of the MAX_SAME_HOST_LINKS places); poll a paused listener again."""
        for link in list(self.stream_links.values()):
            if link.peer is None and now - link.opened > INTRO_TIMEOUT:
                log.warning("closed a same-host link that did not introduce itself within %g s", INTRO_TIMEOUT)
                self._drop_link(link)
        if self.listener_paused_until is not None and now >= self.listener_paused_until and self.same_host:
            self.listener_paused_until = None
            for poller in self.pollers:
                poller.register(self.same_host.fileno(), zmq.POLLIN)

    def _read_local(self) -> None:
        """Messages on the local link: its peer has the owner's session (locallink.py)."""
        assert self.local_link is not None
        session = self.local_link.session
        deadline = time.monotonic() + TURN_READ_BUDGET
        for frames in self.local_link.messages(MAX_MESSAGES_PER_TURN):
            self._take(frames, session)
            if time.monotonic() > deadline:
                break

    def _read_checked(self) -> None:
        """Messages held while their connection's Globus token was checked
        on another thread, now that it has been: handled in the order they
        came, or the connection refused."""
        for frames, outcome in self.access.settled():
            if isinstance(outcome, AccessDenied):
                self._refuse_unauthenticated(frames[0].bytes, outcome)
            else:
                self._take(frames, outcome)

    def _refuse_unauthenticated(self, sender: bytes, exc: AccessDenied) -> None:
        why = str(exc)   # logged once per turn and reason (:meth:`_log_refused_tasks`)
        self.refused_unauthenticated[why] = self.refused_unauthenticated.get(why, 0) + 1
        self._send(sender, P.encode(P.ERROR, exc.reply()))

    def _take(self, frames: list[Any], session: Session) -> None:
        sender = frames[0].bytes
        try:
            msg = P.decode(frames[1:])
            self._handle(sender, session, msg)
        except Exception as exc:  # one bad message must not stop the relay for everyone
            why = f"{type(exc).__name__}: {P.clip(str(exc))}"
            log.warning("rejected a malformed message from user %r (connection %s): %s", session.user,
                        sender.hex()[:64], why)
            self._send(sender, P.encode(P.ERROR, {"msg": f"malformed message: {why}"}))

    def _handle(self, sender: bytes, session: Session, msg: P.Message) -> None:
        t = msg.type
        if t == P.SUBMIT:
            self._on_submit(sender, session, msg)
        elif t == P.RESULTS:
            self._on_results(sender, session, msg)
        elif t == P.CREDIT:
            state = self._endpoint_of(sender)
            state.credit += P.count(msg.fields["n"], "credit")
        elif t == P.HEARTBEAT:
            # the incarnation tells the sender whether this relay restarted
            reply: dict[str, Any] = {"inc": self.incarnation}
            state = self.endpoints.by_routing.get(sender)
            if state is not None:
                state.last_seen = time.monotonic()
                if "st" in msg.fields:   # its workers, queue and blocks: for the Client API and the dashboard
                    state.report = parse_report(msg.fields["st"])
                    if self.dashboard is not None:
                        self.dashboard.endpoint_report(state.endpoint_id, state.report)
            elif sender[:1] == b"E":  # an endpoint we expired or never met: it must introduce itself again
                reply["unknown"] = True
            self._send(sender, P.encode(P.HEARTBEAT, reply))
        elif t == P.RESUME:
            self._answer_resumed(sender, session, P.task_ids(msg.fields["tids"]), final=False)
        elif t == P.CANCEL:
            self._on_cancel(sender, session, msg)
        elif t == P.ACK:
            acknowledged = P.task_ids(msg.fields["tids"])
            if self.graph.refs:   # results that tasks held here still need stay until then
                acknowledged = self.graph.put_off(acknowledged, session.user, self.store.finished_owners)
            known = self.store.acknowledge(acknowledged, session.user)
            self.quotas.acknowledged(known, session.user)
        elif t == P.HELLO:
            self._on_hello(sender, session, msg)
        elif t == P.HOLDING:   # more of what an endpoint's HELLO said it holds
            state = self._endpoint_of(sender)
            if time.monotonic() - state.hello_at > HOLDING_WINDOW:
                raise P.ProtocolError(f"HOLDING is taken only within {HOLDING_WINDOW:.0f} s of the HELLO of "
                                      f"the same connection")
            self._take_back_held(state, sender, P.task_ids(msg.fields["tids"]))
        elif t == P.LOOKUP:
            self._on_lookup(sender, session, P.text(msg.fields["ep"], "endpoint id"))
        elif t == P.SHARE:
            self._on_share(sender, session, msg.fields)
        elif t == P.DEREGISTER:
            self.deletions.handle(sender, session, msg)
        elif t == P.BYE:
            state = self.endpoints.by_routing.get(sender)
            if state is not None:
                log.info("endpoint %s (%s) said goodbye; %d task(s) re-queued",
                         state.name, state.endpoint_id, len(state.dispatched))
                self.endpoints.disconnect(state)
        elif t in BULK_TYPES:
            self.bulk.handle(sender, session, msg)
        elif t in REF_TYPES:
            self.refs.handle(sender, session, msg)
        elif t == P.INSPECT:
            self.inspector.handle(sender, session, msg)
        else:
            raise P.ProtocolError(f"unknown message type {P.shorten(t)}")

    def _endpoint_of(self, sender: bytes) -> EndpointState:
        state = self.endpoints.by_routing.get(sender)
        if state is None:
            raise P.ProtocolError("endpoint message from a connection that did not say hello")
        return state

    def _refuse(self, sender: bytes, session: Session, action: str, why: str) -> None:
        """Say no to an authenticated user, and log who, what and why."""
        refusals.warning("refused user %r: %s: %s", session.user, action, why)
        self._send(sender, P.encode(P.ERROR, {"msg": f"not allowed: {why}", "refused": True}))

    def _refused_task(self, user: str, action: str, task_id: bytes) -> None:
        """Count a refusal of one task, logged with the others of the turn
        (:meth:`_log_refused_tasks`): a message of many such rows makes one
        log line, not one per row."""
        entry = self.refused_tasks.get((user, action))
        if entry is None:
            self.refused_tasks[(user, action)] = [1, task_id]
        else:
            entry[0] += 1

    def _log_refused_tasks(self) -> None:
        for (user, action), (count, first) in self.refused_tasks.items():
            refusals.warning("refused user %r: %s: %d task(s) (the first: %s)", user, action, count, first.hex())
        self.refused_tasks.clear()
        for why, count in self.refused_unauthenticated.items():
            refusals.warning("refused %d message(s) from unauthenticated connections: %s", count, why)
        self.refused_unauthenticated.clear()

    def _on_hello(self, sender: bytes, session: Session, msg: P.Message) -> None:
        f = msg.fields
        role = f["role"]
        if role == "endpoint":
            # check everything before touching state: a bad HELLO must not
            # knock a live endpoint off
            endpoint_id = P.text(f["id"], "endpoint id")
            if not P.is_endpoint_id(endpoint_id):
                raise P.ProtocolError(f"endpoint id {P.shorten(endpoint_id)} is not a UUID")
            if not (sender[:1] == b"E" and len(sender) == 17):
                raise P.ProtocolError("an endpoint connects with a routing id of E and 16 random bytes")
            functions = f.get("functions")
            if functions is not None:
                functions = frozenset(P.function_hashes(functions))
            data_only = f.get("data_only", False)
            if type(data_only) is not bool:
                raise P.ProtocolError("data_only must be true or false")
            name, python = P.text(f["name"], "name"), P.text(f["py"], "python version", 16)
            workers, capacity = P.count(f["workers"], "workers"), P.count(f["capacity"], "capacity")
            held = P.task_ids(f.get("holding", []))
            heartbeat = f.get("hb", 2.0)
            if not isinstance(heartbeat, (int, float)) or not 0.01 <= heartbeat <= 3600:
                raise P.ProtocolError(f"heartbeat period {P.shorten(heartbeat)} out of range")
            missed = f.get("hbm", 3)
            if type(missed) is not int or not 1 <= missed <= 100:
                raise P.ProtocolError(f"missed heartbeats {P.shorten(missed)} out of range")
            meta = endpoint_meta(f.get("meta"))
            if self.deletions.refuse_hello(sender, session, endpoint_id):
                return
            state = self.endpoints.get(endpoint_id)
            if state is not None and state.access.owner and state.access.owner != session.user:
                self._refuse(sender, session, f"connect as endpoint {endpoint_id}",
                             f"endpoint {endpoint_id} is registered to another user")
                return
            if state is None:
                owned = self.endpoints.owned.get(session.user, 0)
                if owned >= self.max_endpoints_per_user:
                    self._refuse(sender, session, f"register endpoint {endpoint_id}",
                                 f"user {session.user!r} has {owned:,} endpoints registered at the relay, its limit "
                                 f"of {self.max_endpoints_per_user:,} endpoints per user (--max-endpoints-per-user)"
                                 f"; connect with the id of one of them")
                    return
                state = EndpointState(endpoint_id, name, python)
                state.access.owner = session.user
                self.endpoints.add(state)
            state.access.owner = session.user
            state.access.functions = functions
            state.access.data_only = data_only
            self.endpoints.connect(state, sender)
            self.endpoint_senders[sender] = endpoint_id
            state.name, state.python, state.workers = name, python, workers
            state.heartbeat_period = float(heartbeat)
            state.heartbeats_missed = missed
            state.meta = meta
            state.credit = capacity
            state.hello_at = time.monotonic()
            self._take_back_held(state, sender, held)
            self._save_endpoint(state)
            log.info("endpoint %s (%s) connected: python %s, %d workers, %d task(s) waiting, %d held there",
                     state.name, endpoint_id, state.python, state.workers, len(state.queue), len(state.dispatched))
            self._send(sender, P.encode(P.WELCOME, {"role": "endpoint", "inc": self.incarnation,
                                                    "max_payload": self.max_payload}))
        elif role == "client":
            self._send(sender, P.encode(P.WELCOME, {"role": "client", "py": P.PYTHON_VERSION,
                                                    "inc": self.incarnation, "max_payload": self.max_payload,
                                                    "deps": True}))
        else:
            raise P.ProtocolError(f"unknown role {P.shorten(role)}")

    def _save_endpoint(self, state: EndpointState) -> None:
        self.store.save_endpoint(state.endpoint_id, state.name, state.python, state.workers, state.access.owner,
                                 state.access.pack())

    def _on_lookup(self, sender: bytes, session: Session, endpoint_id: str) -> None:
        state = self.endpoints.get(endpoint_id)
        if state is not None and not state.access.allows(session.user, session.groups):
            refusals.warning("refused user %r: look up endpoint %s: not shared with them", session.user, endpoint_id)
            reply = {"found": False, "refused": f"endpoint {endpoint_id} is not shared with user {session.user!r}"}
        else:
            # "yours": whether the asker owns it (a client does not trust another
            # user's endpoint with its process: it asks for data only)
            reply = {"found": state is not None,
                     "endpoint": _lookup_view(state, state.access.owner == session.user) if state else {}}
        self._send(sender, P.encode(P.LOOKUP_REPLY, reply))

    def _on_share(self, sender: bytes, session: Session, f: dict[str, Any]) -> None:
        """The owner changes who may use an endpoint."""
        endpoint_id = P.text(f["ep"], "endpoint id")
        state = self.endpoints.get(endpoint_id)
        if state is None:
            self._send(sender, P.encode(P.ERROR, {"msg": f"the relay knows no endpoint {endpoint_id}"}))
            return
        if state.access.owner != session.user:
            self._refuse(sender, session, f"share endpoint {endpoint_id}", "only its owner may share it")
            return
        access = state.access
        if "public" in f:
            if type(f["public"]) is not bool:
                raise P.ProtocolError("public must be true or false")
            access.public = f["public"]
        if "share_memo" in f:
            if type(f["share_memo"]) is not bool:
                raise P.ProtocolError("share_memo must be true or false")
            access.share_memo = f["share_memo"]
        for field_name, names in (("add_users", access.users), ("add_groups", access.groups)):
            names.update(P.text(name, field_name) for name in f.get(field_name, ()))
        for field_name, names in (("remove_users", access.users), ("remove_groups", access.groups)):
            names.difference_update(P.text(name, field_name) for name in f.get(field_name, ()))
        self._save_endpoint(state)
        log.info("user %r changed who may use endpoint %s: %s", session.user, endpoint_id, access.describe())
        self._send(sender, P.encode(P.SHARED, {"endpoint": {"id": endpoint_id, **access.describe()}}))

    def _take_back_held(self, state: EndpointState, sender: bytes, held: list[bytes]) -> None:
        """An endpoint (re)connecting still holds these tasks (queued or
        running there, or finished with their outcome not yet stored here):
        they count as sent to it, not to be sent again, also those held here
        for their dependencies (sent there with their ids before a restart).
        Those this relay has no unfinished record of, or that went to another
        member of their group meanwhile, are cancelled there.

        Looked up by id (cost: the ids held, not the queue): a task taken
        back stays in its queue, marked DISPATCHED, and is skipped when the
        dispatcher or router meets it; a queue is compacted once half of it
        is such entries."""
        if not held:
            return
        endpoint_id = state.endpoint_id
        cancel = []
        groups: set[tuple[str, ...]] = set()
        for task_id in held:
            if task_id in state.dispatched:
                continue
            record = self.tasks.get(task_id)
            if record is not None and record.state == WAITING and record.group is None \
                    and record.endpoint_id == endpoint_id and task_id in self.graph.dependencies_of:
                # sent there with its dependencies' ids before this relay restarted (or before that
                # endpoint left) and held here since: it waits there for them as it did, and counts as
                # sent (were it dropped there, the answer to that could be taken for the outcome of
                # the copy this relay would send once its dependencies finish)
                self.graph.forwarded.add(task_id)
                if record.options is None or "d" not in record.options:   # (recovered: the record keeps no "d")
                    record.options = {**(record.options or {}), "d": list(self.graph.dependencies_of[task_id])}
                record.state = DISPATCHED
                state.dispatched[task_id] = record
                continue
            if record is None or record.state != QUEUED or (
                    record.endpoint_id != endpoint_id if record.group is None
                    else endpoint_id not in record.group or record.endpoint_id not in ("", endpoint_id)):
                cancel.append(task_id)
                continue
            if record.group is not None:   # in its group's queue (or, rarely, routed to this one's)
                groups.add(record.group)
                self.endpoints.group(record.group).stale += 1
            else:
                state.stale += 1
            record.state = DISPATCHED
            record.endpoint_id = endpoint_id
            state.dispatched[task_id] = record
        _compact(state)
        for group in groups:
            _compact(self.endpoints.group(group))
        if cancel:
            # its answers (CANCELLED) are no outcome: the same task may be sent there again before
            # they come (a client sending again what a restarted relay had not recorded, a group
            # task coming back from another member, a held task whose dependencies finished)
            self.drop_notes.note(state, cancel)
        for part in P.chunks(sorted(cancel)):
            self._send(sender, P.encode(P.CANCEL, {"tids": part}))

    def _answer_resumed(self, sender: bytes, session: Session, task_ids: list[bytes], final: bool) -> None:
        """A client (the same after a relay restart, or a new process
        reattaching) waits for these tasks of its user: their results go to
        it, and those already finished are sent from the record (within
        the turn's budget, see :meth:`_answer_from_record`). An id repeated
        in one message counts once."""
        task_ids = list(dict.fromkeys(task_ids))
        in_record = self.store.known_tasks([task_id for task_id in task_ids if task_id not in self.tasks])
        for task_id in task_ids:
            record = self.tasks.get(task_id)
            if record is not None:
                if record.user != session.user:
                    self._not_theirs(sender, session, task_id, "reattach to")
                else:
                    record.client = sender
            elif task_id in in_record and self._answer_from_record(sender, session, task_id):
                continue
            elif not final:  # it may have finished with its result still in the writer's queue
                self.turn_resumed[sender].append((session, task_id))
            else:
                self._reject(sender, task_id, P.LOST,
                             "the relay has no record of this task to give: it was never accepted, its result "
                             "was fetched and acknowledged or expired, or its endpoint is no longer known")

    def _not_theirs(self, sender: bytes, session: Session, task_id: bytes, action: str) -> None:
        self._refused_task(session.user, f"{action} task(s) of another user", task_id)
        self._reject(sender, task_id, P.NOT_ALLOWED, f"task {task_id.hex()} belongs to another user")

    def _on_submit(self, sender: bytes, session: Session, msg: P.Message) -> None:
        ep = msg.fields["ep"]
        # one endpoint (an id), or a group (a list of ids: each task goes to one member)
        group = P.endpoint_group(ep) if isinstance(ep, list) else None
        if group is not None and len(group) == 1:
            group, ep = None, group[0]
        if group is None:
            endpoint_id = P.text(ep, "endpoint id")
            members = (endpoint_id,)
        else:
            endpoint_id = ",".join(group)   # as the record keeps it
            members = group
        states = [self.endpoints.get(member) for member in members]
        state = states[0] if group is None else None
        blobs = msg.blobs
        rows = msg.fields["tasks"]
        if not isinstance(rows, list):
            raise P.ProtocolError("tasks must be a list")
        used: set[int] = set()   # frames referred to (each at most once)
        for row in rows:  # all rows are checked before any is accepted
            P.task_row(row, P.TRACE_AT_RELAY)
            if type(row[2]) is not bytes:   # (inline arguments refer to no frame)
                P.claim_frame(used, blobs, row[2])
            if row[3] != -1:
                P.claim_frame(used, blobs, row[3])
        user = session.user
        for member in states:  # a group: the user must be allowed on every member
            if member is not None and not member.access.allows(user, session.groups):
                why = f"endpoint {member.name!r} ({member.endpoint_id}) is not shared with user {user!r}"
                refusals.warning("refused user %r: submit %d task(s) to endpoint %s: not shared with them",
                                 user, len(rows), member.endpoint_id)
                for row in rows:
                    self._reject(sender, row[0], P.NOT_ALLOWED, why, quiet=True)
                return
        unknown = next((member for member, known in zip(members, states) if known is None), None)
        # allow-lists: one endpoint's; for a group, a function any member allows may go to those members
        lists = [known.access.functions for known in states if known is not None]
        allowed = None if unknown is not None or any(functions is None for functions in lists) \
            else frozenset().union(*lists)
        where = f"endpoint {endpoint_id}" if group is None else f"any endpoint of the group {list(group)}"
        resend = msg.fields.get("resend") is True   # after a relay restart: some may be done already
        accepted = self.turn_accepted[sender]
        now = time.time()
        quota_logged = False
        memo_scope: bytes | None = None   # made for the first memoized task of the batch
        seen: set[bytes] = set()
        finished_again: list[bytes] = []   # tasks of this user the relay holds finished, sent again
        tasks, functions, finished_owners, quotas = self.tasks, self.functions, self.store.finished_owners, self.quotas
        kept_owners = self.store.kept_owners
        function_refs = functions.refs   # (``in functions``, and the common case of ``functions.use``, inline)
        add_task, max_payload = self.store.add_task, self.max_payload
        python_ok: set[str] = set()   # client Python versions every endpoint here runs (checked once per message)
        # What is left of the user's quotas is looked up once per message, and
        # what its accepted tasks take is charged once, at the end (or before
        # a refusal, so that the refusal names the usage as it is).
        room_tasks, room_bytes = quotas.room(user)
        taken_tasks = taken_bytes = 0
        try:
            for row in rows:
                task_id, fn_hash, args_index, fn_index, kind, python = row[:6]
                if task_id in seen:   # a task id repeated in one message: its first row answers it
                    continue
                seen.add(task_id)
                options = row[6] if len(row) == 7 else None
                if options is not None and "tr" in options:
                    options["tr"].append(now)
                if allowed is not None and fn_hash not in allowed:
                    self._refused_task(user, f"run function(s) not on the allow-list of {where}", task_id)
                    self._reject(sender, task_id, P.NOT_ALLOWED,
                                 f"function {fn_hash.hex()} is not on the allow-list of {where}", quiet=True)
                    continue
                body = None   # a body the relay does not have: stored once a task using it is accepted
                if fn_index != -1 and fn_hash not in function_refs:
                    size = len(P.as_buffer(P.blob(blobs, fn_index)))
                    if size > self.max_function:
                        message, details = P.too_large("the function", size, self.max_function)
                        self._reject(sender, task_id, P.TOO_LARGE, message, **details)
                        continue
                    body = P.as_bytes(P.blob(blobs, fn_index))
                    if P.content_hash(body) != fn_hash:
                        self._reject(sender, task_id, P.REJECTED, "function body does not match its hash")
                        continue
                held = tasks.get(task_id)
                if held is not None:
                    if held.user != user:
                        self._not_theirs(sender, session, task_id, "resubmit")
                    else:
                        accepted.append(task_id)  # a resubmission of a task we hold: idempotent
                    continue
                owner = finished_owners.get(task_id)   # finished, its result not yet acknowledged
                if owner is None and kept_owners:
                    owner = kept_owners.get(task_id)   # acknowledged, kept (retained.py): still theirs
                if owner is not None and owner != user:
                    self._not_theirs(sender, session, task_id, "resubmit")
                    continue
                if owner is not None:
                    # finished already: sent again (after a relay restart), or this copy came late
                    # behind the one sent again: answered with its result (below), not run twice
                    finished_again.append(task_id)
                    continue
                if resend and self._answer_from_record(sender, session, task_id):
                    continue
                if unknown is not None:
                    self._reject(sender, task_id, P.REJECTED, f"unknown endpoint {unknown}" if group is None
                                 else f"unknown endpoint {unknown} (in the group {list(group)})")
                    continue
                if python not in python_ok:
                    other = next((known for known in states if known.python and python != known.python), None)
                    if other is not None:
                        self._reject(sender, task_id, P.VERSION,
                                     f"client runs Python {python} but endpoint {other.name!r} runs Python "
                                     f"{other.python}; pickled functions need the same minor version")
                        continue
                    python_ok.add(python)
                if body is None and fn_hash not in function_refs:
                    # sent without its body (the client sent it before), which went
                    # with the last task using it: the client sends this one again with it
                    self._reject(sender, task_id, P.NEED_FUNCTION,
                                 f"the relay no longer has function {fn_hash.hex()}: send it with the task",
                                 quiet=True)
                    self.graph.sent_again(task_id, user, P.NEED_FUNCTION)   # (its dependents follow it)
                    continue
                if type(args_index) is bytes:   # inline (small arguments: the common case)
                    args = buffer = args_index
                else:
                    args = P.blob_at(blobs, args_index)
                    buffer = P.as_buffer(args)
                size = len(buffer)
                if size <= MAX_REF and (args.startswith(REF_MAGIC) if type(args) is bytes else is_big(args)):
                    # a large payload, uploaded before (bulk.py)
                    refused = self.bulk.check_arguments(user, P.as_bytes(args))
                    if refused is not None:
                        self._reject(sender, task_id, refused[0], refused[1], **refused[2])
                        continue
                    args = buffer = P.as_bytes(args)
                if size > max_payload:
                    message, details = P.too_large("the arguments", size, self.max_payload)
                    self._reject(sender, task_id, P.TOO_LARGE, message, **details)
                    continue
                if group is not None and self._too_many_groups(sender, user, group, task_id):
                    continue
                if options is not None and ("dr" in options or "nl" in options):
                    # (dr: the relay's own, for endpoints, kept.py; nl: an endpoint's, for its pools)
                    which = "dr" if "dr" in options else "nl"
                    self._reject(sender, task_id, P.REJECTED,
                                 f"task option {which} is the {'relay' if which == 'dr' else 'endpoint'}'s to set, "
                                 "not a client's")
                    continue
                if options is not None and "rf" in options:   # DataRefs (refs.py): the user's own, live
                    missing = self.refs.check_task(user, options["rf"])
                    if missing is not None:
                        self._reject(sender, task_id, P.REF_MISSING, missing[0], ref=missing[1])
                        continue
                dependencies = options.get("d") if options is not None else None
                unfinished: set[bytes] = set()
                if dependencies is not None:
                    options.pop("m", None)   # its arguments name other tasks: never memoized
                    found = self._open_dependencies(sender, user, task_id, dependencies)
                    if found is None:
                        continue
                    unfinished = found
                if options is not None and "m" in options:
                    if memo_scope is None:
                        memo_scope = self._memo_scope(user, endpoint_id, states)
                    options["m"] = _memo_key(memo_scope, fn_hash, kind, buffer)
                    if self._serve_memoized(sender, task_id, options):
                        continue
                cost = size if size > MIN_ROW_BYTES else MIN_ROW_BYTES   # row_bytes(size)
                need = cost if body is None else cost + len(body)
                if room_tasks < 1 or room_bytes < need:
                    quotas.charge(user, taken_tasks, taken_bytes)
                    taken_tasks = taken_bytes = 0
                    over = quotas.refusal(user, 1, need)
                    if over is not None:
                        if not quota_logged:
                            refusals.warning("refused user %r: submit tasks: %s", user, over[0])
                            quota_logged = True
                        self._reject(sender, task_id, P.QUOTA, over[0], quiet=True, **over[1])
                        continue
                room_tasks -= 1
                room_bytes -= need
                taken_tasks += 1
                taken_bytes += cost   # (a new body is charged by functions.use)
                count = function_refs.get(fn_hash)
                if count:   # a function other unfinished tasks use
                    function_refs[fn_hash] = count + 1
                else:
                    functions.use(fn_hash, body, user)
                add_task(task_id, sender, endpoint_id, fn_hash, kind, python,
                         buffer if dependencies is None else envelope(dependencies, buffer), user,
                         durable_options(options) if options else None)
                if group is None:
                    record = TaskRecord(task_id, sender, endpoint_id, fn_hash, kind, python, args, options, user)
                    if dependencies is None:
                        state.queue.append(record)
                else:  # routed to a member by _route_group
                    record = TaskRecord(task_id, sender, "", fn_hash, kind, python, args, options, user, group)
                    if dependencies is None:
                        self.endpoints.group(group).queue.append(record)
                    mine = self.user_groups.setdefault(user, {})
                    mine[group] = mine.get(group, 0) + 1
                tasks[task_id] = record
                accepted.append(task_id)
                if dependencies is not None:
                    self._hold_or_forward(record, dependencies, unfinished, state if group is None else None, now)
        finally:
            if taken_tasks:
                quotas.charge(user, taken_tasks, taken_bytes)
        if finished_again:   # as a RESUME of them (one look at the record for them all)
            self._answer_resumed(sender, session, finished_again, final=False)

    # -- tasks held for their dependencies (see graph.py) ----------------------------
    def _open_dependencies(self, client: bytes, user: str, task_id: bytes,
                           dependencies: list[bytes]) -> set[bytes] | None:
        """The dependencies a task waits for: each must be an unfinished task
        of the same user, or one that finished a moment ago whose result is
        still here (``graph.recent_result``); None if it is refused (answered)."""
        finished: set[bytes] = set()
        for dependency in dependencies:
            record = self.tasks.get(dependency)
            if record is not None and record.user == user:
                continue
            if record is None and self.store.finished_owners.get(dependency) == user:
                if (self.graph.recent_result(dependency) is not None   # (unacknowledged: it stays)
                        or self._recorded_result(dependency, user) is not None):
                    finished.add(dependency)
                    continue
                # finished: its result is on its way to the client, which sends the value itself
                self._reject(client, task_id, P.DEPENDENCY_DONE, f"task {_uuid(dependency)} has finished",
                             quiet=True)
                self.graph.sent_again(task_id, user, P.DEPENDENCY_DONE)
                return None
            again = self.graph.sent_again_as(dependency, user) if record is None else None
            if again is not None:
                # refused a moment ago for the client to send it again (with its function's
                # body, or later with its dependencies' values): this task, sent before the
                # client knew, is refused the same way, and so are the tasks depending on it
                self.graph.sent_again(task_id, user, again)
                self._reject(client, task_id, again,
                             f"task {_uuid(dependency)}, which this task depends on, is to be sent again: "
                             f"send this task again after it", quiet=True)
                return None
            self._refused_task(user, "depend on task(s) that are not theirs or unknown", task_id)
            self._reject(client, task_id, P.NOT_ALLOWED,
                         f"task {_uuid(task_id)} depends on task {_uuid(dependency)}, which is not an unfinished "
                         f"task of user {user!r} at the relay (it is unknown, finished and acknowledged, or "
                         f"another user's)", quiet=True)
            return None
        return set(dependencies) - finished if finished else set(dependencies)

    def _hold(self, record: TaskRecord, dependencies: list[bytes], unfinished: set[bytes],
              results: dict[bytes, bytes], now: float) -> None:
        """Keep a task out of the queues until ``unfinished`` have finished."""
        record.state = WAITING
        if self.graph.hold(record, dependencies, unfinished, results):
            self._release_ready(record, now)

    def _hold_or_forward(self, record: TaskRecord, dependencies: list[bytes], unfinished: set[bytes],
                         state: EndpointState | None, now: float) -> None:
        """A new task with dependencies: if they all go to its own endpoint
        (``state``; not a group's) and are queued or sent there, it is queued
        for it too and sent with their ids (option "d"), to wait there for
        their results (endpoint/graph.py); else it is held here."""
        tasks = self.tasks
        endpoint_id = record.endpoint_id
        if state is not None and len(unfinished) == len(dependencies) and all(
                (other := tasks.get(d)) is not None and other.group is None and other.endpoint_id == endpoint_id
                and other.state != WAITING for d in dependencies):
            self.graph.hold(record, dependencies, unfinished, {})
            self.graph.forwarded.add(record.task_id)
            state.queue.append(record)
            return
        results = {} if len(unfinished) == len(dependencies) else {
            dependency: self.graph.recent_result(dependency) for dependency in dependencies
            if dependency not in unfinished}
        self._hold(record, dependencies, unfinished, results, now)

    def _forward_now(self, state: EndpointState, record: TaskRecord, now: float) -> bool:
        """(Dispatching) a queued task with dependencies: True to send it
        now, with their ids if they all went to ``state`` before it and none
        finished yet, else with their results if all are in hand; False if
        it is held here after all, or failed."""
        graph = self.graph
        task_id = record.task_id
        if graph.is_ready(task_id):   # (it came back from an endpoint that left)
            return self._release_ready(record, now, queued=True)
        failure = graph.failed_there.pop(task_id, None)
        if failure is not None:
            record.state = WAITING   # (out of the queue)
            del self.tasks[task_id]
            self._fail_held(record, failure, now)
            return False
        if task_id in graph.forwarded and graph.may_go_on(task_id, state.dispatched):
            return True
        graph.forwarded.discard(task_id)   # held here until its dependencies finish
        record.state = WAITING
        return False

    def _release_ready(self, record: TaskRecord, now: float, queued: bool = False) -> bool:
        """Every dependency of a held task has finished: it is queued (if
        not ``queued`` already) with their results around its arguments (or
        fails, if that is too large); whether it stays."""
        results = self.graph.ready_results(record.task_id)
        if queued:
            record.state = WAITING   # (skipped by the dispatcher, should it fail below)
        if None in results:   # large results: read from the record
            failure = self._results_from_record(record, results)
            if failure is not None:
                del self.tasks[record.task_id]
                self._fail_held(record, failure, now)
                return False
        if is_big(record.args):
            # (a large payload is a reference to an upload: the relay cannot wrap results around it)
            del self.tasks[record.task_id]
            self._fail_held(record, P.pack_failure(
                P.REJECTED, "a task whose arguments hold other tasks' futures cannot yet have arguments that "
                            "travel in chunks (over 16 MiB pickled): pass the futures' values yourself "
                            "(future.result())"), now)
            return False
        uploads = None
        if any(is_big(result) for result in results):   # large results: the endpoint fetches them (kept.py)
            uploads, failure = self.kept.substitute(record, self.graph.dependencies_of[record.task_id], results)
            if failure is not None:
                del self.tasks[record.task_id]
                self._fail_held(record, failure, now)
                return False
        args = wrap_arguments(bytes(record.args), results)
        if len(args) > self.max_payload:
            del self.tasks[record.task_id]
            message, details = P.too_large("the arguments with the results of the tasks they depend on",
                                           len(args), self.max_payload)
            self._fail_held(record, P.pack_failure(P.TOO_LARGE, message, **details), now)
            return False
        self.quotas.charge(record.user, 0, row_bytes(len(args)) - row_bytes(len(P.as_buffer(record.args))))
        record.args = args
        record.state = QUEUED
        if record.options is not None and "d" in record.options:   # for the relay only: not sent on
            del record.options["d"]
            if not record.options:
                record.options = None
        if uploads:
            record.options = {**(record.options or {}), "dr": uploads}
        if queued:   # in its queue already
            return True
        if record.group is not None:
            self.endpoints.group(record.group).queue.append(record)
            return True
        state = self.endpoints.get(record.endpoint_id)
        if state is None:
            del self.tasks[record.task_id]
            self._fail_held(record, P.pack_failure(P.REJECTED, f"unknown endpoint {record.endpoint_id}"), now)
            return False
        state.queue.append(record)
        return True

    def _results_from_record(self, record: TaskRecord, results: list[Any]) -> bytes | None:
        """Fill in (in place) the results of a ready task's dependencies that
        were not kept in memory (graph.KEPT_IN_MEMORY), from the record
        (written first, if it is not yet: a wait of one group commit); a
        failure if one is gone."""
        self._wait_for_record()
        for position, dependency in enumerate(self.graph.dependencies_of[record.task_id]):
            if results[position] is not None:
                continue
            outcome = self.store.task_outcome(dependency)
            if outcome is None or outcome[1] != P.OK or outcome[3] != record.user:
                return P.pack_failure(P.LOST, f"the result of task {_uuid(dependency)}, which this task depends on, "
                                              f"could not be read from the relay's record")
            results[position] = outcome[2] or b""
        return None

    def _wait_for_record(self) -> None:
        """(Rare paths) wait until everything recorded so far is written."""
        self.store.sync()

    def _recorded_result(self, task_id: bytes, user: str) -> bytes | None:
        """The result of ``user``'s task that finished and is not yet
        acknowledged (a task naming it reached the relay just after it
        finished: its client sent the two apart, as a chain's first links
        often are), read back from the record if it is small and succeeded,
        and kept with the recent results (``graph.remember``); else None
        (the task naming it is refused, for its client to send it with the
        value). Without it, that refusal is followed by the same for every
        later link already sent (``graph.sent_again``): the whole chain
        through the client. A rare path: it waits for one group commit, at
        most RECORD_READS_PER_SECOND times a second per user, and never for
        a task known not to have a result that could feed a dependent
        (reads.py)."""
        if not self._record_reads.take(task_id, user):
            return None
        self._wait_for_record()
        outcome = self.store.task_outcome(task_id)
        if outcome is None or outcome[1] != P.OK or outcome[3] != user or outcome[2] is None:
            return None
        result = outcome[2]
        if is_big(result) or in_memory(result) is None:
            return None
        self.graph.remember(task_id, result)
        return self.graph.recent_result(task_id)

    def _fail_held(self, record: TaskRecord, failure: bytes, now: float) -> None:
        """A held task (already out of ``self.tasks``) fails with ``failure``."""
        rows, blobs = self.client_results[record.client]
        rows.append(blobs.result_row(record.task_id, P.FAILED, failure))
        self._finished_all([(record, P.FAILED, failure)], now)

    def _dependencies_finished(self, finished: list[tuple[TaskRecord, int, Any]], now: float) -> None:
        """Tasks finished: the tasks held for them go (or fail, if one did
        not succeed, and so on down the graph: a loop, not a recursion, so
        that a long chain cannot exhaust the stack); a finished task's own
        dependencies' results may go once nothing else needs them."""
        if self._cascade is not None:   # called from within the loop below: it takes these too
            self._cascade.extend(finished)
            return
        self._cascade = queue = list(finished)
        graph = self.graph
        try:
            while queue:
                record, status, result = queue.pop()
                if record.task_id in graph.dependencies_of:
                    if status == P.OK:   # a task naming it may be on its way (see recent_result)
                        graph.remember(record.task_id, result)
                    dependencies = graph.dependencies_of[record.task_id]
                    due: dict[str, list[bytes]] = {}
                    for dependency, user in graph.release(record.task_id).items():
                        due.setdefault(user, []).append(dependency)
                    for user, acknowledged in due.items():   # the acknowledgements put off for it
                        self.quotas.acknowledged(self.store.acknowledge(acknowledged, user), user)
                    if self.kept.uploads:   # large results no unfinished task needs now may go (kept.py)
                        for dependency in dependencies:
                            if dependency not in graph.refs:
                                self.kept.released(dependency)
                if status == P.OK and record.task_id in graph.refs and is_big(result):
                    self.kept.keep(record.task_id, record.user, result)   # (until its dependents are done)
                ready, failed = graph.finished(record.task_id, status == P.OK, result)
                for waiting in ready:
                    if self.tasks.get(waiting.task_id) is waiting and waiting.state != DISPATCHED:
                        # (one forwarded to its endpoint takes the results there; they are kept
                        # here only in case it comes back)
                        self._release_ready(waiting, now, queued=waiting.state == QUEUED)
                if failed:
                    what = "was cancelled" if status == P.CANCELLED else "failed"
                    failure = P.pack_failure(P.DEPENDENCY, f"task {_uuid(record.task_id)}, which this task depends "
                                             f"on, {what}, so this task was not run", dep=record.task_id)
                    for waiting in failed:
                        if self.tasks.get(waiting.task_id) is waiting:
                            if waiting.state == DISPATCHED:   # forwarded: its endpoint fails it
                                graph.failed_there[waiting.task_id] = failure
                                continue
                            waiting.state = WAITING   # (a forwarded one still queued is skipped there)
                            del self.tasks[waiting.task_id]
                            self._fail_held(waiting, failure, now)
        finally:
            self._cascade = None

    def _hold_recovered(self, held: list[tuple[TaskRecord, list[bytes]]]) -> None:
        """After a restart: hold again the recorded tasks that wait for
        others, with the results of those that finished from the record."""
        now = time.time()
        for record, dependencies in held:
            unfinished: set[bytes] = set()
            results: dict[bytes, bytes] = {}
            failure = None
            uploads: list[tuple[bytes, bytes]] = []   # finished dependencies whose results are uploads
            for dependency in dependencies:
                other = self.tasks.get(dependency)
                if other is not None and other.user == record.user:
                    unfinished.add(dependency)
                    continue
                outcome = self.store.task_outcome(dependency)
                if outcome is not None and outcome[0] == FINISHED and outcome[3] == record.user \
                        and outcome[1] == P.OK:
                    results[dependency] = in_memory(outcome[2] or b"")
                    if is_big(results[dependency] or b""):
                        uploads.append((dependency, results[dependency]))
                    continue
                why = "failed or was cancelled" if outcome is not None and outcome[3] == record.user \
                    else "is no longer in the record"
                failure = P.pack_failure(P.DEPENDENCY, f"task {_uuid(dependency)}, which this task depends on, "
                                         f"{why}, so this task was not run", dep=dependency)
                break
            if failure is not None:
                del self.tasks[record.task_id]
                self._fail_held(record, failure, now)
            else:
                for dependency, result in uploads:   # (before the client's DROP of it, resumed, can come)
                    self.kept.keep(dependency, record.user, result)
                self._hold(record, dependencies, unfinished, results, now)

    def _too_many_groups(self, client: bytes, user: str, group: tuple[str, ...], task_id: bytes) -> bool:
        """Refuse (a QUOTA failure naming it) a task for a group of endpoints
        when its user already has unfinished tasks for as many other groups
        as they may: routing visits every group with tasks each turn."""
        mine = self.user_groups.get(user)
        if mine is None or group in mine or len(mine) < self.max_groups_per_user:
            return False
        self._reject(client, task_id, P.QUOTA,
                     f"user {user!r} has unfinished tasks for {len(mine):,} different groups of endpoints at the "
                     f"relay, its limit of {self.max_groups_per_user:,} groups per user; wait for those to finish "
                     f"or submit to fewer groups", quiet=True, quota="groups", usage=len(mine),
                     limit=self.max_groups_per_user)
        return True

    def _answer_from_record(self, client: bytes, session: Session, task_id: bytes) -> bool:
        """A task sent again may have finished before a relay restart: then
        its stored result answers it and it does not run twice. Once this
        turn has read RECORD_BYTES_PER_TURN from the record, a finished
        task of the user waits for a later turn (:meth:`_answer_waiting`)."""
        owner = self.store.owner_of(task_id)   # finished, not acknowledged
        if owner is not None and owner != session.user:
            self._not_theirs(client, session, task_id, "read the result of")
            return True
        if owner is not None and self.record_budget <= 0:
            self.record_waiting.setdefault(client, {})[task_id] = session
            return True
        outcome = self.store.task_outcome(task_id)
        if outcome is None or outcome[0] not in (FINISHED, KEPT):
            return False
        state, status, result, user = outcome
        if user != session.user:
            self._not_theirs(client, session, task_id, "read the result of")
            return True
        result = result or b""
        self.record_budget -= len(result)
        rows, blobs = self.client_results[client]
        rows.append(blobs.result_row(task_id, status, result))
        return True

    def _answer_waiting(self) -> None:
        """Answer from the record what earlier turns had no budget left for,
        oldest first, within this turn's budget."""
        while self.record_waiting and self.record_budget > 0:
            client, waiting = next(iter(self.record_waiting.items()))
            task_id, session = next(iter(waiting.items()))
            del waiting[task_id]
            if not waiting:
                del self.record_waiting[client]
            # as a RESUME of it: a result still in the writer's queue (not in the record
            # yet) is answered after the commit that holds it, not called lost
            self._answer_resumed(client, session, [task_id], final=False)

    @staticmethod
    def _memo_scope(user: str, endpoint_id: str, states: list[EndpointState | None]) -> bytes:
        """Whose memoized results a task may be answered with: those of the
        same user on the same endpoint (or group, ``endpoint_id`` as the
        record keeps it); of every user of it when its owner (every member's
        owner, for a group) opted in with ``share_memo``."""
        if states and all(state is not None and state.access.share_memo for state in states):
            return b"shared\0" + endpoint_id.encode()
        return b"user\0" + user.encode() + b"\0" + endpoint_id.encode()

    def _serve_memoized(self, client: bytes, task_id: bytes, options: dict) -> bool:
        """Answer a memoizable task from earlier results in its scope (its
        ``options["m"]``, made by :func:`_memo_key`), if there is one."""
        key = options["m"]
        if key not in self.memo_keys:
            return False
        result = self.memo_recent.get(key)
        if result is None:
            result = self.store.memo_result(key)
            if result is None:
                return False
            result = without_output(result)   # (one kept before memoized results were kept without it)
            self.memo_recent.put(key, result)
        rows, blobs = self.client_results[client]
        rows.append(blobs.result_row(task_id, P.OK, result, options.get("tr")))
        return True

    def _memoize(self, record: TaskRecord, result: bytes, now: float) -> None:
        """Keep a memoized result in the record (charged to the user whose
        task produced it, until it expires) and, if small, in memory. The
        first one stored under a key stays; one its user has no room for is
        not kept (the result itself is delivered all the same)."""
        key = record.options["m"]
        if key in self.memo_keys:
            return
        result = without_output(result)   # a hit carries no output (memo.py)
        if self.quotas.refusal(record.user, 0, len(result)) is not None:
            return
        self.memo_keys.add(key)
        self.memo_recent.put(key, result)
        self.quotas.memo_stored(key, record.user, len(result), now)
        self.store.add_memo(key, result, record.user, now)

    def _reject(self, client: bytes, task_id: bytes, kind: str, message: str, quiet: bool = False,
                **details: Any) -> None:
        if not quiet:
            log.info("task %s refused: %s", task_id.hex(), message)
        rows, blobs = self.client_results[client]
        rows.append(blobs.result_row(task_id, P.FAILED, P.pack_failure(kind, message, **details)))

    def _on_results(self, sender: bytes, session: Session, msg: P.Message) -> None:
        # Results are taken by task id from the endpoint the task went to,
        # also when that endpoint was expired meanwhile (it only stalled):
        # finished work is never thrown away. A group task re-queued from a
        # member that went silent is the exception once it has been routed to
        # another member: then only that member's result counts, and the
        # first one's late result is ignored (at-least-once for group tasks).
        credit = P.count(msg.fields.get("credit", 0), "credit")
        blobs = msg.blobs
        rows = msg.fields["rows"]
        if not isinstance(rows, list):
            raise P.ProtocolError("rows must be a list")
        used: set[int] = set()
        for row in rows:
            ref = P.result_row(row, P.TRACE_FROM_ENDPOINT)[2]
            if type(ref) is not bytes:   # (an inline result refers to no frame)
                P.claim_frame(used, blobs, ref)
        started = P.task_ids(msg.fields.get("started", []))
        endpoint_id = self.endpoint_senders.get(sender)
        known = self.endpoints.get(endpoint_id) if endpoint_id is not None else None
        if known is not None and known.access.owner != session.user:
            refusals.warning("refused user %r: send results as endpoint %s: it is another user's",
                             session.user, endpoint_id)
            return
        if endpoint_id is None:
            # not (or no longer) known as an endpoint: not stored, nor acknowledged,
            # so the endpoint sends them again once it has said hello
            self._send(sender, P.encode(P.HEARTBEAT, {"inc": self.incarnation, "unknown": True}))
            return
        state = self.endpoints.by_routing.get(sender)
        if state is not None:
            state.last_seen = time.monotonic()
            state.credit += credit
        now = time.time()
        stored = self.turn_stored[sender]
        tasks = self.tasks
        max_payload = self.max_payload
        finished: list[tuple[TaskRecord, int, Any]] = []   # records done here, their status and result
        client, client_rows, client_blobs = None, None, None   # (the last row's client: most rows share one)
        for row in rows:
            task_id, status, index = row[:3]
            stored.append(task_id)  # the endpoint may forget it once this turn is committed
            record = tasks.get(task_id)
            if record is None:
                continue  # a late duplicate of a task that already finished
            owner = known   # the endpoint this routing id said hello as
            if owner is None or (endpoint_id != record.endpoint_id and not (
                    # a group task not routed since a relay restart: it ran on one of its members
                    record.endpoint_id == "" and record.group is not None and endpoint_id in record.group)):
                # (also a group task's result from a member that stalled, once the task
                # went to another member: that one's result counts)
                log.warning("ignored a result for task %s from an endpoint it was not sent to", task_id.hex())
                continue
            if owner.dropping and self.drop_notes.answered(owner, task_id) and status == P.CANCELLED:
                continue   # its answer to being told to drop its copy (_take_back_held), not an outcome
            if record.state == WAITING:
                # held here for its dependencies, so not sent in this run of the relay: the endpoint's
                # answer to being told to drop a copy from before a restart (it goes again when ready)
                continue
            del tasks[task_id]
            owner.dispatched.pop(task_id, None)
            if record.state == QUEUED:  # re-queued meanwhile; it finished after all
                self._unqueue(record)
            if type(index) is bytes:   # inline (small results: the common case)
                blob = buffer = index
            else:
                blob = P.blob_at(blobs, index)
                buffer = P.as_buffer(blob)
            if len(buffer) > max_payload:  # the endpoint should have refused it; never store or forward it
                message, details = P.too_large("the result", len(buffer), self.max_payload)
                status, blob = P.FAILED, P.pack_failure(P.TOO_LARGE, message, **details)
                buffer = blob
            elif len(buffer) <= MAX_REF and (blob.startswith(REF_MAGIC) if type(blob) is bytes else is_big(blob)):
                # a large result, uploaded (bulk.py)
                status, blob = self.bulk.check_result(record, status, blob, sender, session.user)
                buffer = blob
                if status == P.OK and self.quotas.retained is not None:   # read again until it goes (retained.py)
                    self.quotas.retained.hold_upload(task_id, record.user, blob)
                self._record_reads.hopeless_task(task_id)   # (an upload: not read back for a dependent)
                record.options = None if record.options is None else {k: v for k, v in record.options.items()
                                                                      if k != "m"}   # never memoized
            finished.append((record, status, buffer))
            if status == P.OK and record.options is not None and "m" in record.options:
                self._memoize(record, P.as_bytes(blob), now)
            if record.client != client:
                client = record.client
                client_rows, client_blobs = self.client_results[client]
            client_rows.append(client_blobs.result_row(task_id, status, blob,
                                                       [*row[3], now] if len(row) == 4 else None))
        if finished:
            self._finished_all(finished, now)
            if self.dashboard is not None:
                self._trace_to_dashboard(rows, finished, now)
        if started and state is not None:
            self._on_started(state, started)

    def _trace_to_dashboard(self, rows: list[Any], finished: list[tuple[TaskRecord, int, Any]], now: float) -> None:
        """The stage times of traced tasks in a RESULTS message, for the dashboard."""
        traces = {row[0]: [*row[3], now] for row in rows if len(row) == 4}
        if traces:
            self.dashboard.traces(finished, traces)

    def _unqueue(self, record: TaskRecord) -> None:
        """Take a queued task out of its queue (it finished or was cancelled
        before it went out): its endpoint's, or its group's."""
        queues = []
        if record.group is not None:
            group = self.endpoints.groups.get(record.group)
            if group is not None:
                queues.append(group.queue)
        state = self.endpoints.get(record.endpoint_id) if record.endpoint_id else None
        if state is not None:
            queues.append(state.queue)
        for queue in queues:
            try:
                queue.remove(record)
                return
            except ValueError:
                pass

    def _on_started(self, state: EndpointState, task_ids: list[bytes]) -> None:
        """Tasks ``state``'s endpoint started: only those sent to it (an
        endpoint cannot mark another's tasks, another user's, as running)."""
        dispatched = state.dispatched
        for task_id in task_ids:
            record = dispatched.get(task_id)
            if record is not None:
                self.client_started[record.client].append(task_id)
                record.started = True   # (a task's status: relay/inspect.py)

    def _on_cancel(self, sender: bytes, session: Session, msg: P.Message) -> None:
        for task_id in P.task_ids(msg.fields["tids"]):
            record = self.tasks.get(task_id)
            if record is None:
                continue
            if record.user != session.user:
                self._refused_task(session.user, "cancel task(s) of another user", task_id)
                continue
            if record.client != sender:
                continue
            if record.state == QUEUED or record.state == WAITING:
                del self.tasks[task_id]
                if record.state == QUEUED:
                    self._unqueue(record)
                else:
                    self.graph.drop(task_id)
                rows, blobs = self.client_results[sender]
                rows.append([task_id, P.CANCELLED, b""])   # before the failures of tasks that depend on it
                self._finished(record, P.CANCELLED, b"", time.time())
            elif record.state == DISPATCHED:
                self.endpoint_cancels[record.endpoint_id].append(task_id)
                state = self.endpoints.get(record.endpoint_id)
                if state is not None and state.dropping:   # (the next CANCELLED from there answers this)
                    self.drop_notes.answered(state, task_id)

    # -- output --------------------------------------------------------------
    def _dispatch(self) -> None:
        if self.store.backlog > MAX_STORE_BACKLOG:
            return  # the commit pipe wakes the loop when the writer has caught up
        if self.endpoints.groups:
            self._route_groups()
        for state in self.endpoints.connected():
            if state.credit <= 0 or not state.queue:
                continue
            rows: list[list[Any]] = []
            blobs = P.Blobs()
            queue = state.queue
            spare = OPTION_BYTES_PER_MESSAGE   # header room left for the rows' dependency options
            owner, known_functions, dispatched = state.access.owner, state.known_functions, state.dispatched
            while queue and state.credit > 0:
                if len(rows) >= P.MAX_ITEMS or spare < 0:   # a message's limit: this one goes, the next begins
                    if not self._send_tasks(state, rows, blobs):
                        break
                    rows, blobs = [], P.Blobs()
                    spare = OPTION_BYTES_PER_MESSAGE
                record = queue.popleft()
                if record.state != QUEUED or record.endpoint_id != state.endpoint_id:
                    state.stale -= state.stale > 0   # taken back by a HOLDING, or routed elsewhere since
                    continue
                if record.options is not None and "d" in record.options \
                        and not self._forward_now(state, record, time.time()):
                    continue
                fn_ref: bytes | int = -1
                if record.fn_hash not in known_functions:
                    body = self.functions.get(record.fn_hash)
                    if body is None:
                        del self.tasks[record.task_id]
                        self._reject(record.client, record.task_id, P.REJECTED,
                                     "the relay has lost this task's function")
                        self._finished(record, P.FAILED, b"", time.time())
                        continue
                    fn_ref = blobs.ref(body)
                    known_functions.add(record.fn_hash)
                rows.append(record.row(blobs.ref(record.args), fn_ref, owner))
                if record.options is not None and ("d" in record.options or "dr" in record.options
                                                   or "rf" in record.options):
                    spare -= option_bytes(record.options)
                record.state = DISPATCHED
                dispatched[record.task_id] = record
                state.credit -= 1
            if rows:
                self._send_tasks(state, rows, blobs)

    def _send_tasks(self, state: EndpointState, rows: list[list[Any]], blobs: P.Blobs) -> bool:
        """One TASKS message to an endpoint; False (and it is marked
        disconnected, its tasks re-queued) when it is unreachable."""
        if self._send(state.routing_id, P.encode(P.TASKS, {"tasks": rows}, blobs.frames)):
            return True
        log.warning("endpoint %s (%s) is unreachable; marked disconnected, %d task(s) re-queued",
                    state.name, state.endpoint_id, len(state.dispatched))
        self.endpoints.disconnect(state)
        return False

    def _route_groups(self) -> None:
        groups = self.endpoints.groups
        for key in [key for key, group in groups.items() if not group.queue]:
            del groups[key]   # made again by the next task for it
        for group in groups.values():
            self._route_group(group)

    def _route_group(self, group: GroupQueue) -> None:
        """Move tasks from a group's queue to members' queues, as many as the
        connected members have free capacity for (credit not yet spoken for
        by their own queues), in the group's order.

        For each function, the members that may run it (allow-lists) are
        split into those it is warm on (this connection was sent it, so a
        worker there has loaded it or is loading it) and the others; its tasks
        fill the warm ones first, then the others, each tier *water-filled*:
        every task goes to the member with the most free capacity left (ties
        rotate from turn to turn). With routing "capacity" there is one tier.
        Cost: O(tasks routed + functions x members) per turn.
        """
        if group.hold_until and time.monotonic() < group.hold_until:
            return   # just after a restart: members are still claiming what they hold
        free: dict[str, int] = {}
        live: list[EndpointState] = []
        for member in group.members:
            state = self.endpoints.get(member)
            if state is not None and state.connected and state.credit > len(state.queue):
                free[member] = state.credit - len(state.queue)
                live.append(state)
        if not live:
            return   # the common case while every member is busy: O(members)
        self.route_turn += 1
        shift = self.route_turn % len(live)
        live = live[shift:] + live[:shift]
        room = sum(free.values())
        tiers: dict[bytes, list[list[EndpointState]]] = {}     # per function: members that may run it, by tier
        batches: dict[bytes, list[TaskRecord]] = {}
        taken: list[TaskRecord] = []      # in the group's order
        passed = 0
        queue = group.queue
        wanted = 0
        while queue and wanted < room and passed < MAX_PASSED_OVER:
            record = queue.popleft()
            if self.tasks.get(record.task_id) is not record or record.state != QUEUED:
                group.stale -= group.stale > 0   # taken back by a HOLDING
                continue  # (or finished or cancelled meanwhile: not expected, they are taken out)
            taken.append(record)
            fn_hash = record.fn_hash
            batch = batches.get(fn_hash)
            if batch is None:
                able = [s for s in live if s.access.functions is None or fn_hash in s.access.functions]
                if self.routing == "warm":
                    warm = [s for s in able if fn_hash in s.known_functions]
                    tiers[fn_hash] = [warm, [s for s in able if fn_hash not in s.known_functions]]
                else:
                    tiers[fn_hash] = [able]
                batch = batches[fn_hash] = []
            if any(tiers[fn_hash]):
                batch.append(record)
                wanted += 1
            else:
                passed += 1   # no live member may run it: it waits (kept in place below)
        routed: set[bytes] = set()
        for fn_hash, batch in batches.items():
            start = 0
            for tier in tiers[fn_hash]:
                for state, count in _water_fill(len(batch) - start, tier, free):
                    for record in batch[start:start + count]:
                        record.endpoint_id = state.endpoint_id
                        state.queue.append(record)
                        routed.add(record.task_id)
                    start += count
        if len(routed) < len(taken):   # the rest go back in front, in their order
            queue.extendleft(reversed([record for record in taken if record.task_id not in routed]))

    def _finished(self, record: TaskRecord, status: int | None = None, result: Any = None,
                  now: float = 0.0) -> None:
        """A task left ``self.tasks`` (finished, cancelled or refused): its
        user's quota and its function's count go down. With a ``status``,
        its outcome (``result``, bytes or a buffer) is stored as
        :meth:`_finished_all` does."""
        if status is None:
            if is_big(record.args):
                self.bulk.finished(record)
            self.quotas.release(record.user, 1, row_bytes(len(P.as_buffer(record.args))))
            self.functions.release(record.fn_hash)
            self._left_group(record)
        else:
            self._finished_all([(record, status, result)], now)

    def _finished_all(self, finished: list[tuple[TaskRecord, int, Any]], now: float) -> None:
        """Tasks left ``self.tasks`` with an outcome (a status, and a result:
        bytes or a buffer), all at ``now``: each outcome goes to the record
        and counts against its user's quotas (a task, at least MIN_ROW_BYTES)
        in place of its arguments, until they acknowledge it or it expires
        (finished, unfetched tasks cannot pile up for free), and each
        function's count goes down. One call for a message's results: the
        quotas and counts are kept in one pass each."""
        add_result = self.store.add_result
        as_buffer = P.as_buffer
        changes = []
        for record, status, result in finished:
            add_result(record.task_id, status, result, record.user)
            args = record.args
            if type(args) is not bytes:   # (a frame)
                if is_big(args):
                    self.bulk.finished(record, ran=status in (P.OK, P.EXCEPTION))
                args = as_buffer(args)
            elif args.startswith(REF_MAGIC):   # is_big, inline for the common case
                self.bulk.finished(record, ran=status in (P.OK, P.EXCEPTION))
            size = len(result)
            changes.append((record.task_id, record.user, len(args), size))
            if status != P.OK or size > KEPT_IN_MEMORY:   # (no use reading it back for a dependent: reads.py)
                self._record_reads.hopeless_task(record.task_id)
            if record.group is not None:
                self._left_group(record)
        self.quotas.results_replace(changes, now)
        self.functions.release_all([record.fn_hash for record, _, _ in finished])
        if self.dashboard is not None:
            self.dashboard.finished(finished, now)
        if self.graph:
            self._dependencies_finished(finished, now)
        if self.kept.again:   # tasks whose client dropped their result before a restart (kept.py)
            self.kept.finished_again(finished)

    def _left_group(self, record: TaskRecord) -> None:
        """A task for a group of endpoints finished: one fewer of its user's."""
        mine = self.user_groups.get(record.user) if record.group is not None else None
        if mine is not None and record.group in mine:
            count = mine.pop(record.group) - 1
            if count:
                mine[record.group] = count
            elif not mine:
                del self.user_groups[record.user]

    def _send_all(self) -> None:
        for client in self.client_results.keys() | self.client_started.keys():  # notices ride with results
            rows, blobs = self.client_results.get(client) or ([], P.Blobs())
            for frames in P.results_messages(rows, blobs.frames, self.client_started.get(client, ())):
                self._send(client, frames)
        self.client_results.clear()
        self.client_started.clear()
        for endpoint_id, task_ids in self.endpoint_cancels.items():
            state = self.endpoints.get(endpoint_id)
            if state is not None and state.connected:
                for part in P.chunks(task_ids):
                    self._send(state.routing_id, P.encode(P.CANCEL, {"tids": part}))
        self.endpoint_cancels.clear()

    def _send_committed(self) -> None:
        """Answer the RESUMEs whose commit is now on disk, and hold its other
        notices (notices.py) for the next message to their peer."""
        committed = self.store.committed_seq
        self.bulk.committed(committed)
        if not (self.after_commit and self.after_commit[0][0] <= committed):
            return
        # the turns one commit covers (many, with a long commit window) are
        # answered together: the held notices gather each peer's
        now = time.monotonic()
        while self.after_commit and self.after_commit[0][0] <= committed:
            _, accepted, stored, resumed = self.after_commit.popleft()
            for client, waiting in resumed.items():
                for session, task_id in waiting:
                    self._answer_resumed(client, session, [task_id], final=True)
            for client, task_ids in accepted.items():
                self.notices.hold(client, P.ACCEPTED, task_ids, now)
            for endpoint, task_ids in stored.items():
                self.notices.hold(endpoint, P.ACK, task_ids, now)

    def _send(self, peer: bytes, frames: list[Any]) -> bool:
        """Send; False when the peer is not connected (EHOSTUNREACH). Results
        stay in the store for it; the caller re-queues tasks."""
        self.sent_to.add(peer)
        stream = self.stream_peers.get(peer)
        if stream is not None:
            sent = stream.send(frames)
            if sent or stream is self.client_link:
                return sent
            # its same-host link has gone: ZeroMQ, where its program may be (samehost.py)
        try:
            if self.local_link is not None and peer in self.local_link.peers:
                self.local_link.send(peer, frames)
            else:
                self.sock.send_multipart([peer, *frames], copy=False)
        except zmq.ZMQError as exc:
            log.debug("could not send to %r: %s", peer, exc)
            return False
        return True


def _uuid(task_id: bytes) -> str:
    return str(uuid.UUID(bytes=task_id))


def _compact(holder: EndpointState | GroupQueue) -> None:
    """Drop from an endpoint's or group's queue the entries of tasks taken
    back by HOLDINGs once they are half of it (so each costs O(1), amortized)."""
    if holder.stale and 2 * holder.stale >= len(holder.queue):
        holder.queue = deque(record for record in holder.queue if record.state == QUEUED)
        holder.stale = 0


def _memo_key(scope: bytes, fn_hash: bytes, kind: int, args: Any) -> bytes:
    """The relay's key for a memoized call: its scope (``Relay._memo_scope``),
    function, kind and pickled arguments, hashed here from what the task
    carries: a client's own key is not trusted, so no one can store a result
    under the key of another call."""
    digest = hashlib.sha256(scope)
    digest.update(b"\0")
    digest.update(fn_hash)
    digest.update(bytes((kind,)))
    digest.update(args)
    return digest.digest()


def _water_fill(n: int, members: list[EndpointState], free: dict[str, int]) -> list[tuple[EndpointState, int]]:
    """Share ``n`` tasks among ``members`` as if each, in turn, went to the
    one with the most free capacity left (the earlier in ``members`` on a
    tie): the free capacities left are levelled. Takes what it gives from
    ``free``; gives at most their sum. O(members x log(capacity))."""
    have = [(state, free[state.endpoint_id]) for state in members if free[state.endpoint_id] > 0]
    if n <= 0 or not have:
        return []
    total = sum(f for _, f in have)
    if n >= total:
        level = 0
        counts = [f for _, f in have]
    else:
        # the highest level L whose excess sum(max(0, f - L)) still covers n
        low, high = 0, max(f for _, f in have)
        while high - low > 1:
            middle = (low + high) // 2
            if sum(max(0, f - middle) for _, f in have) >= n:
                low = middle
            else:
                high = middle
        level = low
        counts = [max(0, f - level) for _, f in have]
        extra = sum(counts) - n   # fewer than the members above the level: one back from the last of them
        for i in range(len(have) - 1, -1, -1):
            if extra == 0:
                break
            if have[i][1] > level:
                counts[i] -= 1
                extra -= 1
    shares = []
    for (state, _), count in zip(have, counts):
        if count > 0:
            free[state.endpoint_id] -= count
            shares.append((state, count))
    return shares


# What LOOKUP tells a user the endpoint is shared with, but who does not own it,
# leaves out: counts that add up every user's work there (any total minus one's
# own would show the others'), as the Client API and dashboard do (endpoint_view.py).
_OWNER_ONLY_LOOKUP = ("queued", "running", "last_seen")


def _lookup_view(state: EndpointState, yours: bool) -> dict[str, Any]:
    """An endpoint as LOOKUP describes it to its owner (everything) or to
    another user it is shared with (no counts of everyone's tasks)."""
    view = state.describe()
    if not yours:
        for key in _OWNER_ONLY_LOOKUP:
            view.pop(key, None)
    view["yours"] = yours
    return view
