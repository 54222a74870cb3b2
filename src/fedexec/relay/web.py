"""The relay's web dashboard, JSON API and Prometheus metrics (``--http``).

An HTTP server on threads of its own (the standard library's: a handful
of read-only GET routes need no framework). It never touches the relay's
loop state: it reads the latest :class:`~.dashboard.Snapshot` the loop
published, filtered for the user who asks (:meth:`Snapshot.view`).

Routes, all GET and read-only (so no CSRF to guard against), all behind
the relay's own credentials:

- ``/`` the page (``/dashboard.js`` and ``/dashboard.css`` its script and
  style: plain JS polling the API); these hold no data and need no
  credentials. A browser signs in by opening ``/?token=TOKEN`` (or
  ``/#token=TOKEN``, which never reaches the server) once: the page's script
  moves the token into the tab's ``sessionStorage`` and takes it off the
  address (``history.replaceState``), then sends it as ``Authorization:
  Bearer`` on each ``/api/`` request. No cookie: ``sessionStorage`` belongs
  to this origin (scheme, host *and port*), so a web server on another port
  of the same host never receives or reads it, as it would a cookie (cookies
  ignore ports); and nothing is sent by the browser on its own, so another
  site's page cannot make requests with it. Opening ``/?token=`` changes
  nothing at the relay (no session is made), so a page that sends a victim's
  browser there with its own token (login CSRF) only shows, in the tab it
  opened, that token's own read-only view, named "signed in as" its user;
- ``/api/snapshot`` everything the page shows, as JSON; ``/api/endpoints``,
  ``/api/tasks``, ``/api/failures`` and ``/api/latency`` parts of it;
- ``/metrics`` Prometheus' text format (prometheus_client, a registry of
  our own per request, not the process-wide one).

Credentials: in local mode the relay's local secret; in token mode a user's
API token (``USER:ID.SECRET``); in globus mode a Globus bearer token; sent
as ``Authorization: Bearer ...`` by scripts. Anything else: 401, no data.

Bounded: at most MAX_CONNECTIONS requests at once (more get 503), a
request's line and headers together at most MAX_REQUEST_BYTES, sent within REQUEST_DEADLINE seconds, a socket
idle for SOCKET_TIMEOUT seconds is closed. The relay keeps no browser
sessions: each request's credentials are checked as the relay's ZeroMQ side
checks them (a revoked token stops working at once).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .. import protocol as P
from .access import LOCAL_USER, AccessControl, Session
from .dashboard import DashboardFeed, Snapshot
from .dashboard_page import PAGE_CSS, PAGE_HTML, PAGE_JS

log = logging.getLogger("fedexec.relay.web")

MAX_CONNECTIONS = 16
MAX_REQUEST_BYTES = 16 * 1024
SOCKET_TIMEOUT = 10.0
REQUEST_DEADLINE = 10.0      # seconds a connection has to send its whole request line and headers
_SECRET_IN_QUERY = re.compile(r"token=[^ &]*")   # what a log line never shows
EXTRA = "pip install 'fedexec[dashboard]'"


def check_http_host(host: str, auth: str, tls: bool = False) -> None:
    """ValueError unless the dashboard may listen on ``host``: loopback
    always; another host only with real per-user authentication (token or
    globus mode), since in local mode the only credential is the relay's
    local secret, meant for its owner's processes on this machine, and only
    over TLS (``tls``: --http-cert and --http-key given), since every
    request carries its user's token."""
    if P.is_loopback(f"tcp://{host}:0"):
        return
    if auth == "local":
        raise ValueError(f"the dashboard listens on {host!r}, not loopback, only with real authentication "
                         f"(--auth token or --auth globus): this relay runs in local mode, whose only credential "
                         f"is its local secret (use --http-host 127.0.0.1, or --auth token)")
    if not tls:
        raise ValueError(f"the dashboard listens on {host!r}, not loopback, only over TLS: every request carries "
                         f"its user's token, which would cross the network in clear. Give --http-cert CERT.pem and "
                         f"--http-key KEY.pem (or use --http-host 127.0.0.1)")


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The dashboard's TLS settings from --http-cert and --http-key (PEM
    files: the certificate chain, its private key), or None without them;
    ValueError naming the problem (one without the other, unreadable, not a
    certificate and its key)."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("--http-cert and --http-key go together: the certificate (PEM) and its private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ValueError(f"--http-cert/--http-key: no such file: {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"--http-cert {cert} and --http-key {key} are not a PEM certificate and its private "
                         f"key: {exc}") from None
    return context


