"""Protocol fuzzing: the relay and the endpoint keep serving under random and
mutated frames.

Each test sends a bounded number of messages built from a seeded
``random.Random`` (set ``FEDEXEC_FUZZ_SEED`` to replay a run; the seed is in
every assertion message): random frames, hand-made malformed msgpack, valid
messages of every type with their fields mutated (wrong types, huge and
negative numbers, nested junk, missing and extra keys, extra frames, truncated
headers, wrong protocol versions) and valid task/result rows with one element
changed. Then it checks that the process is alive, still answers, only ever
sent well-formed messages itself, and still runs real tasks.

Everything is on 127.0.0.1; every process started here is stopped by pid.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import cloudpickle
import msgpack
import pytest
import zmq

from fedexec import FederatedExecutor
from fedexec import protocol as P
from fedexec.auth import connect_plainly
from fedexec.relay.query import lookup_endpoint
from fedexec.serialize import deserialize, serialize_arguments, serialize_function
from test_faults import stop_process

# tests/ is not importable on the workers: this module's functions travel by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SEED = int(os.environ.get("FEDEXEC_FUZZ_SEED") or random.SystemRandom().randrange(2 ** 32))
RELAY_MESSAGES = 400
ENDPOINT_MESSAGES = 400
PY = P.PYTHON_VERSION

# Functions the fuzzed tasks carry: builtins (pickled by reference), cheap
# whatever junk arguments they get. The final check uses ``pow``, which the
# fuzz never sends, so no fuzzed body can stand in for it.
FUZZ_FUNCTIONS = [abs, len, str, repr, bool, sorted, min, max, hash, divmod]
FUZZ_ARGS = [(-3,), ("abc",), ([3, 1, 2],), (b"xy",), (), (1, 2), ((4, 5),), (None,), (2.5,), ({"k": 1},)]


# -- processes -----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


ROUTINE = ("ignored a malformed message from the relay", "rejected a malformed message from",
           "refused a malformed task row from the relay")


def notable(path: Path, n: int = 30) -> str:
    """The log's last lines that are not the routine refusals of fuzzed messages."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "<no log>"
    kept = [line for line in lines if not any(r in line for r in ROUTINE)]
    return f"({len(lines) - len(kept)} routine refusals left out)\n" + "\n".join(kept[-n:])


def start_relay(tmp_path: Path) -> tuple[str, subprocess.Popen, Path]:
    address = f"tcp://127.0.0.1:{free_port()}"
    log = tmp_path / "relay.log"
    with open(log, "wb") as out:  # a file, not a pipe: hundreds of warnings must not block it
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedexec.relay", "--address", address, "--data-dir", str(tmp_path / "relay"),
             "--parent-pid", str(os.getpid()), "--log-level", "WARNING"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    return address, proc, log


