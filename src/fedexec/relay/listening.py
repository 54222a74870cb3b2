"""Whether a relay's address is free, and if not, who holds it.

A relay started on an address already in use must fail before it touches a
file: its secret, keys and record, and above all the discovery files of the
relay already there (``$FEDEXEC_HOME/relays/``), whose clients would be
refused once another secret replaced its own. :func:`check_address_free`
asks the system before anything is written; the bind itself, after the
access control is in place, is the final word (see ``Relay.__init__``).
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from ..config import relay_dir
from ..pidfile import PidFile


class AddressInUse(OSError):
    """Another program (often a relay) listens on the address; the message
    names it when it can tell."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EADDRINUSE, message)

    def __str__(self) -> str:
        return str(self.strerror)


def check_address_free(address: str, data_dir: Path | None = None) -> None:
    """Raise :class:`AddressInUse` if something listens on ``address``
    (``tcp://HOST:PORT`` or ``ipc://PATH``; a port ``*`` or 0 is always
    free). Other problems (a host that is not this machine's) are left to
    the bind, which reports them."""
    if address.startswith("ipc://"):
        path = address[len("ipc://"):]
        if not Path(path).is_socket():
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                return   # a socket file left behind: no one listens
        raise AddressInUse(in_use_message(address, data_dir))
    if not address.startswith("tcp://"):
        return
    host, _, port = address[len("tcp://"):].rpartition(":")
    if port in ("*", "0") or not port.isdigit():
        return
    host = host.strip("[]")
    host = "" if host in ("*", "0.0.0.0") else host
    try:
        infos = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as ZeroMQ binds: TIME_WAIT is no obstacle
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(in_use_message(address, data_dir)) from None


def in_use_message(address: str, data_dir: Path | None = None) -> str:
    """A sentence saying ``address`` is taken, and by whom when it can
    tell: a relay of this user whose pidfile (``relay.json`` in
    ``data_dir`` or the default data dir) names the address, else the
    process the system shows listening on the port."""
    port = address.rpartition(":")[2]
    for directory in dict.fromkeys(d for d in (data_dir, relay_dir()) if d is not None):
        record = PidFile(Path(directory) / "relay.json").read()
        if record and (record.get("address") == address or (
                address.startswith("tcp://") and str(record.get("address", "")).rpartition(":")[2] == port)):
            return _by_relay(address, record["address"], record["pid"], directory)
    holder = _listener(port) if address.startswith("tcp://") and port.isdigit() else None
    if holder is not None:
        pid, cmdline = holder
        if "fedexec.relay" in cmdline:
            return _by_relay(address, _option(cmdline, "--address", address), pid,
                             _option(cmdline, "--data-dir", "?"))
        return (f"the address {address} is already in use by process {pid} ({' '.join(cmdline)[:200]}); "
                "choose another address or port")
    return f"the address {address} is already in use by another program; choose another address or port"


def _by_relay(address: str, at: str, pid: int, directory: Path | str) -> str:
    return (f"the address {address} is already in use by the relay at {at} (pid {pid}, data in {directory}); "
            f"stop it first ('fedexec relay stop --data-dir {directory}') or choose another address or port")


def _option(cmdline: list[str], name: str, default: str) -> str:
    try:
        return cmdline[cmdline.index(name) + 1]
    except (ValueError, IndexError):
        return default


def _listener(port: str) -> tuple[int, list[str]] | None:
    """The pid and command line of a process of this user listening on
    TCP ``port``, if the system tells (Linux does, for one's own)."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == int(port) and conn.pid:
                return conn.pid, psutil.Process(conn.pid).cmdline()
    except (psutil.Error, OSError):
        pass
    return None