def require_prometheus() -> None:
    """ImportError saying what to install when prometheus_client is missing."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ImportError(f"the relay's dashboard (--http) needs prometheus_client: {EXTRA}") from None


class DashboardServer(ThreadingHTTPServer):
    """The HTTP server; :meth:`start` runs it on a thread, :meth:`stop` ends it."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, feed: DashboardFeed, access: AccessControl, host: str, port: int,
                 tls: ssl.SSLContext | None = None) -> None:
        check_http_host(host, access.mode, tls is not None)
        require_prometheus()
        self.tls = tls
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.feed = feed
        self.access = access
        self.loopback = P.is_loopback(f"tcp://{host}:0")
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _Handler)
        if tls is not None:   # the handshake happens in the request's thread, bounded by its socket timeout
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        self.port = self.server_address[1]
        bracket = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if tls is not None else 'http'}://{bracket}:{self.port}/"

    # -- credentials -------------------------------------------------------------
    def check_credential(self, credential: str) -> Session | str:
        """The session a bearer token opens, or why it opens none, as the
        relay's ZeroMQ side checks the same credentials (access.py)."""
        if not credential or len(credential) > 8192:
            return "no credentials"
        mode = self.access.mode
        if mode == "local":
            return self.access.check(LOCAL_USER, credential)
        if mode == "token":
            user, sep, secret = credential.partition(":")
            if not sep:
                return "a token is USER:ID.SECRET"
            return self.access.check(user, secret)
        return self.access.check("", credential)   # globus: checked (and cached) by introspection

    # -- bounded concurrency -----------------------------------------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                if self.tls is not None:   # (no answer without a handshake, which this thread must not wait for)
                    raise OSError("busy")
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n"
                                b"Retry-After: 1\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("dashboard request from %s failed", client_address, exc_info=True)

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.25},
                                        name="fedexec-dashboard", daemon=True)
        self._thread.start()
        log.info("dashboard on %s", self.url)

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
        self.server_close()


