"""The ``fedexec`` command: run and inspect relays and endpoints.

    fedexec relay start [--host H] [--port P] [--data-dir D] [--auth local|token|globus] [--curve|--no-curve]
                        [--result-ttl S] [--max-payload B] [--http PORT [--http-host H] [--http-cert PEM --http-key PEM]]
                        [--daemon]
    fedexec relay stop|status|key [--data-dir D]
    fedexec task list|status|result|cancel ...               (your tasks at a relay: fedexec.Client)
    fedexec relay add-user NAME [--data-dir D]              (token mode; prints the user's first token)
    fedexec token create USER [--expires SECONDS] | revoke ID | list [--data-dir D]
    fedexec endpoint configure NAME [--relay ADDR] [--max-workers N] [--prefetch N] [--relay-key KEY]
                                    [--allow-function HASH ...] [--sandbox MODE] [--sandbox-image IMAGE]
                                    [--data-only | --no-data-only]
                                    [--provider local|slurm|parsl|manual] [--min-blocks N] [--max-blocks N]
                                    [--walltime HH:MM:SS] [--partition P] ...  (see --help)
    fedexec endpoint start NAME [--daemon]
    fedexec endpoint stop|status NAME                       (status: blocks, pools, workers, idle, queued, data refs)
    fedexec endpoint share NAME [--user U ...] [--remove-user U ...] [--group G ...] [--public|--private]
                               [--share-memo|--no-share-memo]
    fedexec endpoint list
    fedexec group set NAME ENDPOINT [ENDPOINT ...] | list | remove NAME   (FederatedExecutor("NAME"))
    fedexec function hash MODULE:FUNCTION
    fedexec login [--client-id ID] [--scope SCOPE]          (globus mode)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from . import protocol as P
from .auth import AUTH_MODES
from .errors import AuthenticationFailed
from .config import DEFAULT_RELAY_PORT, PROVIDERS, SANDBOXES, ProviderConfig, ConfigError, EndpointConfig, endpoint_dir, fedexec_home, relay_dir
from .pidfile import PidFile
from .private import make_private

START_TIMEOUT = 30.0


class CommandError(Exception):
    """Ends the command with this message and exit status 1."""


# -- helpers ------------------------------------------------------------------
def _spawn_daemon(argv: list[str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)


def _wait_for(pidfile: PidFile, proc: subprocess.Popen, log_path: Path, want: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        record = pidfile.read()
        if record and record.get("pid") == proc.pid and all(record.get(k) == v for k, v in want.items()):
            return record
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise CommandError(f"it exited with code {proc.returncode}; last lines of {log_path}:\n  "
                               + "\n  ".join(tail))
        time.sleep(0.05)
    raise CommandError(f"it did not report ready within {START_TIMEOUT:g} s; see {log_path}")


def _stop_process(record: dict[str, Any], what: str, timeout: float = 15.0) -> None:
    pid = int(record["pid"])
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        raise CommandError(f"{what} (pid {pid}) did not stop within {timeout:g} s") from None


# -- relay ----------------------------------------------------------------------
def _relay_pidfile(ns: argparse.Namespace) -> tuple[Path, PidFile]:
    """The relay's data dir (``--data-dir``, else the fedexec home's) and its ``relay.json``."""
    data_dir = Path(ns.data_dir) if ns.data_dir else relay_dir()
    return data_dir, PidFile(data_dir / "relay.json")


def _dashboard_argv(ns: argparse.Namespace) -> list[str]:
    """The relay's --http options, checked here so that a daemon refused
    them says why at once (not only in its log)."""
    if ns.http is None:
        return []
    from .relay.web import check_http_host, require_prometheus, tls_context
    try:
        tls = tls_context(ns.http_cert, ns.http_key)
        check_http_host(ns.http_host, ns.auth, tls is not None)
        require_prometheus()
    except (ValueError, ImportError) as exc:
        raise CommandError(f"--http: {exc}") from None
    files = ["--http-cert", str(Path(ns.http_cert).resolve()), "--http-key", str(Path(ns.http_key).resolve())] \
        if tls is not None else []
    return ["--http", str(ns.http), "--http-host", ns.http_host, *files]


def relay_start(ns: argparse.Namespace) -> None:
    data_dir, pidfile = _relay_pidfile(ns)
    running = pidfile.read()
    if running:
        raise CommandError(f"a relay is already running at {running['address']} (pid {running['pid']})")
    host = f"[{ns.host}]" if ":" in ns.host and not ns.host.startswith("[") else ns.host
    address = f"tcp://{host}:{ns.port}"
    argv = ["-m", "fedexec.relay", "--address", address, "--data-dir", str(data_dir), "--log-level", ns.log_level]
    if ns.result_ttl is not None:
        if ns.result_ttl <= 0:
            raise SystemExit("fedexec: --result-ttl must be greater than 0 seconds")
        argv += ["--result-ttl", str(ns.result_ttl)]
    if ns.max_payload is not None:
        try:
            P.check_payload_limit(ns.max_payload)
        except ValueError as exc:
            raise SystemExit(f"fedexec: --max-payload: {exc}") from None
        argv += ["--max-payload", str(ns.max_payload)]
    for flag, value in (("--max-tasks-per-user", ns.max_tasks_per_user), ("--max-bytes-per-user",
                                                                          ns.max_bytes_per_user),
                        ("--max-endpoints-per-user", ns.max_endpoints_per_user),
                        ("--max-kept-per-user", ns.max_kept_per_user)):
        if value is not None:
            if value <= 0:
                raise SystemExit(f"fedexec: {flag} must be greater than 0")
            argv += [flag, str(value)]
    if ns.keep_results is not None:
        argv += ["--keep-results" if ns.keep_results else "--no-keep-results"]
    argv += ["--auth", ns.auth]
    if ns.curve is not None:
        argv += ["--curve" if ns.curve else "--no-curve"]
    if ns.globus_client_id:
        argv += ["--globus-client-id", ns.globus_client_id]
    if ns.globus_scope:
        argv += ["--globus-scope", ns.globus_scope]
    argv += _dashboard_argv(ns)
    if ns.endpoint is not None:
        from .colocated import configured_endpoint
        try:   # (said here, not only in a daemon's log)
            configured_endpoint(ns.endpoint, address, ns.auth, hold=False)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        argv += ["--endpoint", ns.endpoint]
    from .relay.listening import AddressInUse, check_address_free

    try:   # before the log (in the data dir) is made: a busy address leaves no trace
        check_address_free(address, data_dir)
    except AddressInUse as exc:
        raise CommandError(str(exc)) from None
    if not ns.daemon:
        print(f"fedexec relay on {address}, data in {data_dir} (Ctrl-C stops it)", flush=True)
        from .relay.__main__ import main as relay_main

        relay_main([*argv[2:], "--log-file", str(data_dir / "relay.log")])   # the same log as a daemon's
        return
    log_path = data_dir / "relay.log"
    proc = _spawn_daemon(argv, log_path)
    try:
        record = _wait_for(pidfile, proc, log_path, {})
    except CommandError as exc:
        raise CommandError(f"the relay did not start: {exc}") from None
    print(f"relay running at {record['address']} (pid {record['pid']}); log: {log_path}")
    if ns.endpoint is not None:
        try:
            _wait_for(_endpoint_pidfile(ns.endpoint), proc, log_path, {"status": "connected"})
        except CommandError as exc:
            raise CommandError(f"endpoint {ns.endpoint} did not start inside the relay: {exc}") from None
        print(f"endpoint {ns.endpoint} running inside the relay")
    if record.get("http"):
        print(f"dashboard: {record['http']} (sign in once with {record['http']}?token=TOKEN)")
    if record.get("public_key"):
        print(f"connections are encrypted; the relay's public key: {record['public_key']}")


def relay_key(ns: argparse.Namespace) -> None:
    """Print the relay's CURVE public key (made now if it has none yet)."""
    from .relay.access import load_or_create_curve_keys

    data_dir, _ = _relay_pidfile(ns)
    print(load_or_create_curve_keys(data_dir / "relay.curve")[0].decode())