def wait_for_relay(address: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, f"the relay exited with code {proc.returncode}:\n{tail(log)}"
        try:
            lookup_endpoint(address, str(uuid.UUID(int=0)), timeout=0.5)
            return
        except TimeoutError:
            assert time.monotonic() < deadline, f"the relay did not come up:\n{tail(log)}"


def start_endpoint(tmp_path: Path, relay: str, endpoint_id: str, workers: int = 2) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"endpoint-{endpoint_id[:8]}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedexec.endpoint", "--name", "fuzz", "--relay", relay,
             "--endpoint-id", endpoint_id, "--max-workers", str(workers), "--parent-pid", str(os.getpid()),
             "--log-level", "WARNING"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    return proc, log


# -- message generation ----------------------------------------------------------

def pack(header: Any) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


class Fuzz:
    """Seeded generators of junk values, rows and mutated messages."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.functions = [serialize_function(fn) for fn in FUZZ_FUNCTIONS]

    # values -----------------------------------------------------------------
    def junk_bytes(self, n: int | None = None) -> bytes:
        r = self.rng
        n = r.choice([0, 1, 15, 16, 17, 31, 32, 33, 100, P.INLINE_MAX + 1]) if n is None else n
        # b"\xff" is not a pickle opcode: junk that reaches a worker's
        # pickle.loads fails at once instead of running anything
        return (b"\xff" + r.randbytes(n - 1)) if n else b""

    def junk_int(self) -> int:
        return self.rng.choice([0, -1, 1, 2 ** 31, 2 ** 31 - 1, 2 ** 32, 2 ** 63 - 1, 2 ** 64 - 1, -2 ** 63,
                                -2 ** 31, self.rng.randrange(-1000, 1000), 7, 255, 65536])

    def junk_str(self) -> str:
        return self.rng.choice(["", "x", "3.11", "3." + "9" * 20, "é\u2603\U0001f600", "\x00nul", "a" * 300,
                                "results", "submit", "endpoint", "client", str(uuid.UUID(int=self.rng.getrandbits(128)))])

    def junk(self, depth: int = 0) -> Any:
        r = self.rng
        kinds = ["none", "bool", "int", "float", "str", "bytes", "ext"] + (["list", "map"] * 2 if depth < 3 else [])
        kind = r.choice(kinds)
        if kind == "none":
            return None
        if kind == "bool":
            return r.random() < 0.5
        if kind == "int":
            return self.junk_int()
        if kind == "float":
            return r.choice([math.nan, math.inf, -math.inf, -0.0, 1e308, r.uniform(-1e6, 1e6), 0.5])
        if kind == "str":
            return self.junk_str()
        if kind == "bytes":
            return self.junk_bytes()
        if kind == "ext":
            return r.choice([msgpack.ExtType(r.randrange(0, 128), self.junk_bytes(r.randrange(0, 8))),
                             msgpack.Timestamp(r.randrange(0, 2 ** 32))])
        if kind == "list":
            return [self.junk(depth + 1) for _ in range(r.choice([0, 1, 2, 3, 6, 7, 40]))]
        keys = [self.junk_str(), self.junk_int(), self.junk_bytes(r.choice([1, 16])), "v", "t", "tr", "m"]
        return {r.choice(keys): self.junk(depth + 1) for _ in range(r.randrange(0, 5))}

    def trace(self) -> list[float]:
        """Any length the validator accepts, 0 to len(TRACE_STAGES), the ends most often."""
        top = len(P.TRACE_STAGES)
        n = self.rng.choice([0, 1, 2, 3, 4, 5, top - 3, top - 2, top - 1, top, self.rng.randrange(0, top + 1)])
        return [time.time() + self.rng.random() for _ in range(n)]

    def options(self) -> dict:
        r = self.rng
        opts: dict = {}
        if r.random() < 0.5:
            opts["tr"] = self.trace()
        if r.random() < 0.3:
            opts["m"] = r.randbytes(32)
        if "r" in TASK_OPTIONS and r.random() < 0.2:
            opts["r"] = r.randrange(0, 4)
        if "to" in TASK_OPTIONS and r.random() < 0.2:
            opts["to"] = r.choice([0.001, 0.5, 30, 2.5e7])
        return opts

    # rows ---------------------------------------------------------------------
    def task_row(self, blobs: list, *, fn_index: int | None = None, options: bool | None = None,
                 task_id: bytes | None = None) -> list:
        """A valid task row; payloads inline or as frames appended to ``blobs``."""
        r = self.rng
        i = r.randrange(len(FUZZ_FUNCTIONS)) if fn_index is None else fn_index
        fn_hash, body = self.functions[i]
        args = serialize_arguments(FUZZ_FUNCTIONS[i], r.choice(FUZZ_ARGS), {})

        def ref(blob: bytes) -> bytes | int:
            if r.random() < 0.5:
                return blob
            blobs.append(blob)
            return len(blobs) - 1

        fn_ref = ref(body) if r.random() < 0.8 else -1
        row = [task_id or r.randbytes(16), fn_hash, ref(args), fn_ref, P.TASK_CALL, PY]
        if options or (options is None and r.random() < 0.4):
            row.append(self.options())
        return row

    def bad_payload(self) -> bytes:
        """Argument/function blobs that unpickle to the wrong thing, or not at all."""
        r = self.rng
        good = serialize_arguments(abs, (1,), {})
        return r.choice([pickle.dumps(5), pickle.dumps("x"), pickle.dumps((1,)), pickle.dumps(([1], {"a": 1})),
                         pickle.dumps((None, None)), good[: r.randrange(len(good))], self.junk_bytes(),
                         pickle.dumps(([], {"no_such_kw": 1}))])

    def mutate_row(self, row: list, n_fields: int) -> list:
        """The row with exactly one thing wrong (or oddly right)."""
        r = self.rng
        row = list(row)
        how = r.choice(["junk", "junk", "drop", "extend", "special", "special"])
        if how == "drop" and row:
            del row[r.randrange(len(row))]
        elif how == "extend":
            row.append(self.junk())
        elif how == "special":
            i = r.randrange(n_fields)
            row += [None] * (i + 1 - len(row))
            row[i] = r.choice([self.junk_bytes(r.choice([15, 17, 31, 33])), -1, 2 ** 40, -(2 ** 63), True, 99,
                               self.bad_payload(), 1, 2, 3, "3.11", PY + "x", self.options(),
                               {"tr": [1, 2]}, {"m": b"short"}, {"tr": [0.0] * 12}, {"q": 1}, [], {},
                               {"r": -1}, {"r": 10 ** 6}, {"r": 1.5}, {"to": 0}, {"to": -1.0}, {"to": math.nan},
                               {"to": math.inf}, {"to": "1"}])
        else:
            i = r.randrange(len(row))
            row[i] = self.junk()
        return row

    # messages -----------------------------------------------------------------
    def mutate_fields(self, fields: dict) -> dict:
        r = self.rng
        fields = dict(fields)
        for _ in range(r.randrange(1, 3)):
            how = r.choice(["drop", "junk", "junk", "extra", "version", "type"])
            if how == "drop" and fields:
                del fields[r.choice(list(fields))]
            elif how == "junk" and fields:
                fields[r.choice(list(fields))] = self.junk()
            elif how == "extra":
                fields[r.choice([self.junk_str(), self.junk_int(), "credit", "started", "rows", "tasks"])] = self.junk()
            elif how == "version":
                fields["v"] = r.choice([0, 2, -1, "1", b"\x01", None, 2 ** 64 - 1, [1], P.PROTOCOL_VERSION + 1])
            elif how == "type":
                fields["t"] = r.choice([None, 5, b"submit", "", "nope", "HELLO", r.choice(ALL_TYPES) + " "])
        return fields

    def mutate_frames(self, frames: list[bytes]) -> list[bytes]:
        r = self.rng
        frames = list(frames)
        how = r.choice(["truncate", "flip", "extra", "drop_blobs", "empty_first", "none", "none"])
        head = frames[0]
        if how == "truncate" and head:
            frames[0] = head[: r.randrange(len(head))]
        elif how == "flip" and head:
            b = bytearray(head)
            for _ in range(r.randrange(1, 4)):
                b[r.randrange(len(b))] = r.randrange(256)
            frames[0] = bytes(b)
        elif how == "extra":
            frames += [self.junk_bytes() for _ in range(r.randrange(1, 4))]
        elif how == "drop_blobs":
            frames = frames[:1]
        elif how == "empty_first":
            frames.insert(0, b"")
        return frames

    def random_frames(self) -> list[bytes]:
        r = self.rng
        return [r.randbytes(r.choice([0, 1, 2, 5, 16, 64, 300])) for _ in range(r.randrange(1, 5))]

    def crafted_header(self) -> list[bytes]:
        """Malformed msgpack made by hand."""
        r = self.rng
        v = P.PROTOCOL_VERSION
        return [r.choice([
            b"",
            b"\xc1",                                   # never-used byte
            b"\x81\x91\x01\x01",                       # map with an array key
            b"\x91" * 5000 + b"\x01",                  # nested deeper than any stack
            b"\xdb\xff\xff\xff\xff" + b"x" * 10,       # str32 claiming 4 GiB
            b"\xdf\xff\xff\xff\xff",                   # map32 claiming 4 G entries
            b"\xdd\x7f\xff\xff\xff",                   # array32 claiming 2 G entries
            b"\xa2\xff\xfe",                           # invalid UTF-8 string
            pack({"v": v, "t": P.SUBMIT, "ep": "x", "tasks": []}) + b"\x00trailing",
            pack({"v": v, "t": "\udcff".encode("utf-8", "surrogatepass")}),
            pack([v, P.HELLO]), pack(v), pack("hello"), pack(None), pack({}),
            pack({"v": v}), pack({"t": P.HELLO}), pack({"v": v, "t": None}),
            pack({"v": v, "t": P.HELLO, 1: 2, b"role": "client"}),
            b"\x82\xa1v\x01\xa1t\xc7\x01\x05x",        # type is an ext value
        ])] + ([self.junk_bytes()] if r.random() < 0.3 else [])


ALL_TYPES = [P.HELLO, P.SUBMIT, P.CANCEL, P.ACK, P.LOOKUP, P.CREDIT, P.HEARTBEAT, P.BYE, P.WELCOME, P.RESULTS,
             P.LOOKUP_REPLY, P.TASKS, P.ERROR, P.READY, P.TASK, P.RESULT, P.STOP]
# types added to protocol.py since (sent with generic fields)
ALL_TYPES += [getattr(P, name) for name in ("RESUME", "ACCEPTED") if hasattr(P, name)]
TASK_OPTIONS = getattr(P, "TASK_OPTIONS", frozenset({"m", "tr"}))
# Per-hop trace limits (protocol.py since d2d1262); without them, one limit everywhere.
TRACE_AT_ENDPOINT = getattr(P, "TRACE_AT_ENDPOINT", None)
TRACE_FROM_ENDPOINT = getattr(P, "TRACE_FROM_ENDPOINT", None)


def endpoint_task_row(row: Any) -> list:
    """A task row checked as the endpoint checks what the relay sends it."""
    return P.task_row(row) if TRACE_AT_ENDPOINT is None else P.task_row(row, TRACE_AT_ENDPOINT)


def relay_result_row(row: Any) -> tuple:
    """A result row checked as the relay checks what an endpoint sends it."""
    return P.result_row(row) if TRACE_FROM_ENDPOINT is None else P.result_row(row, TRACE_FROM_ENDPOINT)


def encode_raw(msg_type: Any, fields: dict, blobs: list) -> list[bytes]:
    header = {"v": P.PROTOCOL_VERSION, "t": msg_type}
    header.update(fields)
    return [pack(header), *blobs]


def describe(frames: list[bytes], limit: int = 600) -> str:
    text = repr([f[:200] + (b"..." if len(f) > 200 else b"") for f in frames])
    return text if len(text) <= limit else text[:limit] + "..."


# -- the relay -------------------------------------------------------------------

class RelayFuzzer:
    """DEALER sockets pretending to be endpoints (b"E" + 16 bytes) and clients
    (b"C" + 16 bytes); one of the endpoints really says hello, so fuzzed tasks
    reach the relay's dispatch and result paths."""

    def __init__(self, fuzz: Fuzz, address: str, ctx: zmq.Context) -> None:
        self.fuzz = fuzz
        self.rng = fuzz.rng
        self.ctx = ctx
        self.address = address
        self.sockets: list[zmq.Socket] = []
        self.endpoint_ids: dict[zmq.Socket, str] = {}
        self.clients: list[zmq.Socket] = []
        for _ in range(4):
            ep = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
            self.endpoint_ids[self._socket(b"E" + self.rng.randbytes(16))] = ep
        for _ in range(4):
            self.clients.append(self._socket(b"C" + self.rng.randbytes(16)))
        self.anonymous = self._socket(None)
        # the endpoint the relay will send tasks to
        self.live_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        self.live = self._socket(b"E" + self.rng.randbytes(16))
        self.endpoint_ids[self.live] = self.live_id
        self.dispatched: list[bytes] = []   # task ids the relay sent to the live endpoint
        self.replies = 0
        self.problems: list[str] = []

    def _socket(self, identity: bytes | None) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        connect_plainly(sock, self.address)
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)

    def live_hello(self, **changes: Any) -> dict:
        return {"role": "endpoint", "id": self.live_id, "name": "fuzz-live", "py": PY, "workers": 2,
                "capacity": 8, "hb": 60.0, **changes}

    def drain(self) -> None:
        """Read every reply; check what the relay sends is well formed."""
        for sock in self.sockets:
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.replies += 1
                try:
                    msg = P.decode(frames)
                except P.ProtocolError as exc:
                    self.problems.append(f"the relay sent an undecodable message {describe(frames)}: {exc}")
                    continue
                if msg.type == P.TASKS:
                    self._check_tasks(sock, msg)
                elif msg.type == P.RESULTS:
                    try:  # what executor._read_results relies on
                        for row in msg.fields["rows"]:
                            P.blob(msg.blobs, P.result_row(row[:3])[2])
                    except Exception as exc:
                        self.problems.append(f"the relay sent a client a malformed RESULTS "
                                             f"{describe(frames)}: {type(exc).__name__}: {exc}")

    def _check_tasks(self, sock: zmq.Socket, msg: P.Message) -> None:
        """TASKS must pass the checks a real endpoint makes (agent._on_relay_message)."""
        try:
            rows = msg.fields["tasks"]
            if not isinstance(rows, list):
                raise P.ProtocolError("tasks must be a list")
            for row in rows:
                endpoint_task_row(row)
                P.blob(msg.blobs, row[2])
                if row[3] != -1:
                    P.blob(msg.blobs, row[3])
        except Exception as exc:
            self.problems.append(f"the relay sent endpoint {self.endpoint_ids.get(sock)} a TASKS message a real "
                                 f"endpoint refuses as a whole ({type(exc).__name__}: {exc}): "
                                 f"{str(msg.fields)[:500]}")
            return
        if sock is self.live:
            self.dispatched += [row[0] for row in rows]

    def ping(self, timeout: float = 5.0) -> bool:
        """A LOOKUP round trip from a fresh connection."""
        try:
            lookup_endpoint(self.address, self.live_id, timeout=timeout)
            return True
        except TimeoutError:
            return False

    # one fuzzed message: (socket, frames) ----------------------------------------
    def message(self) -> tuple[zmq.Socket, list[bytes]]:
        r, fuzz = self.rng, self.fuzz
        endpoints = list(self.endpoint_ids)
        sock = r.choice(endpoints + self.clients + [self.anonymous])
        roll = r.random()
        if roll < 0.12:
            return sock, fuzz.random_frames()
        if roll < 0.22:
            return sock, fuzz.crafted_header()
        if roll < 0.52:  # a valid message of any type, then its header and frames mutated
            msg_type, fields, blobs, sock = self.valid(sock)
            fields = fuzz.mutate_fields({"v": P.PROTOCOL_VERSION, "t": msg_type, **fields})
            return sock, fuzz.mutate_frames([pack(fields), *blobs])
        if roll < 0.82:  # a valid SUBMIT/RESULTS/CREDIT/HELLO with one element changed
            return self.one_wrong()
        if r.random() < 0.5:  # a valid SUBMIT for the live endpoint: the relay dispatches it
            blobs: list = []
            rows = [fuzz.task_row(blobs, options=r.random() < 0.6) for _ in range(r.randrange(1, 4))]
            return r.choice(self.clients), encode_raw(P.SUBMIT, {"ep": self.live_id, "tasks": rows}, blobs)
        msg_type, fields, blobs, sock = self.valid(sock)  # left valid: keeps the relay's state busy
        return sock, encode_raw(msg_type, fields, blobs)

    def valid(self, sock: zmq.Socket) -> tuple[str, dict, list, zmq.Socket]:
        r, fuzz = self.rng, self.fuzz
        msg_type = r.choice(ALL_TYPES)
        blobs: list = []
        tids = [r.choice(self.dispatched) if self.dispatched and r.random() < 0.5 else r.randbytes(16)
                for _ in range(r.randrange(0, 4))]
        if msg_type == P.HELLO:
            if sock in self.endpoint_ids:
                ep = self.endpoint_ids[sock]
                fields = {**self.live_hello(), "id": ep, "name": f"fz{r.randrange(100)}", "capacity": r.randrange(0, 5)}
                if r.random() < 0.5:
                    fields["holding"] = tids
            else:
                fields = {"role": "client", "py": PY}
        elif msg_type == P.SUBMIT:
            sock = r.choice(self.clients)
            target = r.choice([self.live_id, self.live_id, str(uuid.uuid4()), r.choice(list(self.endpoint_ids.values()))])
            fields = {"ep": target, "tasks": [fuzz.task_row(blobs) for _ in range(r.randrange(1, 5))]}
        elif msg_type in (P.CANCEL, P.ACK) or msg_type in ("resume", "accepted"):
            fields = {"tids": tids}
        elif msg_type == P.LOOKUP:
            fields = {"ep": r.choice(list(self.endpoint_ids.values()) + [str(uuid.uuid4())])}
        elif msg_type == P.CREDIT:
            fields = {"n": r.randrange(0, 4)}
        elif msg_type == P.RESULTS:
            fields, blobs = self.results_fields(tids)
        elif msg_type == P.WELCOME:
            fields = {"role": r.choice(["client", "endpoint"]), "py": PY}
        elif msg_type == P.LOOKUP_REPLY:
            fields = {"found": False, "endpoint": {}}
        elif msg_type == P.TASKS:
            fields = {"tasks": [fuzz.task_row(blobs) for _ in range(r.randrange(0, 3))]}
        elif msg_type == P.ERROR:
            fields = {"msg": "fuzz", "tids": tids}
        elif msg_type == P.READY:
            fields = {"pid": r.randrange(1, 1 << 22), "py": PY}
        elif msg_type == P.TASK:
            fields = {"task": fuzz.task_row(blobs)}
        elif msg_type == P.RESULT:
            fields = {"row": [r.randbytes(16), P.OK, b""]}
        else:  # HEARTBEAT, BYE, STOP
            fields = {}
        return msg_type, fields, blobs, sock

    def results_fields(self, tids: list[bytes]) -> tuple[dict, list]:
        r = self.rng
        blobs: list = []
        rows = []
        for tid in tids:
            status = r.choice([P.OK, P.EXCEPTION, P.FAILED, P.CANCELLED])
            blob = pickle.dumps(r.randrange(100)) if status == P.OK else b""
            if r.random() < 0.5:
                blobs.append(blob)
                ref: bytes | int = len(blobs) - 1
            else:
                ref = blob
            row: list = [tid, status, ref]
            if r.random() < 0.4:
                row.append(self.fuzz.trace())
            rows.append(row)
        fields: dict = {"rows": rows, "credit": r.randrange(0, 4)}
        if r.random() < 0.3:
            fields["started"] = [r.randbytes(16)]
        return fields, blobs

    def one_wrong(self) -> tuple[zmq.Socket, list[bytes]]:
        r, fuzz = self.rng, self.fuzz
        kind = r.choice([P.SUBMIT, P.SUBMIT, P.RESULTS, P.RESULTS, P.CREDIT, P.HELLO])
        if kind == P.SUBMIT:
            blobs: list = []
            rows = [fuzz.task_row(blobs) for _ in range(r.randrange(1, 4))]
            i = r.randrange(len(rows))
            rows[i] = fuzz.mutate_row(rows[i], 7)
            target = r.choice([self.live_id, str(uuid.uuid4())])
            fields: dict = {"ep": target, "tasks": rows}
            if r.random() < 0.2:
                fields["ep"] = fuzz.junk()
            return r.choice(self.clients), encode_raw(kind, fields, blobs)
        if kind == P.RESULTS:
            tids = [r.choice(self.dispatched) if self.dispatched and r.random() < 0.7 else r.randbytes(16)
                    for _ in range(r.randrange(1, 4))]
            fields, blobs = self.results_fields(tids)
            rows = fields["rows"]
            i = r.randrange(len(rows))
            rows[i] = fuzz.mutate_row(rows[i], 4)
            if r.random() < 0.3:
                fields[r.choice(["credit", "started", "rows"])] = fuzz.junk()
            sock = self.live if r.random() < 0.6 else r.choice(list(self.endpoint_ids) + self.clients)
            return sock, encode_raw(kind, fields, blobs)
        if kind == P.CREDIT:
            sock = self.live if r.random() < 0.6 else r.choice(list(self.endpoint_ids) + self.clients)
            return sock, encode_raw(kind, {"n": r.choice([fuzz.junk(), -1, 2 ** 31, 2 ** 64 - 1, math.nan, 1.0,
                                                           True, "5", None, [1]])}, [])
        # HELLO from an endpoint-shaped connection, its own id, one field wrong
        sock = r.choice(list(self.endpoint_ids))
        ep = self.endpoint_ids[sock]
        fields = {**self.live_hello(), "id": ep, "capacity": 2, "holding": []}
        key = r.choice(list(fields))
        fields[key] = r.choice([fuzz.junk(), -1, 2 ** 31, 2 ** 64 - 1, math.nan, math.inf, 0.0, 1e9, True, None,
                                "", "x" * 257, ep.upper(), "{" + ep + "}", "urn:uuid:" + ep,
                                uuid.UUID(ep).hex, str(uuid.uuid4())])
        if r.random() < 0.2:
            del fields[r.choice(list(fields))]
        return sock, encode_raw(P.HELLO, fields, [])


