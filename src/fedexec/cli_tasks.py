"""``fedexec task list|status|result|cancel``: your tasks at a relay, from the
command line (through :class:`fedexec.Client`)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

STATUS_CHOICES = ("pending", "waiting-for-ep", "waiting-for-launch", "running", "success", "failed", "cancelled")


def _client(ns: argparse.Namespace) -> Any:
    from .client import Client

    return Client(relay=ns.relay, token=ns.token, relay_public_key=ns.relay_key, timeout=ns.timeout)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _failing(action: Any) -> Any:
    """Run a command; its expected errors end it with one line on stderr and exit status 1."""
    def run(ns: argparse.Namespace) -> None:
        from .errors import FedexecError

        try:
            action(ns)
        except (FedexecError, LookupError, ValueError, TimeoutError, RuntimeError) as exc:
            raise SystemExit(f"fedexec: {exc or type(exc).__name__}") from None
    return run


@_failing
def task_list(ns: argparse.Namespace) -> None:
    since = time.time() - ns.since if ns.since is not None else None
    client = _client(ns)
    tasks = client.list_tasks(status=ns.status, endpoint_id=ns.endpoint, since=since, limit=ns.limit)
    if ns.json:
        print(json.dumps(tasks, indent=1))
        return
    print(f"{'TASK':36}  {'STATUS':18}  {'SUBMITTED':19}  {'COMPLETED':19}  ENDPOINT")
    for task in tasks:
        print(f"{task['task_id']:36}  {task['status']:18}  {_when(task['submitted']):19}  "
              f"{_when(task['completed']):19}  {task['endpoint_id'] or '-'}")


@_failing
def task_status(ns: argparse.Namespace) -> None:
    client = _client(ns)
    for task_id, info in client.get_batch_result(ns.task_ids).items():
        line = f"{task_id}  {info['status']}"
        if "exception" in info:
            line += f"  {type(info['exception']).__name__}: {info['exception']}"
        print(line)


@_failing
def task_result(ns: argparse.Namespace) -> None:
    value = _client(ns).get_result(ns.task_id)
    print(json.dumps(value) if ns.json else repr(value))


@_failing
def task_cancel(ns: argparse.Namespace) -> None:
    with _client(ns) as client:
        failed = []
        for task_id in ns.task_ids:
            if client.cancel(task_id):
                print(f"{task_id}  cancelled")
            else:
                failed.append(task_id)
                print(f"{task_id}  not cancelled: {client.get_task(task_id)['status']}")
        if failed:
            raise RuntimeError(f"{len(failed)} task(s) could not be cancelled (running or done)")


def add_task_parser(top: Any) -> None:
    """The ``task`` command and its subcommands, under the CLI's subparsers ``top``."""
    task = top.add_parser("task", help="your tasks at a relay: list them, their status and results, cancel")
    tsub = task.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--relay", help="the relay's address (default: the one in the fedexec home)")
    common.add_argument("--token", help="your API token (default: $FEDEXEC_TOKEN)")
    common.add_argument("--relay-key", help="an encrypted relay's public key, if not in the fedexec home")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the relay (default 30)")
    p = tsub.add_parser("list", parents=[common], help="your tasks, newest first")
    p.add_argument("--status", choices=STATUS_CHOICES, help="only those in this state")
    p.add_argument("--endpoint", help="only those sent to this endpoint id")
    p.add_argument("--since", type=float, metavar="SECONDS", help="only those submitted in the last SECONDS")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=task_list)
    p = tsub.add_parser("status", parents=[common], help="where tasks are, and how they ended")
    p.add_argument("task_ids", nargs="+", metavar="TASK_ID")
    p.set_defaults(func=task_status)
    p = tsub.add_parser("result", parents=[common], help="a task's result (repr), or its error (exit 1)")
    p.add_argument("task_id")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=task_result)
    p = tsub.add_parser("cancel", parents=[common], help="cancel tasks that have not started")
    p.add_argument("task_ids", nargs="+", metavar="TASK_ID")
    p.set_defaults(func=task_cancel)
