"""fedexec quickstart: run ordinary Python functions through a standard Executor.

With no arguments, FederatedExecutor() starts a private relay and a local
endpoint (one worker per usable core) and stops them at the end. Pass an
endpoint id (and --relay) to run the same code on a remote endpoint:

    python examples/quickstart.py [ENDPOINT_ID --relay tcp://HOST:PORT]
"""

import argparse
import math
import os
import statistics
import time
from concurrent.futures import as_completed

from fedexec import FederatedExecutor


def monte_carlo_pi(samples: int, seed: int) -> float:
    import random

    rng = random.Random(seed)
    inside = sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return 4.0 * inside / samples


def where_am_i() -> str:
    import socket

    return f"{socket.gethostname()} pid {os.getpid()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("endpoint_id", nargs="?")
    parser.add_argument("--relay")
    ns = parser.parse_args()

    started = time.perf_counter()
    with FederatedExecutor(ns.endpoint_id, relay=ns.relay) as ex:
        print(f"connected to endpoint {ex.endpoint_name!r} ({ex.endpoint_id}) "
              f"in {time.perf_counter() - started:.2f} s")

        # submit: a standard concurrent.futures.Future
        print("2 ** 100 =", ex.submit(pow, 2, 100).result())
        print("workers:", sorted({f.result() for f in [ex.submit(where_am_i) for _ in range(8)]}))

        # map, with lambdas and closures, in order
        offset = 10
        print("squares + 10:", list(ex.map(lambda x: x * x + offset, range(8))))

        # a real computation, spread over the endpoint's workers
        futures = [ex.submit(monte_carlo_pi, 200_000, seed) for seed in range(8)]
        estimates = [f.result() for f in as_completed(futures)]
        print(f"pi ~ {statistics.mean(estimates):.4f} (error {abs(statistics.mean(estimates) - math.pi):.4f})")

        # remote exceptions come back with their own type and remote traceback
        try:
            ex.submit(math.sqrt, -1).result()
        except ValueError as exc:
            print("remote ValueError, as expected:", exc)

        # warm round trip and throughput of no-op tasks
        ex.submit(int).result()
        t = time.perf_counter()
        for _ in range(500):
            ex.submit(int).result()
        rtt_ms = (time.perf_counter() - t) / 500 * 1000
        t = time.perf_counter()
        list(ex.map(int, range(20_000)))
        rate = 20_000 / (time.perf_counter() - t)
        print(f"warm round trip {rtt_ms:.2f} ms; {rate:,.0f} no-op tasks/s through map")
    print("done: relay, endpoint and workers stopped")


if __name__ == "__main__":
    main()
