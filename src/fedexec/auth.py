"""A program's credentials for a relay, and how its socket presents them.

Every connection to a relay authenticates before its messages are read
(the relay's side is :mod:`fedexec.relay.access`). Credentials are a user
name and a secret, found in this order: an explicit token (``user:secret``),
``$FEDEXEC_TOKEN``, the local relay's secret file (mode ``local``: the relay
writes it to ``$FEDEXEC_HOME/relays/<address>.secret``, readable by its user
only), then a Globus token stored by ``fedexec login``.

Over a plain connection they travel in ZeroMQ's PLAIN handshake. When the
relay's CURVE public key is known (given, ``$FEDEXEC_RELAY_KEY``, or
published by a relay on this machine), the connection is encrypted and the
client's CURVE key pair is derived from them (:func:`client_curve_keypair`):
proving that key in the handshake proves the credentials, so a local- or
token-mode relay refuses a wrong one before any message flows. They also
travel as connection metadata inside the encrypted handshake, for a
globus-mode relay (it cannot derive keys from Globus bearer tokens and
checks them at the connection's first message).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import time
from pathlib import Path

import zmq
from zmq.utils import z85

from .config import fedexec_home

log = logging.getLogger("fedexec.auth")

AUTH_MODES = ("local", "token", "globus")   # how a relay authenticates (relay/access.py)
LOCAL_USER = "local"
GLOBUS_USER = "globus"           # the user name presented with a Globus bearer token
TOKEN_ENV = "FEDEXEC_TOKEN"
RELAY_KEY_ENV = "FEDEXEC_RELAY_KEY"
AUTH_PROPERTY = "X-Fedexec-Auth"  # connection metadata carrying credentials over CURVE
CURVE_KEY_LABEL = b"fedexec client CURVE key v1\0"   # domain separation of client_curve_keypair

#: Seconds a refused handshake is tolerated before a program gives up on the
#: relay (:meth:`HandshakeWatch.refused_for`): the endpoint agent exits,
#: one-shot queries raise; the executor's constructor uses a shorter value
#: (``dispatcher.AUTH_GRACE``). Counted from the first refusal, not from the
#: start, so a relay still starting or a slow Globus Auth introspection does
#: not use it up. Meanwhile the caller looks for other credentials about once
#: a second (:meth:`HandshakeWatch.read`): a relay started at the same moment
#: publishes its secret, ``fedexec login`` finishes, a token is renewed.
#: Waiting is only for such credentials on their way (libzmq does not retry a
#: refused handshake with the same ones), so a few of those tries are enough;
#: longer would only delay reporting credentials that are simply wrong.
REFUSED_GRACE = 5.0
MAX_PLAIN_SECRET = 255   # bytes of secret a ZeroMQ PLAIN handshake carries (a one-byte length)
MAX_TOKEN_BYTES = 4096   # a longer token is a mistake (a file's contents, a pasted log)


class Credentials:
    """A user name and its secret, as presented in the PLAIN handshake."""

    def __init__(self, user: str, secret: str) -> None:
        self.user = user
        self.secret = secret

    def apply(self, sock: zmq.Socket, relay_key: bytes | None = None) -> None:
        """Make ``sock`` present these (before it connects): in the PLAIN
        handshake, or over CURVE when the relay's key is given, as the key
        pair derived from them (and, encrypted, as metadata for a
        globus-mode relay)."""
        if relay_key:
            sock.curve_publickey, sock.curve_secretkey = client_curve_keypair(self.user, self.secret)
            sock.setsockopt(zmq.METADATA, f"{AUTH_PROPERTY}:{self.user}:{self.secret}".encode())
        else:
            self.check_plain()
            sock.plain_username = self.user.encode()
            sock.plain_password = self.secret.encode()

    def check_plain(self, source: str = "the credentials") -> None:
        """AuthenticationFailed if the secret is too long for a PLAIN
        (unencrypted) handshake; over CURVE longer ones travel."""
        from .errors import AuthenticationFailed

        if len(self.secret.encode()) > MAX_PLAIN_SECRET:
            raise AuthenticationFailed(
                f"{source} will not do: the secret of user {self.user!r} is {len(self.secret.encode())} "
                f"bytes long, over the "
                f"{MAX_PLAIN_SECRET} an unencrypted connection carries: give the relay's public key "
                f"(relay_public_key=, ${RELAY_KEY_ENV}) to connect over CURVE")

    @classmethod
    def parse(cls, token: str, source: str = "the token given") -> "Credentials":
        """``user:secret`` as printed by the CLI, or a bare local secret.

        Raises :class:`~fedexec.errors.AuthenticationFailed` at once, naming
        what is wrong (never the secret), for a token no relay would accept:
        an empty user or secret, a user name the relay never accepts,
        control characters, or one too long for the handshake. ``source``
        says where it came from, for the message."""
        from .errors import AuthenticationFailed
        from .relay.access import USER_NAME   # here: relay.access imports this module

        if not isinstance(token, str):
            raise AuthenticationFailed(f"{source} must be a string 'user:secret', not {type(token).__name__}")
        user, sep, secret = token.strip().partition(":")
        if not sep:
            user, secret = LOCAL_USER, user
        problem = None
        if any(ord(c) < 32 or ord(c) == 127 for c in user + secret):
            problem = "it contains control characters"
        elif not user:
            problem = "the user name before ':' is empty"
        elif not USER_NAME.match(user):
            problem = (f"the user name {user!r} is not one a relay accepts (1-128 letters, digits, '.', '_', "
                       "'@', '+' or '-', starting with a letter or digit)")
        elif not secret:
            problem = f"the secret after '{user}:' is empty"
        elif len(secret.encode()) > MAX_TOKEN_BYTES:
            problem = f"it is {len(secret.encode()):,} bytes long, over the {MAX_TOKEN_BYTES:,} a token may have"
        if problem:
            raise AuthenticationFailed(f"{source} is malformed: {problem}; expected 'user:secret' as printed by "
                                       "'fedexec relay add-user' or 'fedexec token create'")
        return cls(user, secret)


def check_token(address: str, token: str | None = None, relay_key: str | bytes | None = None) -> None:
    """Raise :class:`~fedexec.errors.AuthenticationFailed` now, in the
    caller's thread, if the explicit token or ``$FEDEXEC_TOKEN`` is
    malformed (see :meth:`Credentials.parse`) or too long for the kind of
    connection ``address`` gets; other credentials are found and checked
    where they are used."""
    if token is not None and token != "":
        source = "the token given"
        credentials = Credentials.parse(token, source)
    elif os.environ.get(TOKEN_ENV):
        source = f"${TOKEN_ENV}"
        credentials = Credentials.parse(os.environ[TOKEN_ENV], source)
    else:
        return
    if find_relay_key(address, relay_key) is None:
        credentials.check_plain(source)


def client_curve_keypair(user: str, secret: str) -> tuple[bytes, bytes]:
    """The CURVE key pair (public, secret; Z85) a client holding ``user``'s
    ``secret`` connects with. Deterministic, so that a relay knowing the
    credentials (its local secret; a token when it is created) knows the
    public key they yield and lets only that key through its handshake; one
    way, so the public key (kept by the relay) reveals nothing of the
    secret. The secret key is a hash of a fixed label and the credentials
    (Curve25519 takes any 32 bytes)."""
    digest = hashlib.sha256(CURVE_KEY_LABEL + user.encode() + b"\0" + secret.encode()).digest()
    secret_key = z85.encode(digest)
    return zmq.curve_public(secret_key), secret_key


def _address_key(address: str) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", address).strip("_")


def secret_path(address: str) -> Path:
    """Where a local-mode relay at ``address`` keeps its secret."""
    return fedexec_home() / "relays" / f"{_address_key(address)}.secret"


def public_key_path(address: str) -> Path:
    """Where a relay at ``address`` publishes its CURVE public key to this
    machine's users."""
    return fedexec_home() / "relays" / f"{_address_key(address)}.pub"


