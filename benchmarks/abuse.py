"""One user abusing a shared relay, another user running tasks through it.

A token-mode relay with CURVE on loopback, two users. Alice runs no-op
round trips on her own endpoint (2 workers) for ``--seconds``; meanwhile, in
a separate process, one of these scenarios runs:

- ``quiet``: nothing else (the reference);
- ``abuse``: Mallory, with a valid account of her own, sends through raw
  sockets, in rounds until the window closes: headers of ~29 MiB of empty
  msgpack maps (memory amplification), frames of 40 MiB (oversize), RESUMEs
  of 300,000 ids (id floods), SUBMITs with 9 MB function bodies to an
  endpoint she may not use (bodies kept for refused tasks), and 100,000-row
  SUBMITs to her own endpoint id (task floods);
- ``unauth``: a client holding only the relay's public key (no valid
  credentials) sends frames of 150 MB over CURVE.

Reported per scenario (median of ``--runs`` runs): the relay's peak RSS, its
RSS at the end, Alice's completed round trips, p50 and p99, and the ratios
against ``quiet``. Everything is bounded in time and count and stops by
itself; every process is stopped by pid.

    python benchmarks/abuse.py [--runs 3] [--seconds 10]

Saves the table as benchmarks/results/abuse-<date>.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import msgpack
import psutil
import zmq

sys.path.insert(0, str(Path(__file__).parent))
from processes import free_port, stop  # noqa: E402

SCENARIOS = ("quiet", "abuse", "unauth")
MiB = 1024 * 1024


def noop() -> None:
    return None


# -- the abuser (a process of its own) ---------------------------------------
def _raw_socket(ctx: zmq.Context, address: str, token: str | None, relay_key: str) -> zmq.Socket:
    from fedexec.auth import connect_plainly

    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 4)
    sock.setsockopt(zmq.IDENTITY, b"C" + uuid.uuid4().bytes)
    if token is None:   # the public key only: encrypted, with no credentials of its own
        sock.curve_serverkey = relay_key.encode()
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.setsockopt(zmq.METADATA, b"X-Fedexec-Auth:mallory:not-a-token")
        sock.connect(address)
    else:
        connect_plainly(sock, address, token=token, relay_key=relay_key)
    return sock


def _send(sock: zmq.Socket, frames: list, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            time.sleep(0.01)
    return False


def _drain(sock: zmq.Socket) -> None:
    while True:
        try:
            sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return


def abuse(address: str, relay_key: str, token: str | None, victim_endpoint: str, seconds: float) -> None:
    """Mallory's side: rounds of hostile messages until ``seconds`` pass."""
    ctx = zmq.Context()
    sock = _raw_socket(ctx, address, token, relay_key)
    deadline = time.monotonic() + seconds
    head = msgpack.packb({"v": 1, "t": "submit", "ep": str(uuid.uuid4())})
    n_maps = 29 * MiB
    amplifier = head[:1].replace(b"\x83", b"\x84") + head[1:] + msgpack.packb("tasks") + b"\xdd" \
        + n_maps.to_bytes(4, "big") + b"\x80" * n_maps
    oversize = os.urandom(40 * MiB) if token is not None else os.urandom(150 * MiB)
    resume = msgpack.packb({"v": 1, "t": "resume", "tids": [os.urandom(16) for _ in range(300_000)]})
    own = str(uuid.uuid4())
    flood = msgpack.packb({"v": 1, "t": "submit", "ep": own, "tasks": [
        [os.urandom(16), os.urandom(32), b"x", -1, 0, "3.11"] for _ in range(100_000)]})
    rounds = 0
    sent = 0
    try:
        while time.monotonic() < deadline:
            rounds += 1
            if token is None:
                batch = [[oversize]] * 3
            else:
                bodies = []
                for _ in range(5):
                    import hashlib

                    body = os.urandom(9 * MiB)
                    row = [os.urandom(16), hashlib.sha256(body).digest(), b"x", 0, 0, "3.11"]
                    bodies.append([msgpack.packb({"v": 1, "t": "submit", "ep": victim_endpoint,
                                                  "tasks": [row]}), body])
                batch = [[amplifier]] * 2 + [[msgpack.packb({"v": 1, "t": "hb"}), oversize]] * 2 \
                    + [[resume]] * 5 + bodies + [[flood]] * 2
            for frames in batch:
                if time.monotonic() >= deadline:
                    break
                if _send(sock, frames, deadline):
                    sent += 1
                _drain(sock)
            time.sleep(0.2)
    finally:
        sock.close(linger=0)
        ctx.term()
    print(f"abuser: {rounds} rounds, {sent} messages sent", flush=True)


# -- one run --------------------------------------------------------------------
class RssWatch(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.last = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                self.last = self.proc.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, self.last)
            self._done.wait(0.02)

    def stop(self) -> None:
        self._done.set()
        self.join(2)


def cli(env: dict, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "fedexec.cli", *args], env=env, capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"fedexec {' '.join(args)} failed: {out.stderr}")
    return out.stdout.strip()