class _LimitedReader:
    """A request's input, cut off (as if the peer closed) past MAX_REQUEST_BYTES:
    a GET has no body, so its line and headers are all there is to read."""

    def __init__(self, raw: Any, connection: socket.socket) -> None:
        self.raw = raw
        self.connection = connection
        self.left = MAX_REQUEST_BYTES
        self.exceeded = False
        # one deadline for the whole request, not one per read: a client sending a header
        # line now and then cannot hold a connection slot for ever
        self.deadline = time.monotonic() + REQUEST_DEADLINE

    def readline(self, size: int = -1) -> bytes:
        limit = self.left if size is None or size < 0 else min(size, self.left)
        remaining = self.deadline - time.monotonic()
        if limit <= 0 or remaining <= 0:
            self.exceeded = True
            return b""
        self.connection.settimeout(remaining)
        line = self.raw.readline(limit)
        self.left -= len(line)
        if self.left <= 0 and not line.endswith(b"\n"):
            self.exceeded = True
        return line

    def read(self, size: int = -1) -> bytes:
        limit = self.left if size is None or size < 0 else min(size, self.left)
        data = self.raw.read(limit) if limit > 0 else b""
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.raw.close()


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    timeout = SOCKET_TIMEOUT
    protocol_version = "HTTP/1.1"
    server_version = "fedexec-relay"
    sys_version = ""

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        super().setup()
        self.rfile = _LimitedReader(self.rfile, self.connection)  # type: ignore[assignment]

    def log_message(self, format: str, *args: Any) -> None:   # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), _SECRET_IN_QUERY.sub("token=...", format % args))

    # -- methods -------------------------------------------------------------------
    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _not_allowed(self) -> None:
        self._reply(405, b"the dashboard is read-only: GET only\n", "text/plain", extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    # -- routing -------------------------------------------------------------------
    def _serve(self, head: bool = False) -> None:
        self.head = head
        if self.rfile.exceeded:  # type: ignore[attr-defined]
            self.close_connection = True
            self._reply(431, f"a request's line and headers are limited to {MAX_REQUEST_BYTES:,} bytes\n".encode(),
                        "text/plain")
            return
        if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True
            self._reply(400, b"a request to the dashboard has no body\n", "text/plain")
            return
        if self.server.loopback and not self._host_is_loopback():
            # a page elsewhere reaching this port through a name rebound to 127.0.0.1
            self._reply(421, b"this dashboard answers to a loopback host name only\n", "text/plain")
            return
        parts = urlsplit(self.path)
        path = parts.path
        try:
            query = parse_qs(parts.query, max_num_fields=8)
        except ValueError:
            self._reply(400, b"at most 8 query fields\n", "text/plain")
            return
        if path == "/favicon.ico":   # (browsers ask for it; there is none)
            self._reply(204, b"", "image/x-icon")
            return
        if path == "/" and "token" in query and self._checked(query["token"][0]) is None:
            self._refuse()   # (a wrong token in the address is told at once; a right one changes nothing here)
            return
        static = _STATIC.get(path)
        if static is not None:   # the page, its script and style: no data, so no credentials
            self._reply(200, static[0], static[1])
            return
        session = self._session()
        if session is None:
            self._refuse()
            return
        if path == "/metrics":
            self._metrics(session)
        elif path.startswith("/api/"):
            self._api(path[5:], session)
        else:
            self._reply(404, b"not found\n", "text/plain")

    def _host_is_loopback(self) -> bool:
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]")
        if name == "localhost":
            return True
        try:   # an address, not a name that merely starts like one (127.attacker.example)
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    def _session(self) -> Session | None:
        """Who sent this request: its ``Authorization: Bearer`` credentials
        checked (the only way in; cookies are ignored), or None."""
        scheme, _, credential = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self._checked(credential.strip())

    def _checked(self, credential: str) -> Session | None:
        answer = self.server.check_credential(credential)
        return None if isinstance(answer, str) or answer.problem(time.time()) else answer

    def _refuse(self) -> None:
        # (no delay: tokens are 256-bit, and sleeping would hold a connection slot)
        self._reply(401, b"sign in: open /?token=TOKEN (or /#token=TOKEN) in a browser, or send 'Authorization: Bearer TOKEN' "
                         b"(the relay's local secret in local mode, an API token in token mode, a Globus token "
                         b"in globus mode)\n", "text/plain", extra={"WWW-Authenticate": 'Bearer realm="fedexec"'})

    def _snapshot(self, session: Session) -> dict[str, Any] | None:
        snapshot: Snapshot | None = self.server.feed.latest
        if snapshot is None:
            self._reply(503, b"the relay has not published its first snapshot yet\n", "text/plain",
                        extra={"Retry-After": "1"})
            return None
        return snapshot.view(session.user, session.groups)

    def _api(self, name: str, session: Session) -> None:
        keys = {"snapshot": None, "endpoints": ("time", "endpoints"), "tasks": ("time", "tasks", "rates"),
                "failures": ("time", "failures"), "latency": ("time", "latency", "duration")}
        if name not in keys:
            self._reply(404, f"no /api/{name[:64]}: there are {', '.join('/api/' + k for k in keys)}\n".encode(),
                        "text/plain")
            return
        view = self._snapshot(session)
        if view is None:
            return
        wanted = keys[name]
        body = view if wanted is None else {key: view[key] for key in wanted}
        self._reply(200, json.dumps(body).encode(), "application/json")

    def _metrics(self, session: Session) -> None:
        view = self._snapshot(session)
        if view is None:
            return
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from prometheus_client.registry import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_ViewCollector(view))
        self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    def _reply(self, code: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        # one request per connection: an idle keep-alive connection a browser keeps open
        # would hold one of the MAX_CONNECTIONS slots until its timeout
        self.close_connection = True
        self.send_response(code)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not getattr(self, "head", False):
            self.wfile.write(body)


_STATIC = {"/": (PAGE_HTML.encode(), "text/html; charset=utf-8"),
           "/dashboard.js": (PAGE_JS.encode(), "text/javascript; charset=utf-8"),
           "/dashboard.css": (PAGE_CSS.encode(), "text/css; charset=utf-8")}


class _ViewCollector:
    """One user's view of a snapshot as Prometheus metric families."""

    def __init__(self, view: dict[str, Any]) -> None:
        self.view = view

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        view = self.view
        tasks = CounterMetricFamily("fedexec_tasks", "Tasks finished since the relay started, by outcome",
                                    labels=["state"])
        for state, count in view["tasks"]["counts"].items():
            tasks.add_metric([state], count)
        yield tasks
        yield GaugeMetricFamily("fedexec_tasks_in_flight", "Tasks accepted and not finished yet",
                                value=view["tasks"]["in_flight"])
        duration = view["duration"]
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, duration["buckets"]), "+Inf"], duration["counts"]):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily("fedexec_task_duration_seconds",
                                    "Seconds from a traced task's arrival at the relay to its result's",
                                    buckets=buckets, sum_value=duration["sum"])
        labels = ["endpoint", "name"]
        up = GaugeMetricFamily("fedexec_endpoint_up", "1 while the endpoint is connected", labels=labels)
        depth = GaugeMetricFamily("fedexec_queue_depth", "Tasks waiting for a worker: at the relay and at the "
                                  "endpoint", labels=labels)
        workers = GaugeMetricFamily("fedexec_workers", "Workers of the endpoint, by state",
                                    labels=[*labels, "state"])
        running = GaugeMetricFamily("fedexec_endpoint_tasks", "Tasks sent to the endpoint and not finished",
                                    labels=labels)
        for e in view["endpoints"]:
            key = [e["id"], e["name"]]
            up.add_metric(key, 1 if e["status"] == "online" else 0)
            depth.add_metric(key, e["queued_at_relay"] + (e["queued_at_endpoint"] or 0))
            if e["busy_workers"] is not None:   # (None: a shared endpoint's, its owner's only: endpoint_view.py)
                workers.add_metric([*key, "busy"], e["busy_workers"])
                workers.add_metric([*key, "idle"], e["idle_workers"])
            running.add_metric(key, e["at_endpoint"])
        yield from (up, depth, workers, running)
        yield GaugeMetricFamily("fedexec_relay_store_backlog", "Rows waiting for the relay's record writer",
                                value=view["relay"]["store_backlog"])