def globus_tokens_path() -> Path:
    """Where ``fedexec login`` keeps this user's Globus tokens (mode 0600)."""
    return fedexec_home() / "globus-tokens.json"


def relay_key_source(address: str, relay_key: str | bytes | None = None) -> str:
    """Where :func:`find_relay_key` finds the key, for messages."""
    if relay_key:
        return "given as relay_public_key"
    if os.environ.get(RELAY_KEY_ENV):
        return f"from ${RELAY_KEY_ENV}"
    return f"published by the relay in {public_key_path(address)}"


def find_relay_key(address: str, relay_key: str | bytes | None = None) -> bytes | None:
    """The relay's CURVE public key (Z85): given, ``$FEDEXEC_RELAY_KEY``, or
    published by the relay on this machine; None means a plain connection."""
    key = relay_key or os.environ.get(RELAY_KEY_ENV)
    if not key:
        try:
            key = public_key_path(address).read_text().strip()
        except OSError:
            return None
    key = key.encode() if isinstance(key, str) else key
    if len(key) != 40:
        raise ValueError(f"the relay's public key must be 40 characters of Z85, not {key!r}")
    return key




def new_secret() -> str:
    """A new random local secret."""
    return secrets.token_urlsafe(32)


def write_secret(path: Path) -> str:
    """A new random secret in ``path``, readable by this user only."""
    return write_secret_value(path, new_secret())


