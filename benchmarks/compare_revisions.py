"""The cost of a change on the embedded throughput benchmark: the same
measurement (``embedded_baseline.measure``) run alternately by two Python
interpreters, each with its own fedexec installed (this checkout's, and an
older checkout's virtual environment), median of ``--runs`` runs each.

    python benchmarks/compare_revisions.py --base-python /path/to/old/.venv/bin/python \\
        [--base-label ef53ba5] [--runs 5] [--calls 1000] [--tasks 20000]

Alternating the two sides run by run spreads the machine's noise over both.
The same interpreter can be both sides, told apart by their environment
(``--base-env``/``--env NAME=VALUE``, repeatable), to compare a setting:

    python benchmarks/compare_revisions.py --base-python .venv/bin/python \\
        --base-env FEDEXEC_WORKER_LINK=0 --env FEDEXEC_WORKER_LINK=1 --base-label link-off
Prints a table with the ratios this / base and saves it as
benchmarks/results/compare-revisions-<date>.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
ONE_RUN = """
import json, sys
sys.path.insert(0, {here!r})
import fedexec
from embedded_baseline import measure
from fedexec import FederatedExecutor
result = measure(lambda: FederatedExecutor(max_workers=2), {calls}, {tasks})
result["fedexec"] = fedexec.__file__
print("RESULT " + json.dumps(result))
"""


def one_run(python: str, calls: int, tasks: int, env: dict[str, str] | None = None) -> dict[str, float]:
    """One measurement by ``python``, with ``env`` added to this environment."""
    out = subprocess.run([python, "-c", ONE_RUN.format(here=str(HERE), calls=calls, tasks=tasks)],
                         capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
                         env={**os.environ, **(env or {})})
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"{python} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-python", required=True, help="the interpreter of the checkout to compare against")
    parser.add_argument("--base-label", default="base")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--base-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the base's runs (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for this checkout's runs (repeatable)")
    parser.add_argument("--out", default=None, help="the table's file (default results/compare-revisions-<date>.md)")
    ns = parser.parse_args()
    sides = {ns.base_label: ns.base_python, "this checkout": sys.executable}
    envs = {ns.base_label: _env(parser, ns.base_env), "this checkout": _env(parser, ns.env)}
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for run in range(ns.runs):
        order = list(sides.items()) if run % 2 == 0 else list(reversed(sides.items()))
        for name, python in order:
            results[name].append(one_run(python, ns.calls, ns.tasks, envs[name]))
            shown = {k: v for k, v in results[name][-1].items() if k != "fedexec"}
            print(f"run {run + 1}: {name} ({results[name][-1]['fedexec']}): "
                  + ", ".join(f"{k} {v:,.2f}" for k, v in shown.items()), flush=True)
    metrics = [k for k in results[ns.base_label][0] if k != "fedexec"]
    medians = {name: {m: statistics.median(r[m] for r in runs) for m in metrics} for name, runs in results.items()}
    base, this = medians[ns.base_label], medians["this checkout"]
    lines = [f"# Embedded default: this checkout against {ns.base_label}, {datetime.date.today()}", "",
             f"{platform.node()}, Python {platform.python_version()}, no-op tasks, 2 workers, median of {ns.runs} "
             f"runs each, the two alternating ({ns.calls} warm calls for latency, {ns.tasks} tasks for "
             "throughput). Latency: lower is better; rates: higher is better."
             + "".join(f" {name} with {' '.join(f'{k}={v}' for k, v in env.items())}."
                       for name, env in envs.items() if env), "",
             f"| metric | {ns.base_label} | this checkout | this / {ns.base_label} |", "|---|---|---|---|"]
    for m in metrics:
        lines.append(f"| {m} | {base[m]:,.2f} | {this[m]:,.2f} | {this[m] / base[m]:.3f} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    out = Path(ns.out) if ns.out else HERE / "results" / f"compare-revisions-{datetime.date.today()}.md"
    out.write_text(table)
    print(f"saved {out}")


def _env(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` arguments as a mapping (an error naming the bad one otherwise)."""
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            parser.error(f"{pair!r} is not NAME=VALUE")
        env[name] = value
    return env


if __name__ == "__main__":
    main()
