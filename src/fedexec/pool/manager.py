"""The pool manager: one process per node, between an endpoint and its workers.

A pool connects to its endpoint (over ipc on the endpoint's own machine, over
TCP from a batch job on a cluster node), says HELLO with what its node has
(cores, memory, GPUs, and the workers it will run), and once WELCOMEd starts
its workers. From then on it holds the tasks the endpoint sends it and hands
them to its workers:

*Adaptive batches.* The pool keeps a moving average of how long tasks run.
Tasks that take half a millisecond or more go to workers one at a time (the
others wait here, for the next free worker). Faster tasks go in batches worth
about a millisecond of work each, and come back in batches, so per-message
costs do not dominate tiny tasks.

*Crashes and walltimes.* Each worker writes the id of the task it runs into a
marker file; when a worker dies, that task is the culprit (run again up to
``worker_lost_retries`` times, then failed with WorkerLost) and the others it
held run elsewhere. A task past its ``timeout`` has its worker killed.

*Users.* A worker runs the tasks of one user only; workers change hands
between users (retired, and replaced by fresh ones) when one has tasks
waiting and no worker: idle workers at once, and, so that no user keeps the
others waiting by keeping many tasks queued, a worker of the user holding
the most, once it has finished what it holds (``_share_workers``). A worker
told to stop that does not is killed after ``RETIRE_GRACE``.

*Resources.* While it holds tasks that ask for cores, memory, GPUs or MPI
ranks, each task starts alone at an idle worker once what it asks is free
on the node, GPU tasks with accelerators of their own (``placement.py``).

*Draining.* A pool whose batch job has a walltime (``--ends-at``) stops
taking tasks ``--drain`` seconds before it: it tells the endpoint, gives back
the tasks no worker has started, lets its workers finish what they hold, and
exits. Stopped (by its endpoint, or by SIGTERM from the scheduler) it gives
back everything it holds; killed outright, its endpoint notices the silence
and runs its tasks elsewhere. Either way no task is lost with the job.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import threading
import time
import uuid
from collections import Counter, deque
from typing import Any

import zmq

from .. import protocol as P
from ..logs import configure as configure_logging
from ..memlink import MemoryEnd
from ..config import DEFAULT_WORKER_BATCH
from ..dispatch import QueuedTask, take_out, worker_batch_size
from ..endpoint.graph import HeldTasks
from ..endpoint.sockdir import POOL_PREFIX, make_socket_dir
from ..framelink import PoolLinks
from ..gcpolicy import for_service
from ..outbox import ResultOutbox, notices_wait
from ..stopgrace import grace_of
from ..output import HeldOutput, attach as attach_output, configured_limit as configured_output_limit, \
    salvage as salvage_output
from .placement import NodeBudget, has_resources
from ..worker.chain import is_not_kept
from .chaining import WorkerChains
from .stealing import WorkStealing
from .leaving import PoolLeaving
from .recovery import HeldRecovery
from .resources import NodeResources
from ..taskdirs import TaskDirCleaner, start_cleaner
from .workers import LocalWorkerPool, WorkerSlot, describe_exit

log = logging.getLogger("fedexec.pool")

POLL_MS = 100
MAX_MESSAGES_PER_TURN = 2000
REAP_INTERVAL = 0.1
EWMA_WEIGHT = 0.1
DEFAULT_DRAIN = 60.0        # seconds before its job's end a pool stops taking tasks
WELCOME_TIMEOUT = 120.0     # a pool that never hears from its endpoint gives up
ENDPOINT_SILENCE = 60.0     # a welcomed pool whose endpoint is silent this long stops
RETIRE_GRACE = 5.0          # a worker told to stop that still runs this much later is killed
SHARE_AFTER = 1.0           # a worker serves its user this long at least before it may yield to another
SHARE_CHECK = 0.01          # how often, at most, busy workers are looked at for a user waiting for one


class PoolManager(WorkerChains, WorkStealing, PoolLeaving, HeldRecovery):
    """Runs one pool of workers for the endpoint at ``address`` until stopped."""

    def __init__(self, address: str, *, pool_id: bytes, block_id: str = "", workers: int = 0,
                 secret: str = "", endpoint_key: str = "", ends_at: float | None = None,
                 drain: float = DEFAULT_DRAIN, parent_pid: int | None = None,
                 context: zmq.Context | None = None) -> None:
        self.address = address
        self.pool_id = pool_id
        self.block_id = block_id
        self.secret = secret
        self.resources = NodeResources.detect()
        self.workers = workers or self.resources.cores
        # what tasks asking for resources may use here (placement.py); the endpoint's
        # available_accelerators, in its WELCOME, replace the accelerators found
        self.budget = NodeBudget(self.resources.cores, self.resources.memory, list(self.resources.accelerators))
        self.ends_at = ends_at
        self.drain_at = None if ends_at is None else ends_at - drain
        self.parent_pid = parent_pid
        self._own_context = context is None
        self.ctx = context or zmq.Context()   # the agent's, for a pool inside it (endpoint/inprocess.py)
        self.endpoint: zmq.Socket | MemoryEnd = P.dealer(self.ctx, 2000, pool_id)
        if endpoint_key:   # CURVE: only the endpoint holding that key can answer; traffic is encrypted
            public, secret_key = zmq.curve_keypair()
            self.endpoint.curve_serverkey = endpoint_key.encode()
            self.endpoint.curve_publickey = public
            self.endpoint.curve_secretkey = secret_key
        self.worker_sock = P.limit_frames(self.ctx.socket(zmq.ROUTER))
        self.worker_sock_ready = True   # whether the last poll showed the workers' socket readable (workers_ready)
        self.worker_sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.worker_sock.setsockopt(zmq.LINGER, 0)
        self.worker_sock.setsockopt(zmq.ROUTER_HANDOVER, 0)   # an id in use cannot be taken by a second connection
        # unsandboxed workers' own channels (socketpairs, framelink.py): ready with the worker socket
        self.links = PoolLinks()
        # each worker's channel is bound here (workers.py); marked, so that one left by a killed pool goes
        self._sock_dir = make_socket_dir(POOL_PREFIX)   # (endpoint/sockdir.py)
        self.pool: LocalWorkerPool | None = None     # made on WELCOME, with the endpoint's settings
        self.settings: dict[str, Any] = {}
        self.queue: deque[QueuedTask] = deque()
        self.functions: dict[bytes, Any] = {}
        self.at_worker: dict[bytes, WorkerSlot] = {}
        self.held: set[bytes] = set()               # every task here, queued or at a worker
        self.graph = HeldTasks()   # tasks waiting here for tasks they depend on (endpoint/graph.py)
        self._ran_last: dict[bytes, bytes] = {}   # worker id -> the task it answered for last (chaining.py)
        self._chaining: dict[bytes, list[QueuedTask]] = {}   # worker id -> tasks going on to it (chaining.py)
        self._going: dict[bytes, WorkerSlot] = {}   # ... and where each of them goes
        self.task_seconds: float | None = None
        self.outbox = ResultOutbox()   # results and start notices for the endpoint
        self.heard_at = time.monotonic()            # last message from the endpoint
        self.welcomed = False
        self.hello_at = 0.0   # time.monotonic() of the latest HELLO sent
        self._next_share = 0.0   # time.monotonic() of the next look at who the workers serve (_assign)
        self.draining = False
        self.stopping = False
        self._early_deaths = 0
        self._respawn_at: list[float] = []
        self._gpu_workers: set[bytes] = set()   # workers that ran a task given accelerators: replaced once idle
        self.cleaner: TaskDirCleaner | None = None   # removes expired shell task directories (taskdirs.py)
        self._init_stealing()
        self._init_leaving()

    # -- settings the endpoint sent -------------------------------------------
    def _setting(self, key: str, default: Any) -> Any:
        value = self.settings.get(key, default)
        return value if type(value) is type(default) else default

    @property
    def heartbeat_period(self) -> float:
        return float(self._setting("hb", 2.0))

    def stop(self, *_: Any) -> None:
        self.stopping = True

    # -- main loop -----------------------------------------------------------
    def run(self) -> None:
        if threading.current_thread() is threading.main_thread():   # (a pool inside its agent: the agent's)
            self._install_stop_signals()   # a graceful stop (leaving.py)
        poller = zmq.Poller()
        poller.register(self.endpoint, zmq.POLLIN)
        poller.register(self.worker_sock, zmq.POLLIN)
        if self.links.wanted:
            poller.register(self.links.fileno(), zmq.POLLIN)
        try:
            self.begin()   # a bad address raises; the finally cleans up
            while not self.stopping:
                events = dict(poller.poll(self.wait_ms()))
                if not self.step(self.workers_ready(events), self.endpoint in events):
                    break
        finally:
            self._shutdown()

    # The loop's parts, also driven by an endpoint agent's own loop for a
    # pool inside it (endpoint/inprocess.py): begin once, then step whenever
    # a socket is ready or wait_ms has passed; finish once, when stopping.
    def use_link(self, end: MemoryEnd) -> None:
        """Before :meth:`begin`: reach the endpoint agent stepping this pool
        over ``end``, a link in memory (memlink.py), not a socket."""
        self.endpoint.close(linger=0)
        self.endpoint = end

    def begin(self) -> None:
        """Connect to the endpoint and say HELLO."""
        self._next_reap = self._next_beat = time.monotonic()
        if not isinstance(self.endpoint, MemoryEnd):
            self.endpoint.connect(self.address)
        self._hello()

    def workers_ready(self, events: dict) -> bool:
        """Whether a poll's ``events`` show something from the workers (their
        socket, or their links); the next :meth:`step` reads their ZeroMQ
        socket only if they show it (with every local worker on a link, that
        socket has only control connections, and a read finding nothing costs
        a zmq.Again raised per turn: ~15 % of the embedded process's busy time
        on sequential round trips, with the agent's like read of its pools'
        socket). A message there the poll did not show yet, the next shows."""
        self.worker_sock_ready = self.worker_sock in events
        return self.worker_sock_ready or self.links.fileno() in events   # (a descriptor: by its number)

    def wait_ms(self) -> int:
        """How long the loop may wait for its sockets before the next step."""
        return self._steal_wait_ms(self.outbox.wait_ms(time.monotonic(), POLL_MS))

    def step(self, workers_ready: bool, endpoint_ready: bool) -> bool:
        """One turn: read what is ready, hand out tasks, timers, send results.
        False once the pool has drained and should finish."""
        if workers_ready:
            self._read_workers()
        if endpoint_ready:
            self._read_endpoint()
        if (self.leave_asked is not None or self.leave_by is not None) and not self._leave_turn(time.monotonic()):
            return False   # stopping, and the grace ran out (leaving.py)
        if not self.draining:
            self._assign()
        now = time.monotonic()
        if now >= self._next_reap:
            self._next_reap = now + REAP_INTERVAL
            self._check_lifetime(now)
            if self.pool is not None:
                self._enforce_walltimes(now)
                self._kill_lingering_workers(now)
                self._replace_dead_workers()
        if now >= self._next_beat:
            self._next_beat = now + self.heartbeat_period
            self._send(P.encode(P.HEARTBEAT, self._load()))
        if self._flush_due(now):
            self._flush()
        if self.draining and not self.held:
            log.info("pool %s drained; exiting", self.pool_id.decode())
            return False
        return True

    def finish(self) -> None:
        """Give back what is held, stop the workers, say BYE, close."""
        self._shutdown()

    def _hello(self) -> None:
        self.hello_at = time.monotonic()
        r = self.resources
        held = sorted(self.held)
        self._send(P.encode(P.HELLO, {
            "role": "pool", "secret": self.secret, "block": self.block_id, "host": socket.gethostname(),
            "pid": os.getpid(), "py": P.PYTHON_VERSION, "workers": self.workers, "cores": r.cores,
            "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
            "mem": r.memory, "gpus": r.gpus, "ends": self.ends_at, "holding": held[:P.MAX_ITEMS],
        }))
        for part in P.chunks(held[P.MAX_ITEMS:]):   # a message's limit: the rest follow
            self._send(P.encode(P.HOLDING, {"tids": part}))

    def _load(self) -> dict[str, Any]:
        """What the endpoint's status shows of this pool."""
        busy = sum(1 for slot in self.pool.slots.values() if slot.tasks) if self.pool is not None else 0
        return {"idle": max(0, self.workers - busy), "held": len(self.held), "draining": self.draining}

    def _send(self, frames: list[Any]) -> None:
        try:  # never block: with no connection to queue on, the message is dropped (heartbeats, hello)
            self.endpoint.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass

    def _check_lifetime(self, now: float) -> None:
        if self.parent_pid and os.getppid() != self.parent_pid:
            log.info("endpoint process %d is gone; stopping", self.parent_pid)
            self.stopping = True
        silence = now - self.heard_at
        # generous: an endpoint busy with a slow scheduler command is not gone
        limit = (max(ENDPOINT_SILENCE, (self._setting("hbm", 3) * self.heartbeat_period + 1.0) * 2)
                 if self.welcomed else WELCOME_TIMEOUT)
        if silence > limit:
            log.error("no word from the endpoint at %s for %.0f s; stopping", self.address, silence)
            self.stopping = True
        if self.drain_at is not None and not self.draining and time.time() >= self.drain_at:
            log.info("pool %s: its job ends at %s; draining", self.pool_id.decode(), time.ctime(self.ends_at))
            self._start_draining()

    def _start_draining(self) -> None:
        """Take no more tasks; give back those no worker holds."""
        self.draining = True
        self._flush()
        self._give_back(list(self.queue) + self.graph.take_all())
        self.queue.clear()
        self._send(P.encode(P.HEARTBEAT, self._load()))

    def _give_back(self, tasks: list[QueuedTask]) -> None:
        if not tasks:
            return
        for task in tasks:
            self.held.discard(task.row[0])
        for part in P.chunks([t.row[0] for t in tasks]):
            self._send(P.encode(P.RESULTS, {"rows": [], "returned": part, "draining": self.draining}))

    def _shutdown(self) -> None:
        self._flush()
        # everything still here goes back: queued tasks, and those at workers
        # (stopped below; any that finish first were flushed above)
        returned = list(self.queue) + [task for slot in (self.pool.slots.values() if self.pool else ())
                                       for task in slot.tasks.values()] + self.graph.take_all()
        self._give_back(returned)
        if self.pool is not None:
            self.pool.stop(lambda wid: self._send_worker(wid, P.encode(P.STOP)), self._worker_stop_timeout(3.0))
        self._send(P.encode(P.BYE))
        if self.cleaner is not None:
            self.cleaner.stop()
        self.endpoint.close(linger=2000)
        self.worker_sock.close(linger=0)
        self.links.close()
        if self._own_context:
            self.ctx.term()
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    # -- endpoint side ---------------------------------------------------------
    def _read_endpoint(self) -> None:
        for frames in P.waiting_messages(self.endpoint, MAX_MESSAGES_PER_TURN):
            self.heard_at = time.monotonic()
            try:
                self._on_endpoint_message(P.decode(frames))
            except Exception as exc:  # never let one message stop the pool
                log.warning("ignored a malformed message from the endpoint: %s: %s", type(exc).__name__, exc)

    def _on_endpoint_message(self, msg: P.Message) -> None:
        t = msg.type
        if t == P.TASKS:
            blobs = msg.blobs
            for row in msg.fields["tasks"]:
                P.task_row(row, P.TRACE_AT_POOL)
                if row[3] != -1:
                    self.functions[row[1]] = P.blob(blobs, row[3])
                if row[0] in self.held:
                    continue
                if self.draining:  # crossed on the way: back it goes
                    self._give_back([QueuedTask(row, None)])
                    continue
                self.held.add(row[0])
                if len(row) == 7 and "rs" in row[6]:   # placed by what it asks (placement.py)
                    self.budget.active = True
                if len(row) == 7 and "d" in row[6]:   # waits here for tasks sent here before it
                    self._hold_dependent(QueuedTask(row, P.blob(blobs, row[2])))
                    continue
                self.queue.append(QueuedTask(row, P.blob(blobs, row[2])))
            if self._chaining:   # (tasks that go on to the worker running their dependencies, together)
                self._send_chained()
        elif t == P.CANCEL:
            self._cancel(set(P.task_ids(msg.fields["tids"])))
        elif t == P.WELCOME:
            self.settings = msg.fields.get("settings") or {}
            accelerators = self.settings.get("accel")
            if isinstance(accelerators, list) and accelerators and all(isinstance(a, str) for a in accelerators):
                self.budget.use_accelerators(accelerators, self._setting("accel_shared", False))
            self.budget.launcher = self._setting("mpi", self.budget.launcher)
            if not self.welcomed:
                self.welcomed = True
                self._start_workers()
                self.cleaner = start_cleaner(self.settings.get("task_ttl"),
                                             lambda: self.pool.kept_names() if self.pool is not None else set())
        elif t == P.STOP:
            log.info("pool %s: stop asked by the endpoint", self.pool_id.decode())
            grace = grace_of(msg.fields)
            if grace is None:
                self.stopping = True
            else:   # its workers finish what they run first (leaving.py)
                self.ask_to_leave(grace)
        elif t == P.HEARTBEAT:
            # the endpoint restarted or gave up on us: introduce ourselves again,
            # once for a burst of such replies (one per heartbeat it had queued)
            if msg.fields.get("unknown") and time.monotonic() - self.hello_at > self.heartbeat_period:
                self._hello()
        elif t == P.ERROR:
            log.error("the endpoint refused this pool: %s", msg.fields.get("msg"))
            self.stopping = True
        else:
            raise P.ProtocolError(f"unexpected message type {t!r} from the endpoint")

    def _hold_dependent(self, task: QueuedTask, chain: bool = True) -> None:
        """A task the endpoint sent to wait here until the tasks it depends
        on, all here, finish; one of them finished already (the result is on
        its way to the endpoint): it goes back, to wait at the endpoint.
        With ``chain``, it may go on to a worker instead (``_chain_to_worker``,
        ``_chain_after_last``)."""
        dependencies = task.row[6]["d"]
        held = self.held
        if not all(dependency in held for dependency in dependencies):
            if not (chain and self._chain_after_last(task)):
                self._give_back([task])
            return
        if chain and self._chain_to_worker(task):
            return
        ready, failure = self.graph.hold(task, dependencies, held, {})
        if failure is not None:
            self._result(task.row[0], P.FAILED, failure)
        elif ready is not None:
            self._release_held(ready)

    def _release_held(self, task: QueuedTask) -> None:
        """A task held here whose dependencies succeeded (their results
        wrapped in) is queued; when draining, it goes back."""
        if self.draining:
            self._give_back([task])
        else:
            self.queue.append(task)

    def _failed_held(self, task_id: bytes, failure: bytes) -> None:
        self._result(task_id, P.FAILED, failure)

    def _start_workers(self) -> None:
        try:
            self.pool = LocalWorkerPool(self.workers, self.worker_sock,
                                        self._sock_dir, sandbox=self._setting("sandbox", "none"),
                                        sandbox_image=self._setting("sandbox_image", ""),
                                        data_only=self._setting("data_only", False), links=self.links)
            self.pool.start()
        except Exception as exc:  # no workers: stop, giving back what came meanwhile
            log.error("pool %s could not start its workers: %s: %s", self.pool_id.decode(), type(exc).__name__, exc)
            self.stopping = True
            return
        log.info("pool %s started %d workers", self.pool_id.decode(), self.workers)

    def _cancel(self, task_ids: set[bytes]) -> None:
        """Drop those queued here; ask workers to drop those waiting in their
        batches; for those running, say so again (the client's cancel()
        waits for one answer or the other)."""
        ask: dict[bytes, tuple[WorkerSlot, list[bytes]]] = {}
        for task_id in task_ids:
            slot = self.at_worker.get(task_id)
            if slot is None:
                continue
            if task_id == slot.head():
                self.outbox.start(task_id, answer=True)
            else:
                ask.setdefault(slot.worker_id, (slot, []))[1].append(task_id)
        for slot, tids in ask.values():
            self._ask_cancel(slot, tids)
        for task in take_out(self.queue, task_ids):
            self._result(task.row[0], P.CANCELLED, b"")
        if self.graph:
            for task_id in self.graph.cancel(task_ids):
                self._result(task_id, P.CANCELLED, b"")

    def _result(self, task_id: bytes, status: int, blob: Any, trace: list[float] | None = None) -> None:
        self.outbox.add(task_id, status, blob, trace)
        self.held.discard(task_id)
        if self.graph.waiting_on:   # tasks held here may wait for it
            self.graph.settle(task_id, status, blob, self._release_held, self._failed_held)

    def _flush_due(self, now: float) -> bool:
        return self.outbox.due(now, nothing_else=not (self.queue or self.at_worker)
                               or (not self.queue and self.batch_size() == 1),
                               notices_wait=notices_wait(self.task_seconds))

    def _flush(self) -> None:
        if self.outbox:
            for frames in self.outbox.take(**({} if self.task_seconds is None else {"avg": self.task_seconds})):
                self._send(frames)

    # -- worker side ---------------------------------------------------------
    def batch_size(self) -> int:
        """Tasks to hand a worker at once now (``dispatch.worker_batch_size``)."""
        return worker_batch_size(self.task_seconds, self._setting("worker_batch", DEFAULT_WORKER_BATCH))

    def _read_workers(self) -> None:
        for worker_id, body in self.links.messages():   # local workers' own channels (framelink.py)
            slot = self.pool.slots.get(worker_id) if self.pool is not None else None
            if slot is not None:
                self._on_worker_message(slot, body)
        if not self.worker_sock_ready:   # (see workers_ready)
            return
        for frames in P.waiting_messages(self.worker_sock, MAX_MESSAGES_PER_TURN):
            slot = self.pool.slots.get(frames[0].bytes) if self.pool is not None else None
            if slot is None:   # a worker's control thread (stealing.py), or a worker we already gave up on
                try:
                    self._on_control(frames)
                except Exception as exc:
                    log.warning("ignored a malformed control message: %s: %s", type(exc).__name__, exc)
                continue
            self._on_worker_message(slot, frames[1:])

    def _on_worker_message(self, slot: WorkerSlot, body: list[Any]) -> None:
        """A worker's message (routing id taken off), from its socket or its link."""
        try:
            msg = P.decode(body)
            if msg.type == P.READY:
                slot.ready = True
                if self.pool is not None and self.pool.sandbox == "none" and slot.process.returncode is None \
                        and slot.held_output is None:   # (once: a task may send READY again on its socket)
                    # its capture files, held so that what a task it dies in printed still reaches its
                    # caller (not reaped: the pid is still the worker's)
                    slot.held_output = HeldOutput.open(slot.pid)
            elif msg.type == P.RESULTS:
                self._on_worker_results(slot, msg)
        except Exception as exc:
            log.warning("ignored a malformed message from worker %d: %s: %s", slot.pid, type(exc).__name__, exc)

    def _on_worker_results(self, slot: WorkerSlot, msg: P.Message) -> None:
        rows = [P.result_row(row, P.TRACE_FROM_WORKER) for row in msg.fields["rows"]]
        times = msg.fields.get("secs") or []
        for i, row in enumerate(msg.fields["rows"]):
            task_id, status, index = rows[i]
            task = slot.tasks.pop(task_id, None)
            if task is None:
                log.warning("worker %d answered for task %s it did not hold", slot.pid, task_id.hex())
                continue
            self.at_worker.pop(task_id, None)
            blob = P.blob(msg.blobs, index)
            if status == P.FAILED and len(task.row) == 7 and "d" in task.row[6] and is_not_kept(blob):
                self._unchained(task)   # sent on to this worker, which did not keep a dependency's value
                continue
            if self.pool is not None and self.pool.sandbox != "none":   # large payloads cross its wall
                status, blob = self.pool.task_result(slot, task_id, status, blob)
            if status == P.EXCEPTION and task.retried < (task.option("r") or 0) and not self.draining:
                task.retried += 1  # the caller asked for another try after an exception
                answered = task.answered = task.answered or {}   # (its held record is stale: pool/recovery.py)
                answered[slot.name] = answered.get(slot.name, 0) + 1
                self.queue.append(task)
                continue
            if status != P.CANCELLED and i < len(times) and isinstance(times[i], float):
                seconds = times[i]
                average = self.task_seconds
                self.task_seconds = seconds if average is None else average + EWMA_WEIGHT * (seconds - average)
            self._result(task_id, status, blob, row[3] if len(row) == 4 else None)
        self._ran(slot, rows)
        if slot.stuck is not None and slot.stuck not in slot.tasks:   # its long task is done (stealing.py)
            slot.stuck = None
        self._announce(slot)

    def _announce(self, slot: WorkerSlot) -> None:
        """Report the start of the task a worker is now running (its first),
        unless its worker was asked to drop it and has not answered (then the
        answer says: given back, it is cancelled; taken to run, it started;
        stealing.py)."""
        head = slot.head()
        if head is not None and head != slot.announced and not (self._cancel_asked and head in self._cancel_asked):
            slot.announced = head
            self.outbox.start(head)

    def _assign(self) -> None:
        """Top up workers with batches from the queue, least loaded first."""
        if (self.graph.waiting_on or self._chaining) and self.pool is not None:
            self._chain_held()
        if self.pool is None:
            return
        if self.queue:
            if self.budget.active:   # tasks asking for resources are here: placed by them (placement.py)
                self._assign_by_resources()
            else:
                self._assign_batches()
        if not self.queue:   # a worker idle while another holds tasks behind a long one? (stealing.py)
            self._steal_for_idle()

    def _assign_batches(self) -> None:
        """Top up workers with batches from the queue (no task here asks for resources)."""
        assert self.pool is not None
        # A task that takes SLOW_TASK or more goes to a worker one at a time:
        # to an idle worker, or, when such tasks are short, to one running its
        # last (stealing.py: one queued behind a task that turns out long is
        # recalled for a worker that frees up sooner, and is cancelled at once).
        # Quick tasks go in batches, the next sent when a worker is half way
        # through its batch. A worker recalled from (``stuck``) gets none.
        size = self.batch_size()
        slots = [slot for slot in self.pool.slots.values()
                 if slot.ready and not slot.retiring and not slot.yielding and slot.stuck is None]
        limit, hungry_below = (size, size // 2 + 1) if size > 1 else self._single_depth(slots)
        hungry = [slot for slot in slots if len(slot.tasks) < hungry_below]
        hungry.sort(key=lambda slot: len(slot.tasks))
        rounds = size == 1 and limit > 1   # every worker's next task before any worker's second (stealing.py)
        if rounds:
            self._send_in_rounds(hungry, limit)
        for position, slot in enumerate(() if rounds else hungry):
            if not self.queue:
                return
            share = math.ceil(len(self.queue) / (len(hungry) - position))
            self._send_batch(slot, min(limit - len(slot.tasks), share))
        if self.queue:
            # at once when a worker was left idle (the tasks queued are
            # another user's); else now and then: workers busy with one
            # user's tasks change hands after SHARE_AFTER at the soonest
            now = time.monotonic()
            if now >= self._next_share or any(not slot.tasks for slot in hungry):
                self._next_share = now + SHARE_CHECK
                self._share_workers()

    def _assign_by_resources(self) -> None:
        """Start the queued tasks whose resources are free, each alone at an
        idle worker of its user (``NodeBudget.plan``); a worker that ran a
        task given accelerators is replaced by a fresh one (a process that
        loaded a GPU library keeps the devices it saw first)."""
        assert self.pool is not None
        slots = self.pool.slots.values()
        if self._gpu_workers:
            self._gpu_workers &= self.pool.slots.keys()   # (those that died are gone)
        idle = []
        for slot in slots:
            if slot.ready and not slot.retiring and not slot.yielding and not slot.tasks:
                if slot.worker_id in self._gpu_workers:   # (before any other task, with resources or not)
                    self._gpu_workers.discard(slot.worker_id)
                    self._retire(slot)
                else:
                    idle.append(slot)
        if not any(has_resources(task.row) for task in self.queue) and not any(
                has_resources(task.row) for slot in slots for task in slot.tasks.values()):
            if not self._gpu_workers:
                self.budget.active = False   # none left: batches again
            self._assign_batches()
            return
        if idle:
            plan = self.budget.plan(self.queue, [slot.tasks.values() for slot in slots if slot.tasks], len(idle))
            for task, env in plan:
                user = task.option("u") or ""
                slot = next((s for s in idle if s.user == user), None) or next((s for s in idle if s.user is None),
                                                                               None)
                if slot is None:
                    continue   # no worker of theirs free: one changes hands (_share_workers)
                idle.remove(slot)
                if env is not None:
                    task.row = [*task.row[:6], {**task.row[6], "env": env}]
                    if "CUDA_VISIBLE_DEVICES" in env:
                        self._gpu_workers.add(slot.worker_id)
                self._send_placed(slot, task)
        if self.queue:
            now = time.monotonic()
            if now >= self._next_share or idle:
                self._next_share = now + SHARE_CHECK
                self._share_workers()

    def _send_placed(self, slot: WorkerSlot, task: QueuedTask) -> None:
        """Send one queued task to ``slot`` (``_send_batch`` on it alone)."""
        self.queue.remove(task)
        if slot.user is None:
            slot.user, slot.bound_at = task.option("u") or "", time.monotonic()
        queue, self.queue = self.queue, deque([task])
        try:
            self._send_batch(slot, 1)
        finally:
            self.queue = queue

    def _serving(self) -> list[WorkerSlot]:
        """Workers bound to a user that still take that user's tasks."""
        assert self.pool is not None
        return [slot for slot in self.pool.slots.values()
                if slot.user is not None and not slot.retiring and not slot.yielding]

    def _share_workers(self) -> None:
        """A worker serves the tasks of one user only (``WorkerSlot.user``):
        one user's task could otherwise read or change what another's left
        in the process (functions, modules, queued arguments). Tasks still
        queued after assigning are of users with no worker free, and workers
        change hands for them:

        - an idle worker of a user with nothing queued retires at once;
        - fair share: for each user with tasks queued and no worker (beyond
          the fresh and retiring workers already on their way), one worker of
          the user holding the most, and bound to that user for SHARE_AFTER
          at least, is given no more tasks; once idle it retires as well.

        A fresh worker goes to the first user queued who has none
        (``_user_for_fresh_worker``). With one user, nothing changes hands."""
        assert self.pool is not None
        waiting = {task.option("u") or "" for task in self.queue}
        for slot in self.pool.slots.values():
            if slot.ready and not slot.retiring and not slot.tasks and slot.user is not None \
                    and (slot.yielding or slot.user not in waiting):
                self._retire(slot)
        serving = self._serving()
        holding = Counter(slot.user for slot in serving)
        starved = sum(1 for user in waiting if user not in holding)
        coming = len(self.pool.slots) - len(serving) + len(self._respawn_at)   # fresh, retiring, yielding, dead
        now = time.monotonic()
        for _ in range(starved - coming):
            richest = max(holding, key=holding.__getitem__, default=None)
            candidates = [slot for slot in serving if slot.user == richest and not slot.yielding
                          and now - slot.bound_at >= SHARE_AFTER]
            if not candidates:
                return
            slot = min(candidates, key=lambda slot: len(slot.tasks))
            slot.yielding = True
            holding[richest] -= 1
            if not holding[richest]:
                del holding[richest]
            if not slot.tasks:
                self._retire(slot)

    def _user_for_fresh_worker(self) -> str:
        """The first user in the queue with no worker serving them; else the
        user of the first task queued."""
        served = {slot.user for slot in self._serving()}
        users = (task.option("u") or "" for task in self.queue)
        return next((user for user in users if user not in served), self.queue[0].option("u") or "")

    def _retire(self, slot: WorkerSlot) -> None:
        """Tell an idle worker to stop; when it has, a fresh one takes its
        place (``_replace_dead_workers``)."""
        slot.retiring = True
        slot.retired_at = time.monotonic()
        self._send_worker(slot.worker_id, P.encode(P.STOP))

    def _kill_lingering_workers(self, now: float) -> None:
        """Kill a worker still running RETIRE_GRACE after it was told to
        stop: something a task left in it (a thread, a patched exit) keeps
        it alive, and until it is gone no fresh worker takes its place."""
        assert self.pool is not None
        for slot in self.pool.slots.values():
            if slot.retiring and now - slot.retired_at > RETIRE_GRACE and slot.process.poll() is None:
                log.warning("worker %d did not stop within %g s of being told to; killing it", slot.pid, RETIRE_GRACE)
                slot.retired_at = now   # not again before another grace period (a container's kill is slow)
                try:
                    slot.process.kill()
                except OSError:
                    pass

    def _send_batch(self, slot: WorkerSlot, count: int, low_mark: int | None = None,
                    source: deque[QueuedTask] | None = None) -> None:
        """Up to ``count`` queued tasks of its user to ``slot``'s worker, in
        one message, taken from ``source`` (default: the pool's queue); with
        ``low_mark``, the worker holds their results until it has that many
        tasks left queued (stealing.py)."""
        queue = self.queue if source is None else source
        count = min(count, P.MAX_ITEMS)   # a message's limit (a worker's batch is far smaller)
        rows: list[list[Any]] = []
        blobs = P.Blobs()
        others: list[QueuedTask] = []   # tasks of users this worker does not serve: they stay queued, in order
        if slot.user is None and queue:
            slot.user, slot.bound_at = self._user_for_fresh_worker(), time.monotonic()
        pool = self.pool
        assert pool is not None
        while queue and len(rows) < count:
            task = queue.popleft()
            task_row = task.row
            # the relay names the user ("u") when not the endpoint's owner
            user = (task_row[6].get("u") or "") if len(task_row) == 7 else ""
            if user != slot.user:
                others.append(task)
                continue
            task_id, fn_hash, python = task_row[0], task_row[1], task_row[5]
            if python != P.PYTHON_VERSION:
                self._result(task_id, P.FAILED, P.pack_failure(
                    P.VERSION, f"client runs Python {python} but the workers on {socket.gethostname()} run "
                               f"Python {P.PYTHON_VERSION}; pickled functions need the same minor version"))
                continue
            fn_ref: bytes | int = -1
            if fn_hash not in slot.known_functions:
                body = self.functions.get(fn_hash)
                if body is None:
                    self._result(task_id, P.FAILED, P.pack_failure(
                        P.REJECTED, "the pool was not given this task's function"))
                    continue
                fn_ref = blobs.ref(body)
                slot.known_functions.add(fn_hash)
            args = task.args if pool.sandbox == "none" else pool.task_arguments(slot, task_id, task.args)
            row = [task_id, fn_hash, blobs.ref(args), fn_ref, task.row[4], python]
            if len(task.row) == 7:
                options = task.row[6]
                if "tr" in options:
                    options = {**options, "tr": [*options["tr"], time.time()]}
                row.append(options)
            rows.append(row)
            slot.tasks[task_id] = task
            self.at_worker[task_id] = slot
        if others:
            queue.extendleft(reversed(others))
        if rows:
            slot.sent += 1   # numbered, so that its control thread can give back tasks not read yet (stealing.py)
            slot.batches.append((slot.sent, rows))
            fields: dict[str, Any] = {"tasks": rows, "q": slot.sent}
            if low_mark is not None:
                fields["lw"] = low_mark
            self._send_worker(slot.worker_id, P.encode(P.TASKS, fields, blobs.frames))
            self._announce(slot)

    def _send_worker(self, worker_id: bytes, frames: list[Any]) -> None:
        if self.links.send(worker_id, frames):   # a worker with a channel of its own (framelink.py)
            return
        try:
            self.worker_sock.send_multipart([worker_id, *frames], copy=False)
        except zmq.ZMQError as exc:
            log.debug("could not send to worker %r: %s", worker_id, exc)

    def _enforce_walltimes(self, now: float) -> None:
        """Stop a worker whose running task has passed its ``timeout``; the
        task fails with a timeout error, the others it held run elsewhere."""
        assert self.pool is not None
        for slot in self.pool.slots.values():
            if not slot.tasks or slot.timed_out is not None:
                continue
            running = self._running_task(slot)
            if running != slot.running:
                slot.running, slot.running_since = running, now
                continue
            task = slot.tasks.get(running) if running is not None else None
            walltime = task.option("to") if task is not None else None
            if walltime is not None and now - slot.running_since > walltime:
                slot.timed_out = running
                slot.timed_out_output = self._last_output(slot, task)
                try:
                    slot.process.kill()
                except OSError:
                    pass

    def _last_output(self, slot: WorkerSlot, task: QueuedTask) -> bytes | None:
        """The output trailer of ``task``, which ``slot``'s worker was running
        and will never answer for (it is about to be killed, or died): read
        from the capture files held since the worker said it was ready, else
        (a live worker) through /proc now; None in a sandbox (``slot.pid`` is
        the sandbox's, and its files out of reach) or when there is none."""
        if self.pool is None or self.pool.sandbox != "none":
            return None
        limit, asked = configured_output_limit(), task.option("ol")
        limit = limit if asked is None else min(limit, asked)
        if slot.held_output is not None:
            return slot.held_output.read(limit)
        if slot.process.returncode is not None:   # reaped: its pid may be another process's by now
            return None
        return salvage_output(slot.pid, limit)

    @staticmethod
    def _running_task(slot: WorkerSlot) -> bytes | None:
        """The task a worker's marker names, if it is one the worker holds;
        None when idle or unknown. The task running there may have written
        anything into its marker: another task's id must not put the blame
        (for a crash, or a walltime) on that task."""
        running = slot.marker.read()
        return running if running in slot.tasks else None

    def _replace_dead_workers(self) -> None:
        assert self.pool is not None
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
        """A worker died. The task its marker names (else the first it held)
        fails with WorkerLost (or runs again, up to ``worker_lost_retries``
        times); every other task it
        held goes back to the front of the queue: those after it never
        started, and those before it finished without their results being
        sent, so they run again, unless their results were in its
        held-results file (recovery.py)."""
        self._recover_held(slot)
        if self._cancel_asked:   # (asked of this worker, never answered: they start elsewhere announced)
            self._cancel_asked.difference_update(slot.tasks)
        how = describe_exit(slot.process.returncode)
        culprit = slot.timed_out if slot.timed_out is not None else self._running_task(slot)
        if culprit is None and not slot.retiring and slot.tasks:
            # its marker was idle or spoiled (a task can truncate it or write
            # junk): the blame goes to the first task it held, the one running
            # or about to, so a task that spoils its marker and kills its
            # worker still ends with WorkerLost rather than being run again
            # and again; every task here is the same user's (one per worker)
            culprit = slot.head()
            unmarked = True
        else:
            unmarked = False
        retries = self._setting("worker_lost_retries", 2)
        name = self._setting("endpoint", "")
        survivors: list[QueuedTask] = []
        for task_id, task in slot.tasks.items():
            self.at_worker.pop(task_id, None)
            if task_id != culprit:
                survivors.append(task)
            elif task_id == slot.timed_out:
                walltime = task.option("to")
                log.warning("task %s ran past its walltime of %g s; its worker %d was stopped",
                            task_id.hex(), walltime, slot.pid)
                self._result(task_id, P.FAILED, attach_output(P.pack_failure(
                    P.TIMEOUT, f"the task ran longer than its timeout of {walltime:g} s on endpoint "
                               f"{name!r} and was stopped", timeout=walltime, endpoint=name), slot.timed_out_output))
            elif task.lost < retries:
                task.lost += 1
                log.warning("worker %d %s while running task %s; running it again (%d of %d)",
                            slot.pid, how, task_id.hex(), task.lost, retries)
                survivors.append(task)
            else:
                log.warning("worker %d %s while running task %s", slot.pid, how, task_id.hex())
                tries = f" (run {task.lost + 1} times, its worker died each time)" if task.lost else ""
                self._result(task_id, P.FAILED, attach_output(P.pack_failure(
                    P.WORKER_LOST,
                    f"worker process {slot.pid} on endpoint {name!r} {how} while running this "
                    f"task{tries}", pid=slot.pid, exitcode=slot.process.returncode, endpoint=name),
                    self._last_output(slot, task)))
        if slot.retiring:
            log.debug("worker %d of user %r stopped to make room for another user's", slot.pid, slot.user)
        elif culprit is None:
            log.warning("worker %d %s between tasks", slot.pid, how)
        elif unmarked:
            log.warning("worker %d %s holding tasks, its marker naming none of them", slot.pid, how)
        slot.tasks.clear()
        self._ran_last.pop(slot.worker_id, None)
        chained = [task for task in survivors if len(task.row) == 7 and "d" in task.row[6]]
        if chained:   # sent on to it for their dependencies' values there: they wait again
            survivors = [task for task in survivors if not (len(task.row) == 7 and "d" in task.row[6])]
        if self.draining:
            self._give_back(survivors)
        else:
            self.queue.extendleft(reversed(survivors))
        for task in chained:
            self._unchained(task)


def new_pool_id() -> bytes:
    """A fresh pool's id (its routing id at the endpoint)."""
    return b"P" + uuid.uuid4().bytes[:8].hex().encode()


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    from ..private import make_private

    make_private()   # its socket directory and the workers' task markers

    parser = argparse.ArgumentParser(prog="python -m fedexec.pool",
                                     description="Run a pool of workers for an endpoint (one per node).")
    parser.add_argument("--address", required=True, help="the endpoint's pool socket (tcp:// or ipc://)")
    parser.add_argument("--block-id", default="", help="the block (batch job) this pool belongs to")
    parser.add_argument("--workers", type=int, default=0, help="worker processes; 0: this node's usable cores")
    parser.add_argument("--ends-at", type=float, default=None,
                        help="unix time this pool's batch job ends (its walltime)")
    parser.add_argument("--drain", type=float, default=DEFAULT_DRAIN,
                        help="seconds before --ends-at to stop taking tasks")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process is gone")
    parser.add_argument("--endpoint-key", default="",
                        help="the endpoint's CURVE public key (pools.json 'key'), for a tcp:// address")
    parser.add_argument("--log-level", default="INFO")
    ns = parser.parse_args(argv)
    configure_logging(ns.log_level)
    if ns.workers < 0:
        sys.exit(f"fedexec pool: --workers must be >= 0, not {ns.workers}")
    if ns.endpoint_key and len(ns.endpoint_key) != 40:
        sys.exit(f"fedexec pool: --endpoint-key must be a 40-character Z85 key, not {ns.endpoint_key!r}")
    if ns.address.startswith("tcp://") and not ns.endpoint_key:
        sys.exit("fedexec pool: a tcp:// endpoint needs --endpoint-key (the 'key' in the endpoint's pools.json)")
    secret = os.environ.pop("FEDEXEC_POOL_SECRET", "")  # not handed down to the workers
    manager = PoolManager(ns.address, pool_id=new_pool_id(), block_id=ns.block_id, workers=ns.workers, secret=secret,
                          endpoint_key=ns.endpoint_key, ends_at=ns.ends_at, drain=ns.drain, parent_pid=ns.parent_pid)
    for_service()
    manager.run()
