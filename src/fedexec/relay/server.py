"""The relay server: one ROUTER socket, one poll loop.

Clients and endpoints both connect to the relay's single address with DEALER
sockets and introduce themselves with HELLO. Each turn of the loop reads
every message that is waiting, updates the in-memory state, commits the
turn's writes to the store in one transaction, and only then sends what the
turn produced (tasks to endpoints, results to clients). User payloads are
forwarded as the frames they arrived in; the relay never unpickles them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

import zmq

from .. import protocol as P
from ..auth import RelayAuthenticator, load_or_create_secret, secret_path, write_secret_value
from ..pidfile import PidFile
from .registry import DISPATCHED, QUEUED, EndpointRegistry, EndpointState, TaskRecord
from .store import FINISHED, RelayStore

log = logging.getLogger("fedexec.relay")

MAX_MESSAGES_PER_TURN = 2000
MEMO_IN_MEMORY = 4096    # memoized results the relay keeps in memory (the store keeps all)
MAINTENANCE_INTERVAL = 0.5
# While this many rows wait for the store's writer, no more tasks go out to
# endpoints: results then come back no faster than they can be recorded, and
# the writer's backlog (memory) stays bounded.
MAX_STORE_BACKLOG = 100_000
EXPIRY_INTERVAL = 60.0
DEFAULT_RESULT_TTL = 7 * 24 * 3600.0   # results nobody fetched are kept this long


class Relay:
    """A relay bound to ``address`` keeping its record under ``data_dir``."""

    def __init__(self, address: str, data_dir: Path, *, parent_pid: int | None = None,
                 remove_on_exit: Path | None = None, result_ttl: float = DEFAULT_RESULT_TTL,
                 max_payload: int = P.DEFAULT_MAX_PAYLOAD, secret_file: Path | None = None) -> None:
        if result_ttl <= 0:
            raise ValueError("result_ttl must be greater than 0 seconds")
        if max_payload <= 0:
            raise ValueError("max_payload must be greater than 0 bytes")
        self.result_ttl = result_ttl
        self.max_payload = max_payload
        self.incarnation = os.urandom(8)   # tells clients and endpoints that the relay restarted
        self.data_dir = Path(data_dir)
        self.remove_on_exit = remove_on_exit
        self.store = RelayStore(self.data_dir)
        self.parent_pid = parent_pid
        self.ctx = zmq.Context()
        # Every connection authenticates (PLAIN) before a message flows. The
        # local secret is kept with the record (the same after a restart, so
        # clients and endpoints reconnect with what they have) in a file only
        # this user can read.
        self.secret_file = Path(secret_file) if secret_file else self.data_dir / "relay.secret"
        self.local_secret = load_or_create_secret(self.secret_file)
        self.authenticator = RelayAuthenticator(self.ctx, self.local_secret)
        self.authenticator.start()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.plain_server = True
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if "[" in address:  # an IPv6 host such as tcp://[::1]:55700
            self.sock.setsockopt(zmq.IPV6, 1)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 1000)
        # Copies by address, where this user's executors and endpoints look
        # (not for a private relay, whose owner was given secret_file): one
        # written before the relay listens, so no one connects without it,
        # and one under the address it reports, if that differs (a port
        # chosen at bind time, a host name resolved).
        self.discovery_files: list[Path] = []
        if not secret_file and not address.endswith(":*"):
            self._publish_secret(address)
        self.sock.bind(address)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if not secret_file and secret_path(self.address) not in self.discovery_files:
            self._publish_secret(self.address)
        self.endpoints = EndpointRegistry()
        self.tasks: dict[bytes, TaskRecord] = {}
        self.functions: dict[bytes, bytes] = {}
        self.stopping = False
        self.client_results: dict[bytes, tuple[list, P.Blobs]] = defaultdict(lambda: ([], P.Blobs()))
        self.client_started: dict[bytes, list] = defaultdict(list)
        self.endpoint_cancels: dict[str, list] = defaultdict(list)
        # Notices that wait for the store: ACCEPTED to clients and ACK (results
        # stored) to endpoints, sent once the commit holding them is on disk.
        self.turn_accepted: dict[bytes, list] = defaultdict(list)
        self.turn_stored: dict[bytes, list] = defaultdict(list)
        # RESUMEd tasks the record shows unfinished though they are not here:
        # their result is on its way to disk; answered after that commit
        self.turn_resumed: dict[bytes, list] = defaultdict(list)
        self.after_commit: deque[tuple[int, dict[bytes, list], dict[bytes, list], dict[bytes, list]]] = deque()
        self.memo_keys: set[bytes] = self.store.memo_keys()   # results memoized in the store
        self.memo_recent: dict[bytes, bytes] = {}             # the newest of them, in memory
        self._recover()

    def _publish_secret(self, address: str) -> None:
        path = secret_path(address)
        write_secret_value(path, self.local_secret)
        self.discovery_files.append(path)

    # -- lifecycle ---------------------------------------------------------
    def _recover(self) -> None:
        """Reload endpoints and unfinished tasks from the store after a restart."""
        for endpoint_id, name, python, workers, _last in self.store.endpoints():
            self.endpoints.add(EndpointState(endpoint_id, name, python, workers))
        count = 0
        for task_id, client, endpoint_id, fn_hash, kind, python, args in self.store.pending_tasks():
            state = self.endpoints.get(endpoint_id)
            if state is None:
                continue
            record = TaskRecord(task_id, client, endpoint_id, fn_hash, kind, python, args)
            self.tasks[task_id] = record
            state.queue.append(record)
            count += 1
        if count:
            log.info("recovered %d unfinished task(s) from %s", count, self.store.path)

    @property
    def pidfile(self) -> PidFile:
        """``relay.json``: address and pid, so the CLI and executors can find
        a running relay."""
        return PidFile(self.data_dir / "relay.json")

    def stop(self, *_: Any) -> None:
        self.stopping = True

    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.pidfile.write(address=self.address)
        log.info("relay listening on %s (data in %s)", self.address, self.data_dir)
        next_maintenance = time.monotonic() + MAINTENANCE_INTERVAL
        next_expiry = time.monotonic()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.store.commit_fd, zmq.POLLIN)
        try:
            while not self.stopping:
                events = dict(poller.poll(int(MAINTENANCE_INTERVAL * 1000)))
                if self.sock in events:
                    self._read_messages()
                if self.store.commit_fd in events:
                    self.store.drain_commit_notices()
                seq = self.store.flush()
                if self.turn_accepted or self.turn_stored or self.turn_resumed:
                    self.after_commit.append((seq, self.turn_accepted, self.turn_stored, self.turn_resumed))
                    self.turn_accepted, self.turn_stored = defaultdict(list), defaultdict(list)
                    self.turn_resumed = defaultdict(list)
                self._dispatch()
                self._send_all()
                self._send_committed()
                now = time.monotonic()
                if now >= next_maintenance:
                    next_maintenance = now + MAINTENANCE_INTERVAL
                    self._maintenance(now)
                if now >= next_expiry:
                    next_expiry = now + min(EXPIRY_INTERVAL, max(0.5, self.result_ttl / 2))
                    self.store.expire_results(time.time() - self.result_ttl)
        finally:
            log.info("relay stopping")
            self.store.close()
            self.sock.close(linger=500)
            self.authenticator.stop()
            self.ctx.term()
            for path in self.discovery_files:
                try:  # ours only: a relay started since on this address keeps its own
                    if path.read_text() == self.local_secret:
                        path.unlink()
                except OSError:
                    pass
            self.pidfile.remove()
            if self.remove_on_exit is not None:  # a private relay leaves nothing behind
                shutil.rmtree(self.remove_on_exit, ignore_errors=True)

    def _maintenance(self, now: float) -> None:
        for state in self.endpoints.connected():
            if state.expired(now):
                log.warning("endpoint %s (%s) missed its heartbeats; marked disconnected, "
                            "%d task(s) re-queued", state.name, state.endpoint_id, len(state.dispatched))
                self.endpoints.disconnect(state)
        if self.parent_pid and os.getppid() != self.parent_pid:
            log.info("parent process %d is gone; stopping", self.parent_pid)
            self.stopping = True

    # -- input ---------------------------------------------------------------
    def _read_messages(self) -> None:
        sock = self.sock
        for _ in range(MAX_MESSAGES_PER_TURN):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            sender = frames[0].bytes
            try:
                msg = P.decode(frames[1:])
                self._handle(sender, msg)
            except Exception as exc:  # one bad message must not stop the relay for everyone
                log.warning("rejected a malformed message from %r: %s: %s", sender, type(exc).__name__, exc)
                self._send(sender, P.encode(P.ERROR, {"msg": f"malformed message: {type(exc).__name__}: {exc}"}))

    def _handle(self, sender: bytes, msg: P.Message) -> None:
        t = msg.type
        if t == P.SUBMIT:
            self._on_submit(sender, msg)
        elif t == P.RESULTS:
            self._on_results(sender, msg)
        elif t == P.CREDIT:
            state = self._endpoint_of(sender)
            state.credit += P.count(msg.fields["n"], "credit")
        elif t == P.HEARTBEAT:
            # the incarnation tells the sender whether this relay restarted
            reply: dict[str, Any] = {"inc": self.incarnation}
            state = self.endpoints.by_routing.get(sender)
            if state is not None:
                state.last_seen = time.monotonic()
            elif sender[:1] == b"E":  # an endpoint we expired or never met: it must introduce itself again
                reply["unknown"] = True
            self._send(sender, P.encode(P.HEARTBEAT, reply))
        elif t == P.RESUME:
            self._on_resume(sender, P.task_ids(msg.fields["tids"]))
        elif t == P.CANCEL:
            self._on_cancel(sender, msg)
        elif t == P.ACK:
            self.store.acknowledge(P.task_ids(msg.fields["tids"]))
        elif t == P.HELLO:
            self._on_hello(sender, msg)
        elif t == P.LOOKUP:
            state = self.endpoints.get(P.text(msg.fields["ep"], "endpoint id"))
            reply = state.describe() if state else {}
            self._send(sender, P.encode(P.LOOKUP_REPLY, {"found": state is not None, "endpoint": reply}))
        elif t == P.BYE:
            state = self.endpoints.by_routing.get(sender)
            if state is not None:
                log.info("endpoint %s (%s) said goodbye; %d task(s) re-queued",
                         state.name, state.endpoint_id, len(state.dispatched))
                self.endpoints.disconnect(state)
        else:
            raise P.ProtocolError(f"unknown message type {t!r}")

    def _endpoint_of(self, sender: bytes) -> EndpointState:
        state = self.endpoints.by_routing.get(sender)
        if state is None:
            raise P.ProtocolError("endpoint message from a connection that did not say hello")
        return state

    def _on_hello(self, sender: bytes, msg: P.Message) -> None:
        f = msg.fields
        role = f["role"]
        if role == "endpoint":
            # check everything before touching state: a bad HELLO must not
            # knock a live endpoint off
            endpoint_id = P.text(f["id"], "endpoint id")
            if sender != P.endpoint_routing_id(endpoint_id):
                raise P.ProtocolError("endpoint connection identity does not match its id")
            name, python = P.text(f["name"], "name"), P.text(f["py"], "python version", 16)
            workers, capacity = P.count(f["workers"], "workers"), P.count(f["capacity"], "capacity")
            held = P.task_ids(f.get("holding", []))
            heartbeat = f.get("hb", 2.0)
            if not isinstance(heartbeat, (int, float)) or not 0.01 <= heartbeat <= 3600:
                raise P.ProtocolError(f"heartbeat period {heartbeat!r} out of range")
            missed = f.get("hbm", 3)
            if type(missed) is not int or not 1 <= missed <= 100:
                raise P.ProtocolError(f"missed heartbeats {missed!r} out of range")
            state = self.endpoints.get(endpoint_id)
            if state is None:
                state = EndpointState(endpoint_id, name, python)
                self.endpoints.add(state)
            self.endpoints.connect(state, sender)
            state.name, state.python, state.workers = name, python, workers
            state.heartbeat_period = float(heartbeat)
            state.heartbeats_missed = missed
            state.credit = capacity
            self._take_back_held(state, sender, held)
            self.store.save_endpoint(endpoint_id, state.name, state.python, state.workers)
            log.info("endpoint %s (%s) connected: python %s, %d workers, %d task(s) waiting, %d held there",
                     state.name, endpoint_id, state.python, state.workers, len(state.queue), len(state.dispatched))
            self._send(sender, P.encode(P.WELCOME, {"role": "endpoint", "inc": self.incarnation,
                                                    "max_payload": self.max_payload}))
        elif role == "client":
            self._send(sender, P.encode(P.WELCOME, {"role": "client", "py": P.PYTHON_VERSION,
                                                    "inc": self.incarnation, "max_payload": self.max_payload}))
        else:
            raise P.ProtocolError(f"unknown role {role!r}")

    def _take_back_held(self, state: EndpointState, sender: bytes, held: list[bytes]) -> None:
        """An endpoint (re)connecting still holds these tasks (queued or
        running there): they count as sent to it, not to be sent again. Those
        this relay has no unfinished record of are cancelled there."""
        if not held:
            return
        held_set = set(held)
        kept: deque = deque()
        for record in state.queue:
            if record.task_id in held_set:
                record.state = DISPATCHED
                state.dispatched[record.task_id] = record
                held_set.discard(record.task_id)
            else:
                kept.append(record)
        state.queue = kept
        held_set -= state.dispatched.keys()
        if held_set:
            self._send(sender, P.encode(P.CANCEL, {"tids": sorted(held_set)}))

    def _on_resume(self, sender: bytes, task_ids: list[bytes]) -> None:
        """A client (the same after a relay restart, or a new process
        reattaching) waits for these tasks: their results go to it, and those
        already finished are sent from the record now."""
        self._answer_resumed(sender, task_ids, final=False)

    def _answer_resumed(self, sender: bytes, task_ids: list[bytes], final: bool) -> None:
        for task_id in task_ids:
            record = self.tasks.get(task_id)
            if record is not None:
                record.client = sender
            elif self._answer_from_record(sender, task_id):
                continue
            elif not final:  # it may have finished with its result still in the writer's queue
                self.turn_resumed[sender].append(task_id)
            else:
                self._reject(sender, task_id, P.LOST,
                             "the relay has no record of this task to give: it was never accepted, its result "
                             "was fetched and acknowledged or expired, or its endpoint is no longer known")

    def _on_submit(self, sender: bytes, msg: P.Message) -> None:
        endpoint_id = P.text(msg.fields["ep"], "endpoint id")
        state = self.endpoints.get(endpoint_id)
        blobs = msg.blobs
        rows = msg.fields["tasks"]
        if not isinstance(rows, list):
            raise P.ProtocolError("tasks must be a list")
        for row in rows:  # all rows are checked before any is accepted
            P.task_row(row, P.TRACE_AT_RELAY)
            P.blob(blobs, row[2])
            if row[3] != -1:
                P.blob(blobs, row[3])
        resend = msg.fields.get("resend") is True   # after a relay restart: some may be done already
        accepted = self.turn_accepted[sender]
        now = time.time()
        for row in rows:
            task_id, fn_hash, args_index, fn_index, kind, python = row[:6]
            options = row[6] if len(row) == 7 else None
            if options is not None and "tr" in options:
                options["tr"].append(now)
            if fn_index != -1 and fn_hash not in self.functions:
                body = P.as_bytes(P.blob(blobs, fn_index))
                if P.content_hash(body) != fn_hash:
                    self._reject(sender, task_id, P.REJECTED, "function body does not match its hash")
                    continue
                self.functions[fn_hash] = body
                self.store.add_function(fn_hash, body)
            if task_id in self.tasks:
                accepted.append(task_id)  # a resubmission of a task we hold: idempotent
                continue
            if resend and self._answer_from_record(sender, task_id):
                continue
            if state is None:
                self._reject(sender, task_id, P.REJECTED, f"unknown endpoint {endpoint_id}")
                continue
            if state.python and python != state.python:
                self._reject(sender, task_id, P.VERSION,
                             f"client runs Python {python} but endpoint {state.name!r} runs Python "
                             f"{state.python}; pickled functions need the same minor version")
                continue
            if self._function_body(fn_hash) is None:
                self._reject(sender, task_id, P.REJECTED, "function is not registered with this relay")
                continue
            if options is not None and "m" in options and self._serve_memoized(sender, task_id, options):
                continue
            args = P.blob(blobs, args_index)
            size = len(P.as_buffer(args))
            if size > self.max_payload:
                self._reject(sender, task_id, P.TOO_LARGE,
                             f"the arguments are {size:,} bytes pickled, over the relay's payload limit of "
                             f"{self.max_payload:,} bytes", size=size, limit=self.max_payload)
                continue
            record = TaskRecord(task_id, sender, endpoint_id, fn_hash, kind, python, args, options)
            self.tasks[task_id] = record
            self.store.add_task(task_id, sender, endpoint_id, fn_hash, kind, python, P.as_buffer(args))
            state.queue.append(record)
            accepted.append(task_id)

    def _answer_from_record(self, client: bytes, task_id: bytes) -> bool:
        """A task sent again may have finished before a relay restart: then
        its stored result answers it and it does not run twice."""
        outcome = self.store.task_outcome(task_id)
        if outcome is None or outcome[0] != FINISHED:
            return False
        _, status, result = outcome
        rows, blobs = self.client_results[client]
        rows.append(blobs.result_row(task_id, status, result or b""))
        return True

    def _serve_memoized(self, client: bytes, task_id: bytes, options: dict) -> bool:
        """Answer a memoizable task from earlier results, if there is one."""
        key = options["m"]
        if key not in self.memo_keys:
            return False
        result = self.memo_recent.get(key)
        if result is None:
            result = self.store.memo_result(key)
            if result is None:
                return False
            self._remember(key, result)
        rows, blobs = self.client_results[client]
        rows.append(blobs.result_row(task_id, P.OK, result, options.get("tr")))
        return True

    def _remember(self, key: bytes, result: bytes) -> None:
        recent = self.memo_recent
        if len(recent) >= MEMO_IN_MEMORY:
            for old in list(recent)[: MEMO_IN_MEMORY // 2]:  # oldest first
                del recent[old]
        recent[key] = result
        self.memo_keys.add(key)

    def _reject(self, client: bytes, task_id: bytes, kind: str, message: str, **details: Any) -> None:
        log.info("task %s refused: %s", task_id.hex(), message)
        rows, blobs = self.client_results[client]
        rows.append(blobs.result_row(task_id, P.FAILED, P.pack_failure(kind, message, **details)))

    def _on_results(self, sender: bytes, msg: P.Message) -> None:
        # Results are taken by task id from the endpoint the task went to,
        # also when that endpoint was expired meanwhile (it only stalled):
        # finished work is never thrown away.
        if not (sender[:1] == b"E" and len(sender) == 17):
            raise P.ProtocolError("results from a connection that is not an endpoint")
        credit = P.count(msg.fields.get("credit", 0), "credit")
        blobs = msg.blobs
        rows = msg.fields["rows"]
        if not isinstance(rows, list):
            raise P.ProtocolError("rows must be a list")
        for row in rows:
            P.blob(blobs, P.result_row(row, P.TRACE_FROM_ENDPOINT)[2])
        started = P.task_ids(msg.fields.get("started", []))
        state = self.endpoints.by_routing.get(sender)
        if state is not None:
            state.last_seen = time.monotonic()
            state.credit += credit
        now = time.time()
        stored = self.turn_stored[sender]
        for row in rows:
            task_id, status, index = row[:3]
            stored.append(task_id)  # the endpoint may forget it once this turn is committed
            record = self.tasks.get(task_id)
            if record is None:
                continue  # a late duplicate of a task that already finished
            owner = self.endpoints.get(record.endpoint_id)
            if owner is None or sender != P.endpoint_routing_id(record.endpoint_id):
                log.warning("ignored a result for task %s from an endpoint it was not sent to", task_id.hex())
                continue
            del self.tasks[task_id]
            owner.dispatched.pop(task_id, None)
            if record.state == QUEUED:  # re-queued meanwhile; it finished after all
                try:
                    owner.queue.remove(record)
                except ValueError:
                    pass
            blob = P.blob(blobs, index)
            size = len(P.as_buffer(blob))
            if size > self.max_payload:  # the endpoint should have refused it; never store or forward it
                status, blob = P.FAILED, P.pack_failure(
                    P.TOO_LARGE, f"the result is {size:,} bytes pickled, over the relay's payload limit of "
                                 f"{self.max_payload:,} bytes", size=size, limit=self.max_payload)
            self.store.add_result(task_id, status, P.as_buffer(blob))
            if status == P.OK and record.options is not None and "m" in record.options:
                result = P.as_bytes(blob)
                self._remember(record.options["m"], result)
                self.store.add_memo(record.options["m"], result)
            client_rows, client_blobs = self.client_results[record.client]
            client_rows.append(client_blobs.result_row(task_id, status, blob,
                                                       [*row[3], now] if len(row) == 4 else None))
        if started and state is not None:
            self._on_started(started)

    def _on_started(self, task_ids: list[bytes]) -> None:
        for task_id in task_ids:
            record = self.tasks.get(task_id)
            if record is not None:
                self.client_started[record.client].append(task_id)

    def _on_cancel(self, sender: bytes, msg: P.Message) -> None:
        for task_id in P.task_ids(msg.fields["tids"]):
            record = self.tasks.get(task_id)
            if record is None or record.client != sender:
                continue
            if record.state == QUEUED:
                del self.tasks[task_id]
                state = self.endpoints.get(record.endpoint_id)
                if state is not None:
                    try:
                        state.queue.remove(record)
                    except ValueError:
                        pass
                self.store.add_result(task_id, P.CANCELLED, b"")
                rows, blobs = self.client_results[sender]
                rows.append([task_id, P.CANCELLED, b""])
            elif record.state == DISPATCHED:
                self.endpoint_cancels[record.endpoint_id].append(task_id)

    # -- output --------------------------------------------------------------
    def _dispatch(self) -> None:
        if self.store.backlog > MAX_STORE_BACKLOG:
            return  # the commit pipe wakes the loop when the writer has caught up
        for state in self.endpoints.connected():
            if state.credit <= 0 or not state.queue:
                continue
            rows: list[list[Any]] = []
            blobs = P.Blobs()
            queue = state.queue
            while queue and state.credit > 0:
                record = queue.popleft()
                fn_ref: bytes | int = -1
                if record.fn_hash not in state.known_functions:
                    body = self._function_body(record.fn_hash)
                    if body is None:
                        del self.tasks[record.task_id]
                        self._reject(record.client, record.task_id, P.REJECTED,
                                     "the relay has lost this task's function")
                        self.store.add_result(record.task_id, P.FAILED, b"")
                        continue
                    fn_ref = blobs.ref(body)
                    state.known_functions.add(record.fn_hash)
                rows.append(record.row(blobs.ref(record.args), fn_ref))
                record.state = DISPATCHED
                state.dispatched[record.task_id] = record
                state.credit -= 1
            if rows and not self._send(state.routing_id, P.encode(P.TASKS, {"tasks": rows}, blobs.frames)):
                log.warning("endpoint %s (%s) is unreachable; marked disconnected, %d task(s) re-queued",
                            state.name, state.endpoint_id, len(state.dispatched))
                self.endpoints.disconnect(state)

    def _function_body(self, fn_hash: bytes) -> bytes | None:
        """A function body by hash, from memory or (after a restart) the store."""
        body = self.functions.get(fn_hash)
        if body is None:
            body = self.store.function_body(fn_hash)
            if body is not None:
                self.functions[fn_hash] = body
        return body

    def _send_all(self) -> None:
        for client in self.client_results.keys() | self.client_started.keys():  # notices ride with results
            rows, blobs = self.client_results.get(client) or ([], P.Blobs())
            fields: dict[str, Any] = {"rows": rows}
            started = self.client_started.get(client)
            if started:
                fields["started"] = started
            self._send(client, P.encode(P.RESULTS, fields, blobs.frames))
        self.client_results.clear()
        self.client_started.clear()
        for endpoint_id, task_ids in self.endpoint_cancels.items():
            state = self.endpoints.get(endpoint_id)
            if state is not None and state.connected:
                self._send(state.routing_id, P.encode(P.CANCEL, {"tids": task_ids}))
        self.endpoint_cancels.clear()

    def _send_committed(self) -> None:
        """Send the notices whose commit is now on disk."""
        committed = self.store.committed_seq
        while self.after_commit and self.after_commit[0][0] <= committed:
            _, accepted, stored, resumed = self.after_commit.popleft()
            for client, task_ids in resumed.items():
                self._answer_resumed(client, task_ids, final=True)
            for client, task_ids in accepted.items():
                if task_ids:
                    self._send(client, P.encode(P.ACCEPTED, {"tids": task_ids}))
            for endpoint, task_ids in stored.items():
                self._send(endpoint, P.encode(P.ACK, {"tids": task_ids}))

    def _send(self, peer: bytes, frames: list[Any]) -> bool:
        """Send; False when the peer is not connected (EHOSTUNREACH). Results
        stay in the store for it; the caller re-queues tasks."""
        try:
            self.sock.send_multipart([peer, *frames], copy=False)
        except zmq.ZMQError as exc:
            log.debug("could not send to %r: %s", peer, exc)
            return False
        return True

