"""Wire protocol shared by executor, relay, endpoint and worker.

A message is a ZeroMQ multipart message: one msgpack *header* frame followed
by zero or more opaque *blob* frames. The header is a map with the protocol
version ``v``, the message type ``t`` and type-specific fields. Rows in it
carry user payloads (pickled functions, arguments, results) by *reference*:
a small payload (up to ``INLINE_MAX`` bytes) travels inline as msgpack bytes,
a larger one as its own frame, referred to by index, so it is never copied
into msgpack. Either way the relay never looks into a payload.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import msgpack
import zmq

from . import resources as _resources

PROTOCOL_VERSION = 1

#: The Python minor version pickles were made with ("3.11").
PYTHON_VERSION = f"{sys.version_info[0]}.{sys.version_info[1]}"

# Message types -------------------------------------------------------------
# client/endpoint -> relay
HELLO = "hello"          # {role, id, name?, py, capacity?, holding?: [task ids an endpoint holds], data_only?}
SUBMIT = "submit"        # {ep, tasks: [TaskRow], resend?: true after a relay restart}
                         #   ep: an endpoint id, or a list of them (a group: the relay routes each task
                         #   to one member with capacity, preferring one the function is warm on)
CANCEL = "cancel"        # {tids}
ACK = "ack"              # {tids}: client -> relay: results received, relay may forget them;
                         #         relay -> endpoint: results stored, endpoint may forget them
RESUME = "resume"        # {tids}: a client waits for these accepted tasks: route their results to it
HOLDING = "holding"      # {tids}: endpoint -> relay, pool -> endpoint, right after HELLO: more task ids it
                         #   holds than one HELLO's "holding" list carries (MAX_ITEMS each)
LOOKUP = "lookup"        # {ep}
CREDIT = "credit"        # {n}: endpoint can take n more tasks
SHARE = "share"          # {ep, public?, add_users?, remove_users?, add_groups?, remove_groups?}: owner only
DEREGISTER = "deregister"  # {ep}: the owner deletes an endpoint at the relay (relay/deregister.py)
HEARTBEAT = "hb"
BYE = "bye"
# relay -> client/endpoint
WELCOME = "welcome"      # {role, inc: this relay run's id, py?}
ACCEPTED = "accepted"    # {tids}: these tasks are in the relay's durable record
RESULTS = "results"      # {rows: [ResultRow], credit?, started?: [task ids now running]}
LOOKUP_REPLY = "lookup_reply"
TASKS = "tasks"          # {tasks: [TaskRow]}
ERROR = "error"          # {msg, auth?: credentials refused, refused?: not allowed, deleted?: to an endpoint: it
                         #   was deleted by its owner (relay/deregister.py): it stops}
SHARED = "shared"        # {endpoint: who may use it}, the answer to SHARE
DEREGISTERED = "deregistered"  # {ep, known, failed?: its tasks failed}, the answer to DEREGISTER (the same
                               #   "known": false for an unknown id and for another user's endpoint)
# endpoint <-> worker
READY = "ready"          # worker -> endpoint {pid}
TASK = "task"            # endpoint -> worker, one TaskRow
RESULT = "result"        # worker -> endpoint, one ResultRow
STOP = "stop"
RECALL = "recall"        # pool -> worker's control thread {tids: [[task id, q of its TASKS]], c?: to cancel}: give
                         #   back (or cancel) these if not started (worker/control.py)
RECALLED = "recalled"    # worker's control thread -> pool {given: task ids given back, absent: taken to run, c}
# large payloads, in chunks (transfer.py), on a connection of their own to the relay
UPLOAD = "upload"        # client/endpoint -> relay {b, o, n, h, q, tid?} + one chunk frame
UPLOADED = "uploaded"    # relay -> sender {b, q, have, done?, err?}
FETCH = "fetch"          # client/endpoint -> relay {b, o, q, tid?}
CHUNK_MSG = "chunk"      # relay -> receiver {b, o, q, n} + one chunk frame, or {b, o, q, err}
DROP = "drop"            # client -> relay {b}: a large result was received; the relay deletes it
# data sent once (dataref.py, relay/refs.py): a complete upload kept under a name, with a TTL
REF = "ref"              # client -> relay {op: "put" | "del" | "info", b, q, put: ttl, n, h}
REF_ANSWER = "ref_answer"  # relay -> client {b, q, err?, e?: expiry (epoch s), n?, fetches?}
REFS_GONE = "refs_gone"  # relay -> endpoint {refs: [[user or "" for the owner, ref id]]}: drop cached copies
# the Client API (relay/inspect.py): a user's own tasks, registered functions and usable endpoints
INSPECT = "inspect"      # client -> relay {op, q, ...op's fields} (+ a function body frame for op "fn_put")
INSPECTED = "inspected"  # relay -> client {op, q, ...} (+ result or body frames), or {q, busy: true}: ask later

# Task rows: [task_id, fn_hash, args_blob, fn_blob_or_-1, kind, client_python, options?]
# options (only when used): {"m": memo key (32 bytes), "tr": [timestamps so far],
#   "r": times to run it again after it raised, "to": walltime in seconds,
#   "u": relay -> endpoint only: the user who submitted it, when not the endpoint's owner
#        (a pool runs each user's tasks in workers of their own),
#   "d": client -> relay only: the ids of the sender's unfinished tasks whose results the arguments
#        name (persistent ids 0, 1, ... in their pickle): the relay holds the task until those are done,
#   "rf": the DataRefs its arguments name, [[ref id, size, sha256]]: the relay checks they are the
#        user's; the endpoint fetches each once and hands the worker their files (dataref.py),
#   "dr": relay -> endpoint only: the results over 16 MiB (uploads at the relay) of the tasks a task
#        held at the relay depended on, [[dependency id, upload id, size, sha256]]: the endpoint
#        fetches each (for this task) and hands the worker their files (relay/kept.py),
#   "rs": the resources it asks (resources.py: {"c": cores, "m": memory, "g": GPUs, "n": nodes, "r": ranks});
#        the endpoint places it where they are free (endpoint/placement.py),
#   "nl": endpoint -> pool only (the agent drops one from the relay): the nodes of a multi-node task,
#   "ol": the bytes of each output stream the task's result carries at most (the executor's output_limit;
#        the endpoint's own limit caps it: output.py)}
# pool -> worker only (refused from anyone else by task_row): "env": {name: value} set while it runs
TASK_OPTIONS = frozenset({"m", "tr", "r", "to", "u", "d", "rf", "dr", "rs", "nl", "ol"})
MAX_OUTPUT_LIMIT = 16 << 20   # the most an "ol" may ask (output.MAX_LIMIT)
MAX_REFS = 256   # DataRefs one task may name
MAX_RETRIES = 100
MAX_WALLTIME = 366 * 24 * 3600.0
TASK_CALL = 0    # fn(*args, **kwargs)
TASK_CHUNK = 1   # [fn(*a) for a in chunk]; a map() chunk travels as one task

# Result rows: [task_id, status, blob, trace?]; trace: the task's timestamps
# Trace stages, in order (time.time() on each part's clock):
TRACE_STAGES = ("submit", "sent", "relay_in", "relay_out", "endpoint_in", "worker_in",
                "start", "end", "endpoint_out", "relay_result", "done")
# Result statuses
OK = 0            # blob: pickled return value
EXCEPTION = 1     # blob: pickled RemoteException (from the user's function)
FAILED = 2        # blob: msgpack {kind, msg, ...}: fedexec could not run it
CANCELLED = 3     # blob: empty; dropped before it ran

# FAILED kinds
WORKER_LOST = "worker_lost"
REJECTED = "rejected"
VERSION = "version"
SERIALIZATION = "serialization"
LOST = "lost"            # the relay has no record of the task (never accepted, or expired)
NOT_ALLOWED = "not_allowed"  # the user may not do this (someone else's endpoint, a function not allowed)
TIMEOUT = "timeout"      # the task ran longer than its walltime and was stopped
TOO_LARGE = "too_large"  # arguments or result over the relay's payload limit
QUOTA = "quota"          # the user's tasks in flight or bytes stored at the relay are at its quota
                         #   (details: quota = "tasks" | "bytes", usage, limit)
DEPENDENCY = "dependency"  # a task it depended on ("d") failed or was cancelled (details: dep = its id)
DEPENDENCY_DONE = "dependency_done"  # a task named in "d" has finished already: the client sends the
                                     #   values itself (it has them, or they are on their way to it)
REF_MISSING = "ref_missing"  # a DataRef the task names is not the user's (unknown, deleted, expired,
                             #   or another user's) (details: ref = its id)
NEED_FUNCTION = "need_function"  # the task came without its function body (fn_index -1) and the relay no
                                 #   longer has it (it expired with the last task using it): send it again
                                 #   with the body. Not a final outcome: the client neither acknowledges it
                                 #   nor shows it to the user.

DEFAULT_MAX_PAYLOAD = 4 * 1024 ** 3  # bytes of pickled arguments or result (over 16 MiB: in chunks, transfer.py)
MAX_PAYLOAD_SETTING = 1 << 40       # the largest max_payload a relay takes

# Limits every part holds to, so that no message can make a receiver buffer,
# decode or loop over much (issue 12).
# MAX_FRAME: zmq.MAXMSGSIZE on every socket that reads from another program
# (see limit_frames). libzmq applies it to each frame, not to a multipart
# message as a whole (checked with libzmq 4.3.5: two 600-byte frames pass a
# 1000-byte limit, one frame of 1001 bytes drops the sender's connection), so
# a payload travels in a frame of its own and must fit one: the relay's
# max_payload is at most MAX_FRAME minus a little room (MAX_PAYLOAD_LIMIT).
MAX_FRAME = 32 * 1024 * 1024
MAX_PAYLOAD_LIMIT = MAX_FRAME - 64 * 1024
# MAX_HEADER: bytes of a header frame. A header holds rows and small inline
# payloads only; decoding one is bounded by its size (msgpack makes at most
# ~72 bytes of Python objects per byte: one empty map per byte), so a larger
# header is refused before it is decoded.
MAX_HEADER = 512 * 1024
# MAX_ITEMS: items of any list in a header (task rows, result rows, task ids of
# RESUME, CANCEL, ACK, ACCEPTED, started, holding), checked while decoding.
# Senders split longer lists over several messages (chunks()).
MAX_ITEMS = 1024
# Inline payload bytes in one message (Blobs); payloads beyond this go as
# frames, so MAX_ITEMS rows of at most ~240 bytes each and the inline
# payloads fit MAX_HEADER.
INLINE_BUDGET = 128 * 1024
MAX_MAP = 256        # keys of any map in a header
# MAX_FRAMES: frames of one message, the header included. Every row refers to
# at most two frames (a task's arguments and function body; a result's
# payload), each frame at most once (see claim_frame), so a message of
# MAX_ITEMS rows needs at most this many. libzmq has no option that caps a
# whole multipart message (MAXMSGSIZE is per frame, RCVHWM counts messages):
# it assembles every frame of a message before the receiver sees any, so a
# message of millions of 1-byte frames costs ~90x its size in libzmq's and
# Python's frame objects. waiting_messages keeps at most MAX_FRAMES (+ the
# routing id) of a message as Python objects, dropping the rest as it reads
# them, and decode refuses a message over MAX_FRAMES.
MAX_FRAMES = 1 + 2 * MAX_ITEMS
# How much of a value an error message or log line quotes (shorten()).
MAX_QUOTED = 200

INLINE_MAX = 8 * 1024

# Clients and endpoints reconnect to a relay that went away by themselves,
# waiting 0.1 s at first and doubling up to 2 s between attempts.
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 2000


class Blobs:
    """The payloads of one outgoing message: :meth:`ref` gives what a row
    carries for a payload (the bytes themselves, or a frame index)."""

    __slots__ = ("frames", "inline")

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.inline = 0   # bytes inline so far (at most INLINE_BUDGET)

    def ref(self, blob: Any) -> bytes | int:
        size = len(blob)
        if size <= INLINE_MAX and self.inline + size <= INLINE_BUDGET:
            self.inline += size
            return blob if type(blob) is bytes else as_bytes(blob)
        self.frames.append(blob)
        return len(self.frames) - 1

    def result_row(self, task_id: bytes, status: int, blob: Any, trace: list[float] | None = None) -> list[Any]:
        """An outgoing result row ``[task_id, status, ref, trace?]`` whose payload travels with this message."""
        row = [task_id, status, self.ref(blob)]
        if trace is not None:
            row.append(trace)
        return row


def split_rows(rows: list[list[Any]], frames: list[Any]) -> Iterator[tuple[list[list[Any]], list[Any]]]:
    """Result rows (their payload reference in field 2) and the frames they
    refer to, as the ``(rows, frames)`` of messages of at most MAX_ITEMS rows,
    each with its frames renumbered. The inline payloads of all of them were
    within one INLINE_BUDGET, so each part is too."""
    if len(rows) <= MAX_ITEMS:
        yield rows, frames
        return
    for part in chunks(rows):
        own: list[Any] = []
        out = []
        for row in part:
            ref = row[2]
            if type(ref) is int:
                own.append(frames[ref])
                row = [row[0], row[1], len(own) - 1, *row[3:]]
            out.append(row)
        yield out, own


def results_messages(rows: list[list[Any]], frames: list[Any], started: Sequence[bytes] = (),
                     **fields: Any) -> list[list[Any]]:
    """RESULTS messages for result rows (referring to ``frames``) and start
    notices, each within MAX_ITEMS; ``fields`` (credit, ...) go with the first."""
    parts = list(split_rows(rows, frames))
    notices = list(chunks(started))
    messages = []
    for i in range(max(len(parts), len(notices))):
        part_rows, part_frames = parts[i] if i < len(parts) else ([], [])
        header: dict[str, Any] = dict(fields) if i == 0 else {}
        header["rows"] = part_rows
        if i < len(notices):
            header["started"] = notices[i]
        messages.append(encode(RESULTS, header, part_frames))
    return messages


def as_bytes(blob: Any) -> bytes:
    """A payload as bytes (a copy for frames and buffers)."""
    if type(blob) is bytes:
        return blob
    data = getattr(blob, "bytes", None)  # zmq.Frame
    return data if data is not None else bytes(blob)


def as_buffer(blob: Any) -> Any:
    """A payload as something sqlite3 and file writes take without a copy."""
    buffer = getattr(blob, "buffer", None)  # zmq.Frame
    return buffer if buffer is not None else blob


def blob(frames: Sequence[Any], ref: Any) -> Any:
    """The payload a row refers to: inline bytes, or a frame by index."""
    if type(ref) is bytes:
        return ref
    return blob_at(frames, ref)


# zmq.POLLIN and zmq.EVENTS as plain ints: zmq's are enum members, whose
# ``&`` runs Python code (~1 us), and loops test them every turn.
POLLIN = int(zmq.POLLIN)
EVENTS = int(zmq.EVENTS)


def waiting_messages(sock: zmq.Socket, limit: int) -> Iterator[list[Any]]:
    """The messages already waiting on ``sock``, as frames, at most ``limit``
    (so one busy socket cannot starve a loop's others); never blocks.

    A message of more than MAX_FRAMES frames (after a ROUTER's routing id)
    is cut to MAX_FRAMES + 1 of them (the rest are read and dropped at
    once, never kept), so that :func:`decode` refuses it without it costing
    a Python object per frame. Reads a link in memory (memlink.py) as well,
    whose messages come from this process's own code."""
    if type(sock) is not zmq.Socket:
        from .memlink import MemoryEnd
        if isinstance(sock, MemoryEnd):
            yield from sock.messages(limit)
            return
    keep = MAX_FRAMES + (2 if sock.type == zmq.ROUTER else 1)
    for _ in range(limit):
        try:
            frames = [sock.recv(zmq.NOBLOCK, copy=False)]
        except zmq.Again:
            return
        # the rest of a message is already here (libzmq delivers whole messages)
        while frames[-1].more:
            frame = sock.recv(copy=False)
            if len(frames) < keep:
                frames.append(frame)
            elif not frame.more:
                break
        yield frames


def limit_frames(sock: zmq.Socket) -> zmq.Socket:
    """Refuse frames over MAX_FRAME on ``sock`` (libzmq drops the connection
    of a peer that sends one, before buffering it)."""
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
    return sock


def dealer(ctx: zmq.Context, linger_ms: int, identity: bytes | None = None, queues: bool = True) -> zmq.Socket:
    """A DEALER socket as every connection toward a relay or endpoint has
    it: frames limited (limit_frames), IPv6 addresses too, reconnecting at
    RECONNECT_IVL_MS backing off to RECONNECT_IVL_MAX_MS; ``queues``: no
    high-water mark (messages queue, they are never dropped or blocked)."""
    sock = limit_frames(ctx.socket(zmq.DEALER))
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:port as well as IPv4
    sock.setsockopt(zmq.LINGER, linger_ms)
    if queues:
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    return sock


def chunks(items: Sequence[Any], size: int = MAX_ITEMS) -> Iterator[Sequence[Any]]:
    """``items`` in slices of at most ``size``: the lists of the messages that
    carry them (none for no items)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def check_payload_limit(max_payload: int) -> int:
    """A relay's max_payload, checked (payloads over transfer.BIG_THRESHOLD
    travel in chunks, so the limit is not bound by a frame's)."""
    if type(max_payload) is not int or not 0 < max_payload <= MAX_PAYLOAD_SETTING:
        raise ValueError(f"max_payload must be from 1 to {MAX_PAYLOAD_SETTING:,} bytes, not {max_payload!r}")
    return max_payload


def shorten(value: Any, limit: int = MAX_QUOTED) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for error messages
    and log lines that quote what a peer sent: a large value makes neither
    a large reply nor a large log line."""
    if isinstance(value, (bytes, bytearray, str)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value):,} in all)"
    return clip(repr(value), limit)


def clip(text: str, limit: int = MAX_QUOTED) -> str:
    """``text`` cut to ``limit`` characters (saying how long it was)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class ProtocolError(ValueError):
    """A message that is not a well-formed fedexec message."""


@dataclass
class Message:
    """A decoded message: its type, header fields and blob frames."""

    type: str
    fields: dict[str, Any]
    blobs: list[Any] = field(default_factory=list)


_packer = msgpack.Packer(use_bin_type=True)


def encode(msg_type: str, fields: dict[str, Any] | None = None, blobs: Sequence[Any] = ()) -> list[Any]:
    """Frames for a message; ``blobs`` are bytes-like objects sent as is."""
    header = {"v": PROTOCOL_VERSION, "t": msg_type}
    if fields:
        if "v" in fields or "t" in fields:
            raise ValueError("'v' and 't' are the envelope's own keys")
        header.update(fields)
    return [_packer.pack(header), *blobs]


def decode(frames: Sequence[Any]) -> Message:
    """Parse frames (bytes or zmq.Frame) into a :class:`Message`.

    Raises :class:`ProtocolError` for anything malformed, truncated or of
    another protocol version, so that a server can log it and go on.
    """
    if not frames:
        raise ProtocolError("empty message")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"more than {MAX_FRAMES:,} frames in one message, the limit (MAX_FRAMES: a header "
                            f"and two payload frames for each of at most {MAX_ITEMS} rows)")
    head = frames[0]
    raw = head.buffer if hasattr(head, "buffer") else head
    if len(raw) > MAX_HEADER:
        raise ProtocolError(f"header of {len(raw):,} bytes, over the limit of {MAX_HEADER:,} bytes (MAX_HEADER)")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=False, max_array_len=MAX_ITEMS,
                                 max_map_len=MAX_MAP, max_str_len=MAX_HEADER, max_bin_len=MAX_HEADER,
                                 max_ext_len=0)
    except ValueError as exc:
        if "exceeds max_array_len" in str(exc):
            raise ProtocolError(f"a list in the header has more than {MAX_ITEMS} items, the limit per message "
                                "(MAX_ITEMS)") from None
        if "exceeds max_map_len" in str(exc):
            raise ProtocolError(f"a map in the header has more than {MAX_MAP} keys (MAX_MAP)") from None
        raise ProtocolError(f"undecodable header: {exc}") from None
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable header: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    version = header.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {shorten(version)}, expected {PROTOCOL_VERSION}")
    msg_type = header.pop("t", None)
    if not isinstance(msg_type, str):
        raise ProtocolError("message has no type")
    return Message(msg_type, header, list(frames[1:]))