def read_secret(path: Path) -> str:
    """The secret kept in ``path``; "" if there is none."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def write_secret_value(path: Path, secret: str) -> str:
    """Write ``secret`` to ``path`` (mode 0600, in a directory only this user can enter)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent.name == "relays":
        os.chmod(path.parent, 0o700)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    os.replace(tmp, path)
    return secret


def find_credentials(address: str, token: str | None = None, secret_file: str | Path | None = None
                     ) -> Credentials | None:
    """The credentials to present to the relay at ``address``: an explicit
    token, else ``$FEDEXEC_TOKEN``, else a secret file (given, or the local
    relay's by address); None if there are none."""
    if token is not None and token != "":
        return Credentials.parse(token)
    if os.environ.get(TOKEN_ENV):
        return Credentials.parse(os.environ[TOKEN_ENV], f"${TOKEN_ENV}")
    secret = read_secret(Path(secret_file) if secret_file else secret_path(address))
    if secret:
        return Credentials(LOCAL_USER, secret)
    from .globus_login import client_credentials_token, stored_token

    token = client_credentials_token() or stored_token()
    return Credentials(GLOBUS_USER, token) if token else None


def describe_handshake_failure(event: int, address: str, credentials: Credentials | None,
                               encrypted: bool = False, key_source: str = "") -> str:
    """A sentence for a refused handshake (a socket monitor's event);
    ``encrypted``: over CURVE, with the relay's public key from
    ``key_source`` (see :func:`relay_key_source`)."""
    if encrypted and event != zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        # what listens there does not hold the key (or speaks no CURVE at all):
        # never fall back to a plain connection, which would hand it the credentials
        return (f"the relay at {address} did not complete an encrypted handshake with the public key this client "
                f"has for it ({key_source or 'given'}), so nothing was sent: what listens there is not the relay "
                "that key belongs to (another program took the address while the relay is down, or the relay "
                "was started again with another key or without encryption). If the relay's key really changed, "
                "give the new one or remove the old one's file")
    if credentials is None:
        return (f"the relay at {address} requires credentials and none were found: pass token=, set "
                f"{TOKEN_ENV}, run 'fedexec login' (a globus-mode relay), or run on the relay's machine as "
                f"its user (a local-mode relay writes {secret_path(address)})")
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        refused = f"the relay at {address} refused the credentials of user {credentials.user!r}"
        if encrypted:   # the relay's reason does not reach the client; say what it can be
            return (f"{refused}: wrong credentials, a revoked or expired token, or a token made before "
                    "encrypted connections checked tokens in their handshake (such a token still works "
                    "over a plain connection; create a new one: 'fedexec token create USER')")
        return refused
    return (f"the relay at {address} does not accept this kind of connection: it may require encryption "
            f"(give its public key: relay_public_key=, {RELAY_KEY_ENV}, or relay_public_key in the "
            "endpoint's config), or the key given is not its key, or it is not a fedexec relay")


_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED)