def run_once(scenario: str, seconds: float, workdir: Path) -> dict[str, float]:
    from fedexec import FederatedExecutor
    from fedexec.relay.query import lookup_endpoint

    home = workdir / "home"
    data = workdir / "relay-data"
    env = {**os.environ, "FEDEXEC_HOME": str(home)}
    env.pop("FEDEXEC_TOKEN", None)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    log = open(workdir / "relay.log", "ab")
    try:
        data.mkdir(parents=True)
        alice = cli(env, "relay", "add-user", "alice", "--data-dir", str(data)).splitlines()[-1]
        mallory = cli(env, "relay", "add-user", "mallory", "--data-dir", str(data)).splitlines()[-1]
        relay = subprocess.Popen([sys.executable, "-m", "fedexec.relay", "--address", address, "--data-dir",
                                  str(data), "--auth", "token", "--curve", "--log-level", "ERROR"],
                                 env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        procs.append(relay)
        key_file = data / "relay.curve"
        deadline = time.monotonic() + 20
        while not key_file.exists() or len(key_file.read_text().split()) < 2:
            if time.monotonic() > deadline or relay.poll() is not None:
                raise RuntimeError("the relay did not start: " + (workdir / "relay.log").read_text()[-2000:])
            time.sleep(0.05)
        relay_key = key_file.read_text().split()[0]
        endpoint_id = str(uuid.uuid4())
        ep_env = {**env, "FEDEXEC_TOKEN": alice}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fedexec.endpoint", "--name", "alice-ep", "--relay", address, "--endpoint-id",
             endpoint_id, "--max-workers", "2", f"--relay-key={relay_key}", "--log-level", "ERROR"],
            env=ep_env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        while True:   # until Alice's endpoint has connected
            try:
                view = lookup_endpoint(address, endpoint_id, timeout=1.0, token=alice, relay_key=relay_key)
            except TimeoutError:
                view = None
            if view and view.get("status") == "connected":
                break
            if time.monotonic() > deadline:
                raise RuntimeError("Alice's endpoint did not connect: " + (workdir / "relay.log").read_text()[-2000:])
            time.sleep(0.1)
        watch = RssWatch(relay.pid)
        with FederatedExecutor(endpoint_id, relay=address, token=alice, relay_public_key=relay_key,
                               connect_timeout=30) as ex:
            for _ in range(50):
                ex.submit(noop).result(timeout=60)
            base_rss = psutil.Process(relay.pid).memory_info().rss
            watch.start()
            abuser = None
            if scenario != "quiet":
                args = [sys.executable, __file__, "--abuser", address, relay_key,
                        mallory if scenario == "abuse" else "-", endpoint_id, str(seconds)]
                abuser = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT)
                procs.append(abuser)
                time.sleep(0.5)   # let it build its messages
            latencies: list[float] = []
            failures = 0
            longest = 0.0   # the longest wait, failed round trips included
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t = time.perf_counter()
                try:
                    ex.submit(noop).result(timeout=30)
                except Exception as exc:
                    failures += 1
                    longest = max(longest, time.perf_counter() - t)
                    print(f"alice's round trip failed after {time.perf_counter() - t:.1f} s: "
                          f"{type(exc).__name__}: {exc}", flush=True)
                    continue
                latencies.append(time.perf_counter() - t)
                longest = max(longest, latencies[-1])
            if abuser is not None:
                abuser.wait(seconds + 60)
            watch.stop()
        latencies.sort()
        pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies \
            else float("nan")
        return {"relay RSS before MiB": base_rss / MiB, "relay peak RSS MiB": watch.peak / MiB,
                "relay RSS after MiB": watch.last / MiB, "alice round trips": len(latencies),
                "alice failed round trips": failures, "alice p50 ms": pick(0.5), "alice p99 ms": pick(0.99),
                "alice longest wait ms": longest * 1000}
    finally:
        for proc in reversed(procs):
            stop(proc)
        log.close()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--abuser":
        address, relay_key, token, victim, seconds = sys.argv[2:7]
        abuse(address, relay_key, None if token == "-" else token, victim, float(seconds))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--label", default="", help="a word for the table's title (e.g. before, after)")
    ns = parser.parse_args()
    scenarios = [s for s in ns.scenarios.split(",") if s]
    results: dict[str, list[dict[str, float]]] = {s: [] for s in scenarios}
    for run in range(ns.runs):
        for scenario in scenarios:
            with tempfile.TemporaryDirectory(prefix="fedexec-abuse-") as tmp:
                results[scenario].append(run_once(scenario, ns.seconds, Path(tmp)))
            print(f"run {run + 1} {scenario}: " + ", ".join(f"{k} {v:,.1f}" for k, v in
                                                            results[scenario][-1].items()), flush=True)
    metrics = list(results[scenarios[0]][0])
    medians = {s: {m: statistics.median(r[m] for r in runs) for m in metrics} for s, runs in results.items()}
    lines = [f"# One user abusing a shared relay{' (' + ns.label + ')' if ns.label else ''}, {datetime.date.today()}",
             "", f"{platform.node()}, Python {platform.python_version()}, token mode with CURVE on loopback, "
             f"{ns.seconds:g} s window, median of {ns.runs} runs; Alice: sequential no-op round trips on her "
             "own endpoint (2 workers).", "",
             "| metric | " + " | ".join(scenarios) + " | " + " | ".join(f"{s} / quiet" for s in scenarios
                                                                     if s != "quiet") + " |",
             "|---|" + "---|" * (len(scenarios) * 2 - (1 if "quiet" in scenarios else 0))]
    for m in metrics:
        row = f"| {m} | " + " | ".join(f"{medians[s][m]:,.1f}" for s in scenarios)
        if "quiet" in medians:
            ref = medians["quiet"][m]
            row += " | " + " | ".join(f"{medians[s][m] / ref:.2f}" if ref else "-" for s in scenarios
                                      if s != "quiet")
        lines.append(row + " |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    suffix = f"-{ns.label}" if ns.label else ""
    out = Path(__file__).parent / "results" / f"abuse-{datetime.date.today()}{suffix}.md"
    out.write_text(table)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
