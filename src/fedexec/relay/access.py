"""Who is talking to the relay: authentication modes, sessions, the ZAP handler.

A relay runs in one of three modes (``fedexec relay start --auth MODE``):

- ``local``: one random secret, kept in a file only the relay's user can
  read; every holder of it is the user ``local``.
- ``token``: per-user API tokens (``fedexec relay add-user``, ``fedexec
  token create``), kept hashed in ``access.sqlite3`` beside the record, and
  revocable: a revoked token's live sessions end within a second.
- ``globus``: Globus Auth bearer tokens, checked by token introspection
  (globus-sdk) and cached until they expire (or ``recheck`` seconds).

Credentials are checked in the handshake, by the relay's ZAP handler
thread, before any message of the connection is accepted. Over a plain
connection they are the user and secret of ZeroMQ's PLAIN handshake. Over a
CURVE (encrypted) connection the handshake carries only the client's public
key, which the client derives from its credentials
(:func:`fedexec.auth.client_curve_keypair`): in local mode the relay knows
the key its own secret yields, in token mode the key of each token (computed
when the token is created and kept with it), and it lets only those keys
through. A client holding just the relay's public key is refused before it
can send anything, so nothing of its is buffered.

In globus mode a bearer token yields a key the relay cannot know
beforehand, so over CURVE every handshake passes and the token, sent as
connection metadata (``X-Fedexec-Auth``, encrypted), is checked at the
connection's first message (see :meth:`AccessControl.session`).

Checking a Globus token is an HTTP call to Globus Auth, which may be slow or
hang. It never runs in the ZAP thread nor in the relay's loop: it runs on a
small bounded pool of threads (:class:`BackgroundChecks`), the answer
coming back through a :class:`Mailbox`, so that only the connection being
checked waits; answers already cached are served at once. Either way
the check makes a :class:`Session`, found again for every message by the
``User-Id`` ZeroMQ attaches to it, so that a session revoked or expired
mid-way is refused at its next message.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import zmq
from zmq.utils import z85

from ..auth import AUTH_MODES as MODES
from ..auth import AUTH_PROPERTY, LOCAL_USER, client_curve_keypair, write_secret_value
from ..private import create_private_file, private_dir

log = logging.getLogger("fedexec.relay.access")

USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$")
GLOBUS_RECHECK = 600.0               # seconds a Globus introspection answer is trusted at most
GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
CURVE_IDLE = 3600.0                  # seconds after which a silent CURVE connection's session is forgotten
GLOBUS_CHECK_THREADS = 8             # Globus introspections at once (threads of BackgroundChecks)
GLOBUS_CHECKS_WAITING = 64           # distinct tokens waiting for or in an introspection, at most
# ... of them brought by connections from one network address: fewer than the
# threads, so that one address whose tokens hang never holds every thread
GLOBUS_CHECKS_PER_PEER = GLOBUS_CHECK_THREADS // 2
GLOBUS_REFUSED_CACHED = 10_000       # refused tokens remembered (the oldest forgotten first)
GLOBUS_SESSIONS_CACHED = 100_000     # valid tokens remembered (expired ones forgotten first)
PENDING_CONNECTIONS = 32             # CURVE connections (globus mode) whose first message waits for its check
PENDING_BYTES_EACH = 1 << 20         # what such a connection may have held meanwhile: bytes...
PENDING_MESSAGES_EACH = 16           # ... and messages (HELLO, LOOKUP...); the rest is dropped, to send again
CHECKS_BUSY = (f"the relay is checking too many Globus tokens at once (at most {GLOBUS_CHECKS_WAITING}); "
               "try again shortly")
PEER_BUSY = (f"the relay is checking too many Globus tokens from this network address at once (at most "
             f"{GLOBUS_CHECKS_PER_PEER}); try again shortly")
BUSY = (CHECKS_BUSY, PEER_BUSY)   # refusals that are not the token's fault: not remembered


class AccessDenied(Exception):
    """A connection or message the relay refuses; the message says why."""

    def reply(self) -> dict[str, Any]:
        """The fields of the ERROR answering it (``auth``: the session is refused)."""
        return {"msg": f"authentication failed: {self}", "auth": True}


class NotYetChecked(AccessDenied):
    """A message of a connection whose credentials are still being checked,
    beyond what the relay holds for it meanwhile: dropped, to be sent again
    once the connection is answered (the session is not refused)."""

    def reply(self) -> dict[str, Any]:
        return {"msg": str(self), "unchecked": True}


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

    def copy(self) -> "Session":
        """The same identity, as a session of its own (another connection's)."""
        return Session(self.user, token_id=self.token_id, expires=self.expires, groups=self.groups)

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
# The public CURVE key each token yields (client_curve_keypair, raw 32 bytes),
# so that the ZAP handler finds a token by the key of a CURVE handshake.
# Tokens made before this column existed have none: PLAIN only.
TOKEN_CURVE_KEY = "curve_key"
OLD_TOKEN_OVER_CURVE = ("an unknown CURVE key: wrong credentials, or a token made before encrypted connections "
                        "checked tokens in their handshake (it still works over a plain connection; its user "
                        "needs a new token for an encrypted one: 'fedexec token create USER')")


def curve_key_of(user: str, secret: str) -> bytes:
    """The public CURVE key (raw 32 bytes, as the ZAP handler sees it) that
    a client presenting ``user``'s ``secret`` connects with."""
    return z85.decode(client_curve_keypair(user, secret)[0])


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
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(tokens)")}
        if TOKEN_CURVE_KEY not in columns:   # a book made before: its tokens stay PLAIN only
            self.db.execute(f"ALTER TABLE tokens ADD COLUMN {TOKEN_CURVE_KEY} BLOB")
        self.db.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS tokens_by_curve_key ON tokens({TOKEN_CURVE_KEY})")
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
        ``user:ID.SECRET``. Only its hash is kept, and the public CURVE
        key it yields (one way: it reveals nothing of the secret)."""
        with self._lock:
            if not self.db.execute("SELECT 1 FROM users WHERE name=?", (user,)).fetchone():
                raise ValueError(f"no user {user!r}: add it first with 'fedexec relay add-user {user}'")
            token_id, secret = secrets.token_hex(4), secrets.token_urlsafe(32)
            expires = time.time() + lifetime if lifetime else None
            presented = f"{token_id}.{secret}"
            self.db.execute(f"INSERT INTO tokens (id, user, hash, created, expires, revoked, {TOKEN_CURVE_KEY}) "
                            "VALUES (?,?,?,?,?,NULL,?)", (token_id, user, self._hash(secret), time.time(),
                                                          expires, curve_key_of(user, presented)))
        return f"{user}:{presented}"

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

    def tokens(self) -> list[tuple[str, str, float, float | None, float | None, bool]]:
        """(id, user, created, expires, revoked, whether it works over CURVE)
        of every token (those made before CURVE keys were kept do not)."""
        with self._lock:
            return [row[:5] + (bool(row[5]),) for row in self.db.execute(
                f"SELECT id, user, created, expires, revoked, {TOKEN_CURVE_KEY} IS NOT NULL FROM tokens "
                "ORDER BY created")]

    def check(self, user: str, presented: str) -> Session | str:
        """The session ``user:presented`` opens, or why it opens none."""
        token_id, _, secret = presented.partition(".")
        with self._lock:
            row = self.db.execute("SELECT user, hash, expires, revoked FROM tokens WHERE id=?",
                                  (token_id,)).fetchone()
        if row is None or row[0] != user or not hmac.compare_digest(row[1], self._hash(secret)):
            return f"wrong token for user {user!r}"
        return self._session(token_id, row[0], row[2], row[3])

    def check_curve_key(self, public: bytes) -> Session | str:
        """The session a CURVE handshake proving ``public`` opens (the key
        of a token, see :func:`curve_key_of`), or why it opens none."""
        with self._lock:
            row = self.db.execute(f"SELECT id, user, expires, revoked FROM tokens WHERE {TOKEN_CURVE_KEY}=?",
                                  (public,)).fetchone()
        if row is None:
            return OLD_TOKEN_OVER_CURVE
        return self._session(*row)

    @staticmethod
    def _session(token_id: str, user: str, expires: float | None, revoked: float | None) -> Session | str:
        if revoked is not None:
            return f"the token {token_id} of user {user!r} was revoked"
        if expires is not None and expires <= time.time():
            return f"the token {token_id} of user {user!r} expired"
        return Session(user, token_id=token_id, expires=expires)

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
    ``recheck`` seconds pass, whichever is first.

    Valid and refused tokens are cached apart: anyone can present refused
    tokens (random ones) by the thousand, so their cache is bounded
    (``refused_cached``, the oldest forgotten first) and filling it never
    forgets a valid token's session."""

    def __init__(self, client_id: str, client_secret: str, *, scope: str | None = None,
                 recheck: float = GLOBUS_RECHECK, refused_cached: int = GLOBUS_REFUSED_CACHED,
                 sessions_cached: int = GLOBUS_SESSIONS_CACHED) -> None:
        import globus_sdk

        self.client_id = client_id
        self.client = globus_sdk.ConfidentialAppAuthClient(client_id, client_secret)
        self.scope = scope
        self.recheck = recheck
        self.refused_cached = refused_cached
        self.sessions_cached = sessions_cached
        self._cache: dict[bytes, tuple[float, Session]] = {}      # valid tokens
        self._refused: dict[bytes, tuple[float, str]] = {}       # refused ones, oldest first
        self._lock = threading.Lock()

    @staticmethod
    def key(token: str) -> bytes:
        """What the cache knows a token by (not the token itself)."""
        return hashlib.sha256(token.encode()).digest()

    def cached(self, token: str) -> Session | str | None:
        """The answer for ``token`` if one is cached and still holds (a
        session of its own), None if it needs an introspection."""
        key = self.key(token)
        with self._lock:
            cached: tuple[float, Session | str] | None = self._cache.get(key) or self._refused.get(key)
        if cached is None or time.time() >= cached[0]:
            return None
        return cached[1].copy() if isinstance(cached[1], Session) else cached[1]

    def check(self, token: str) -> Session | str:
        """The session ``token`` opens, or why it opens none: cached, or by
        introspection (an HTTP call to Globus Auth: it may take long; see
        :class:`BackgroundChecks`)."""
        answer = self.cached(token)
        if answer is not None:
            return answer
        now = time.time()
        answer, until = self._introspect(token, now)
        key = self.key(token)
        with self._lock:
            if isinstance(answer, Session):
                self._refused.pop(key, None)
                if len(self._cache) >= self.sessions_cached:   # forget the expired ones (valid tokens are few)
                    self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                self._cache[key] = (until, answer)
            else:
                self._cache.pop(key, None)
                self._refused.pop(key, None)   # (at the end again: the newest)
                while len(self._refused) >= self.refused_cached:
                    del self._refused[next(iter(self._refused))]
                self._refused[key] = (until, answer)
        return answer.copy() if isinstance(answer, Session) else answer

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


class Mailbox:
    """Answers handed from the check threads to one thread that polls
    :attr:`fd` (readable when there are some) and takes them."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._items: deque[Any] = deque()
        self._closed = False
        self._lock = threading.Lock()   # put vs close: never write to a closed (maybe reused) fd
        self.fd = self._read

    def put(self, item: Any) -> None:
        self._items.append(item)
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._write, b"\0")
            except BlockingIOError:   # the pipe is full of wake-ups already
                pass

    def take(self) -> list[Any]:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
        items = []
        while self._items:
            items.append(self._items.popleft())
        return items

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read)
                os.close(self._write)


class BackgroundChecks:
    """Globus token checks off the caller's thread: a cached answer comes at
    once; otherwise the introspection runs on one of a few threads
    (``threads``) and its answer is handed to ``done``, called from that
    thread. Connections presenting the same token share one introspection.
    At most ``waiting`` tokens wait for or are in an introspection; beyond,
    a token is refused at once (:data:`CHECKS_BUSY`), so a slow Globus Auth
    piles up neither threads nor connections. At most ``per_peer`` of them
    were brought by connections from one network address (beyond:
    :data:`PEER_BUSY`), so that one address cannot take every place."""

    def __init__(self, globus: GlobusTokenCheck, threads: int = GLOBUS_CHECK_THREADS,
                 waiting: int = GLOBUS_CHECKS_WAITING, per_peer: int = GLOBUS_CHECKS_PER_PEER) -> None:
        self.globus = globus
        self.limit = waiting
        self.per_peer = per_peer
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="relay-globus-check")
        # token key -> (the address that brought it, who waits for its answer)
        self._waiting: dict[bytes, tuple[str, list[Callable[[Session | str], None]]]] = {}
        self._by_peer: dict[str, int] = {}   # tokens in _waiting per address
        self._lock = threading.Lock()

    def check(self, token: str, done: Callable[[Session | str], None], peer: str = "") -> Session | str | None:
        """The answer now (cached, or refused as too many are waiting, from
        everywhere or from ``peer``, the connection's address), or None:
        ``done`` gets it later."""
        answer = self.globus.cached(token)
        if answer is not None:
            return answer
        key = self.globus.key(token)
        with self._lock:
            if key in self._waiting:
                self._waiting[key][1].append(done)
                return None
            if len(self._waiting) >= self.limit:
                log.warning("refused a Globus token unchecked: %d are being checked already", len(self._waiting))
                return CHECKS_BUSY
            if self._by_peer.get(peer, 0) >= self.per_peer:
                log.warning("refused a Globus token from %s unchecked: %d of its are being checked already",
                            peer or "an unknown address", self.per_peer)
                return PEER_BUSY
            self._waiting[key] = (peer, [done])
            self._by_peer[peer] = self._by_peer.get(peer, 0) + 1
        self._pool.submit(self._run, token, key)
        return None

    def _run(self, token: str, key: bytes) -> None:
        try:
            answer: Session | str = self.globus.check(token)
        except Exception as exc:  # a bug must still answer the connections waiting
            log.exception("checking a Globus token failed")
            answer = f"the relay could not check the Globus token ({type(exc).__name__})"
        with self._lock:
            peer, waiters = self._waiting.pop(key, ("", []))
            left = self._by_peer.get(peer, 1) - 1
            if left > 0:
                self._by_peer[peer] = left
            else:
                self._by_peer.pop(peer, None)
        for i, done in enumerate(waiters):
            done(answer.copy() if isinstance(answer, Session) and i else answer)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Pending:
    """A CURVE connection (globus mode) whose token is being checked: the
    messages it sent meanwhile, held up to a bound."""

    __slots__ = ("sender", "messages", "size")

    def __init__(self, sender: zmq.Frame) -> None:
        self.sender = sender          # its routing id frame
        self.messages: list[list[zmq.Frame]] = []
        self.size = 0                 # bytes of the messages held


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
        # the CURVE key a holder of the local secret connects with (local mode)
        self.local_curve_key = curve_key_of(LOCAL_USER, local_secret) if mode == "local" else b""
        self.tokens = tokens
        self.globus = globus
        self.sessions: dict[str, Session] = {}
        self.refused: dict[str, str] = {}      # CURVE connections whose credentials failed
        self._revocations_read = 0.0           # revocations before this time were acted on
        self.checks = BackgroundChecks(globus) if globus is not None else None
        self.pending: dict[str, _Pending] = {}   # CURVE connections whose token is being checked (globus)
        self.answers = Mailbox()                 # their checks' answers, for the relay's loop
        self.wake_fd = self.answers.fd           # readable when answers wait: call settled()

    def check(self, user: str, password: str, done: Callable[[Session | str], None] | None = None,
              peer: str = "") -> Session | str | None:
        """The session these credentials open, or why they open none. With
        ``done``, a Globus token not cached yet is checked on another
        thread: None now, and ``done`` gets the answer (from that thread);
        ``peer``, the connection's address, limits the checks one address
        may have running (see :class:`BackgroundChecks`)."""
        if self.mode == "local":
            if user == LOCAL_USER and hmac.compare_digest(password.encode(), self.local_secret.encode()):
                return Session(LOCAL_USER)
            return f"wrong credentials for user {user!r}"
        if self.mode == "token":
            assert self.tokens is not None
            return self.tokens.check(user, password)
        assert self.globus is not None and self.checks is not None
        if done is None:
            return self.globus.check(password)
        return self.checks.check(password, done, peer)

    def open(self, user: str, password: str, done: Callable[[tuple[str | None, str]], None] | None = None,
             peer: str = "") -> tuple[str | None, str] | None:
        """Check credentials presented in a handshake: the new session's key
        (the User-Id of its messages), or None and why. With ``done``, a
        Globus token not cached yet gives None now, and ``done`` that pair
        later, from another thread."""
        def opened(answer: Session | str) -> tuple[str | None, str]:
            if isinstance(answer, str):
                return None, answer
            return self._keep(answer, password), "OK"

        answer = self.check(user, password, None if done is None else (lambda later: done(opened(later))), peer)
        return None if answer is None else opened(answer)

    def open_curve(self, public: bytes) -> tuple[str | None, str]:
        """Check the client key of a CURVE handshake: the new session's key,
        or None and why. In local and token mode only the key that valid
        credentials yield passes; in globus mode every key does, its
        session being opened at the connection's first message."""
        if self.mode == "globus":
            return "curve:" + public.hex(), "OK"
        if self.mode == "local":
            answer: Session | str = Session(LOCAL_USER) if hmac.compare_digest(public, self.local_curve_key) \
                else "an unknown CURVE key: wrong credentials for this relay"
        else:
            assert self.tokens is not None
            answer = self.tokens.check_curve_key(public)
        if isinstance(answer, str):
            return None, answer
        return self._keep(answer, ""), "OK"

    def _keep(self, answer: Session, password: str) -> str:
        """Keep a session opened in a handshake; its key (the User-Id of its
        messages)."""
        if answer.token_id:
            key = f"{answer.user}/{answer.token_id}"
        elif self.mode == "globus":
            key = f"{answer.user}/g" + hashlib.sha256(password.encode()).hexdigest()[:16]
        else:
            key = answer.user
        self.sessions[key] = answer
        return key

    def session(self, frames: list[zmq.Frame], now: float) -> Session | None:
        """The live session a received message (its frames, the sender's
        routing id first) belongs to; AccessDenied if it has none (any
        more); None if its connection's token is being checked: the message
        is held meanwhile, and :meth:`settled` gives it back."""
        frame = frames[-1]
        key = frame.get("User-Id")
        session = self.sessions.get(key)
        if session is None:
            session = self._open_curve(key, frames)
            if session is None:
                return None
        problem = session.problem(now)
        if problem:
            raise AccessDenied(problem)
        return session

    def _open_curve(self, key: str, frames: list[zmq.Frame]) -> Session | None:
        """A CURVE connection's first message (globus mode only: the ZAP
        handler lets no unknown key through in the other modes): its
        token is in its metadata (encrypted on the wire). A cached answer
        holds at once; otherwise the token is checked on another thread
        while the relay holds this message, and a few small ones after it
        (HELLO, LOOKUP: see PENDING_BYTES_EACH), dropping (freeing) the
        rest with a NotYetChecked refusal, to be sent again. If the token
        fails, what was held is dropped, as is every later message of the
        refused connection. A first message over PENDING_BYTES_EACH is
        not held (its check starts, it is refused as NotYetChecked, to be
        sent again). So a connection not yet authenticated has at most
        PENDING_BYTES_EACH bytes held, its first message included, and at
        most PENDING_CONNECTIONS such connections are held at once."""
        if not key.startswith("curve:"):
            raise AccessDenied("this connection has no session")
        if key in self.refused:
            raise AccessDenied(self.refused[key])
        pending = self.pending.get(key)
        if pending is not None:
            size = sum(len(frame) for frame in frames)
            if len(pending.messages) >= PENDING_MESSAGES_EACH or pending.size + size > PENDING_BYTES_EACH:
                raise NotYetChecked("not read: this connection's credentials are still being checked; send it "
                                    f"again once the relay answers (it holds at most {PENDING_MESSAGES_EACH} "
                                    f"messages and {PENDING_BYTES_EACH} bytes of a connection meanwhile)")
            pending.messages.append(frames)
            pending.size += size
            return None
        try:
            presented = frames[-1].get(AUTH_PROPERTY)
        except zmq.ZMQError:
            presented = ""
        if not presented:
            answer: Session | str | None = "no credentials were presented"
        elif len(self.pending) >= PENDING_CONNECTIONS:
            raise AccessDenied(f"the relay is checking the credentials of too many connections at once "
                               f"(at most {PENDING_CONNECTIONS}); try again shortly")
        else:
            user, _, password = presented.partition(":")
            try:
                peer = frames[-1].get("Peer-Address")
            except zmq.ZMQError:
                peer = ""
            answer = self.check(user, password, lambda later: self.answers.put((key, later)), peer)
            if answer is None:
                pending = self.pending[key] = _Pending(frames[0])
                size = sum(len(frame) for frame in frames)
                if size > PENDING_BYTES_EACH:   # not held: sent again once the check has answered
                    raise NotYetChecked(f"not read: this connection's credentials are being checked, and the "
                                        f"relay holds at most {PENDING_BYTES_EACH} bytes of a connection "
                                        f"meanwhile (this message has {size:,}); send it again once the relay "
                                        "answers")
                pending.messages.append(frames)
                pending.size = size
                return None
            if answer in BUSY:   # not this connection's fault: it may try again
                raise AccessDenied(answer)
        return self._settle(key, answer)

    def _settle(self, key: str, answer: Session | str) -> Session:
        """Keep the answer for a CURVE connection's token: its session, or
        AccessDenied (remembered: its later messages are refused too)."""
        if isinstance(answer, str):
            if len(self.refused) > 10_000:
                self.refused.clear()
            self.refused[key] = answer
            log.warning("refused a connection: %s", answer)
            raise AccessDenied(answer)
        self.sessions[key] = answer
        return answer

    def settled(self) -> list[tuple[list[zmq.Frame], Session | AccessDenied]]:
        """The messages held while their connection's token was being
        checked, whose check has answered (call it when :attr:`wake_fd` is
        readable): each with its session, in the order they came, or, for
        a refused connection, its first message with the refusal (the rest
        is dropped)."""
        out: list[tuple[list[zmq.Frame], Session | AccessDenied]] = []
        for key, answer in self.answers.take():
            pending = self.pending.pop(key, None)
            if pending is None:
                continue
            try:
                session = self._settle(key, answer)
            except AccessDenied as exc:
                out.append(([pending.sender], exc))   # (the refusal goes to its routing id)
                continue
            session.seen = time.time()
            out.extend((frames, session) for frames in pending.messages)
        return out

    def close(self) -> None:
        """Stop the check threads (their answers are no longer wanted)."""
        if self.checks is not None:
            self.checks.close()
        self.answers.close()

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
    checked here, and so are CURVE keys (derived from the credentials) but
    in globus mode, whose tokens are checked at the first message.

    It answers out of order: its socket is a ROUTER, and each handshake
    waiting in libzmq has a pipe of its own to it, so a Globus token that
    needs an introspection is answered when that ends (on another thread,
    see :class:`BackgroundChecks`) while other handshakes are answered at
    once."""

    def __init__(self, ctx: zmq.Context, access: AccessControl) -> None:
        super().__init__(name="relay-zap", daemon=True)
        self.access = access
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind("inproc://zeromq.zap.01")
        self.later = Mailbox()   # answers of checks that ran on other threads
        self._stopping = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.later.fd, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                events = dict(poller.poll(200))
                if self.later.fd in events:
                    for reply in self.later.take():
                        self.sock.send_multipart(reply)
                if self.sock in events:
                    # [the handshake's pipe id, b"", ZAP frames...]; the reply goes back the same way
                    request = self.sock.recv_multipart()
                    envelope = request[:2]
                    reply = self._answer(request[2:], lambda later, to=envelope: self.later.put(to + later))
                    if reply is not None:
                        self.sock.send_multipart(envelope + reply)
        finally:
            self.sock.close(linger=0)
            self.later.close()

    def _answer(self, request: list[bytes], done: Callable[[list[bytes]], None]) -> list[bytes] | None:
        """The reply to a ZAP request, or None: ``done`` gets it later."""
        version, request_id = (request + [b"", b""])[:2]
        if version != b"1.0" or len(request) < 6:
            return [b"1.0", request_id, b"400", b"malformed ZAP request", b"", b""]
        mechanism, credentials = request[5], request[6:]
        if mechanism == b"PLAIN" and len(credentials) == 2:
            try:
                user, password = credentials[0].decode(), credentials[1].decode()
            except UnicodeDecodeError:
                return [version, request_id, b"400", b"credentials are not text", b"", b""]
            peer = request[3].decode(errors="replace")

            def reply(opened: tuple[str | None, str]) -> list[bytes]:
                key, reason = opened
                if key is None:
                    log.warning("refused a connection from %s: %s", peer, reason)
                    return [version, request_id, b"400", reason.encode()[:255], b"", b""]
                return [version, request_id, b"200", b"OK", key.encode(), b""]

            opened = self.access.open(user, password, lambda later: done(reply(later)), peer)
            return None if opened is None else reply(opened)
        if mechanism == b"CURVE" and len(credentials) == 1:
            key, reason = self.access.open_curve(credentials[0])
            if key is None:
                log.warning("refused a CURVE connection from %s: %s", request[3].decode(errors="replace"), reason)
                return [version, request_id, b"400", reason.encode()[:255], b"", b""]
            return [version, request_id, b"200", b"OK", key.encode(), b""]
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
