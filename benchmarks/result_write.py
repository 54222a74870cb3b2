"""What it costs a worker to write one large result into a file, by way of
writing (issue 13: the 1 GB round trip against Ray; see
benchmarks/results/large-payloads-s23-2026-11-30.md).

A fresh array (``source + rep``, as a task's ``array + 1`` makes) is written,
per rep, in each of these ways, their order reversed every other rep:

- ``new``: a new file, written in 8 MiB pieces with ``pwrite`` (what
  ``transfer.spill_result`` does today), then deleted (its page cache freed);
- ``presized``: the same, the file's size set first (``ftruncate``);
- ``kept``: a file kept from the previous rep, overwritten with ``pwrite``
  (its page-cache pages exist already);
- ``mapped``: a file kept mapped ``MAP_SHARED`` (its pages faulted in once),
  the array copied in with memcpy: the way Ray writes into its object store.

Reported: the median CPU seconds (user, system) of the write, and of the
unlink where there is one, and every rep's total.

    python benchmarks/result_write.py [--mb 1000] [--reps 10] [--dir /tmp]

The directory should be on the filesystem the endpoint's spool is on.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import statistics
import tempfile
from typing import Callable

import numpy as np

PIECE = 8 * 1024 * 1024   # transfer.CHUNK: the pieces spill_result writes


def cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def pwrite_all(fd: int, view: memoryview) -> None:
    off = 0
    while off < len(view):
        off += os.pwrite(fd, view[off:off + PIECE], off)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1000, help="megabytes of the result (default 1000)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go (default: the temp dir)")
    ns = parser.parse_args()
    count = ns.mb * 1_000_000 // 8
    source = np.arange(count, dtype=np.float64)
    with tempfile.TemporaryDirectory(dir=ns.dir, prefix="result-write-") as directory:
        paths = {name: os.path.join(directory, name) for name in ("new", "presized", "kept", "mapped")}

        def new(view: memoryview, presized: bool = False) -> None:
            fd = os.open(paths["presized" if presized else "new"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if presized:
                    os.ftruncate(fd, len(view))
                pwrite_all(fd, view)
            finally:
                os.close(fd)

        def kept(view: memoryview) -> None:
            fd = os.open(paths["kept"], os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                pwrite_all(fd, view)
            finally:
                os.close(fd)

        fd = os.open(paths["mapped"], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, count * 8)
        shared = mmap.mmap(fd, count * 8)
        os.close(fd)
        target = np.frombuffer(shared, dtype=np.uint8)
        target[:] = 0   # faulted in once

        def mapped(view: memoryview) -> None:
            target[:] = np.frombuffer(view, dtype=np.uint8)

        ways: dict[str, Callable[[memoryview], None]] = {
            "new": new, "presized": lambda view: new(view, presized=True), "kept": kept, "mapped": mapped}
        kept(memoryview(source).cast("B"))
        spent: dict[str, dict[str, list[float]]] = {name: {"user": [], "sys": [], "unlink": []} for name in ways}
        for rep in range(ns.reps):
            result = source + rep
            view = memoryview(result).cast("B")
            for name in (list(ways) if rep % 2 == 0 else list(reversed(ways))):
                user, system = cpu()
                ways[name](view)
                user2, system2 = cpu()
                spent[name]["user"].append(user2 - user)
                spent[name]["sys"].append(system2 - system)
                if name in ("new", "presized"):
                    os.unlink(paths[name])
                    user3, system3 = cpu()
                    spent[name]["unlink"].append(user3 - user2 + system3 - system2)
            view.release()
            del result
        del target
        shared.close()
    print(f"### Writing one {ns.mb} MB result, CPU seconds, median of {ns.reps} reps\n")
    print("| way | user | sys | unlink | total per rep |")
    print("|---|---|---|---|---|")
    for name, got in spent.items():
        unlink = f"{statistics.median(got['unlink']):.3f}" if got["unlink"] else "—"
        totals = " ".join(f"{u + s:.2f}" for u, s in zip(got["user"], got["sys"]))
        print(f"| {name} | {statistics.median(got['user']):.3f} | {statistics.median(got['sys']):.3f} | {unlink} "
              f"| {totals} |")


if __name__ == "__main__":
    main()
