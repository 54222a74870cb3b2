"""What first touching fresh memory costs on this machine, just after
freeing as much and some seconds later (issue 13; see
benchmarks/results/large-payloads-s23-2026-11-30.md).

On a VM whose balloon device reports free pages to the host (virtio-balloon
free page reporting, as here), memory freed for a couple of seconds is given
back to the host; touching it again faults on the host, which the guest sees
as slow page clearing and copying. Large payloads that land in freshly
allocated pages (a new spool file's page cache, a new array) pay it; a
store that reuses its pages (Ray's) does not.

    python benchmarks/fresh_memory.py [--mb 1000] [--reps 6] [--wait 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--wait", type=float, default=5.0, help="seconds between freeing and touching again")
    ns = parser.parse_args()
    count = ns.mb * 1_000_000 // 8
    spent: dict[float, list[float]] = {0.0: [], ns.wait: []}
    for rep in range(ns.reps):
        for wait in ((0.0, ns.wait) if rep % 2 else (ns.wait, 0.0)):
            touched = np.ones(count)   # touched, then freed
            del touched
            time.sleep(wait)
            started = cpu()
            fresh = np.ones(count)
            spent[wait].append(cpu() - started)
            del fresh
    for wait, times in spent.items():
        print(f"touch {ns.mb} MB of fresh memory {wait:g} s after freeing as much: CPU median "
              f"{statistics.median(times):.3f} s, reps {' '.join(f'{t:.2f}' for t in times)}")


if __name__ == "__main__":
    main()