def pack_failure(kind: str, msg: str, **extra: Any) -> bytes:
    """Blob of a FAILED result row."""
    return msgpack.packb({"kind": kind, "msg": msg, **extra}, use_bin_type=True)


def too_large(what: str, size: int, limit: int) -> tuple[str, dict[str, int]]:
    """The message and details of a TOO_LARGE failure: ``what`` (the
    arguments, the result, ...) is ``size`` bytes pickled, over ``limit``."""
    verb = "are" if what.endswith("s") else "is"
    return (f"{what} {verb} {size:,} bytes pickled, over the relay's payload limit of {limit:,} bytes",
            {"size": size, "limit": limit})


def unpack_failure(blob: Any) -> dict[str, Any]:
    """The fields of a FAILED result's blob, whatever follows them (the
    output trailer of a task that ran: output.py)."""
    try:
        data = msgpack.unpackb(bytes(blob), raw=False)
    except msgpack.ExtraData as extra:
        data = extra.unpacked
    if not isinstance(data, dict):
        raise ProtocolError("failure blob is not a map")
    return data


def content_hash(data: Any) -> bytes:
    """sha256 of a blob: names functions and memoized calls (never unpickles)."""
    return hashlib.sha256(data).digest()


def body_mismatch(fn_hash: bytes, body: Any) -> str:
    """Why a function body may not be loaded as ``fn_hash`` ("" when its
    sha256 is that hash): an endpoint checks every body it is sent, so a
    relay (or anyone between) cannot swap the code a hash stands for."""
    actual = hashlib.sha256(body).digest()
    if hmac.compare_digest(actual, fn_hash):
        return ""
    return (f"the function body sent for {fn_hash.hex()} does not match that hash (its sha256 is "
            f"{actual.hex()}); it was not loaded")