def _token_book(ns: argparse.Namespace) -> Any:
    from .relay.access import TokenBook

    data_dir, _ = _relay_pidfile(ns)
    return TokenBook(data_dir)


def relay_add_user(ns: argparse.Namespace) -> None:
    book = _token_book(ns)
    try:
        book.add_user(ns.name)
        token = book.create_token(ns.name, ns.expires)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    print(f"added user {ns.name}; their token (shown once; give it to them, they set FEDEXEC_TOKEN to it):",
          file=sys.stderr)
    print(token)


def token_create(ns: argparse.Namespace) -> None:
    try:
        print(_token_book(ns).create_token(ns.user, ns.expires))
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def token_revoke(ns: argparse.Namespace) -> None:
    try:
        token_id = _token_book(ns).revoke(ns.token)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    print(f"revoked token {token_id}; its sessions end within a second")


def token_list(ns: argparse.Namespace) -> None:
    def when(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"

    # a token made by an older relay has no CURVE key: plain connections only (create a new one)
    rows = [("ID", "USER", "CREATED", "EXPIRES", "REVOKED", "ENCRYPTED")]
    rows += [(tid, user, when(c), when(e), when(r), "yes" if curve else "no: plain only, create a new token")
             for tid, user, c, e, r, curve in _token_book(ns).tokens()]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def relay_stop(ns: argparse.Namespace) -> None:
    data_dir, pidfile = _relay_pidfile(ns)
    record = pidfile.read()
    if not record:
        print(f"no relay is running for {data_dir}")
        return
    _stop_process(record, "the relay")
    print(f"relay (pid {record['pid']}) stopped")


def relay_status(ns: argparse.Namespace) -> None:
    data_dir, pidfile = _relay_pidfile(ns)
    record = pidfile.read()
    if not record:
        print(f"relay: stopped (data in {data_dir})")
        raise SystemExit(3)
    from .relay.query import lookup_endpoint

    from .errors import FedexecError

    try:
        lookup_endpoint(record["address"], "00000000-0000-0000-0000-000000000000", timeout=2.0,
                        relay_key=record.get("public_key") or None)
        answer = "answering"
    except TimeoutError:
        answer = "NOT answering"
    except FedexecError as exc:  # it answered, with a refusal (token or globus mode, no credentials here)
        answer = f"answering (and refusing us: {exc})"
    print(f"relay: running at {record['address']} (pid {record['pid']}), {answer}; data in {data_dir}")
    if record.get("http"):
        print(f"dashboard: {record['http']}")


# -- endpoint -------------------------------------------------------------------
# provider settings `endpoint configure` takes as options (ProviderConfig fields)
PROVIDER_OPTIONS = ("init_blocks", "min_blocks", "max_blocks", "nodes_per_block", "max_idletime", "walltime",
                    "drain", "partition", "account", "scheduler_options", "worker_init", "address", "port",
                    "parsl_class", "exclusive", "in_process")

def _endpoint_pidfile(name: str) -> PidFile:
    return PidFile(endpoint_dir(name) / "endpoint.json")


# `endpoint configure` options copied into the endpoint's config as given (same names)
SETTINGS_AS_GIVEN = ("max_workers", "prefetch", "sandbox", "sandbox_image", "data_only", "accelerators_shared",
                     "mpi_launcher", "task_dir_ttl", "multi_node_for_others", "max_nodes_per_user",
                     "max_cores_per_user", "max_gpus_per_user")


def endpoint_configure(ns: argparse.Namespace) -> None:
    try:
        config = EndpointConfig.load(ns.name)
        created = False
    except ConfigError:
        if (endpoint_dir(ns.name) / "config.toml").exists():
            raise
        config = EndpointConfig(name=ns.name)
        created = True
    if ns.relay:
        config.relay = ns.relay
    if ns.relay_key is not None:
        config.relay_public_key = ns.relay_key
    if ns.allow_function:
        config.allowed_functions = sorted(set(config.allowed_functions) | set(ns.allow_function))
    if ns.allow_any_function:
        config.allowed_functions = []
    if ns.available_accelerators is not None:
        config.available_accelerators = [i.strip() for i in ns.available_accelerators.split(",") if i.strip()]
    for key in SETTINGS_AS_GIVEN:
        if getattr(ns, key) is not None:
            setattr(config, key, getattr(ns, key))
    given = {key: getattr(ns, key) for key in PROVIDER_OPTIONS if getattr(ns, key) is not None}
    if ns.provider is not None and ns.provider != config.provider.type:
        settings = {"type": ns.provider}     # another provider: its defaults, then what was given
    else:
        settings = dataclasses.asdict(config.provider)
    config.provider = ProviderConfig.from_dict({**settings, **given})
    path = config.save()
    print(f"{'configured' if created else 'updated'} endpoint {config.name} ({config.endpoint_id}): {path}")


def endpoint_start(ns: argparse.Namespace) -> None:
    config = EndpointConfig.load(ns.name)
    pidfile = _endpoint_pidfile(ns.name)
    running = pidfile.read()
    if running:
        raise CommandError(f"endpoint {ns.name} is already running (pid {running['pid']})")
    argv = ["-m", "fedexec.endpoint", "--name", ns.name, "--log-level", ns.log_level]
    if not ns.daemon:
        print(f"starting endpoint {ns.name} ({config.endpoint_id}) for relay {config.relay} "
              "(Ctrl-C stops it)", flush=True)
        from .endpoint.__main__ import main as endpoint_main

        endpoint_main([*argv[2:], "--log-file", str(endpoint_dir(ns.name) / "endpoint.log")])
        return
    log_path = endpoint_dir(ns.name) / "endpoint.log"
    proc = _spawn_daemon(argv, log_path)
    try:
        _wait_for(pidfile, proc, log_path, {"status": "connected"})
    except CommandError as exc:
        if proc.poll() is None:
            raise CommandError(f"endpoint {ns.name} (pid {proc.pid}) started but has not reached the relay at "
                               f"{config.relay} yet; it keeps trying. {exc}") from None
        raise CommandError(f"endpoint {ns.name} did not start: {exc}") from None
    print(f"endpoint {ns.name} running (pid {proc.pid}), connected to {config.relay}")
    print(config.endpoint_id)


def endpoint_share(ns: argparse.Namespace) -> None:
    """The owner changes who may submit to an endpoint (through its relay)."""
    from .errors import FedexecError
    from .relay.query import share_endpoint

    config = EndpointConfig.load(ns.name)
    try:
        view = share_endpoint(config.relay, config.endpoint_id, public=ns.public, add_users=ns.user,
                              remove_users=ns.remove_user, add_groups=ns.group, remove_groups=ns.remove_group,
                              share_memo=ns.share_memo, relay_key=config.relay_public_key or None)
    except (FedexecError, TimeoutError, RuntimeError) as exc:
        raise CommandError(str(exc)) from None
    who = "everyone" if view["public"] else ", ".join(
        [f"user {u}" for u in view["users"]] + [f"group {g}" for g in view["groups"]]) or "its owner only"
    memo = "shared among its users" if view.get("share_memo") else "each user's own"
    print(f"endpoint {ns.name} ({config.endpoint_id}), owner {view['owner']}: usable by {who}; "
          f"memoized results: {memo}")


def function_hash_command(ns: argparse.Namespace) -> None:
    import importlib

    from .serialize import function_hash

    module_name, _, attr = ns.function.partition(":")
    if not attr:
        raise CommandError(f"give the function as MODULE:FUNCTION, not {ns.function!r}")
    try:
        fn = importlib.import_module(module_name)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError) as exc:
        raise CommandError(f"cannot find {ns.function}: {exc}") from None
    print(function_hash(fn))