def square(x):
    return x * x


@pytest.mark.timeout(90)
def test_relay_keeps_serving_under_fuzz(tmp_path):
    """RELAY_MESSAGES fuzzed messages from endpoint- and client-shaped
    connections: the relay stays up, answers a LOOKUP every 50 messages, only
    sends well-formed messages (TASKS a real endpoint accepts), logs no
    traceback, and then serves a real endpoint and executor."""
    seed = SEED
    tag = f"[FEDEXEC_FUZZ_SEED={seed}]"
    fuzz = Fuzz(seed)
    address, relay, relay_log = start_relay(tmp_path)
    ctx = zmq.Context()
    fuzzer = None
    endpoint = None
    started = time.monotonic()
    try:
        wait_for_relay(address, relay, relay_log)
        fuzzer = RelayFuzzer(fuzz, address, ctx)
        fuzzer.live.send_multipart(P.encode(P.HELLO, fuzzer.live_hello()))
        sent: list[str] = []  # the messages since the relay last answered a ping
        for i in range(RELAY_MESSAGES):
            sock, frames = fuzzer.message()
            sock.send_multipart(frames)
            sent.append(f"#{i} as {sock.getsockopt(zmq.IDENTITY)!r}: {describe(frames)}")
            if i % 10 == 0:  # fuzzed BYEs and HELLOs knock the live endpoint off: bring it back
                fuzzer.live.send_multipart(P.encode(P.HELLO, fuzzer.live_hello()))
            fuzzer.drain()
            if relay.poll() is not None:
                pytest.fail(f"{tag} the relay died (exit code {relay.returncode}) after message "
                            f"{sent[-1]}\nrecent messages:\n" + "\n".join(sent[-5:]) + f"\nrelay log:\n{notable(relay_log)}")
            if i % 50 == 49 or i == RELAY_MESSAGES - 1:
                assert fuzzer.ping(), (f"{tag} the relay stopped answering; one of these did it:\n"
                                       + "\n".join(sent) + f"\nrelay log:\n{notable(relay_log)}")
                sent.clear()
        time.sleep(0.3)
        fuzzer.drain()
        fuzz_seconds = time.monotonic() - started
        assert not fuzzer.problems, f"{tag} the relay sent malformed messages:\n" + "\n".join(fuzzer.problems[:10])
        assert fuzzer.replies > RELAY_MESSAGES // 4, f"{tag} only {fuzzer.replies} replies to {RELAY_MESSAGES} messages"
        assert relay.poll() is None, f"{tag} the relay exited:\n{notable(relay_log)}"

        # a real endpoint and a real executor still work through the same relay
        endpoint_id = str(uuid.uuid4())
        endpoint, endpoint_log = start_endpoint(tmp_path, address, endpoint_id)
        deadline = time.monotonic() + 20
        while True:
            assert endpoint.poll() is None, f"{tag} the endpoint exited:\n{tail(endpoint_log)}"
            view = lookup_endpoint(address, endpoint_id, timeout=5)
            if view and view["status"] == "connected":
                break
            assert time.monotonic() < deadline, f"{tag} the endpoint did not connect:\n{tail(endpoint_log)}"
            time.sleep(0.1)
        with FederatedExecutor(endpoint_id, relay=address, connect_timeout=10) as ex:
            assert ex.submit(pow, 2, 10).result(timeout=20) == 1024, tag
            assert list(ex.map(abs, range(-30, 30), timeout=20)) == [abs(i) for i in range(-30, 30)], tag
            assert ex.submit(square, 12).result(timeout=20) == 144, tag
        assert relay.poll() is None, f"{tag} the relay exited:\n{notable(relay_log)}"
        log_text = tail(relay_log, 10 ** 7)
        assert "Traceback" not in log_text, f"{tag} the relay logged a traceback:\n{log_text[-4000:]}"
        print(f"{tag} relay fuzz: {RELAY_MESSAGES} messages in {fuzz_seconds:.1f} s, "
              f"{fuzzer.replies} replies, {len(fuzzer.dispatched)} tasks dispatched to the fake endpoint")
    finally:
        if fuzzer is not None:
            fuzzer.close()
        ctx.term()
        if endpoint is not None:
            stop_process(endpoint)
        stop_process(relay)


