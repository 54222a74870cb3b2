"""Who is talking to the relay: authentication modes, sessions, the ZAP handler.

A relay runs in one of three modes (``fedexec relay start --auth MODE``):

- ``local``: one random secret, kept in a file only the relay's user can
  read; every holder of it is the user ``local``.
- ``token``: per-user API tokens (``fedexec relay add-user``, ``fedexec
  token create``), kept hashed in ``access.sqlite3`` beside the record, and
  revocable: a revoked token's live sessions end within a second.
- ``globus``: Globus Auth bearer tokens, checked by token introspection
  (globus-sdk) and cached until they expire (or ``recheck`` seconds).

Credentials arrive in one of two ways. Over a plain connection, in the
ZeroMQ PLAIN handshake, checked here by the relay's ZAP handler thread
before any message flows. Over a CURVE (encrypted) connection, where the
handshake carries only the client's public key, as connection metadata
(``X-Fedexec-Auth``, sent encrypted) checked at the connection's first
message. Either way the check makes a :class:`Session`, found again for
every message by the ``User-Id`` ZeroMQ attaches to it, so that a
session revoked or expired mid-way is refused at its next message.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import sqlite3
import threading
import time
from pathlib import Path
import zmq

from ..auth import AUTH_MODES as MODES
from ..auth import AUTH_PROPERTY, LOCAL_USER, write_secret_value
from ..private import create_private_file, private_dir

log = logging.getLogger("fedexec.relay.access")

USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$")
GLOBUS_RECHECK = 600.0               # seconds a Globus introspection answer is trusted at most
GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
CURVE_IDLE = 3600.0                  # seconds after which a silent CURVE connection's session is forgotten


class AccessDenied(Exception):
    """A connection or message the relay refuses; the message says why."""


class Session:
    """One authenticated identity: a user, and until when it holds."""

    __slots__ = ("user", "token_id", "expires", "groups", "ended", "seen")

    def __init__(self, user: str, *, token_id: str | None = None, expires: float | None = None,
                 groups: frozenset[str] = frozenset()) -> None:
        self.user = user
        self.token_id = token_id
        self.expires = expires       # time.time() after which it no longer holds
        self.groups = groups         # Globus group ids the user belongs to
        self.ended: str | None = None
        self.seen = 0.0              # time.time() of its latest message

    def problem(self, now: float) -> str | None:
        self.seen = now
        if self.ended:
            return self.ended
        if self.expires is not None and now >= self.expires:
            return f"the credentials of user {self.user!r} expired"
        return None


# -- token mode ---------------------------------------------------------------
TOKEN_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users(name),
    hash BLOB NOT NULL,
    created REAL NOT NULL,
    expires REAL,
    revoked REAL
);
"""


def check_user_name(name: str) -> None:
    if not USER_NAME.match(name or ""):
        raise ValueError(f"invalid user name {name!r}: use 1-128 letters, digits, '.', '_', '@', '+' or '-'")


