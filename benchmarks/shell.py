"""Shell commands as tasks (issue 14): fedexec ShellFunction vs Parsl
bash_app vs subprocess.run in a ProcessPoolExecutor, side by side.

    python benchmarks/shell.py [--calls 100] [--tasks 400] [--runs 3] [--only fedexec,parsl,processpool]

Two commands, ``true`` and ``echo hi``; for each system and command:

- *round trip*: one call at a time, submit to result, ``--calls`` times
  (after a warm-up); the median milliseconds of a call;
- *throughput*: ``--tasks`` calls submitted at once, then all results
  awaited; tasks per second.

Each system has 2 workers and keeps what each command wrote: fedexec its
embedded default (``FederatedExecutor(max_workers=2)``; a ShellResult with
snippets, the output in files in the task's directory); Parsl a
HighThroughputExecutor with one local block of 2 workers (as in run_all.py)
and a ``bash_app`` whose stdout and stderr go to files; the baseline a
``ProcessPoolExecutor(2)`` running ``subprocess.run(cmd, shell=True,
capture_output=True)``. Medians of ``--runs`` runs, the systems one after
the other within each run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# Parsl's workers import bench_tasks (run_all.py's warm-up) by reference; its scripts are found on PATH
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

COMMANDS = ("true", "echo hi")
RESULT_TIMEOUT = 600.0


def run_shell(cmd: str) -> tuple[int, bytes, bytes]:
    """The baseline's task: the command by a shell, its output captured."""
    done = subprocess.run(cmd, shell=True, capture_output=True)
    return done.returncode, done.stdout, done.stderr


def measure(call: Callable[[str], Any], submit: Callable[[str], Any], result: Callable[[Any], Any],
            cmd: str, calls: int, tasks: int) -> tuple[float, float]:
    """(median ms of a round trip, tasks/s of a burst) for one command."""
    for _ in range(5):   # warm
        call(cmd)
    laps = []
    for _ in range(calls):
        started = time.perf_counter()
        call(cmd)
        laps.append(time.perf_counter() - started)
    started = time.perf_counter()
    futures = [submit(cmd) for _ in range(tasks)]
    done, not_done = wait(futures, timeout=RESULT_TIMEOUT)
    if not_done:
        raise TimeoutError(f"{len(not_done)} of {tasks} tasks not done within {RESULT_TIMEOUT:g} s")
    for future in futures:
        result(future)
    elapsed = time.perf_counter() - started
    return statistics.median(laps) * 1000, tasks / elapsed