class HandshakeWatch:
    """Connects a socket to a relay with this user's credentials for it and
    watches the handshakes, so that a refusal becomes a clear error rather
    than silence (ZeroMQ retries quietly). Close it before the socket: it
    holds a monitor socket.

    ``failure`` is the latest refusal (None once a handshake succeeds or
    other credentials are tried), ``succeeded`` whether any handshake ever
    did, ``failing_since`` the ``time.monotonic()`` of the first refusal
    since the last success (None while none): see :meth:`refused_for`. The
    socket's owner thread calls :meth:`read`; other threads may call
    :meth:`refused_for`."""

    def __init__(self, sock: zmq.Socket, address: str, token: str | None = None,
                 secret_file: str | Path | None = None, relay_key: str | bytes | None = None) -> None:
        self.sock = sock
        self.address = address
        self._source = (token, secret_file)   # where the credentials come from, to look again
        self.relay_key = secure(sock, address, relay_key)
        self.key_source = relay_key_source(address, relay_key) if self.relay_key is not None else ""
        self.credentials = find_credentials(address, token, secret_file)
        if self.credentials is not None:
            self.credentials.apply(sock, self.relay_key)
        self.monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        self.failure: str | None = None
        self.succeeded = False
        self.failing_since: float | None = None
        sock.connect(address)

    def read(self) -> bool:
        """Take the events waiting on the monitor socket. After a refusal,
        credentials that turned up or changed since (a relay started just now
        writes its secret as it starts) are tried at once: whether the socket
        reconnected with them (what was sent before went with the refused
        connection and is lost; send it again).

        libzmq does not retry a refused handshake, so no event follows a
        refusal: while ``failure`` is set, call this now and then (about once
        a second) even without events, for credentials that arrive later."""
        from zmq.utils.monitor import recv_monitor_message

        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.succeeded, self.failure = True, None
                self.failing_since = None
            else:
                if self.failing_since is None:  # set before failure: refused_for reads them in the other order
                    self.failing_since = time.monotonic()
                self.failure = describe_handshake_failure(event, self.address, self.credentials,
                                                          self.relay_key is not None, self.key_source)
        if self.failure:
            return self.renew()
        return False

    def refused_for(self, grace: float, now: float | None = None) -> str | None:
        """The refusal, once handshakes have been failing for ``grace``
        seconds or more with no success in between; None otherwise (no
        refusal, a success since, other credentials being tried, or not for
        that long yet).

        ``now`` is a ``time.monotonic()`` reading (default: the time now).
        Cheap and without side effects: call it every loop turn, since no
        monitor event comes after a refusal. Other credentials tried
        (:meth:`renew`) do not restart the count; only a success does.
        Events are taken by :meth:`read`, not here."""
        failure = self.failure
        since = self.failing_since
        if failure is None or since is None:
            return None
        if (time.monotonic() if now is None else now) - since >= grace:
            return failure
        return None

    def renew(self) -> bool:
        """Reconnect with credentials that differ from those refused or whose
        session the relay ended (a secret written since, a token renewed);
        whether there were any. ``failing_since`` is kept: until a handshake
        succeeds, the refusal goes on counting (see :meth:`refused_for`)."""
        found = find_credentials(self.address, *self._source)
        if found is None or (self.credentials is not None and (found.user, found.secret)
                             == (self.credentials.user, self.credentials.secret)):
            return False
        try:
            self.sock.disconnect(self.address)
        except zmq.ZMQError:
            pass
        found.apply(self.sock, self.relay_key)
        self.credentials, self.failure = found, None
        self.sock.connect(self.address)
        return True

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)


class NoHandshake:
    """What stands for a :class:`HandshakeWatch` on a link with no
    handshake (one in memory, to a relay in the same process: memlink.py):
    nothing to watch, never refused."""

    monitor = None
    failure: str | None = None
    succeeded = True

    def read(self) -> bool:
        return False

    def refused_for(self, grace: float, now: float | None = None) -> str | None:
        return None

    def renew(self) -> bool:
        return False

    def close(self) -> None:
        pass


def secure(sock: zmq.Socket, address: str, relay_key: str | bytes | None = None) -> bytes | None:
    """Make ``sock`` encrypt its connection to the relay at ``address`` if
    the relay's public key is known (a fresh key pair for this socket,
    replaced by the credentials' own when they are applied); the key, or
    None for a plain connection."""
    key = find_relay_key(address, relay_key)
    if key is not None:
        sock.curve_serverkey = key
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    return key


def connect_plainly(sock: zmq.Socket, address: str, token: str | None = None,
                    relay_key: str | bytes | None = None) -> None:
    """Connect ``sock`` to a relay with this user's credentials for it,
    without watching the handshake (tools and tests)."""
    key = secure(sock, address, relay_key)
    credentials = find_credentials(address, token)
    if credentials is not None:
        credentials.apply(sock, key)
    sock.connect(address)
