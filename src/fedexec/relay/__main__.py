"""``python -m fedexec.relay``: run a relay in the foreground (used by the
CLI's daemon mode and by the embedded default)."""

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .. import protocol as P
from ..gcpolicy import for_service
from ..logs import configure as configure_logging
from ..private import make_private
from .access import MODES, GlobusTokenCheck
from .quota import DEFAULT_FUNCTION_GRACE, DEFAULT_MAX_BYTES_PER_USER, DEFAULT_MAX_ENDPOINTS_PER_USER, \
    DEFAULT_MAX_TASKS_PER_USER
from .retained import DEFAULT_MAX_KEPT_PER_USER
from .server import DEFAULT_RESULT_TTL, Relay
from .store import GROUP_COMMIT_WINDOW


def main(argv: list[str] | None = None) -> None:
    make_private()   # the record holds every user's arguments and results
    parser = argparse.ArgumentParser(prog="python -m fedexec.relay")
    parser.add_argument("--address", required=True, help="tcp://HOST:PORT or ipc://PATH (port * = any free port)")
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process is gone")
    parser.add_argument("--remove-on-exit", type=Path, default=None,
                        help="delete this directory when the relay stops (private relays)")
    parser.add_argument("--result-ttl", type=float, default=DEFAULT_RESULT_TTL,
                        help="seconds a result nobody fetched is kept (default: 7 days)")
    parser.add_argument("--max-payload", type=int, default=P.DEFAULT_MAX_PAYLOAD,
                        help="largest pickled arguments or result accepted, in bytes (default 4 GiB; over 16 MiB they travel in chunks)")
    parser.add_argument("--max-tasks-per-user", type=int, default=DEFAULT_MAX_TASKS_PER_USER,
                        help="tasks one user may have in flight (accepted, not finished)")
    parser.add_argument("--max-bytes-per-user", type=int, default=DEFAULT_MAX_BYTES_PER_USER,
                        help="bytes one user may have stored (arguments, unacknowledged results, functions)")
    parser.add_argument("--max-endpoints-per-user", type=int, default=DEFAULT_MAX_ENDPOINTS_PER_USER,
                        help="endpoints one user may register (default 1,000)")
    parser.add_argument("--function-grace", type=float, default=DEFAULT_FUNCTION_GRACE,
                        help="seconds a function body is kept after its last task finished (default 300)")
    parser.add_argument("--commit-window", type=float, default=GROUP_COMMIT_WINDOW,
                        help="seconds the record's writer waits for more writes to join a transaction (default "
                             f"{GROUP_COMMIT_WINDOW:g}; a private relay that dies with its program, as the embedded "
                             "default's, gains nothing from committing sooner)")
    parser.add_argument("--keep-results", action=argparse.BooleanOptionalAction, default=None,
                        help="keep results readable after their client received them, until --result-ttl or "
                             "Client.delete_result (default: yes, unless --remove-on-exit)")
    parser.add_argument("--max-kept-per-user", type=int, default=DEFAULT_MAX_KEPT_PER_USER,
                        help="received results kept per user, the oldest received going first (default 100,000)")
    parser.add_argument("--secret-file", type=Path, default=None,
                        help="where to write the local secret (default $FEDEXEC_HOME/relays/<address>.secret)")
    parser.add_argument("--auth", choices=MODES, default="local",
                        help="local (a secret file, the default), token (per-user API tokens) or globus")
    parser.add_argument("--curve", action=argparse.BooleanOptionalAction, default=None,
                        help="encrypt connections with CURVE (default: when listening on anything but loopback)")
    parser.add_argument("--globus-client-id", default=os.environ.get("FEDEXEC_RELAY_GLOBUS_CLIENT_ID"),
                        help="the relay's Globus app (globus mode); its secret in "
                             "$FEDEXEC_RELAY_GLOBUS_CLIENT_SECRET")
    parser.add_argument("--globus-scope", default=None,
                        help="a scope every Globus token must carry (globus mode)")
    parser.add_argument("--http", type=int, default=None, metavar="PORT",
                        help="serve the web dashboard, /api/ and /metrics on this port (0: any free port)")
    parser.add_argument("--http-host", default="127.0.0.1",
                        help="the dashboard's host (default 127.0.0.1; another than loopback only in token or "
                             "globus mode)")
    parser.add_argument("--http-cert", default=None, metavar="PEM",
                        help="serve the dashboard over HTTPS with this certificate (chain); needed for a --http-host "
                             "other than loopback")
    parser.add_argument("--http-key", default=None, metavar="PEM", help="the private key of --http-cert")
    parser.add_argument("--endpoint", metavar="NAME", default=None,
                        help="also run this configured endpoint (fedexec endpoint configure NAME --relay ADDRESS) "
                             "inside the relay's process, on its loop: no hop between them (--auth local only)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-file", type=Path, default=None,
                        help="also log to this file (appended, private); a daemon's stderr already goes to its log")
    ns = parser.parse_args(argv)
    hosted = None
    if ns.endpoint is not None:   # (checked, its lock taken, before anything is made: a refusal leaves nothing)
        from ..colocated import configured_endpoint
        try:
            hosted = configured_endpoint(ns.endpoint, ns.address, ns.auth, hold=True)
        except ValueError as exc:
            parser.error(str(exc))
    configure_logging(ns.log_level, ns.log_file)
    if ns.result_ttl <= 0:
        parser.error("--result-ttl must be greater than 0 seconds")
    try:
        P.check_payload_limit(ns.max_payload)
    except ValueError as exc:
        parser.error(f"--max-payload: {exc}")
    if ns.function_grace < 0:
        parser.error("--function-grace must be 0 seconds or more")
    if not 0 <= ns.commit_window <= 1:
        parser.error("--commit-window must be between 0 and 1 second")
    for flag, value in (("--max-tasks-per-user", ns.max_tasks_per_user), ("--max-bytes-per-user",
                                                                          ns.max_bytes_per_user),
                        ("--max-endpoints-per-user", ns.max_endpoints_per_user),
                        ("--max-kept-per-user", ns.max_kept_per_user)):
        if value <= 0:
            parser.error(f"{flag} must be greater than 0")
    http = _dashboard_address(parser, ns)
    globus = None
    if ns.auth == "globus":
        secret = os.environ.get("FEDEXEC_RELAY_GLOBUS_CLIENT_SECRET")
        if not (ns.globus_client_id and secret):
            parser.error("--auth globus needs the relay's Globus app: --globus-client-id (or "
                         "$FEDEXEC_RELAY_GLOBUS_CLIENT_ID) and $FEDEXEC_RELAY_GLOBUS_CLIENT_SECRET")
        globus = GlobusTokenCheck(ns.globus_client_id, secret, scope=ns.globus_scope)
    try:
        relay = Relay(ns.address, ns.data_dir, parent_pid=ns.parent_pid, remove_on_exit=ns.remove_on_exit,
                      result_ttl=ns.result_ttl, max_payload=ns.max_payload, secret_file=ns.secret_file,
                      auth=ns.auth, curve=ns.curve, globus=globus,
                      max_tasks_per_user=ns.max_tasks_per_user, max_bytes_per_user=ns.max_bytes_per_user,
                      max_endpoints_per_user=ns.max_endpoints_per_user, function_grace=ns.function_grace,
                      commit_window=ns.commit_window, keep_acknowledged=ns.keep_results,
                      max_kept_per_user=ns.max_kept_per_user, http=http)
    except OSError as exc:   # the address is in use (AddressInUse names who by), or not this machine's
        sys.exit(f"fedexec relay: {exc.strerror or exc}")
    for_service()
    if hosted is None:
        relay.serve_forever()
        return
    from ..colocated import host_configured_endpoint
    code = host_configured_endpoint(relay, hosted, str(ns.secret_file) if ns.secret_file else None,
                                    ns.log_file or _stderr_file())
    if code:
        sys.exit(code)


def _stderr_file() -> Path | None:
    """The file this process's stderr is (a daemon's log: ``fedexec relay
    start --daemon``), if it is a file."""
    try:
        path = Path(os.readlink("/proc/self/fd/2"))
    except OSError:
        return None
    return path if path.is_file() else None


def _dashboard_address(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> tuple[Any, ...] | None:
    """(host, port, TLS context or None) of the dashboard asked for with --http, checked; None without it."""
    if ns.http is None:
        return None
    if not 0 <= ns.http <= 65535:
        parser.error(f"--http: {ns.http} is not a port (0-65535)")
    from .web import check_http_host, require_prometheus, tls_context
    try:
        tls = tls_context(ns.http_cert, ns.http_key)
        check_http_host(ns.http_host, ns.auth, tls is not None)
        require_prometheus()
    except (ValueError, ImportError) as exc:
        parser.error(f"--http: {exc}")
    return ns.http_host, ns.http, tls


if __name__ == "__main__":
    main()
