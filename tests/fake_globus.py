"""A fake Globus Auth + Groups service on loopback, for offline tests.

The real globus-sdk is pointed at it through its service-URL variables, so
the SDK's own request/response code runs unchanged::

    with FakeGlobusAuth() as fake:
        for k, v in fake.env().items():
            monkeypatch.setenv(k, v)
        fake.add_client(RELAY_ID, RELAY_SECRET)
        fake.add_user("alice@example.org", groups=[GID])
        tok = fake.issue_token("alice@example.org", scope=RELAY_SCOPE)

globus-sdk resolves ``GLOBUS_SDK_SERVICE_URL_<SERVICE>`` when a client is
*constructed*, so set the variables before building clients. Both services
live at the server root, because the SDK's paths already carry ``/v2/...``
(auth: ``/v2/oauth2/...``; groups: ``/v2/groups/my_groups``).
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import re
import secrets
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

GROUPS_RS = "groups.api.globus.org"
GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"
DEPENDENT_GRANT = "urn:globus:auth:grant_type:dependent_token"
CLIENT_DOMAIN = "@clients.auth.globus.org"


def resource_server_of(scope: str) -> str:
    """The resource server a Globus scope string belongs to."""
    if m := re.match(r"urn:globus:auth:scope:([^:]+):", scope):
        return m.group(1)
    if m := re.match(r"https://auth\.globus\.org/scopes/([^/]+)/", scope):
        return m.group(1)
    return "auth.globus.org"  # openid, profile, email, ...


def split_scopes(scopes: str) -> list[str]:
    """Top-level scopes of a scope string; dependent ``[...]`` parts dropped."""
    out, depth, cur = [], 0, ""
    for ch in scopes + " ":
        depth += (ch == "[") - (ch == "]")
        if ch == " " and depth == 0:
            if cur:
                out.append(re.sub(r"\[.*\]", "", cur))
            cur = ""
        else:
            cur += ch
    return out


class _OAuthError(Exception):
    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


class FakeGlobusAuth:
    """In-memory Globus Auth/Groups on ``127.0.0.1:<ephemeral>``; a context manager."""

    def __init__(self) -> None:
        self.clients: dict[str, str | None] = {}  # client_id -> secret (None: native app)
        self.users: dict[str, dict] = {}  # username -> identity
        self.groups: dict[str, str] = {}  # group id -> name
        self.tokens: dict[str, dict] = {}  # access token -> record
        self.refresh_tokens: dict[str, dict] = {}  # refresh token -> grant
        self.codes: dict[str, dict] = {}  # authorization code -> grant
        self.calls: collections.Counter[str] = collections.Counter()
        self.failures: dict[str, list[int]] = {}  # path -> statuses to answer next
        self.delays: dict[str, float] = {}  # token -> seconds its requests wait before an answer
        self.released = threading.Event()  # set: delayed requests are answered at once
        self.login_as: str | None = None  # user who "consents" at /v2/oauth2/authorize
        self.lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    # ---- lifecycle -------------------------------------------------------
    def env(self) -> dict[str, str]:
        return {"GLOBUS_SDK_SERVICE_URL_AUTH": self.url + "/",
                "GLOBUS_SDK_SERVICE_URL_GROUPS": self.url + "/"}

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeGlobusAuth:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- model -----------------------------------------------------------
    def add_client(self, client_id: str, secret: str | None = None) -> str:
        """Register a client; ``secret=None`` makes it a native (public) app."""
        self.clients[str(client_id)] = secret
        return str(client_id)

    def add_group(self, group_id: str, name: str | None = None) -> str:
        self.groups[str(group_id)] = name or f"group-{str(group_id)[:8]}"
        return str(group_id)

    def add_user(self, username: str, sub: str | None = None, groups=(), *,
                 name: str | None = None, email: str | None = None, linked=()) -> str:
        """Add an identity (``linked``: other identity ids in its identity_set)."""
        sub = str(sub or uuid.uuid4())
        self.users[username] = {"sub": sub, "groups": [],
                                "name": name or username.split("@")[0], "email": email or username,
                                "identity_set": [sub, *map(str, linked)]}
        self.set_groups(username, groups)
        return sub

    def set_groups(self, username: str, groups) -> None:
        """Replace a user's group memberships (e.g. to test a removed member)."""
        for g in groups:
            if str(g) not in self.groups:
                self.add_group(g)
        self.users[username]["groups"] = [str(g) for g in groups]

    def add_auth_code(self, code: str, username: str, scope: str = GROUPS_SCOPE,
                      client_id: str | None = None, refresh: bool = True) -> str:
        """Pre-register an authorization code. The PKCE code_challenge only goes
        into the authorize URL (browser side), so for such codes any
        code_verifier is accepted; codes minted by GET /v2/oauth2/authorize
        (see ``login_as``) do check the verifier."""
        self.codes[code] = {"username": username, "scope": scope, "client_id": client_id,
                            "challenge": None, "offline": refresh}
        return code

    def _identity(self, username: str) -> dict:
        if username in self.users:
            return self.users[username]
        if username.endswith(CLIENT_DOMAIN):  # a client identity's id is its client id
            cid = username[: -len(CLIENT_DOMAIN)]
            return {"sub": cid, "groups": [], "name": cid, "email": None, "identity_set": [cid]}
        raise KeyError(f"unknown user {username!r}")

    def issue_token(self, username: str, lifetime: float = 3600, scope: str = GROUPS_SCOPE,
                    aud: list[str] | None = None, client_id: str | None = None) -> str:
        """Mint an access token. ``aud`` defaults to the scope's resource server(s);
        ``client_id`` (the requesting app) to the first registered client."""
        ident, now, tok = self._identity(username), int(time.time()), secrets.token_urlsafe(32)
        scopes = split_scopes(scope)
        with self.lock:
            self.tokens[tok] = {
                "active": True, "scope": " ".join(scopes), "sub": ident["sub"], "username": username,
                "client_id": client_id or next(iter(self.clients), str(uuid.uuid4())),
                "aud": list(aud) if aud is not None else sorted({resource_server_of(s) for s in scopes}),
                "exp": int(now + lifetime), "iat": now, "nbf": now, "name": ident["name"],
                "email": ident["email"], "identity_set": list(ident["identity_set"])}
        return tok

    def revoke(self, token: str) -> None:
        with self.lock:
            if token in self.tokens:
                self.tokens[token]["active"] = False
            self.refresh_tokens.pop(token, None)

    def expire(self, token: str) -> None:
        self.tokens[token]["exp"] = int(time.time()) - 1

    def fail(self, path: str, status: int = 503, times: int = 1) -> None:
        """Answer the next ``times`` requests to ``path`` with ``status``.
        (globus-sdk retries 429/500/502/503/504 itself, with backoff.)"""
        self.failures.setdefault(path, []).extend([status] * times)

    def slow(self, token: str, seconds: float) -> None:
        """Answer the introspection of ``token`` only after
        ``seconds``, as a slow or hung Globus Auth would; other requests are
        served meanwhile. :meth:`release` answers them at once."""
        self.delays[token] = seconds

    def release(self) -> None:
        self.delays.clear()
        self.released.set()

    def active_record(self, token: str) -> dict | None:
        rec = self.tokens.get(token)
        if rec and rec["active"] and rec["exp"] > time.time():
            return rec
        return None

    # ---- protocol --------------------------------------------------------
    def _authenticate(self, headers, form: dict, required: bool) -> str | None:
        """The calling client: HTTP Basic, or a native app's form client_id."""
        auth = headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                cid, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            except Exception:
                cid, secret = "", ""
            if cid in self.clients and self.clients[cid] is not None \
                    and secrets.compare_digest(self.clients[cid], secret):
                return cid
            raise _OAuthError(401, "invalid_client", "Invalid client credentials")
        cid = form.get("client_id")
        if required or cid is None or cid not in self.clients or self.clients[cid] is not None:
            raise _OAuthError(401, "invalid_client", "Call must be authenticated")
        return cid

    def _token_set(self, username: str, scope: str, client_id: str, offline: bool) -> list[dict]:
        """One token dict per resource server, as in the Auth token response."""
        by_rs: dict[str, list[str]] = {}
        for s in split_scopes(scope):
            by_rs.setdefault(resource_server_of(s), []).append(s)
        out = []
        for rs, scopes in by_rs.items():
            sc = " ".join(scopes)
            d = {"access_token": self.issue_token(username, 172800, sc, [rs], client_id),
                 "scope": sc, "resource_server": rs, "expires_in": 172800, "token_type": "Bearer"}
            if offline:
                d["refresh_token"] = rt = secrets.token_urlsafe(32)
                self.refresh_tokens[rt] = {"username": username, "scope": sc, "client_id": client_id}
            out.append(d)
        return out

    def _token(self, headers, form: dict):
        grant = form.get("grant_type")
        if grant == "authorization_code":
            cid = self._authenticate(headers, form, required=False)
            code = self.codes.pop(form.get("code", ""), None)
            if code is None or code["client_id"] not in (None, cid):
                raise _OAuthError(400, "invalid_grant", "Invalid authorization code")
            if code["challenge"] is not None:
                v = form.get("code_verifier", "").encode()
                if base64.urlsafe_b64encode(hashlib.sha256(v).digest()).rstrip(b"=").decode() \
                        != code["challenge"]:
                    raise _OAuthError(400, "invalid_grant", "code_verifier mismatch")
            toks = self._token_set(code["username"], code["scope"], cid, code["offline"])
        elif grant == "refresh_token":
            cid = self._authenticate(headers, form, required=False)
            rt = self.refresh_tokens.get(form.get("refresh_token", ""))
            if rt is None or rt["client_id"] != cid:
                raise _OAuthError(400, "invalid_grant", "Invalid refresh token")
            toks = self._token_set(rt["username"], rt["scope"], cid, False)
            toks[0]["refresh_token"] = form["refresh_token"]
        elif grant == "client_credentials":
            cid = self._authenticate(headers, form, required=True)
            toks = self._token_set(cid + CLIENT_DOMAIN, form.get("scope", ""), cid, False)
        elif grant == DEPENDENT_GRANT:
            cid = self._authenticate(headers, form, required=True)
            rec = self.active_record(form.get("token", ""))
            if rec is None or cid not in rec["aud"]:  # only the token's resource server may
                raise _OAuthError(400, "invalid_grant", "Token is invalid for this client")
            return self._token_set(rec["username"], form.get("scope") or GROUPS_SCOPE, cid,
                                   form.get("access_type") == "offline")
        else:
            raise _OAuthError(400, "unsupported_grant_type", f"grant_type {grant!r}")
        if not toks:
            raise _OAuthError(400, "invalid_scope", "No scopes requested")
        return {**toks[0], "state": form.get("state", "_default"), "other_tokens": toks[1:]}

    def _introspect(self, headers, form: dict) -> dict:
        self._authenticate(headers, form, required=True)
        rec = self.active_record(form.get("token", ""))
        if rec is None:
            return {"active": False}
        body = {k: v for k, v in rec.items() if k != "identity_set"}
        body.update(token_type="Bearer", iss="https://auth.globus.org")
        if "identity_set" in form.get("include", "").split(","):
            body["identity_set"] = rec["identity_set"]
        return body

    def _authorize(self, query: dict) -> str:
        """Stand-in for the browser login+consent: mint a code for ``login_as``."""
        if self.login_as is None or query.get("client_id") not in self.clients:
            raise _OAuthError(400, "invalid_request", "no login_as user / unknown client")
        code = secrets.token_urlsafe(16)
        self.codes[code] = {"username": self.login_as, "scope": query.get("scope", ""),
                            "client_id": query["client_id"], "challenge": query.get("code_challenge"),
                            "offline": query.get("access_type") == "offline"}
        sep = "&" if "?" in query["redirect_uri"] else "?"
        return query["redirect_uri"] + sep + urlencode({"code": code, "state": query.get("state", "")})

    def _my_groups(self, headers) -> list[dict]:
        auth = headers.get("Authorization", "")
        rec = self.active_record(auth[7:]) if auth.startswith("Bearer ") else None
        if rec is None or GROUPS_RS not in rec["aud"]:
            raise _OAuthError(401, "UNAUTHORIZED", "Invalid or missing groups token")
        ident = self._identity(rec["username"])
        return [{"id": g, "name": self.groups[g], "parent_id": None, "group_type": "regular",
                 "enforce_session": False, "session_limit": 28800, "session_timeouts": {},
                 "policies": {"group_visibility": "private", "group_members_visibility": "managers"},
                 "my_memberships": [{"group_id": g, "identity_id": ident["sub"], "role": "member",
                                     "username": rec["username"], "status": "active"}]}
                for g in ident["groups"]]


