"""Where a shell task's time goes in the worker (issue 14): a
``ShellFunction`` call as the worker makes it, against its parts and
against the baseline's ``subprocess.run``, in this one process.

    python benchmarks/shell_steps.py [--calls 400] [--cmd true]

Each step runs once per round, the steps one after the other within a
round (so a load spike hits them alike); the table gives the median wall
milliseconds of a step and its CPU per call, this process's and its
children's (the shell), from ``os.times()`` (10 ms ticks: meaningful over
hundreds of calls). Steps:

- ``subprocess.run``: ``subprocess.run(cmd, shell=True, capture_output=True)``,
  what the ProcessPoolExecutor baseline of benchmarks/shell.py runs;
- ``Popen + wait``: the shell alone, its output to two open files (the
  floor: no task directory, no snippets);
- ``task directory``: a task's directory and its two output files, made and
  closed (taskdirs.py);
- ``ShellFunction``: the whole call, as a worker makes it (directory,
  files, shell, snippets), and with its result pickled as the worker sends it;
- ``walltime``: ``sleep 0.07`` with a walltime, less the same without one:
  what waiting under a walltime adds.

Run against another checkout with ``PYTHONPATH=<its src>``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--cmd", default="true")
    parser.add_argument("--sleeps", type=int, default=20, help="rounds of the walltime step (70 ms each)")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="fedexec-shell-steps-")
    os.environ["FEDEXEC_TASK_DIR"] = os.path.join(base, "tasks")
    try:
        run(args)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def run(args: argparse.Namespace) -> None:
    import fedexec
    from fedexec import ShellFunction, taskdirs
    from fedexec.serialize import serialize_result
    from fedexec.shell import SHELL
    from fedexec.worker import process as worker

    worker.current_task_id = os.urandom(16)   # (as a worker running a task has it)
    cmd = args.cmd
    function = ShellFunction(cmd)
    scratch = os.path.join(os.environ["FEDEXEC_TASK_DIR"], "..", "scratch")
    os.makedirs(scratch)
    out = os.open(os.path.join(scratch, "stdout"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    err = os.open(os.path.join(scratch, "stderr"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def task_directory() -> None:
        _, fd = taskdirs.make_task_dir(taskdirs.base_path(), worker.current_task_id)
        for name in ("stdout", "stderr"):
            os.close(taskdirs.create_file(fd, name))
        os.close(fd)

    steps: dict[str, Callable[[], object]] = {
        "subprocess.run (baseline's task)": lambda: subprocess.run(cmd, shell=True, capture_output=True),
        "Popen + wait (the shell alone)": lambda: subprocess.Popen(
            [SHELL, "-c", cmd], stdin=subprocess.DEVNULL, stdout=out, stderr=err).wait(),
        "task directory + 2 files": task_directory,
        "ShellFunction call": function,
        "ShellFunction call + result pickled": lambda: serialize_result(function()),
    }
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu = {name: [0.0, 0.0] for name in steps}
    for step in steps.values():   # warm
        for _ in range(10):
            step()
    for _ in range(args.calls):
        for name, step in steps.items():
            before = os.times()
            started = time.perf_counter()
            step()
            wall[name].append(time.perf_counter() - started)
            after = os.times()
            cpu[name][0] += after.user - before.user + after.system - before.system
            cpu[name][1] += (after.children_user - before.children_user
                             + after.children_system - before.children_system)
    plain, limited = ShellFunction("sleep 0.07"), ShellFunction("sleep 0.07", walltime=600)
    extra = []
    for _ in range(args.sleeps):
        started = time.perf_counter()
        plain()
        middle = time.perf_counter()
        limited()
        extra.append((time.perf_counter() - middle) - (middle - started))
    print(f"fedexec from {os.path.dirname(fedexec.__file__)}; command {cmd!r}; {args.calls} rounds; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| step | median wall ms | CPU ms/call (process) | CPU ms/call (shell) |")
    print("|---|---|---|---|")
    for name in steps:
        print(f"| {name} | {statistics.median(wall[name]) * 1e3:.3f} | {cpu[name][0] / args.calls * 1e3:.3f} | "
              f"{cpu[name][1] / args.calls * 1e3:.3f} |")
    print(f"| walltime: `sleep 0.07` with one minus without (median of {args.sleeps}) | "
          f"{statistics.median(extra) * 1e3:.1f} | | |")
    os.close(out)
    os.close(err)


if __name__ == "__main__":
    sys.exit(main())