class TokenBook:
    """Users and their API tokens (``access.sqlite3``): only a hash of each
    token is kept, so a copy of the file grants nothing."""

    def __init__(self, data_dir: Path) -> None:
        private_dir(data_dir)
        self.path = create_private_file(data_dir / "access.sqlite3")   # before SQLite makes its WAL and SHM
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(TOKEN_SCHEMA)
        self._lock = threading.Lock()   # the ZAP thread and the relay loop share the connection

    @staticmethod
    def _hash(secret: str) -> bytes:
        return hashlib.sha256(secret.encode()).digest()

    def add_user(self, name: str) -> None:
        check_user_name(name)
        with self._lock:
            if self.db.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone():
                raise ValueError(f"user {name!r} already exists")
            self.db.execute("INSERT INTO users VALUES (?,?)", (name, time.time()))

    def users(self) -> list[str]:
        with self._lock:
            return [row[0] for row in self.db.execute("SELECT name FROM users ORDER BY name")]

    def create_token(self, user: str, lifetime: float | None = None) -> str:
        """A new token for ``user``, as it is to be presented:
        ``user:ID.SECRET``. Only its hash is kept."""
        with self._lock:
            if not self.db.execute("SELECT 1 FROM users WHERE name=?", (user,)).fetchone():
                raise ValueError(f"no user {user!r}: add it first with 'fedexec relay add-user {user}'")
            token_id, secret = secrets.token_hex(4), secrets.token_urlsafe(32)
            expires = time.time() + lifetime if lifetime else None
            self.db.execute("INSERT INTO tokens VALUES (?,?,?,?,?,NULL)",
                            (token_id, user, self._hash(secret), time.time(), expires))
        return f"{user}:{token_id}.{secret}"

    def revoke(self, token: str) -> str:
        """Revoke a token given by its id or in full; returns its id."""
        token_id = token.partition(":")[2].partition(".")[0] if ":" in token else token.partition(".")[0]
        with self._lock:
            cur = self.db.execute("UPDATE tokens SET revoked=? WHERE id=? AND revoked IS NULL",
                                  (time.time(), token_id))
            if cur.rowcount == 0:
                known = self.db.execute("SELECT 1 FROM tokens WHERE id=?", (token_id,)).fetchone()
                raise ValueError(f"token {token_id!r} was already revoked" if known else f"no token {token_id!r}")
        return token_id

    def tokens(self) -> list[tuple[str, str, float, float | None, float | None]]:
        """(id, user, created, expires, revoked) of every token."""
        with self._lock:
            return list(self.db.execute("SELECT id, user, created, expires, revoked FROM tokens ORDER BY created"))

    def check(self, user: str, presented: str) -> Session | str:
        """The session ``user:presented`` opens, or why it opens none."""
        token_id, _, secret = presented.partition(".")
        with self._lock:
            row = self.db.execute("SELECT user, hash, expires, revoked FROM tokens WHERE id=?",
                                  (token_id,)).fetchone()
        if row is None or row[0] != user or not hmac.compare_digest(row[1], self._hash(secret)):
            return f"wrong token for user {user!r}"
        if row[3] is not None:
            return f"the token {token_id} of user {user!r} was revoked"
        if row[2] is not None and row[2] <= time.time():
            return f"the token {token_id} of user {user!r} expired"
        return Session(user, token_id=token_id, expires=row[2])

    def revoked_since(self, since: float) -> set[str]:
        """Ids of the tokens revoked at or after ``since`` (a time.time())."""
        with self._lock:
            return {row[0] for row in self.db.execute("SELECT id FROM tokens WHERE revoked >= ?", (since,))}

    def close(self) -> None:
        self.db.close()


