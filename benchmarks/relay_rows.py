"""CPU time the embedded relay's loop spends per no-op task, measured in
one process without workers, so that a change to the relay's row handling
shows apart from the machine's load (wall-clock rates on a shared 2-core
machine move by more than such a change).

    python benchmarks/relay_rows.py [--tasks 1000] [--rounds 200] [--repeats 5]

A relay with its record in memory (as the embedded default's) is driven
turn by turn over its local link by two raw sockets in this process: a
client that sends SUBMIT (``--tasks`` rows of inline arguments), reads
ACCEPTED and RESULTS and sends ACK, and an endpoint that answers each TASKS
message with RESULTS. Only the relay's turns are timed (thread CPU time):
reading the messages, _on_submit, _dispatch, _on_results, _send_all,
_send_committed, ACK handling; the raw peers' work is not. Prints the
median and best over ``--repeats`` of microseconds per task.

The turn is the body of ``Relay.serve_forever`` (its reads, record flush,
hand-out and sends), repeated here: a change to that loop must be made here
too. Run it with each checkout's interpreter to compare two of them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import zmq

from fedexec import protocol as P
from fedexec.relay.server import Relay


def turn(relay: Relay) -> None:
    """One turn of the relay's loop for messages on its local link."""
    relay._read_local()
    relay._after_reads()


def drain(sock: zmq.Socket) -> list[P.Message]:
    out = []
    while sock.poll(0):
        out.append(P.decode(sock.recv_multipart()))
    return out


def measure(tasks: int, rounds: int) -> float:
    """Relay CPU microseconds per task over ``rounds`` rounds of ``tasks``."""
    with tempfile.TemporaryDirectory(prefix="fedexec-relay-rows-") as tmp:
        relay = Relay(f"ipc://{tmp}/relay.sock", Path(tmp) / "data", durable=False,
                      secret_file=Path(tmp) / "secret")
        ctx, address = relay.open_local_link()
        endpoint, client = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        endpoint.setsockopt(zmq.IDENTITY, b"E" + os.urandom(16))
        client.setsockopt(zmq.IDENTITY, b"C" + os.urandom(16))
        for sock in (endpoint, client):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
        endpoint_id = str(uuid.uuid4())
        endpoint.send_multipart(P.encode(P.HELLO, {
            "role": "endpoint", "id": endpoint_id, "name": "bench", "py": P.PYTHON_VERSION, "workers": 2,
            "capacity": tasks, "hb": 60.0, "hbm": 100, "holding": []}))
        client.send_multipart(P.encode(P.HELLO, {"role": "client", "py": P.PYTHON_VERSION}))
        time.sleep(0.05)
        turn(relay)
        drain(endpoint), drain(client)
        body = b"a function body"
        fn_hash = P.content_hash(body)
        args = b"\x80\x05\x95\x06\x00\x00\x00\x00\x00\x00\x00K\x01\x85\x94."
        result = b"\x80\x05K\x01."
        spent = 0.0
        for round_ in range(rounds):
            ids = [os.urandom(16) for _ in range(tasks)]
            rows: list[list[Any]] = [[task_id, fn_hash, args, -1, P.TASK_CALL, P.PYTHON_VERSION] for task_id in ids]
            frames: list[Any] = []
            if round_ == 0:
                rows[0][3], frames = 0, [body]
            client.send_multipart(P.encode(P.SUBMIT, {"ep": endpoint_id, "tasks": rows}, frames))
            for _ in range(3):   # submit -> tasks; results -> results, ack; ack
                start = time.thread_time()
                turn(relay)
                spent += time.thread_time() - start
                handed = [row[0] for msg in drain(endpoint) if msg.type == P.TASKS for row in msg.fields["tasks"]]
                if handed:
                    for part in P.chunks(handed):
                        endpoint.send_multipart(P.encode(P.RESULTS, {
                            "rows": [[task_id, P.OK, result] for task_id in part], "credit": len(part)}))
                done = [row[0] for msg in drain(client) if msg.type == P.RESULTS for row in msg.fields["rows"]]
                if done:
                    for part in P.chunks(done):
                        client.send_multipart(P.encode(P.ACK, {"tids": part}))
                time.sleep(0.001)   # (inproc delivery is asynchronous: let the messages land)
            if relay.tasks:
                raise RuntimeError(f"{len(relay.tasks)} task(s) still at the relay after round {round_}")
        for sock in (endpoint, client):
            sock.close(linger=0)
        relay.local_link.close()
        relay.sock.close(linger=0)
        relay.zap.stop()
        relay.access.close()
        relay.store.close()
        return spent / (tasks * rounds) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per SUBMIT (at most MAX_ITEMS)")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    ns = parser.parse_args()
    results = [measure(ns.tasks, ns.rounds) for _ in range(ns.repeats)]
    import fedexec
    print(f"{fedexec.__file__}: relay CPU per task: median {statistics.median(results):.2f} us, "
          f"best {min(results):.2f} us ({ns.repeats} x {ns.rounds} rounds of {ns.tasks} tasks; "
          f"load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