# -- the endpoint ----------------------------------------------------------------

class FakeRelay:
    """A ROUTER on 127.0.0.1 that an endpoint connects out to."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.peer: bytes | None = None
        self.hellos = 0
        self.answered: dict[bytes, int] = {}   # task id -> status of its (first) result
        self.expect_ok: set[bytes] = set()      # task ids whose OK value to keep
        self.ok_values: dict[bytes, Any] = {}
        self.problems: list[str] = []

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart([self.peer, *frames])

    def read(self, timeout_ms: int = 0) -> None:
        """Take whatever the endpoint sent; check it as the real relay would."""
        while self.sock.poll(timeout_ms):
            timeout_ms = 0
            peer, *frames = self.sock.recv_multipart()
            if self.peer is not None and peer != self.peer:
                self.problems.append(f"a message from an unexpected peer {peer!r}")
                continue
            try:
                msg = P.decode(frames)
            except P.ProtocolError as exc:
                self.problems.append(f"an undecodable message {describe(frames)}: {exc}")
                continue
            if msg.type == P.HELLO:
                self.hellos += 1
            elif msg.type == P.RESULTS:
                self._check_results(msg, frames)
            elif msg.type == P.CREDIT:
                try:
                    P.count(msg.fields["n"], "credit")
                except Exception as exc:
                    self.problems.append(f"a malformed CREDIT {msg.fields!r}: {exc}")

    def _check_results(self, msg: P.Message, frames: list[bytes]) -> None:
        """The checks relay/server.py _on_results makes: a RESULTS message it
        would refuse loses every result (and the credit) in it."""
        try:
            P.count(msg.fields.get("credit", 0), "credit")
            rows = msg.fields["rows"]
            if not isinstance(rows, list):
                raise P.ProtocolError("rows must be a list")
            for row in rows:
                P.blob(msg.blobs, relay_result_row(row)[2])
            P.task_ids(msg.fields.get("started", []))
        except Exception as exc:
            self.problems.append(f"a RESULTS message the relay would refuse as a whole "
                                 f"({type(exc).__name__}: {exc}): {str(msg.fields)[:600]}")
        stored = []
        for row in msg.fields.get("rows") or []:
            if isinstance(row, list) and row and isinstance(row[0], bytes):
                stored.append(row[0])
                self.answered.setdefault(row[0], row[1])
                if row[1] == P.OK and row[0] in self.expect_ok:
                    self.ok_values[row[0]] = deserialize(P.blob(msg.blobs, row[2]))
        if stored:  # as the relay does once they are stored: the endpoint may forget them
            try:
                self.send(P.encode(P.ACK, {"tids": stored}))
            except zmq.ZMQError:
                pass  # it has gone away: the liveness checks say so


def endpoint_accepts(frames: list[bytes]) -> list[bytes]:
    """The task ids the endpoint takes from these frames: exactly the checks
    of agent._on_relay_message (a TASKS message is taken whole or not at all)."""
    try:
        msg = P.decode(frames)
        if msg.type != P.TASKS:
            return []
        rows = msg.fields["tasks"]
        if not isinstance(rows, list):
            return []
        for row in rows:
            endpoint_task_row(row)
            P.blob(msg.blobs, row[2])
            if row[3] != -1:
                P.blob(msg.blobs, row[3])
        return [row[0] for row in rows]
    except Exception:
        return []


def endpoint_message(fuzz: Fuzz, history: list[list[bytes]], known: list[bytes]) -> list[bytes]:
    r = fuzz.rng
    roll = r.random()
    if roll < 0.1:
        return fuzz.random_frames()
    if roll < 0.18:
        return fuzz.crafted_header()
    if roll < 0.26 and history:  # a replay of recent tasks, as a relay re-dispatch sends them again
        return list(r.choice(history[-3:]))
    blobs: list = []
    if roll < 0.5:  # TASKS with one row element changed
        rows = [fuzz.task_row(blobs) for _ in range(r.randrange(1, 4))]
        i = r.randrange(len(rows))
        rows[i] = fuzz.mutate_row(rows[i], 7)
        return encode_raw(P.TASKS, {"tasks": rows}, blobs)
    if roll < 0.65:  # valid TASKS: the endpoint must run (or answer) every one
        rows = [fuzz.task_row(blobs) for _ in range(r.randrange(1, 4))]
        return encode_raw(P.TASKS, {"tasks": rows}, blobs)
    if roll < 0.75:  # CANCEL with junk ids, or ids of tasks it holds
        tids: Any = [r.choice(known) if known and r.random() < 0.5 else fuzz.junk_bytes(r.choice([0, 16, 3]))
                     for _ in range(r.randrange(0, 4))]
        if r.random() < 0.4:
            tids = fuzz.junk()
        return encode_raw(P.CANCEL, {"tids": tids}, [])
    # any other message, valid then mutated
    msg_type = r.choice(ALL_TYPES)
    fields: dict = {P.HEARTBEAT: {"unknown": r.choice([False, None, 0, fuzz.junk()])},
                    P.WELCOME: {"role": "endpoint", "max_payload": r.choice([1, 0, -1, 2 ** 64 - 1, 1 << 20, None])},
                    P.ERROR: {"msg": fuzz.junk_str(), "tids": []},
                    P.TASKS: {"tasks": [fuzz.task_row(blobs)]},
                    P.CANCEL: {"tids": list(known[-2:])},
                    P.RESULTS: {"rows": [[r.randbytes(16), P.OK, b""]], "credit": 1}}.get(msg_type, {})
    frames = [pack(fuzz.mutate_fields({"v": P.PROTOCOL_VERSION, "t": msg_type, **fields})), *blobs]
    return fuzz.mutate_frames(frames)


@pytest.mark.timeout(90)
def drain(relay: FakeRelay, seconds: float) -> None:
    """Read all the endpoint sends for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        relay.read(50)