def login(ns: argparse.Namespace) -> None:
    """Globus Auth's native-app login; the tokens are kept (mode 0600) for
    executors and the CLI of this user."""
    from .globus_login import login_interactively

    try:
        path = login_interactively(ns.client_id, ns.scope)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    print(f"logged in; tokens saved in {path}")


def endpoint_stop(ns: argparse.Namespace) -> None:
    from .endpoint.sockdir import remove_stale_socket_dirs

    EndpointConfig.load(ns.name)
    record = _endpoint_pidfile(ns.name).read()
    if not record:
        print(f"endpoint {ns.name} is not running")
    elif record.get("in_relay"):
        raise CommandError(f"endpoint {ns.name} runs inside the relay (pid {record['pid']}, started with relay start "
                           "--endpoint): 'fedexec relay stop' stops both")
    else:
        _stop_process(record, f"endpoint {ns.name}")
        print(f"endpoint {ns.name} (pid {record['pid']}) stopped")
    # what endpoints killed with SIGKILL left behind (theirs, or any other of this user's)
    removed = remove_stale_socket_dirs()
    if removed:
        print(f"removed {len(removed)} socket director{'y' if len(removed) == 1 else 'ies'} left by endpoints that "
              f"did not exit cleanly: {', '.join(removed)}")


