"""The endpoint agent: connects out to the relay and feeds a pool of workers.

One poll loop serves two sockets: a DEALER to the relay and a ROUTER the
workers connect to.

*Credit.* The agent tells the relay how many more tasks it may send (a grant
in HELLO, then grants riding on RESULTS or in CREDIT messages), keeping
``capacity`` tasks here or at workers, so a worker that finishes finds its
next task already at hand.

*Adaptive batches.* The agent keeps a moving average of how long tasks run.
Tasks that take half a millisecond or more go to workers one at a time (the
prefetched ones wait here, for the next free worker). Faster tasks go in
batches worth about a millisecond of work each, and come back in batches, so
per-message costs do not dominate tiny tasks.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import tempfile
import time
from collections import defaultdict, deque
from typing import Any, Callable

import zmq

from .. import protocol as P
from ..auth import HandshakeWatch
from ..config import EndpointConfig
from .pool import LocalWorkerPool, WorkerSlot, describe_exit

log = logging.getLogger("fedexec.endpoint")

POLL_MS = 100
MAX_MESSAGES_PER_TURN = 2000
REAP_INTERVAL = 0.1
# Under load, results are sent to the relay in batches: when this many are
# waiting, or when the oldest has waited this long. An endpoint with nothing
# else to do sends at once, so a lone task's latency does not pay for it.
FLUSH_BATCH = 256
FLUSH_DELAY = 0.001
# Worker batches: tasks shorter than SLOW_TASK go in batches worth about
# BATCH_WORK seconds, at most the config's worker_batch tasks.
SLOW_TASK = 0.0005
BATCH_WORK = 0.001
EWMA_WEIGHT = 0.1
AUTH_GRACE = 10.0   # seconds an endpoint that never got in keeps retrying a refused handshake


class QueuedTask:
    """A task received from the relay: its row and argument blob."""

    __slots__ = ("row", "args", "lost", "retried")

    def __init__(self, row: list[Any], args: Any) -> None:
        self.row = row
        self.args = args
        self.lost = 0      # times its worker died under it
        self.retried = 0   # times it ran again after raising (its max_retries)

    def option(self, key: str) -> Any:
        return self.row[6].get(key) if len(self.row) == 7 else None


class EndpointAgent:
    """Runs one configured endpoint until stopped."""

    def __init__(self, config: EndpointConfig, *, parent_pid: int | None = None,
                 on_connected: Callable[["EndpointAgent"], None] | None = None,
                 secret_file: str | None = None) -> None:
        config.validate()
        self.config = config
        self.secret_file = secret_file
        self.started_at = time.monotonic()
        self.exit_code = 0
        self.parent_pid = parent_pid
        self.on_connected = on_connected
        self.workers = config.workers()
        self.task_seconds: float | None = None   # moving average of run time
        self.ctx = zmq.Context()
        self.relay = self._relay_socket()
        self.worker_sock = self.ctx.socket(zmq.ROUTER)
        self.worker_sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.worker_sock.setsockopt(zmq.LINGER, 0)
        self._sock_dir = tempfile.mkdtemp(prefix="fedexec-ep-")
        self.worker_sock.bind(f"ipc://{self._sock_dir}/workers")
        try:
            self.pool = LocalWorkerPool(self.workers, self.worker_sock.getsockopt_string(zmq.LAST_ENDPOINT),
                                        self._sock_dir, sandbox=config.sandbox, sandbox_image=config.sandbox_image)
        except Exception:  # a sandbox that cannot run here: leave nothing behind
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            raise
        self.queue: deque[QueuedTask] = deque()
        self.functions: dict[bytes, Any] = {}
        self.at_worker: dict[bytes, WorkerSlot] = {}   # task_id -> the worker holding it
        self.relay_credit = 0                           # tasks the relay may still send us
        self.out_rows: list[list[Any]] = []
        self.out_blobs = P.Blobs()
        self.started: list[bytes] = []
        # results sent to the relay that it has not stored yet: sent again if
        # the relay restarts before its ACK
        self.unstored: dict[bytes, tuple[int, Any, list[float] | None]] = {}
        self.max_payload = P.DEFAULT_MAX_PAYLOAD   # the relay's, from its WELCOME
        self.allowed_functions: frozenset[bytes] | None = (
            frozenset(bytes.fromhex(h) for h in config.allowed_functions) if config.allowed_functions else None)
        self.holding: set[bytes] = set()   # ids of the tasks here (queued or at workers) until their outcome
        self._unflushed_since = 0.0
        self.stopping = False
        self.connected = False
        self._early_deaths = 0          # workers that died before saying READY, in a row
        self._respawn_at: list[float] = []

    def _relay_socket(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, P.new_endpoint_routing_id())
        sock.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:port as well as IPv4
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, P.RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, P.RECONNECT_IVL_MAX_MS)
        self.handshake = HandshakeWatch(sock, self.config.relay, secret_file=self.secret_file,
                                        relay_key=self.config.relay_public_key or None)
        return sock

    def _check_handshake(self) -> None:
        self.handshake.read()
        if self.handshake.failure:
            self._refused(self.handshake.failure)

    def _refused(self, why: str) -> None:
        """The relay refused our credentials: retried for a while at start
        (they may be on their way), else the endpoint stops."""
        if self.connected or time.monotonic() - self.started_at < AUTH_GRACE:
            log.warning("%s; trying again", why)
            return
        log.error("%s", why)  # never got in: retrying will not help
        self.exit_code = 2
        self.stopping = True

    def stop(self, *_: Any) -> None:
        self.stopping = True

    # -- main loop -----------------------------------------------------------
    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.pool.start()
        self._hello()
        poller = zmq.Poller()
        poller.register(self.relay, zmq.POLLIN)
        poller.register(self.worker_sock, zmq.POLLIN)
        poller.register(self.handshake.monitor, zmq.POLLIN)
        next_reap = next_beat = time.monotonic()
        try:
            while not self.stopping:
                timeout = POLL_MS
                if self.out_rows or self.started:
                    # whole milliseconds, rounded up: a 0 ms poll would spin
                    timeout = max(0, math.ceil((self._unflushed_since + FLUSH_DELAY - time.monotonic()) * 1000))
                events = dict(poller.poll(timeout))
                if self.worker_sock in events:
                    self._read_workers()
                if self.relay in events:
                    self._read_relay()
                if self.handshake.monitor in events:
                    self._check_handshake()
                self._assign()
                now = time.monotonic()
                if now >= next_reap:
                    next_reap = now + REAP_INTERVAL
                    self._enforce_walltimes(now)
                    self._replace_dead_workers()
                    if self.parent_pid and os.getppid() != self.parent_pid:
                        log.info("parent process %d is gone; stopping", self.parent_pid)
                        self.stopping = True
                if now >= next_beat:
                    next_beat = now + self.config.heartbeat_period
                    try:  # never block here: with no connection to queue on, a beat is simply skipped
                        self.relay.send_multipart(P.encode(P.HEARTBEAT), zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                if self._flush_due(now):
                    self._flush()
                elif not (self.out_rows or self.started):
                    self._offer_spare_credit()
        finally:
            self._shutdown()

    def _hello(self) -> None:
        holding = list(self.holding)
        self.relay.send_multipart(P.encode(P.HELLO, {
            "role": "endpoint", "id": self.config.endpoint_id, "name": self.config.name,
            "py": P.PYTHON_VERSION, "workers": self.workers, "capacity": self._reset_credit(),
            "hb": self.config.heartbeat_period, "hbm": self.config.heartbeats_missed, "holding": holding,
            "functions": sorted(self.allowed_functions) if self.allowed_functions is not None else None,
        }))

    # -- credit ----------------------------------------------------------------
    def batch_size(self) -> int:
        """Tasks to hand a worker at once, from how long tasks have been taking."""
        seconds = self.task_seconds
        if seconds is None or seconds >= SLOW_TASK:
            return 1
        return max(1, min(self.config.worker_batch, int(BATCH_WORK / max(seconds, 1e-6))))

    def worker_depth(self) -> int:
        """Tasks a worker may hold at once (see ``_assign``)."""
        size = self.batch_size()
        return 2 * size if size > 1 else 1

    def capacity(self) -> int:
        """Tasks to keep here and at workers: what each worker may hold, plus
        ``prefetch`` more per worker waiting here."""
        return self.workers * (self.worker_depth() + self.config.prefetch)

    def _reset_credit(self) -> int:
        """On (re)introduction the relay's credit for us becomes this."""
        self.relay_credit = max(0, self.capacity() - len(self.holding))
        return self.relay_credit

    def _offer_spare_credit(self) -> None:
        """When capacity grew (tasks turned out fast), say so without waiting
        for results to carry the grant."""
        spare = self.capacity() - len(self.holding) - self.relay_credit
        if spare >= max(1, self.capacity() // 4):
            self.relay.send_multipart(P.encode(P.CREDIT, {"n": self._grant()}))

    def _grant(self) -> int:
        """Credit to give the relay now, and count it as given."""
        grant = self.capacity() - len(self.holding) - self.relay_credit
        if grant <= 0:
            return 0
        self.relay_credit += grant
        return grant

    def _shutdown(self) -> None:
        log.info("endpoint %s stopping", self.config.name)
        self._flush()
        try:
            self.relay.send_multipart(P.encode(P.BYE), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.pool.stop(lambda wid: self._send_worker(wid, P.encode(P.STOP)))
        self.handshake.close()
        self.relay.close(linger=500)
        self.worker_sock.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    # -- relay side ----------------------------------------------------------
    def _read_relay(self) -> None:
        for _ in range(MAX_MESSAGES_PER_TURN):
            try:
                frames = self.relay.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = P.decode(frames)
                self._on_relay_message(msg)
            except Exception as exc:  # never let one message stop the endpoint
                log.warning("ignored a malformed message from the relay: %s: %s", type(exc).__name__, exc)

    def _on_relay_message(self, msg: P.Message) -> None:
        t = msg.type
        if t == P.TASKS:
            blobs = msg.blobs
            rows = msg.fields["tasks"]
            if not isinstance(rows, list):
                raise P.ProtocolError("tasks must be a list")
            for row in rows:
                P.task_row(row, P.TRACE_AT_ENDPOINT)
                P.blob(blobs, row[2])
                if row[3] != -1:
                    P.blob(blobs, row[3])
            self.relay_credit = max(0, self.relay_credit - len(rows))
            now = time.time()
            for row in rows:
                if len(row) == 7 and "tr" in row[6]:
                    row[6]["tr"].append(now)
                fn_hash, args_index, fn_index = row[1], row[2], row[3]
                if fn_index != -1:
                    self.functions[fn_hash] = P.blob(blobs, fn_index)
                if row[0] in self.holding:  # sent twice (the relay re-sent it): one copy runs
                    log.info("ignored a second copy of task %s, which is here already", row[0].hex())
                    continue
                if self.allowed_functions is not None and fn_hash not in self.allowed_functions:
                    # the relay checks this too; a relay that did not is not trusted with it
                    log.warning("refused task %s: function %s is not on this endpoint's allow-list",
                                row[0].hex(), fn_hash.hex())
                    self._result(row[0], P.FAILED, P.pack_failure(
                        P.NOT_ALLOWED, f"function {fn_hash.hex()} is not on the allow-list of endpoint "
                                       f"{self.config.name!r}"))
                    continue
                self.holding.add(row[0])
                self.queue.append(QueuedTask(row, P.blob(blobs, args_index)))
        elif t == P.CANCEL:
            self._cancel(set(P.task_ids(msg.fields["tids"])))
        elif t == P.HEARTBEAT:
            if msg.fields.get("unknown"):
                log.warning("the relay no longer knows this endpoint; introducing it again")
                self._hello()
        elif t == P.WELCOME:
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
        elif t == P.ERROR:
            if msg.fields.get("auth") and self.connected and self.handshake.renew():
                log.warning("the relay ended this endpoint's session (%s); reconnected with renewed credentials",
                            msg.fields.get("msg"))
                self._hello()
            elif msg.fields.get("auth") or msg.fields.get("refused"):
                self._refused(f"the relay at {self.config.relay} refused this endpoint: {msg.fields.get('msg')}")
            else:
                log.warning("relay reported an error: %s", msg.fields.get("msg"))
        else:
            raise P.ProtocolError(f"unexpected message type {t!r} from the relay")

    def _cancel(self, task_ids: set[bytes]) -> None:
        """Drop those queued here; ask workers to drop those waiting in their
        batches; for those running, say so again (the client's cancel()
        waits for one answer or the other)."""
        ask: dict[bytes, list[bytes]] = defaultdict(list)
        for task_id in task_ids:
            slot = self.at_worker.get(task_id)
            if slot is None:
                continue
            if task_id == slot.head():
                self._mark_unflushed()
                self.started.append(task_id)
            else:
                ask[slot.worker_id].append(task_id)
        for worker_id, tids in ask.items():
            self._send_worker(worker_id, P.encode(P.CANCEL, {"tids": tids}))
        kept: deque[QueuedTask] = deque()
        for task in self.queue:
            if task.row[0] in task_ids:
                self._result(task.row[0], P.CANCELLED, b"")
            else:
                kept.append(task)
        self.queue = kept

    def _resend_unstored(self) -> None:
        """After (re)introduction: results the relay may have lost go again
        (it ignores those it has, and acknowledges them all)."""
        if not self.unstored:
            return
        blobs = P.Blobs()
        rows = [blobs.result_row(task_id, *outcome) for task_id, outcome in self.unstored.items()]
        log.info("sending %d result(s) again that the relay had not stored", len(rows))
        self.relay.send_multipart(P.encode(P.RESULTS, {"rows": rows}, blobs.frames), copy=False)

    def _mark_unflushed(self) -> None:
        if not (self.out_rows or self.started):
            self._unflushed_since = time.monotonic()

    def _result(self, task_id: bytes, status: int, blob: Any, trace: list[float] | None = None) -> None:
        self._mark_unflushed()
        self.out_rows.append(self.out_blobs.result_row(task_id, status, blob, trace))
        self.unstored[task_id] = (status, blob, trace)
        self.holding.discard(task_id)

    def _flush_due(self, now: float) -> bool:
        if not (self.out_rows or self.started):
            return False
        # Nothing left here, or (for tasks that go one at a time) nothing
        # queued: the credit these results carry is what brings more work.
        return (len(self.out_rows) >= FLUSH_BATCH or not (self.queue or self.at_worker)
                or (not self.queue and self.batch_size() == 1)
                or now - self._unflushed_since >= FLUSH_DELAY)

    def _flush(self) -> None:
        """Send the results gathered so far with the credit they free and, in
        the same message, start notices for tasks that have not finished."""
        if not (self.out_rows or self.started):
            return
        now = time.time()
        for row in self.out_rows:
            if len(row) == 4:
                row[3].append(now)
        fields: dict[str, Any] = {"rows": self.out_rows, "credit": self._grant()}
        if self.started:
            finished = {row[0] for row in self.out_rows}
            fields["started"] = [t for t in self.started if t not in finished]
        self.relay.send_multipart(P.encode(P.RESULTS, fields, self.out_blobs.frames), copy=False)
        self.out_rows, self.out_blobs, self.started = [], P.Blobs(), []
        self._unflushed_since = 0.0

    # -- worker side ---------------------------------------------------------
    def _read_workers(self) -> None:
        for _ in range(MAX_MESSAGES_PER_TURN):
            try:
                frames = self.worker_sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            slot = self.pool.slots.get(frames[0].bytes)
            if slot is None:
                continue  # a worker we already gave up on
            try:
                msg = P.decode(frames[1:])
                if msg.type == P.READY:
                    slot.ready = True
                elif msg.type == P.RESULTS:
                    self._on_worker_results(slot, msg)
            except Exception as exc:
                log.warning("ignored a malformed message from worker %d: %s: %s", slot.pid, type(exc).__name__, exc)

    def _on_worker_results(self, slot: WorkerSlot, msg: P.Message) -> None:
        rows = [P.result_row(row, P.TRACE_FROM_WORKER) for row in msg.fields["rows"]]
        times = msg.fields.get("secs") or []
        for i, row in enumerate(msg.fields["rows"]):
            task_id, status, index = rows[i]
            blob = P.blob(msg.blobs, index)
            task = slot.tasks.pop(task_id, None)
            if task is None:
                log.warning("worker %d answered for task %s it did not hold", slot.pid, task_id.hex())
                continue
            self.at_worker.pop(task_id, None)
            if status == P.EXCEPTION and task.retried < (task.option("r") or 0):
                task.retried += 1  # the caller asked for another try after an exception
                self.queue.append(task)
                continue
            size = len(P.as_buffer(blob))
            if size > self.max_payload:
                what = "result" if status == P.OK else "exception"
                status, blob = P.FAILED, P.pack_failure(
                    P.TOO_LARGE, f"the task's {what} is {size:,} bytes pickled, over the relay's payload limit "
                                 f"of {self.max_payload:,} bytes", size=size, limit=self.max_payload)
            if status != P.CANCELLED and i < len(times) and isinstance(times[i], float):
                seconds = times[i]
                average = self.task_seconds
                self.task_seconds = seconds if average is None else average + EWMA_WEIGHT * (seconds - average)
            self._result(task_id, status, blob, row[3] if len(row) == 4 else None)
        self._announce(slot)

    def _announce(self, slot: WorkerSlot) -> None:
        """Report the start of the task a worker is now running (its first)."""
        head = slot.head()
        if head is not None and head != slot.announced:
            slot.announced = head
            self._mark_unflushed()
            self.started.append(head)

    def _assign(self) -> None:
        """Top up workers with batches from the queue, least loaded first."""
        if not self.queue:
            return
        # A task that takes SLOW_TASK or more goes to an idle worker only: one
        # queued behind it at a busy worker could neither move to a worker that
        # frees up sooner nor be cancelled before it starts. Quick tasks go in
        # batches, the next sent when a worker is half way through its batch.
        size = self.batch_size()
        limit, hungry_below = (size, size // 2 + 1) if size > 1 else (1, 1)
        hungry = [slot for slot in self.pool.slots.values() if slot.ready and len(slot.tasks) < hungry_below]
        hungry.sort(key=lambda slot: len(slot.tasks))
        for position, slot in enumerate(hungry):
            if not self.queue:
                return
            share = math.ceil(len(self.queue) / (len(hungry) - position))
            self._send_batch(slot, min(limit - len(slot.tasks), share))

    def _send_batch(self, slot: WorkerSlot, count: int) -> None:
        rows: list[list[Any]] = []
        blobs = P.Blobs()
        while self.queue and len(rows) < count:
            task = self.queue.popleft()
            task_id, fn_hash, python = task.row[0], task.row[1], task.row[5]
            if python != P.PYTHON_VERSION:
                self._result(task_id, P.FAILED, P.pack_failure(
                    P.VERSION, f"client runs Python {python} but endpoint {self.config.name!r} runs Python "
                               f"{P.PYTHON_VERSION}; pickled functions need the same minor version"))
                continue
            fn_ref: bytes | int = -1
            if fn_hash not in slot.known_functions:
                body = self.functions.get(fn_hash)
                if body is None:
                    self._result(task_id, P.FAILED, P.pack_failure(
                        P.REJECTED, "the endpoint was not given this task's function"))
                    continue
                fn_ref = blobs.ref(body)
                slot.known_functions.add(fn_hash)
            row = [task_id, fn_hash, blobs.ref(task.args), fn_ref, task.row[4], python]
            if len(task.row) == 7:
                options = task.row[6]
                if "tr" in options:
                    options = {**options, "tr": [*options["tr"], time.time()]}
                row.append(options)
            rows.append(row)
            slot.tasks[task_id] = task
            self.at_worker[task_id] = slot
        if rows:
            self._send_worker(slot.worker_id, P.encode(P.TASKS, {"tasks": rows}, blobs.frames))
            self._announce(slot)

    def _send_worker(self, worker_id: bytes, frames: list[Any]) -> None:
        try:
            self.worker_sock.send_multipart([worker_id, *frames], copy=False)
        except zmq.ZMQError as exc:
            log.debug("could not send to worker %r: %s", worker_id, exc)

    def _enforce_walltimes(self, now: float) -> None:
        """Stop a worker whose running task has passed its ``timeout``; the
        task fails with a timeout error, the others it held run elsewhere."""
        for slot in self.pool.slots.values():
            if not slot.tasks or slot.timed_out is not None:
                continue
            running = slot.marker.read()
            if running != slot.running:
                slot.running, slot.running_since = running, now
                continue
            task = slot.tasks.get(running) if running is not None else None
            walltime = task.option("to") if task is not None else None
            if walltime is not None and now - slot.running_since > walltime:
                slot.timed_out = running
                try:
                    slot.process.kill()
                except OSError:
                    pass

    def _replace_dead_workers(self) -> None:
        for slot in self.pool.reap():
            self._recover_tasks_of(slot)
            self.pool.forget(slot)
            how = describe_exit(slot.process.returncode)
            if slot.ready:
                self._early_deaths = 0
                self._respawn_at.append(time.monotonic())
            else:  # dying at start-up: back off rather than spin (broken env, bad import)
                self._early_deaths += 1
                delay = min(30.0, 0.25 * 2 ** self._early_deaths)
                log.error("worker %d %s before it was ready; next start in %.1f s", slot.pid, how, delay)
                self._respawn_at.append(time.monotonic() + delay)
        now = time.monotonic()
        due = [t for t in self._respawn_at if t <= now]
        if due and not self.stopping:
            self._respawn_at = [t for t in self._respawn_at if t > now]
            for _ in due:
                self.pool.spawn()

    def _recover_tasks_of(self, slot: WorkerSlot) -> None:
        """A worker died. The task its marker names fails with WorkerLost;
        every other task it held goes back to the front of the queue: those
        after it never started, and those before it finished without their
        results being sent, so they run again."""
        how = describe_exit(slot.process.returncode)
        culprit = slot.marker.read()
        survivors: list[QueuedTask] = []
        for task_id, task in slot.tasks.items():
            self.at_worker.pop(task_id, None)
            if task_id != culprit:
                survivors.append(task)
            elif task_id == slot.timed_out:
                walltime = task.option("to")
                log.warning("task %s ran past its walltime of %g s; its worker %d was stopped",
                            task_id.hex(), walltime, slot.pid)
                self._result(task_id, P.FAILED, P.pack_failure(
                    P.TIMEOUT, f"the task ran longer than its timeout of {walltime:g} s on endpoint "
                               f"{self.config.name!r} and was stopped", timeout=walltime, endpoint=self.config.name))
            elif task.lost < self.config.worker_lost_retries:
                task.lost += 1
                log.warning("worker %d %s while running task %s; running it again (%d of %d)",
                            slot.pid, how, task_id.hex(), task.lost, self.config.worker_lost_retries)
                survivors.append(task)
            else:
                log.warning("worker %d %s while running task %s", slot.pid, how, task_id.hex())
                tries = f" (run {task.lost + 1} times, its worker died each time)" if task.lost else ""
                self._result(task_id, P.FAILED, P.pack_failure(
                    P.WORKER_LOST,
                    f"worker process {slot.pid} on endpoint {self.config.name!r} {how} while running this "
                    f"task{tries}", pid=slot.pid, exitcode=slot.process.returncode, endpoint=self.config.name))
        if culprit is None or culprit not in slot.tasks:
            log.warning("worker %d %s between tasks", slot.pid, how)
        slot.tasks.clear()
        self.queue.extendleft(reversed(survivors))