def test_a_burst_of_unknown_beats_draws_one_hello(tmp_path):
    """The beats an endpoint sent while its relay was down all reach the
    restarted relay at once, and each is answered "unknown": the endpoint
    says hello once for the burst (each HELLO puts back in the relay's queue
    what was sent since the one before), again for an "unknown" after a
    heartbeat period without a WELCOME (a HELLO may be lost), and at once
    after a WELCOME."""
    ctx = zmq.Context()
    relay = FakeRelay(ctx)
    endpoint, endpoint_log = start_endpoint(tmp_path, relay.address, str(uuid.uuid4()))
    try:
        assert relay.sock.poll(20000), f"no HELLO from the endpoint within 20 s:\n{tail(endpoint_log)}"
        relay.peer = relay.sock.recv_multipart()[0]
        relay.send(P.encode(P.WELCOME, {"role": "endpoint"}))
        relay.read(200)
        unknown = P.encode(P.HEARTBEAT, {"unknown": True})
        for _ in range(8):
            relay.send(unknown)
        drain(relay, 0.5)
        assert relay.hellos == 1, f"{relay.hellos} HELLOs for 8 'unknown' beats at once"
        time.sleep(1.2)   # no WELCOME for longer than the wait (a heartbeat period, at most 1 s)
        relay.send(unknown)
        drain(relay, 0.5)
        assert relay.hellos == 2, f"{relay.hellos} HELLOs: an unanswered HELLO was not sent again"
        relay.send(P.encode(P.WELCOME, {"role": "endpoint"}))
        relay.send(unknown)
        drain(relay, 0.5)
        assert relay.hellos == 3, f"{relay.hellos} HELLOs: none for an 'unknown' beat after a WELCOME"
        assert relay.problems == [] and endpoint.poll() is None, (relay.problems, tail(endpoint_log))
    finally:
        stop_process(endpoint)
        relay.sock.close()
        ctx.term()