def _make_handler(fake: FakeGlobusAuth):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, body, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _dispatch(self, method: str) -> None:
            parts = urlsplit(self.path)
            path, query = parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()}
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n).decode() if n else ""
            form = {k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()}
            delay = fake.delays.get(form.get("token", "")) if path.endswith("/introspect") else None
            if delay:
                fake.released.wait(delay)
            with fake.lock:
                fake.calls[path] += 1
                pending = fake.failures.get(path)
                status = pending.pop(0) if pending else None
            if status is not None:
                return self._send(status, {"error": "fake_failure", "errors": [
                    {"status": str(status), "code": "FAKE_FAILURE", "detail": "injected"}]})
            try:
                with fake.lock:
                    status, body, headers = self._route(method, path, query, form)
            except _OAuthError as e:
                title = {400: "Bad Request", 401: "Unauthorized"}.get(e.status, "Error")
                status, headers, body = e.status, {}, {"error": e.error, "errors": [
                    {"id": str(uuid.uuid4()), "status": str(e.status), "code": e.error.upper(),
                     "title": title, "detail": e.detail}]}
            self._send(status, body, headers)

        def _route(self, method: str, path: str, query: dict, form: dict):
            route = (method, path)
            if route == ("POST", "/v2/oauth2/token/introspect"):
                return 200, fake._introspect(self.headers, form), {}
            if route == ("POST", "/v2/oauth2/token"):
                return 200, fake._token(self.headers, form), {}
            if route == ("POST", "/v2/oauth2/token/revoke"):
                fake._authenticate(self.headers, form, required=False)
                fake.revoke(form.get("token", ""))
                return 200, {"active": False}, {}
            if route == ("GET", "/v2/oauth2/authorize"):
                return 302, {}, {"Location": fake._authorize(query)}
            if route == ("GET", "/v2/groups/my_groups"):
                return 200, fake._my_groups(self.headers), {}
            return 404, {"errors": [{"status": "404", "code": "NOT_FOUND",
                                     "detail": f"{method} {path}"}]}, {}

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

    return Handler