# -- globus mode --------------------------------------------------------------
class GlobusTokenCheck:
    """Checks Globus Auth bearer tokens by introspection, as the relay's own
    (confidential) Globus app; answers are cached until the token expires or
    ``recheck`` seconds pass, whichever is first."""

    def __init__(self, client_id: str, client_secret: str, *, scope: str | None = None,
                 recheck: float = GLOBUS_RECHECK) -> None:
        import globus_sdk

        self.client_id = client_id
        self.client = globus_sdk.ConfidentialAppAuthClient(client_id, client_secret)
        self.scope = scope
        self.recheck = recheck
        self._cache: dict[bytes, tuple[float, Session | str]] = {}
        self._lock = threading.Lock()

    def check(self, token: str) -> Session | str:
        key = hashlib.sha256(token.encode()).digest()
        now = time.time()
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and now < cached[0]:
            answer = cached[1]
            return Session(answer.user, expires=answer.expires, groups=answer.groups) \
                if isinstance(answer, Session) else answer
        answer, until = self._introspect(token, now)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (until, answer)
        return answer

    def _introspect(self, token: str, now: float) -> tuple[Session | str, float]:
        import globus_sdk

        try:
            info = self.client.oauth2_token_introspect(token, include="identity_set")
        except globus_sdk.GlobusAPIError as exc:
            log.error("Globus token introspection failed: %s", exc)
            return f"the relay could not check the Globus token ({exc.http_status})", now + 5
        except globus_sdk.NetworkError as exc:
            log.error("Globus Auth is unreachable: %s", exc)
            return "the relay could not reach Globus Auth to check the token", now + 5
        if not info.get("active"):
            return "the Globus token is not active (expired or revoked)", now + self.recheck
        scopes = str(info.get("scope") or "").split()
        if self.scope and self.scope not in scopes:
            return f"the Globus token does not carry the relay's scope {self.scope}", now + self.recheck
        audience = info.get("aud") or []
        if audience and self.client_id not in audience:
            return "the Globus token was not issued for this relay", now + self.recheck
        user = str(info.get("username") or info.get("sub") or "")
        if not user:
            return "the Globus token names no identity", now + self.recheck
        expires = float(info.get("exp") or now + self.recheck)
        session = Session(user, expires=expires, groups=self._groups(token))
        return session, min(expires, now + self.recheck)

    def _groups(self, token: str) -> frozenset[str]:
        """The Globus groups of the token's user, through a dependent token
        for the Groups service; empty if the token does not allow it."""
        import globus_sdk

        try:
            dependent = self.client.oauth2_get_dependent_tokens(token).by_resource_server
            groups_token = dependent.get(GROUPS_RESOURCE_SERVER)
            if not groups_token:
                return frozenset()
            groups = globus_sdk.GroupsClient(
                authorizer=globus_sdk.AccessTokenAuthorizer(groups_token["access_token"])).get_my_groups()
            return frozenset(str(group["id"]) for group in groups)
        except (globus_sdk.GlobusAPIError, globus_sdk.NetworkError) as exc:
            log.warning("could not read the Globus groups of a user: %s", exc)
            return frozenset()