def endpoint_restart(ns: argparse.Namespace) -> None:
    """Stop the endpoint if it runs, then start it in the background (with
    its config file as it is now)."""
    endpoint_stop(ns)
    endpoint_start(argparse.Namespace(name=ns.name, daemon=True, log_level=ns.log_level))


def endpoint_delete(ns: argparse.Namespace) -> None:
    """Stop the endpoint if it runs, tell its relay (which forgets it and
    fails its tasks: relay/deregister.py), remove its directory (config,
    keys, logs, block scripts) and take it out of this machine's named
    groups, after asking unless ``--yes``. With ``--relay-only ID``: only
    tell the relay (when it could not be told at the time)."""
    if ns.relay_only:
        if ns.name or not ns.relay:
            raise CommandError("--relay-only ENDPOINT_ID takes the relay's address (--relay tcp://HOST:PORT) and no "
                               "endpoint name")
        if not P.is_endpoint_id(ns.relay_only):
            raise CommandError(f"--relay-only takes the endpoint's id (a UUID), not {ns.relay_only!r}")
        if not _tell_relay_deleted(ns.relay, ns.relay_only, ns.relay_key or None):
            raise SystemExit(1)
        return
    if not ns.name:
        raise CommandError("give the name of the endpoint to delete ('fedexec endpoint list' shows them)")
    config = EndpointConfig.load(ns.name)
    directory = endpoint_dir(ns.name)
    if not ns.yes:
        if not sys.stdin.isatty():
            raise CommandError(f"not deleting endpoint {ns.name}: confirm with --yes (no terminal to ask on)")
        answer = input(f"delete endpoint {ns.name} ({config.endpoint_id}): stop it, tell the relay at {config.relay} "
                       f"(its queued tasks fail) and remove {directory}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted")
            return
    endpoint_stop(ns)
    told = _tell_relay_deleted(config.relay, config.endpoint_id, config.relay_public_key or None, ns.name)
    shutil.rmtree(directory)
    print(f"deleted endpoint {ns.name} ({config.endpoint_id}): its config, keys and logs are removed")
    from .config import leave_groups

    left, emptied = leave_groups(config.endpoint_id)
    if left:
        print(f"it left the endpoint group(s) {', '.join(left)}")
    if emptied:
        print(f"the endpoint group(s) {', '.join(emptied)} had no other endpoint and were removed")
    if not told:
        raise SystemExit(1)


def _tell_relay_deleted(relay: str, endpoint_id: str, relay_key: str | None, name: str = "") -> bool:
    """Ask the relay to forget an endpoint; print what it said, or that it
    was not told and the command that tells it later. Whether it was told."""
    from .errors import FedexecError
    from .relay.query import deregister_endpoint

    try:
        answer = deregister_endpoint(relay, endpoint_id, relay_key=relay_key)
    except (FedexecError, TimeoutError, RuntimeError, ValueError) as exc:
        key = f" --relay-key {relay_key}" if relay_key else ""
        what = f"{name} ({endpoint_id})" if name else endpoint_id
        print(f"fedexec: the relay at {relay} was NOT told that endpoint {what} is deleted: {exc}\n"
              f"  it still lists the endpoint, and tasks sent to it wait there; once the relay is reachable, run:\n"
              f"  fedexec endpoint delete --relay-only {endpoint_id} --relay {relay}{key}", file=sys.stderr)
        return False
    if answer.get("known"):
        failed = answer.get("failed", 0)
        print(f"the relay at {relay} forgot endpoint {endpoint_id}"
              + (f"; {failed} task(s) waiting for it failed, saying it was deleted" if failed else ""))
    else:
        print(f"the relay at {relay} knows no endpoint {endpoint_id} of yours (it never connected there, or "
              f"was deleted already)")
    return True