def new_endpoint_routing_id() -> bytes:
    """The ZeroMQ identity an endpoint process connects to its relay with:
    random, so that no one can take over a connection by knowing the
    (public) endpoint id."""
    return b"E" + os.urandom(16)


def is_endpoint_id(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def is_loopback(address: str) -> bool:
    """Whether only this machine can reach ``address`` (ipc, or a loopback host)."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def function_hashes(values: Any) -> list[bytes]:
    """An allow-list of function hashes (sha256, 32 bytes each)."""
    if not isinstance(values, list) or not all(isinstance(v, bytes) and len(v) == 32 for v in values):
        raise ProtocolError("function hashes must be a list of 32-byte sha256 digests")
    return values


MAX_COUNT = 1 << 31


def count(value: Any, name: str) -> int:
    """A non-negative integer field (credits, worker counts), checked at the edge."""
    if type(value) is not int or not 0 <= value < MAX_COUNT:
        raise ProtocolError(f"{name} must be an integer from 0 to {MAX_COUNT - 1}, not {shorten(value)}")
    return value


def text(value: Any, name: str, limit: int = 256) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(f"{name} must be a string of at most {limit} characters")
    return value


MAX_GROUP = 256   # endpoints in one group


def endpoint_group(value: Any) -> tuple[str, ...]:
    """The members of an endpoint group (SUBMIT's ``ep`` as a list): endpoint
    ids, sorted and without repeats, so one set of endpoints is one group."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_GROUP:
        raise ProtocolError(f"an endpoint group is a list of 1 to {MAX_GROUP} endpoint ids")
    members = {text(member, "endpoint id") for member in value}
    if not all(is_endpoint_id(member) for member in members):
        raise ProtocolError("an endpoint group's members must be endpoint ids (UUIDs)")
    return tuple(sorted(members))


def task_ids(values: Any) -> list[bytes]:
    """A message's list of task ids, checked: each 16 bytes, as every task
    row's is (an id of another length names no task, and one kept for
    later, as the relay's drop notes are, would cost its length)."""
    if not isinstance(values, list) or not all(type(v) is bytes and len(v) == 16 for v in values):
        raise ProtocolError("task ids must be a list of 16-byte ids")
    if len(values) > MAX_ITEMS:  # decode() refuses longer lists; this is for lists made here
        raise ProtocolError(f"{len(values)} task ids in one message, over the limit of {MAX_ITEMS} (MAX_ITEMS)")
    return values


# The most stamps a trace may carry when it reaches each part (each part
# adds its own before passing it on, so a longer one is refused at the edge).
TRACE_AT_RELAY = 2       # submit, sent
TRACE_AT_ENDPOINT = 4    # ... relay_in, relay_out
TRACE_AT_POOL = 5        # ... endpoint_in
TRACE_FROM_WORKER = 8    # ... endpoint_in, worker_in, start, end
TRACE_FROM_ENDPOINT = 9  # ... endpoint_out


_REFS = (int, bytes)   # what a row's payload reference may be (a frame index, or the bytes inline)
_KINDS = (TASK_CALL, TASK_CHUNK)
_STATUSES = (OK, EXCEPTION, FAILED, CANCELLED)   # (a tuple: an unhashable status is refused, not a TypeError)


def trace(value: Any, at_most: int = len(TRACE_STAGES)) -> list[float]:
    if (not isinstance(value, list) or len(value) > at_most
            or not all(isinstance(t, float) for t in value)):
        raise ProtocolError(f"a trace here is a list of at most {at_most} timestamps")
    return value


def result_row(row: Any, max_trace: int = len(TRACE_STAGES)) -> tuple[bytes, int, Any]:
    """``(task_id, status, blob_index)`` of a result row, checked (a 4th
    field, the trace, is checked too and left in the row)."""
    if type(row) is list and len(row) == 3:   # the common row (no trace), checked in one test
        task_id, status, index = row
        if type(task_id) is bytes and status in _STATUSES and type(index) in _REFS:
            return task_id, status, index
    if not isinstance(row, list) or len(row) not in (3, 4):
        raise ProtocolError("a result row has 3 or 4 fields")
    if len(row) == 4:
        trace(row[3], max_trace)
    task_id, status, index = row[:3]
    if (not isinstance(task_id, bytes) or status not in (OK, EXCEPTION, FAILED, CANCELLED)
            or type(index) not in (int, bytes)):
        raise ProtocolError(f"malformed result row {shorten(row)}")
    return task_id, status, index


def data_refs(refs: Any) -> list[Any]:
    """A task's ``rf`` option, checked: 1 to MAX_REFS distinct ``[ref id (16
    bytes), size, sha256 (32 bytes)]``."""
    if not (isinstance(refs, list) and 0 < len(refs) <= MAX_REFS and all(
            isinstance(r, list) and len(r) == 3 and isinstance(r[0], bytes) and len(r[0]) == 16
            and type(r[1]) is int and r[1] >= 0 and isinstance(r[2], bytes) and len(r[2]) == 32 for r in refs)
            and len({r[0] for r in refs}) == len(refs)):
        raise ProtocolError(f"DataRefs (rf) must be a list of 1 to {MAX_REFS} distinct [16-byte id, size, "
                            "32-byte sha256]")
    return refs


def dependency_results(wire: Any) -> list[Any]:
    """A task's ``dr`` option, checked: 1 to MAX_ITEMS ``[dependency id (16
    bytes), upload id (16 bytes), size, sha256 (32 bytes)]``, distinct dependencies."""
    if not (isinstance(wire, list) and 0 < len(wire) <= MAX_ITEMS and all(
            isinstance(r, list) and len(r) == 4 and isinstance(r[0], bytes) and len(r[0]) == 16
            and isinstance(r[1], bytes) and len(r[1]) == 16 and type(r[2]) is int and r[2] >= 0
            and isinstance(r[3], bytes) and len(r[3]) in (0, 32) for r in wire)
            and len({r[0] for r in wire}) == len(wire)):
        raise ProtocolError(f"dependency results (dr) must be a list of 1 to {MAX_ITEMS} [16-byte task id, "
                            "16-byte upload id, size, 32-byte sha256 or empty: unhashed] of distinct tasks")
    return wire


def task_row(row: Any, max_trace: int = len(TRACE_STAGES)) -> list[Any]:
    """A task row ``[task_id, fn_hash, args_index, fn_index, kind, python, options?]``, checked."""
    if type(row) is list and len(row) == 6:   # the common row (no options), checked in one test: each hop
        task_id, fn_hash, args_index, fn_index, kind, python = row   # checks every row; the rest as below
        if (type(task_id) is bytes and len(task_id) == 16 and type(fn_hash) is bytes and len(fn_hash) == 32
                and type(args_index) in _REFS and type(fn_index) in _REFS and kind in _KINDS
                and type(python) is str and len(python) <= 16):
            return row
    if not isinstance(row, list) or len(row) not in (6, 7):
        raise ProtocolError("a task row has 6 or 7 fields")
    task_id, fn_hash, args_index, fn_index, kind, python = row[:6]
    if len(row) == 7:
        options = row[6]
        if not isinstance(options, dict) or not set(options) <= TASK_OPTIONS:
            raise ProtocolError(f"task options must be a map with keys among {', '.join(sorted(TASK_OPTIONS))}")
        if "m" in options and not (isinstance(options["m"], bytes) and len(options["m"]) == 32):
            raise ProtocolError("a memo key is 32 bytes")
        if "r" in options and not (type(options["r"]) is int and 0 <= options["r"] <= MAX_RETRIES):
            raise ProtocolError(f"max_retries must be an integer from 0 to {MAX_RETRIES}")
        if "to" in options and not (type(options["to"]) in (int, float) and 0 < options["to"] <= MAX_WALLTIME):
            raise ProtocolError(f"a task timeout must be a number of seconds from 0 to {MAX_WALLTIME}")
        if "tr" in options:
            trace(options["tr"], max_trace)
        if "u" in options:
            text(options["u"], "user")
        if "d" in options:
            deps = options["d"]
            if not (isinstance(deps, list) and 0 < len(deps) <= MAX_ITEMS
                    and all(isinstance(d, bytes) and len(d) == 16 for d in deps) and len(set(deps)) == len(deps)):
                raise ProtocolError(f"dependencies must be a list of 1 to {MAX_ITEMS} distinct 16-byte task ids")
        if "rf" in options:
            data_refs(options["rf"])
        if "dr" in options:
            dependency_results(options["dr"])
        if "nl" in options and not (isinstance(options["nl"], list) and 0 < len(options["nl"]) <= MAX_ITEMS
                                    and all(isinstance(n, str) and 0 < len(n) <= 256 for n in options["nl"])):
            raise ProtocolError(f"a node list (nl) is a list of 1 to {MAX_ITEMS} node names")
        if "ol" in options and not (type(options["ol"]) is int and 0 <= options["ol"] <= MAX_OUTPUT_LIMIT):
            raise ProtocolError(f"an output limit (ol) must be an integer from 0 to {MAX_OUTPUT_LIMIT} bytes")
        if "rs" in options:
            try:
                _resources.check_wire(options["rs"])
            except ValueError as exc:
                raise ProtocolError(str(exc)) from None
    if not (isinstance(task_id, bytes) and len(task_id) == 16):
        raise ProtocolError("task id must be 16 bytes")
    if not (isinstance(fn_hash, bytes) and len(fn_hash) == 32):
        raise ProtocolError("function hash must be 32 bytes")
    if type(args_index) not in (int, bytes) or type(fn_index) not in (int, bytes):
        raise ProtocolError("payload references must be inline bytes or frame indexes")
    if kind not in (TASK_CALL, TASK_CHUNK):
        raise ProtocolError(f"unknown task kind {shorten(kind)}")
    text(python, "python version", 16)
    return row


def claim_frame(used: set[int], blobs: Sequence[Any], ref: Any) -> None:
    """Check a row's payload reference (inline bytes, or a frame index)
    and mark its frame used: a frame referred to twice in one message is a
    ProtocolError, so that one large frame cannot be hashed, stored or
    forwarded once per row (every sender gives each payload its own frame,
    see :class:`Blobs`)."""
    if type(ref) is bytes:
        return
    blob_at(blobs, ref)
    if ref in used:
        raise ProtocolError(f"blob frame {ref} is referred to twice in one message; each payload travels in a "
                            "frame of its own")
    used.add(ref)


def blob_at(blobs: Sequence[Any], index: Any) -> Any:
    """The blob a row refers to, with a ProtocolError for a bad index."""
    if not isinstance(index, int) or not 0 <= index < len(blobs):
        raise ProtocolError(f"row refers to blob {shorten(index)} of {len(blobs)}")
    return blobs[index]
