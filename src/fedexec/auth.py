"""Who may talk to a relay: credentials, and the relay's check of them.

Every connection to a relay authenticates with ZeroMQ's PLAIN mechanism
before a single message flows; the relay's ZAP handler (a thread of the
relay, :class:`RelayAuthenticator`) accepts or refuses the handshake, and
each accepted message then carries its sender's user name as metadata.

Mode ``local`` (the default): the relay creates a random secret at start
and writes it to a file only its user can read (mode 0600), by default
``$FEDEXEC_HOME/relays/<address>.secret``; executors, endpoints and the CLI
of the same user on the same machine find it there by the relay's address.
``FEDEXEC_TOKEN`` or an explicit token take precedence.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from .config import fedexec_home

log = logging.getLogger("fedexec.auth")

LOCAL_USER = "local"
TOKEN_ENV = "FEDEXEC_TOKEN"


class Credentials:
    """A user name and its secret, as presented in the PLAIN handshake."""

    def __init__(self, user: str, secret: str) -> None:
        self.user = user
        self.secret = secret

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` authenticate with these (before it connects)."""
        sock.plain_username = self.user.encode()
        sock.plain_password = self.secret.encode()

    @classmethod
    def parse(cls, token: str) -> "Credentials":
        """``user:secret`` as printed by the CLI, or a bare local secret."""
        user, sep, secret = token.strip().partition(":")
        return cls(user, secret) if sep else cls(LOCAL_USER, user)


def secret_path(address: str) -> Path:
    """Where a local-mode relay at ``address`` keeps its secret."""
    key = re.sub(r"[^A-Za-z0-9.\-]+", "_", address).strip("_")
    return fedexec_home() / "relays" / f"{key}.secret"


def write_secret(path: Path) -> str:
    """A new random secret in ``path``, readable by this user only."""
    return write_secret_value(path, secrets.token_urlsafe(32))


def load_or_create_secret(path: Path) -> str:
    """The secret kept in ``path``, made (mode 0600) if there is none yet."""
    try:
        secret = path.read_text().strip()
        if secret:
            return secret
    except OSError:
        pass
    return write_secret(path)


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
    if token:
        return Credentials.parse(token)
    if os.environ.get(TOKEN_ENV):
        return Credentials.parse(os.environ[TOKEN_ENV])
    path = Path(secret_file) if secret_file else secret_path(address)
    try:
        secret = path.read_text().strip()
    except OSError:
        return None
    return Credentials(LOCAL_USER, secret) if secret else None


def describe_handshake_failure(event: int, address: str, credentials: Credentials | None) -> str:
    """A sentence for a refused handshake (a socket monitor's event)."""
    if credentials is None:
        return (f"the relay at {address} requires credentials and none were found: pass token=, set "
                f"{TOKEN_ENV}, or run on the relay's machine as its user (it writes {secret_path(address)})")
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"the relay at {address} refused the credentials of user {credentials.user!r}"
    return f"the relay at {address} does not accept this kind of connection (is it a fedexec relay?)"


class RelayAuthenticator(ThreadAuthenticator):
    """The relay's ZAP handler: checks each connection's PLAIN credentials."""

    def __init__(self, context: zmq.Context, local_secret: str) -> None:
        super().__init__(context)
        self._local_secret = local_secret

    def _authenticate_plain(self, domain: str, username: str, password: str) -> tuple[bool, bytes]:
        if username == LOCAL_USER and hmac.compare_digest(password.encode(), self._local_secret.encode()):
            return True, b"OK"
        log.warning("refused a connection: wrong credentials for user %r", username)
        return False, b"wrong credentials"


_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED)


class HandshakeWatch:
    """Connects a socket to a relay with this user's credentials for it and
    watches the handshakes, so that a refusal becomes a clear error rather
    than silence (ZeroMQ retries quietly). Close it before the socket: it
    holds a monitor socket."""

    def __init__(self, sock: zmq.Socket, address: str, token: str | None = None,
                 secret_file: str | Path | None = None) -> None:
        self.sock = sock
        self.address = address
        self._source = (token, secret_file)   # where the credentials come from, to look again
        self.credentials = find_credentials(address, token, secret_file)
        if self.credentials is not None:
            self.credentials.apply(sock)
        self.monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        self.failure: str | None = None
        self.succeeded = False
        sock.connect(address)

    def read(self) -> None:
        """Take the events waiting on the monitor socket. After a refusal,
        credentials that turned up or changed since (a relay started just now
        writes its secret as it starts) are tried at once."""
        from zmq.utils.monitor import recv_monitor_message

        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.succeeded, self.failure = True, None
            else:
                self.failure = describe_handshake_failure(event, self.address, self.credentials)
        if self.failure:
            self._retry_with_new_credentials()

    def _retry_with_new_credentials(self) -> None:
        found = find_credentials(self.address, *self._source)
        if found is None or (self.credentials is not None and (found.user, found.secret)
                             == (self.credentials.user, self.credentials.secret)):
            return
        try:
            self.sock.disconnect(self.address)
        except zmq.ZMQError:
            pass
        found.apply(self.sock)
        self.credentials, self.failure = found, None
        self.sock.connect(self.address)

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)


def connect_plainly(sock: zmq.Socket, address: str, token: str | None = None) -> None:
    """Connect ``sock`` to a relay with this user's credentials for it,
    without watching the handshake (tools and tests)."""
    credentials = find_credentials(address, token)
    if credentials is not None:
        credentials.apply(sock)
    sock.connect(address)