def endpoint_logs(ns: argparse.Namespace) -> None:
    """Print the end of the endpoint's log (``endpoint.log`` in its
    directory); with ``--follow``, then what is added to it, until Ctrl-C
    (a log started anew, as by a restart, is followed from its start)."""
    EndpointConfig.load(ns.name)
    path = endpoint_dir(ns.name) / "endpoint.log"
    try:   # (also a record its process left when killed: the relay's log tells how it ended)
        record = json.loads((endpoint_dir(ns.name) / "endpoint.json").read_text())
    except (OSError, ValueError):
        record = {}
    if isinstance(record, dict) and record.get("in_relay") and record.get("log"):   # relay start --endpoint
        path = Path(record["log"])
    if not path.exists() and not ns.follow:
        raise CommandError(f"endpoint {ns.name} has no log yet ({path}): it writes one once started (one run "
                           "inside a relay, relay start --endpoint, logs to the relay's log)")
    offset = 0
    if path.exists():
        with open(path, "rb") as log:
            lines = log.read().splitlines(keepends=True)
            offset = log.tell()
        sys.stdout.write(b"".join(lines[-ns.lines:] if ns.lines > 0 else []).decode(errors="replace"))
        sys.stdout.flush()
    if not ns.follow:
        return
    identity = _file_identity(path)
    try:
        while True:
            time.sleep(0.2)
            now = _file_identity(path)
            if now is None:
                continue
            if now != identity or now[2] < offset:   # replaced or truncated: from its start
                identity, offset = now, 0
            if now[2] > offset:
                with open(path, "rb") as log:
                    log.seek(offset)
                    chunk = log.read()
                    offset = log.tell()
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
    except KeyboardInterrupt:
        pass


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """(device, inode, size) of ``path``, or None if it does not exist."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino, info.st_size


def _endpoint_names() -> list[str]:
    root = fedexec_home() / "endpoints"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.toml").exists())


def endpoint_list(ns: argparse.Namespace) -> None:
    names = _endpoint_names()
    if not names:
        print(f"no endpoints configured under {fedexec_home()}; try 'fedexec endpoint configure NAME'")
        return
    from .relay.query import lookup_endpoint

    rows = [("NAME", "ENDPOINT ID", "STATE", "PID", "AT RELAY", "RELAY")]
    for name in names:
        try:
            config = EndpointConfig.load(name)
        except (ConfigError, OSError) as exc:
            rows.append((name, "-", "misconfigured", "-", "-", str(exc)))
            continue
        record = _endpoint_pidfile(name).read()
        state = "stopped" if not record else ("running" if record.get("status") == "connected" else "connecting")
        try:  # the relay's own view: "disconnected" once the endpoint's heartbeats stopped
            seen = lookup_endpoint(config.relay, config.endpoint_id, timeout=0.5)
            at_relay = seen["status"] if seen else "unknown"
        except (TimeoutError, OSError, ValueError):
            at_relay = "relay unreachable"
        if state == "stopped" and at_relay == "connected":
            at_relay = "disconnected"  # the process is gone; the relay will see it at the next missed heartbeat
        rows.append((name, config.endpoint_id, state, str(record["pid"]) if record else "-", at_relay,
                     config.relay))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[5])


def endpoint_status(ns: argparse.Namespace) -> None:
    config = EndpointConfig.load(ns.name)
    record = _endpoint_pidfile(ns.name).read()
    provider = config.provider
    print(f"endpoint:  {config.name}")
    print(f"id:        {config.endpoint_id}")
    print(f"relay:     {config.relay}")
    print(f"local:     {'running (pid %s)' % record['pid'] if record else 'stopped'}")
    print(f"provider:  {provider.type}, blocks {provider.min_blocks}..{provider.max_blocks} "
          f"(init {provider.init_blocks}), {provider.nodes_per_block} node(s) per block, "
          f"{config.max_workers or 'all cores'} worker(s) per node, prefetch {config.prefetch}")
    status = _read_status(ns.name) if record else None
    if status is not None:
        blocks, pools = status["blocks"], status["pools"]
        print(f"blocks:    {len(blocks)}" + "".join(f"\n  {b['id']}  job {b['job']}  {b['state']}, "
                                                 f"{b['pools']} pool(s)" for b in blocks))
        print(f"pools:     {len(pools)}" + "".join(
            f"\n  {p['id']}  {p['host']}  block {p['block'] or '-'}  {p['workers']} workers, "
            f"{p['idle_workers']} idle, {p['tasks']} task(s)" + (", draining" if p["draining"] else "")
            for p in pools))
        print(f"workers:   {status['workers']} ({status['idle_workers']} idle)")
        print(f"queued:    {status['queued']} (at the relay and here), {status['at_pools']} at pools")
        if "cached_refs" in status:
            print(f"data refs: {status['cached_refs']} cached ({status['cached_ref_bytes']:,} bytes), "
                  f"{status['ref_fetches']} fetched from the relay")
        if status.get("provider_error"):
            print(f"provider:  last error: {status['provider_error']}")
        changed = _settings_changed(config, status.get("settings"))
        if changed:
            print(f"settings:  its config file changed since it started ({', '.join(changed)} differ); "
                  f"'fedexec endpoint restart {ns.name}' applies it")
    from .relay.query import lookup_endpoint

    try:
        view = lookup_endpoint(config.relay, config.endpoint_id, timeout=2.0)
    except TimeoutError:
        print("relay:     not answering")
    else:
        if view is None:
            print("at relay:  unknown (never connected)")
        else:
            counts = (f", {view['queued']} queued, {view['running']} out at the endpoint"
                      if "queued" in view else "")   # (a relay tells only an endpoint's owner)
            print(f"at relay:  {view['status']}{counts}")
    if not record:
        raise SystemExit(3)


def _settings_changed(config: EndpointConfig, running: Any) -> list[str]:
    """The settings (``provider.`` ones so named) in which the config file
    ``config`` differs from those the endpoint runs with (its status's)."""
    if not isinstance(running, dict):
        return []   # an endpoint of an older release does not say
    now = json.loads(json.dumps(dataclasses.asdict(config)))
    changed = [key for key in now if key != "provider" and now[key] != running.get(key)]
    provider, was = now.get("provider", {}), running.get("provider") or {}
    return changed + [f"provider.{key}" for key in provider if provider[key] != was.get(key)]


def _read_status(name: str) -> dict | None:
    """The running endpoint's own view (it rewrites status.json each second)."""
    try:
        return json.loads((endpoint_dir(name) / "status.json").read_text())
    except (OSError, ValueError):
        return None


# -- endpoint groups --------------------------------------------------------------
def group_set(ns: argparse.Namespace) -> None:
    from .config import set_group

    members = set_group(ns.name, ns.endpoints)
    print(f"group {ns.name}: {len(members)} endpoint(s): {', '.join(members)}")


def group_list(ns: argparse.Namespace) -> None:
    from .config import groups_path, load_groups

    groups = load_groups()
    if not groups:
        print(f"no endpoint groups in {groups_path()}; try 'fedexec group set NAME ENDPOINT_ID ENDPOINT_ID'")
        return
    names: dict[str, str] = {}   # endpoint id -> the name it is configured under here
    for name in _endpoint_names():
        try:
            names[EndpointConfig.load(name).endpoint_id] = name
        except (ConfigError, OSError):
            pass
    rows = [("GROUP", "ENDPOINTS")]
    for group, members in sorted(groups.items()):
        rows.append((group, ", ".join(f"{m} ({names[m]})" if m in names else m for m in members)))
    width = max(len(row[0]) for row in rows)
    for row in rows:
        print(f"{row[0].ljust(width)}  {row[1]}")


def group_remove(ns: argparse.Namespace) -> None:
    from .config import remove_group

    remove_group(ns.name)
    print(f"group {ns.name} removed")


# -- parser ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedexec", description="Federated function execution.")
    parser.add_argument("--version", action="version", version=f"fedexec {_version()}")
    top = parser.add_subparsers(dest="command", required=True)

    relay = top.add_parser("relay", help="run the relay that clients and endpoints connect to")
    rsub = relay.add_subparsers(dest="action", required=True)
    p = rsub.add_parser("start", help="start a relay (foreground unless --daemon)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_RELAY_PORT, help=f"port (default {DEFAULT_RELAY_PORT})")
    p.add_argument("--data-dir", help="where tasks and results are kept (default $FEDEXEC_HOME/relay)")
    p.add_argument("--daemon", action="store_true", help="run in the background")
    p.add_argument("--result-ttl", type=float, help="seconds a result nobody fetched is kept (default 7 days)")
    p.add_argument("--max-payload", type=int, help="largest pickled arguments or result in bytes (default 4 GiB; over 16 MiB they travel in chunks)")
    p.add_argument("--max-tasks-per-user", type=int,
                   help="tasks one user may have in flight at the relay (default 1,000,000)")
    p.add_argument("--max-bytes-per-user", type=int,
                   help="bytes one user may have stored at the relay: arguments, results not yet fetched, "
                        "function bodies (default 4 GiB)")
    p.add_argument("--max-endpoints-per-user", type=int,
                   help="endpoints one user may register at the relay (default 1,000)")
    p.add_argument("--keep-results", action=argparse.BooleanOptionalAction, default=None,
                   help="keep results readable after their client received them, until --result-ttl or "
                        "Client.delete_result (default: on)")
    p.add_argument("--max-kept-per-user", type=int,
                   help="received results kept per user, the oldest going first (default 100,000)")
    p.add_argument("--auth", choices=AUTH_MODES, default="local",
                   help="local: a secret file for this machine's user (default); token: per-user API tokens "
                        "(relay add-user, token create); globus: Globus Auth tokens")
    p.add_argument("--curve", action=argparse.BooleanOptionalAction, default=None,
                   help="encrypt connections (default: on unless --host is a loopback address)")
    p.add_argument("--globus-client-id", help="the relay's Globus app (globus mode; its secret in "
                                              "$FEDEXEC_RELAY_GLOBUS_CLIENT_SECRET)")
    p.add_argument("--globus-scope", help="a scope every Globus token must carry (globus mode)")
    p.add_argument("--http", type=int, metavar="PORT",
                   help="serve the web dashboard, /api/ and /metrics on this port (pip install 'fedexec[dashboard]')")
    p.add_argument("--http-host", default="127.0.0.1",
                   help="the dashboard's host (default 127.0.0.1; another than loopback in token or globus mode "
                        "only, and over TLS: --http-cert, --http-key)")
    p.add_argument("--http-cert", metavar="PEM", help="serve the dashboard over HTTPS with this certificate (chain)")
    p.add_argument("--http-key", metavar="PEM", help="the private key of --http-cert")
    p.add_argument("--endpoint", metavar="NAME",
                   help="also run this configured endpoint inside the relay's process, with no hop between them "
                        "(--auth local only; its config's relay must be this relay's address)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=relay_start)
    for action, func in (("stop", relay_stop), ("status", relay_status), ("key", relay_key)):
        p = rsub.add_parser(action, help=f"{action} the relay of a data dir" if action != "key"
                            else "print the relay's public key (for clients' relay_public_key)")
        p.add_argument("--data-dir")
        p.set_defaults(func=func)
    p = rsub.add_parser("add-user", help="add a user (token mode) and print their first token")
    p.add_argument("name")
    p.add_argument("--expires", type=float, help="the token's lifetime in seconds (default: until revoked)")
    p.add_argument("--data-dir")
    p.set_defaults(func=relay_add_user)

    token = top.add_parser("token", help="API tokens of a token-mode relay (run where the relay keeps its data)")
    tsub = token.add_subparsers(dest="action", required=True)
    p = tsub.add_parser("create", help="a new token for a user, printed once")
    p.add_argument("user")
    p.add_argument("--expires", type=float, help="lifetime in seconds (default: until revoked)")
    p.add_argument("--data-dir")
    p.set_defaults(func=token_create)
    p = tsub.add_parser("revoke", help="revoke a token (its id, or the whole token); its sessions end")
    p.add_argument("token")
    p.add_argument("--data-dir")
    p.set_defaults(func=token_revoke)
    p = tsub.add_parser("list", help="tokens and their state")
    p.add_argument("--data-dir")
    p.set_defaults(func=token_list)

    p = top.add_parser("login", help="log in with Globus Auth (globus mode)")
    p.add_argument("--client-id", default=None, help="the native app to log in with "
                                                     "(default $FEDEXEC_GLOBUS_NATIVE_CLIENT_ID)")
    p.add_argument("--scope", default=None, help="the relay's scope (default $FEDEXEC_GLOBUS_SCOPE)")
    p.set_defaults(func=login)

    function = top.add_parser("function", help="functions as relays and endpoints know them")
    fsub = function.add_subparsers(dest="action", required=True)
    p = fsub.add_parser("hash", help="the hash for an endpoint's allowed_functions")
    p.add_argument("function", help="MODULE:FUNCTION")
    p.set_defaults(func=function_hash_command)

    endpoint = top.add_parser("endpoint", help="configure and run endpoints")
    esub = endpoint.add_subparsers(dest="action", required=True)
    p = esub.add_parser("configure", help="create or update an endpoint's config")
    p.add_argument("name")
    p.add_argument("--relay", help="relay address, e.g. tcp://127.0.0.1:55700")
    p.add_argument("--max-workers", type=int, help="worker processes (0 = usable cores)")
    p.add_argument("--prefetch", type=int, help="extra tasks fetched per worker")
    p.add_argument("--relay-key", help="the relay's public key (fedexec relay key): encrypt and pin it")
    p.add_argument("--allow-function", action="append", default=[], metavar="HASH",
                   help="run only these functions (fedexec function hash); repeat for more")
    p.add_argument("--allow-any-function", action="store_true", help="clear the allow-list")
    p.add_argument("--sandbox", choices=SANDBOXES, help="what workers run in")
    p.add_argument("--sandbox-image", help="image for apptainer or podman")
    p.add_argument("--data-only", action=argparse.BooleanOptionalAction, default=None,
                   help="take and give only plain data (numbers, text, bytes, lists, dicts, numpy arrays), never "
                        "pickles; default: on with an allow-list")
    p.add_argument("--available-accelerators", metavar="IDS",
                   help="accelerator (GPU) ids of each node, comma-separated, e.g. 0,1 ('' : find them)")
    p.add_argument("--accelerators-shared", action=argparse.BooleanOptionalAction, default=None,
                   help="let concurrent tasks be given the same accelerator")
    p.add_argument("--mpi-launcher", help="srun, mpiexec, mpirun or a command such as mpiexec.mpich")
    p.add_argument("--task-dir-ttl", type=float, metavar="SECONDS",
                   help="seconds a shell task's directory (its whole output) is kept after its last change, "
                        "then removed (default 604800: 7 days; 0: kept for ever)")
    p.add_argument("--multi-node-for-others", action=argparse.BooleanOptionalAction, default=None,
                   help="let users other than the owner run tasks asking for several nodes (default: no)")
    p.add_argument("--max-nodes-per-user", type=int, metavar="N",
                   help="nodes one other user's multi-node tasks hold at once (0: no cap)")
    p.add_argument("--max-cores-per-user", type=int, metavar="N",
                   help="cores one other user's tasks asking for resources hold at once (0: no cap)")
    p.add_argument("--max-gpus-per-user", type=int, metavar="N",
                   help="GPUs one other user's tasks hold at once (0: no cap)")
    p.add_argument("--provider", choices=PROVIDERS, help="how pools are started (default local)")
    p.add_argument("--init-blocks", type=int, help="blocks started with the endpoint")
    p.add_argument("--min-blocks", type=int, help="blocks kept even when idle")
    p.add_argument("--max-blocks", type=int, help="most blocks at once")
    p.add_argument("--nodes-per-block", type=int, help="nodes in each block (one pool per node)")
    p.add_argument("--max-idletime", type=float, help="seconds a block may idle before it is let go")
    p.add_argument("--walltime", help="a block's time limit, HH:MM:SS (slurm, parsl)")
    p.add_argument("--drain", type=float, help="seconds before the walltime pools stop taking tasks")
    p.add_argument("--partition", help="slurm partition")
    p.add_argument("--account", help="slurm account")
    p.add_argument("--scheduler-options", help="extra batch script lines, e.g. '#SBATCH --gres=gpu:1'")
    p.add_argument("--worker-init", help="shell commands run before pools start (module load ...)")
    p.add_argument("--pools-in-process", dest="in_process", action=argparse.BooleanOptionalAction, default=None,
                   help="local: run pools inside the endpoint's process, no hop to a pool process (the default "
                        "where allowed); --no-pools-in-process: a pool process of their own")
    p.add_argument("--pool-address", dest="address", help="the address pools on other nodes connect to")
    p.add_argument("--pool-port", dest="port", type=int, help="the pool socket's TCP port (0: any)")
    p.add_argument("--parsl-class", help="a Parsl provider class, e.g. parsl.providers.PBSProProvider")
    p.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None,
                   help="slurm: whole nodes for each block (default); --no-exclusive: --cpus-per-task=max_workers")
    p.set_defaults(func=endpoint_configure)
    p = esub.add_parser("start", help="start an endpoint (foreground unless --daemon)")
    p.add_argument("name")
    p.add_argument("--daemon", action="store_true", help="run in the background")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=endpoint_start)
    for action, func in (("stop", endpoint_stop), ("status", endpoint_status)):
        p = esub.add_parser(action, help=f"{action} an endpoint")
        p.add_argument("name")
        p.set_defaults(func=func)
    p = esub.add_parser("restart", help="stop an endpoint if it runs, then start it in the background")
    p.add_argument("name")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=endpoint_restart)
    p = esub.add_parser("logs", help="the end of an endpoint's log; -f: and what it writes next")
    p.add_argument("name")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what is added (Ctrl-C ends)")
    p.add_argument("-n", "--lines", type=int, default=100, help="how many of its last lines first (default 100)")
    p.set_defaults(func=endpoint_logs)
    p = esub.add_parser("delete", help="stop an endpoint, tell its relay (its queued tasks fail) and remove its "
                                       "config, keys and logs")
    p.add_argument("name", nargs="?")
    p.add_argument("--yes", action="store_true", help="do not ask first")
    p.add_argument("--relay-only", metavar="ENDPOINT_ID",
                   help="only tell the relay (--relay) that this endpoint is deleted: when it could not be told "
                        "at the time")
    p.add_argument("--relay", help="the relay's address, with --relay-only")
    p.add_argument("--relay-key", help="the relay's public key (CURVE), with --relay-only, if not kept here")
    p.set_defaults(func=endpoint_delete)
    p = esub.add_parser("share", help="change who may use an endpoint (its owner only)")
    p.add_argument("name")
    p.add_argument("--user", action="append", default=[], help="share with this user (repeat for more)")
    p.add_argument("--remove-user", action="append", default=[], help="stop sharing with this user")
    p.add_argument("--group", action="append", default=[], help="share with this Globus group id (globus mode)")
    p.add_argument("--remove-group", action="append", default=[], help="stop sharing with this group")
    p.add_argument("--public", dest="public", action="store_const", const=True, default=None,
                   help="anyone the relay authenticates may use it")
    p.add_argument("--private", dest="public", action="store_const", const=False,
                   help="only its owner and those it is shared with")
    p.add_argument("--share-memo", action=argparse.BooleanOptionalAction, default=None,
                   help="serve a result memoized on it for one user to every user of it (default: off, each "
                        "user gets only their own memoized results)")
    p.set_defaults(func=endpoint_share)
    p = esub.add_parser("list", help="configured endpoints and whether they run")
    p.set_defaults(func=endpoint_list)

    group = top.add_parser("group", help="named groups of endpoints: FederatedExecutor(\"NAME\") runs each "
                                         "task on one of them")
    gsub = group.add_subparsers(dest="action", required=True)
    p = gsub.add_parser("set", help="make or replace a group")
    p.add_argument("name")
    p.add_argument("endpoints", nargs="+", metavar="ENDPOINT",
                   help="an endpoint id, or the name of an endpoint configured here")
    p.set_defaults(func=group_set)
    p = gsub.add_parser("list", help="the groups and their endpoints")
    p.set_defaults(func=group_list)
    p = gsub.add_parser("remove", help="forget a group")
    p.add_argument("name")
    p.set_defaults(func=group_remove)

    from .cli_tasks import add_task_parser

    add_task_parser(top)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> None:
    make_private()   # configs, logs, relay data and the daemons it starts
    ns = build_parser().parse_args(argv)
    try:
        ns.func(ns)
    except (CommandError, ConfigError, AuthenticationFailed) as exc:
        print(f"fedexec: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