def run_fedexec(args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    from fedexec import FederatedExecutor, ShellFunction

    functions = {cmd: ShellFunction(cmd) for cmd in COMMANDS}
    out: dict[str, tuple[float, float]] = {}
    # the tasks' directories in a fresh base of this run's, removed after it: thousands a run
    # would pile up in ~/.fedexec/tasks, which each pool's first cleaning pass then stats
    # (the base itself made by fedexec, as the default ~/.fedexec/tasks is: it marks the bases it makes
    # for ext4 to spread their directories over block groups, taskdirs.spread_subdirectories)
    run_dir = tempfile.mkdtemp(prefix="fedexec-bench-tasks-", dir=task_base_parent(args.task_base))
    os.environ["FEDEXEC_TASK_DIR"] = os.path.join(run_dir, "tasks")
    with contextlib.ExitStack() as cleanup, FederatedExecutor(max_workers=2) as ex:
        cleanup.callback(shutil.rmtree, run_dir, True)
        def check(future: Any) -> Any:
            value = future.result()
            assert value.returncode == 0, value
            return value

        for cmd in COMMANDS:
            fn = functions[cmd]
            out[cmd] = measure(lambda c: check(ex.submit(fn)), lambda c: ex.submit(fn), check, cmd,
                               args.calls, args.tasks)
    return out


def task_base_parent(where: str) -> str | None:
    """Where the fresh base of a run's task directories is made: ``home``,
    in the fedexec home (``~/.fedexec``, where the default base ``tasks`` is:
    the file system a user's shell tasks write to); ``tmp``, in the system's
    temporary directory (the default); else that directory."""
    if where == "home":
        from fedexec.config import fedexec_home

        home = fedexec_home()
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        return str(home)
    return None if where == "tmp" else where


def run_parsl(args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    import parsl
    from run_all import ParslSystem

    logs = tempfile.mkdtemp(prefix="fedexec-bench-shell-")
    counter = iter(range(10**9))

    def shell(cmd: str, stdout: str = "", stderr: str = "") -> str:
        return cmd

    out: dict[str, tuple[float, float]] = {}
    try:
        system = ParslSystem()
    except BaseException:   # loaded, then failed (its block never came up): stop what it started
        with contextlib.suppress(Exception):
            parsl.dfk().cleanup()
        parsl.clear()
        shutil.rmtree(logs, True)
        raise
    # (its apps' output files, ~1,000 a run, removed after it: they were left in the temporary directory)
    with contextlib.ExitStack() as cleanup, system:
        cleanup.callback(shutil.rmtree, logs, True)
        app = parsl.bash_app(shell, executors=["htex"])

        def submit(cmd: str) -> Any:
            n = next(counter)
            return app(cmd, stdout=os.path.join(logs, f"{n}.out"), stderr=os.path.join(logs, f"{n}.err"))

        def check(future: Any) -> Any:
            value = future.result()
            assert value == 0, value
            return value

        for cmd in COMMANDS:
            out[cmd] = measure(lambda c: check(submit(c)), submit, check, cmd, args.calls, args.tasks)
    return out


def run_processpool(args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    with ProcessPoolExecutor(2) as pool:
        def check(future: Any) -> Any:
            value = future.result()
            assert value[0] == 0, value
            return value

        for cmd in COMMANDS:
            out[cmd] = measure(lambda c: check(pool.submit(run_shell, c)), lambda c: pool.submit(run_shell, c),
                               check, cmd, args.calls, args.tasks)
    return out


SYSTEMS = {"fedexec": run_fedexec, "parsl": run_parsl, "processpool": run_processpool}
LABELS = {"fedexec": "fedexec ShellFunction", "parsl": "Parsl bash_app (HTEX)",
          "processpool": "subprocess.run in ProcessPoolExecutor(2)"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=",".join(SYSTEMS))
    parser.add_argument("--task-base", default="tmp",
                        help="where fedexec's task directories go: tmp (the system's temporary directory: the "
                             "default), home (a fresh directory in ~/.fedexec, beside the default base), or a "
                             "directory (/dev/shm: no file system cost at all). On an "
                             "ext4 without a journal, creating a file costs ~1 ms of CPU in a directory whose "
                             "block group had many files deleted in the last minutes (ext4's recently_deleted "
                             "scan), as a shared /tmp often has")
    args = parser.parse_args()
    names = args.only.split(",")
    runs: dict[str, list[dict[str, tuple[float, float]]]] = {name: [] for name in names}
    for run in range(args.runs):
        for name in names:
            try:
                runs[name].append(SYSTEMS[name](args))
            except Exception as exc:   # one system failing does not hide the others
                print(f"run {run + 1}: {name} failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            shown = ", ".join(f"{cmd!r} {ms:.2f} ms, {rate:,.0f}/s" for cmd, (ms, rate) in runs[name][-1].items())
            print(f"run {run + 1}: {name}: {shown}", flush=True)
    print(f"\nround trip: median ms of {args.calls} sequential calls; burst: {args.tasks} tasks at once, tasks/s; "
          f"medians of {args.runs} runs; fedexec's task directories in --task-base {args.task_base}; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"| system | {' | '.join(f'`{c}` round trip ms | `{c}` burst tasks/s' for c in COMMANDS)} |")
    print("|---|" + "---|" * (2 * len(COMMANDS)))
    for name in names:
        if not runs[name]:
            continue
        cells = []
        for cmd in COMMANDS:
            cells.append(f"{statistics.median(r[cmd][0] for r in runs[name]):.2f}")
            cells.append(f"{statistics.median(r[cmd][1] for r in runs[name]):,.0f}")
        print(f"| {LABELS[name]} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