# -- the relay's view ---------------------------------------------------------
class AccessControl:
    """Checks credentials in the relay's mode and keeps the sessions they
    opened, keyed by the ``User-Id`` ZeroMQ stamps on each message."""

    def __init__(self, mode: str, *, local_secret: str, tokens: TokenBook | None = None,
                 globus: GlobusTokenCheck | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown authentication mode {mode!r}: use one of {', '.join(MODES)}")
        if mode == "token" and tokens is None:
            raise ValueError("token mode needs the relay's token book")
        if mode == "globus" and globus is None:
            raise ValueError("globus mode needs the relay's Globus app credentials")
        self.mode = mode
        self.local_secret = local_secret
        self.tokens = tokens
        self.globus = globus
        self.sessions: dict[str, Session] = {}
        self.refused: dict[str, str] = {}      # CURVE connections whose credentials failed
        self._revocations_read = 0.0           # revocations before this time were acted on

    def check(self, user: str, password: str) -> Session | str:
        """The session these credentials open, or why they open none."""
        if self.mode == "local":
            if user == LOCAL_USER and hmac.compare_digest(password.encode(), self.local_secret.encode()):
                return Session(LOCAL_USER)
            return f"wrong credentials for user {user!r}"
        if self.mode == "token":
            assert self.tokens is not None
            return self.tokens.check(user, password)
        assert self.globus is not None
        return self.globus.check(password)

    def open(self, user: str, password: str) -> tuple[str | None, str]:
        """Check credentials presented in a handshake: the new session's key
        (the User-Id of its messages), or None and why."""
        answer = self.check(user, password)
        if isinstance(answer, str):
            return None, answer
        if answer.token_id:
            key = f"{answer.user}/{answer.token_id}"
        elif self.mode == "globus":
            key = f"{answer.user}/g" + hashlib.sha256(password.encode()).hexdigest()[:16]
        else:
            key = answer.user
        self.sessions[key] = answer
        return key, "OK"

    def session(self, frame: zmq.Frame, now: float) -> Session:
        """The live session a received message belongs to; AccessDenied if
        it has none (any more)."""
        key = frame.get("User-Id")
        session = self.sessions.get(key)
        if session is None:
            session = self._open_curve(key, frame)
        problem = session.problem(now)
        if problem:
            raise AccessDenied(problem)
        return session

    def _open_curve(self, key: str, frame: zmq.Frame) -> Session:
        """A CURVE connection's first message: its credentials are in its
        metadata (encrypted on the wire)."""
        if not key.startswith("curve:"):
            raise AccessDenied("this connection has no session")
        if key in self.refused:
            raise AccessDenied(self.refused[key])
        try:
            presented = frame.get(AUTH_PROPERTY)
        except zmq.ZMQError:
            presented = ""
        if not presented:
            answer: Session | str = "no credentials were presented"
        else:
            user, _, password = presented.partition(":")
            answer = self.check(user, password)
        if isinstance(answer, str):
            if len(self.refused) > 10_000:
                self.refused.clear()
            self.refused[key] = answer
            log.warning("refused a connection: %s", answer)
            raise AccessDenied(answer)
        self.sessions[key] = answer
        return answer

    def refresh(self, now: float) -> None:
        """End the sessions of tokens revoked since the last call (token
        mode), and forget CURVE sessions idle for CURVE_IDLE seconds (each
        connection has its own key; one that speaks again is checked
        again from its metadata)."""
        sessions = list(self.sessions.items())   # the ZAP thread adds to it meanwhile
        if self.tokens is not None:
            revoked = self.tokens.revoked_since(self._revocations_read - 1.0)   # (a second of clock slack)
            self._revocations_read = now
            for _key, session in sessions:
                if session.token_id in revoked and not session.ended:
                    session.ended = f"the token {session.token_id} of user {session.user!r} was revoked"
                    log.warning("ended the sessions of revoked token %s (user %r)", session.token_id, session.user)
        for key, session in sessions:
            if key.startswith("curve:") and now - session.seen > CURVE_IDLE:
                self.sessions.pop(key, None)


class ZapHandler(threading.Thread):
    """The relay's ZAP handler (ZeroMQ's authentication hook, RFC 27): a
    thread answering each new connection's handshake. PLAIN credentials are
    checked here; CURVE handshakes only prove the client's key (encryption),
    their credentials being checked at the first message."""

    def __init__(self, ctx: zmq.Context, access: AccessControl) -> None:
        super().__init__(name="relay-zap", daemon=True)
        self.access = access
        self.sock = ctx.socket(zmq.REP)
        self.sock.linger = 0
        self.sock.bind("inproc://zeromq.zap.01")
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self.sock.poll(200):
                    continue
                request = self.sock.recv_multipart()
                self.sock.send_multipart(self._answer(request))
        finally:
            self.sock.close(linger=0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        version, request_id = (request + [b"", b""])[:2]
        if version != b"1.0" or len(request) < 6:
            return [b"1.0", request_id, b"400", b"malformed ZAP request", b"", b""]
        mechanism, credentials = request[5], request[6:]
        if mechanism == b"PLAIN" and len(credentials) == 2:
            try:
                user, password = credentials[0].decode(), credentials[1].decode()
            except UnicodeDecodeError:
                return [version, request_id, b"400", b"credentials are not text", b"", b""]
            key, reason = self.access.open(user, password)
            if key is None:
                log.warning("refused a connection from %s: %s", request[3].decode(errors="replace"), reason)
                return [version, request_id, b"400", reason.encode()[:255], b"", b""]
            return [version, request_id, b"200", b"OK", key.encode(), b""]
        if mechanism == b"CURVE" and len(credentials) == 1:
            return [version, request_id, b"200", b"OK", b"curve:" + credentials[0].hex().encode(), b""]
        return [version, request_id, b"400", b"unsupported security mechanism", b"", b""]

    def stop(self) -> None:
        self._stopping.set()
        self.join(2)


# -- CURVE keys ---------------------------------------------------------------
def load_or_create_curve_keys(path: Path) -> tuple[bytes, bytes]:
    """The relay's CURVE key pair (public, secret; Z85) kept in ``path``
    (mode 0600), made on first use."""
    try:
        public, secret = path.read_bytes().split()[:2]
        if len(public) == 40 and len(secret) == 40:
            return public, secret
    except (OSError, ValueError):
        pass
    public, secret = zmq.curve_keypair()
    write_secret_value(path, f"{public.decode()}\n{secret.decode()}\n")
    return public, secret