def test_endpoint_keeps_serving_under_fuzz(tmp_path):
    """A fake relay sends a real endpoint ENDPOINT_MESSAGES fuzzed messages:
    it stays up, says hello again when asked every 50 messages, answers every
    task it accepted, sends nothing the relay would refuse, and then runs one
    valid task to an OK result."""
    seed = SEED
    tag = f"[FEDEXEC_FUZZ_SEED={seed}]"
    fuzz = Fuzz(seed + 1)
    ctx = zmq.Context()
    relay = FakeRelay(ctx)
    endpoint_id = str(uuid.uuid4())
    endpoint, endpoint_log = start_endpoint(tmp_path, relay.address, endpoint_id)
    started = time.monotonic()
    try:
        assert relay.sock.poll(20000), f"{tag} no HELLO from the endpoint within 20 s:\n{tail(endpoint_log)}"
        peer, *frames = relay.sock.recv_multipart()
        hello = P.decode(frames)
        assert hello.type == P.HELLO and hello.fields["id"] == endpoint_id and peer[:1] == b"E" and len(peer) == 17, f"{tag} {hello!r}"
        relay.peer = peer
        relay.send(P.encode(P.WELCOME, {"role": "endpoint"}))

        accepted: list[bytes] = []
        carried: dict[bytes, list[str]] = {}   # task id -> the messages that carried it
        history: list[list[bytes]] = []
        sent: list[str] = []
        for i in range(ENDPOINT_MESSAGES):
            frames = endpoint_message(fuzz, history, accepted)
            tids = endpoint_accepts(frames)
            if tids:
                accepted += tids
                history.append(frames)
                for tid in tids:
                    carried.setdefault(tid, []).append(f"#{i}: {describe(frames, 1500)}")
            sent.append(f"#{i}: {describe(frames)}")
            try:
                relay.send(frames)
            except zmq.ZMQError as exc:  # EHOSTUNREACH: the endpoint's connection is gone
                pytest.fail(f"{tag} could not send to the endpoint ({exc}); exit code {endpoint.poll()}; "
                            "recent messages:\n" + "\n".join(sent[-5:]) + f"\nendpoint log:\n{notable(endpoint_log)}")
            relay.read()
            if endpoint.poll() is not None:
                pytest.fail(f"{tag} the endpoint died (exit code {endpoint.returncode}) after message {sent[-1]}\n"
                            "recent messages:\n" + "\n".join(sent[-5:]) + f"\nendpoint log:\n{notable(endpoint_log)}")
            if i % 50 == 49:  # ping: an "unknown" heartbeat makes it say hello again
                relay.read(50)
                hellos = relay.hellos
                # (a WELCOME first: an endpoint waiting for the answer to a HELLO the fuzz drew out
                # sends no other for "unknown" beats until it comes or a moment passes)
                relay.send(P.encode(P.WELCOME, {"role": "endpoint"}))
                relay.send(P.encode(P.HEARTBEAT, {"unknown": True}))
                deadline = time.monotonic() + 5
                while relay.hellos == hellos and time.monotonic() < deadline:
                    relay.read(100)
                assert relay.hellos > hellos, (f"{tag} the endpoint stopped answering; one of these did it:\n"
                                               + "\n".join(sent) + f"\nendpoint log:\n{notable(endpoint_log)}")
                relay.send(P.encode(P.WELCOME, {"role": "endpoint"}))
                sent.clear()
        fuzz_seconds = time.monotonic() - started

        # one valid task, with a function the fuzz never sent, after a sane
        # WELCOME (a fuzzed one may have set a tiny payload limit)
        welcome: dict = {"role": "endpoint"}
        if hasattr(P, "DEFAULT_MAX_PAYLOAD"):
            welcome["max_payload"] = P.DEFAULT_MAX_PAYLOAD
        relay.send(P.encode(P.WELCOME, welcome))
        fn_hash, body = serialize_function(pow)
        task_id = uuid.uuid4().bytes
        relay.expect_ok = {task_id}
        relay.send(P.encode(P.TASKS, {"tasks": [[task_id, fn_hash, serialize_arguments(pow, (2, 10), {}), 0,
                                                 P.TASK_CALL, PY]]}, [body]))
        deadline = time.monotonic() + 20
        while task_id not in relay.answered and time.monotonic() < deadline:
            relay.read(100)
            assert endpoint.poll() is None, f"{tag} the endpoint exited:\n{tail(endpoint_log)}"
        unanswered = set(accepted) - set(relay.answered)
        assert task_id in relay.answered, (
            f"{tag} no result for a valid task within 20 s after {ENDPOINT_MESSAGES} fuzzed messages; "
            f"{len(unanswered)} of {len(set(accepted))} fuzzed tasks it accepted are unanswered too\n"
            f"endpoint log:\n{notable(endpoint_log)}")
        assert relay.answered[task_id] == P.OK and relay.ok_values.get(task_id) == 1024, (
            f"{tag} the valid task came back with status {relay.answered[task_id]}")
        assert endpoint.poll() is None, f"{tag} the endpoint exited:\n{tail(endpoint_log)}"

        # every task it accepted gets an answer (a result, a failure or a cancellation)
        deadline = time.monotonic() + 5
        while set(accepted) - set(relay.answered) and time.monotonic() < deadline:
            relay.read(100)
        unanswered = set(accepted) - set(relay.answered)
        assert not unanswered, (
            f"{tag} the endpoint accepted {len(set(accepted))} fuzzed tasks and never answered "
            f"{len(unanswered)} of them, e.g. {sorted(t.hex() for t in unanswered)[:5]}, sent in:\n"
            + "\n".join(sorted({m for t in unanswered for m in carried[t]})[:4]) + "\n"
            f"endpoint log:\n{notable(endpoint_log)}")
        assert not relay.problems, (f"{tag} the endpoint sent messages a relay refuses:\n"
                                    + "\n".join(relay.problems[:10]))
        print(f"{tag} endpoint fuzz: {ENDPOINT_MESSAGES} messages in {fuzz_seconds:.1f} s, "
              f"{len(set(accepted))} tasks accepted, all answered")
    finally:
        stop_process(endpoint)
        relay.sock.close(linger=0)
        ctx.term()
