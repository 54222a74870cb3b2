"""First contact: what a FederatedExecutor checks before and while it first
talks to its relay, so that each common first mistake ends at once (or
within a few seconds) with an error naming the problem and the fix, rather
than a background-thread traceback or a long silent wait:

- a relay address of the wrong form (``"127.0.0.1:55700"``): a
  :class:`~fedexec.ConfigError` (a ValueError) naming ``tcp://HOST:PORT``;
- nothing listening at the relay's address: :class:`~fedexec.RelayUnavailable`
  within :data:`LISTEN_GRACE` seconds;
- an endpoint given by a name that is neither a locally configured
  endpoint's (accepted where an id is) nor a group's:
  :class:`~fedexec.UnknownEndpoint`;
- an endpoint the relay knows but that is not connected: a warning that
  tasks will wait for it, or with ``wait_for_endpoint`` an
  :class:`~fedexec.EndpointNotConnected` once that time has passed.

The checks run in the constructor's thread and cost nothing per task.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from .config import ConfigError, EndpointConfig, ENDPOINT_NAME, endpoint_dir, endpoint_targets, groups_path, \
    load_groups
from .errors import EndpointNotConnectedWarning, RelayUnavailable, UnknownEndpoint

# Nothing listening at the relay's address fails the constructor after this
# long: refused connections are tried again meanwhile, so that a relay
# started just before the program (still binding) is not taken for absent.
LISTEN_GRACE = 2.0

_TCP = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.%a-zA-Z]+\]|[^\s/:\[\]@*]+):(?P<port>\d{1,5})")
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]@]+):\d{1,5}")


def check_relay_address(address: object, source: str = "relay") -> str:
    """``address`` if it is a relay address a client can connect to
    (``tcp://HOST:PORT`` with a port from 1 to 65535, or ``ipc://PATH``);
    otherwise a :class:`~fedexec.ConfigError` naming ``source`` (where the
    address came from) and the expected form."""
    if isinstance(address, str):
        match = _TCP.fullmatch(address)
        if match and 0 < int(match["port"]) < 65536:
            return address
        if address.startswith("ipc://") and len(address) > len("ipc://"):
            return address
    hint = ""
    if isinstance(address, str) and _HOST_PORT.fullmatch(address):
        hint = f": did you mean 'tcp://{address}'?"
    elif isinstance(address, str) and address.startswith("tcp://"):
        hint = ": the port must be a number from 1 to 65535, and HOST has no '*' (that is for binding)"
    raise ConfigError(f"{source} {address!r} is not a relay address; expected tcp://HOST:PORT (for example "
                      f"tcp://127.0.0.1:55700) or ipc://PATH{hint}")


def check_listening(address: str, grace: float = LISTEN_GRACE) -> None:
    """Raise :class:`~fedexec.RelayUnavailable` if nothing has listened at
    ``address`` for ``grace`` seconds (connections refused, or an ipc
    socket file missing), or at once if its host name is unknown. Anything
    else (a host that does not answer at all, a firewall) is left to the
    constructor's ``connect_timeout``. A probe is an ordinary connection
    closed before it says anything, which a relay drops without a word."""
    deadline = time.monotonic() + grace
    while True:
        why = _why_not_listening(address)
        if why is None:
            return
        if time.monotonic() >= deadline:
            raise RelayUnavailable(
                f"nothing listens at the relay address {address} ({why}): start the relay ('fedexec relay start'), "
                f"or give the address it listens on (relay=, $FEDEXEC_RELAY; 'fedexec relay status' shows it)")
        time.sleep(0.1)


def _why_not_listening(address: str) -> str | None:
    """Why nothing listens at ``address`` (None: something does, or it
    cannot be told quickly); raises RelayUnavailable for an unknown host."""
    if address.startswith("ipc://"):
        path = address[len("ipc://"):]
        if not Path(path).is_socket():
            return f"no socket file {path}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError as exc:
                return f"connecting to {path}: {os.strerror(exc.errno) if exc.errno else exc}"
        return None
    match = _TCP.fullmatch(address)
    if match is None:
        return None
    host, port = match["host"].strip("[]"), int(match["port"])
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RelayUnavailable(f"the relay address {address} names a host that cannot be found ({exc.strerror}): "
                               "check the host name") from None
    refused = None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(sockaddr)
                return None
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                    return None   # (a timeout, no route: not known to be absent; the lookup's timeout decides)
                refused = "connection refused"
    return refused


def resolve_endpoints(value: object) -> tuple[list[str], str | None]:
    """The endpoint ids ``FederatedExecutor(value)`` sends to, and the relay
    address of the locally configured endpoint ``value`` names (else None).

    ``value`` is an endpoint id (a UUID), a list of them, the name of a group
    (``fedexec group set``) or the name of an endpoint configured on this
    machine (``fedexec endpoint configure NAME``); a group wins over an
    endpoint of the same name. A name that is neither:
    :class:`~fedexec.UnknownEndpoint`; a value of another form: ConfigError."""
    if not isinstance(value, str) or not ENDPOINT_NAME.match(value) or value in load_groups():
        return endpoint_targets(value), None
    try:
        return endpoint_targets(value), None   # a UUID
    except ConfigError:
        pass
    if (endpoint_dir(value) / "config.toml").exists():
        config = EndpointConfig.load(value)
        return [config.endpoint_id], config.relay
    raise UnknownEndpoint(
        f"no endpoint or group is named {value!r} here: give an endpoint id (a UUID: 'fedexec endpoint list' on "
        f"the endpoint's machine shows it), the name of an endpoint configured on this machine ('fedexec endpoint "
        f"list'; none is named so under {endpoint_dir(value).parent}), or a group's name ('fedexec group list'; "
        f"{groups_path()})")


def unknown_endpoint_message(relay: str, endpoint_id: str) -> str:
    """What :class:`~fedexec.UnknownEndpoint` says of an id the relay does not know."""
    return (f"the relay at {relay} knows no endpoint {endpoint_id}: check the id ('fedexec endpoint list' on the "
            "endpoint's machine shows it) and that the endpoint uses this relay; an endpoint is known to its "
            "relay once it has connected to it ('fedexec endpoint start NAME')")


def disconnected_message(info: dict[str, Any], relay: str) -> str:
    """A sentence saying the endpoint ``info`` (a LOOKUP reply's) is known to
    the relay but not connected. (Not since when: the relay's ``last_seen``
    is a reading of its own monotonic clock, meaningless here.)"""
    return f"endpoint {info.get('name')!r} ({info.get('id')}) is known to the relay at {relay} but not connected"


def warn_disconnected(info: dict[str, Any], relay: str) -> None:
    """Warn that tasks will wait at the relay until the endpoint connects."""
    warnings.warn(f"{disconnected_message(info, relay)}: tasks will wait at the relay until it connects "
                  "('fedexec endpoint start NAME' on its machine); pass wait_for_endpoint=SECONDS to fail instead",
                  EndpointNotConnectedWarning, stacklevel=4)
