"""Same-host links: a local-mode relay's owner reaches it over a Unix stream socket.

A relay started from the CLI is reached over ZeroMQ, which suits other
hosts and other users. For a client or an endpoint of the relay's owner on
the relay's own machine it is the dearest part of a round trip: each
message wakes the sender's ZeroMQ I/O thread, the receiver's, and then the
receiving loop (a 200-byte echo between two processes: ~180-220 µs over
ZeroMQ tcp, ~80-100 µs over a stream socket with framelink.py's framing).

So a relay in ``local`` authentication mode (every session is its owner's,
the holder of its secret file) also listens on a Unix stream socket beside
that secret file, ``~/.fedexec/relays/<address>.sock``: in the owner's
private directory (mode 0700), the socket itself mode 0600, and the relay
takes a connection only from a process of its own uid (``SO_PEERCRED``),
the trust rule its secret file gives today (that file is readable by that
uid alone). A program of the owner that finds the socket beside the secret
for the relay's address connects to it, checks the relay is its own uid
too, introduces itself with the routing id it uses on ZeroMQ
(:data:`INTRO`), and uses the link once the relay has answered ``[INTRO]``
(a relay with no room for more links, or that finds the id another link's,
closes it instead: the program keeps to ZeroMQ). From then on it speaks
framelink.py's framing to the relay, the messages unchanged; the relay
sends nothing else on a link before the program's first message.

The ZeroMQ connection stays open beside it. A program chooses its
transport when it introduces itself (a HELLO): a link when it can make
one; when it cannot though one may come (the relay is on this machine and
its secret, which the program presents, is there: the relay is starting,
or restarting), it sends nothing and tries again (the dispatcher each
heartbeat, the agent each tick) for LINK_GRACE seconds; then, or when no
link is expected (a token, a relay elsewhere), ZeroMQ, under the same
routing id, for good. A link that ends (the relay stopped or restarted)
leaves the program sending nothing until its next HELLO. It never moves
from ZeroMQ to a link: a message ZeroMQ still held (sent while the relay
was down) could arrive after its copy sent again on the link, and a task
run twice. ``FEDEXEC_SAME_HOST_LINK=0`` turns links off (ZeroMQ only).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import time
from pathlib import Path

from .auth import TOKEN_ENV, read_secret, secret_path
from .framelink import StreamEnd, set_buffers
from .protocol import is_loopback

log = logging.getLogger("fedexec")

ENABLE_VARIABLE = "FEDEXEC_SAME_HOST_LINK"
INTRO = b"fedexec-same-host/1"   # the first message on a link: [INTRO, routing id]; the relay's answer: [INTRO]
INTRO_FRAME = 64                 # a link's largest frame until it has introduced itself
ANSWER_WAIT = 1.0                # seconds a program waits for the relay's answer to its INTRO
# seconds a program whose relay should have a link (its secret is there) holds its messages while
# the link cannot be made (the relay starting, or restarting), trying again meanwhile, before it
# keeps to ZeroMQ for good
LINK_GRACE = 5.0
SUN_PATH_MAX = 107               # bytes in a Unix socket's path (sun_path, with its NUL: 108)

_UCRED = struct.Struct("3i")     # struct ucred: pid, uid, gid


def supported() -> bool:
    """Whether this system tells a Unix socket's peer's uid (Linux: SO_PEERCRED)."""
    return hasattr(socket, "SO_PEERCRED") and hasattr(socket, "AF_UNIX")


def enabled() -> bool:
    """Whether programs use same-host links: unless ``FEDEXEC_SAME_HOST_LINK=0``."""
    return os.environ.get(ENABLE_VARIABLE, "1") != "0" and supported()


def socket_path(address: str) -> Path:
    """Where the local-mode relay at ``address`` listens for its owner's programs."""
    return secret_path(address).with_suffix(".sock")


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (as it was when it connected)."""
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid


def reachable_path(path: Path) -> tuple[str, int | None]:
    """A name for ``path`` short enough for a Unix socket's address: the
    path itself, or, when it is too long (deep test or home directories),
    ``/proc/self/fd/N/NAME`` through a descriptor of its directory, which
    the caller closes (the second item) once it has bound or connected."""
    text = str(path)
    if len(os.fsencode(text)) <= SUN_PATH_MAX:
        return text, None
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    short = f"/proc/self/fd/{dir_fd}/{path.name}"
    if len(os.fsencode(short)) > SUN_PATH_MAX:
        os.close(dir_fd)
        raise OSError(f"the socket name {path.name!r} is too long for a Unix socket")
    return short, dir_fd


def _local_secret_presented(address: str, token: str | None, secret_file: str | Path | None) -> bool:
    """Whether the credentials the program presents over ZeroMQ are the
    relay's local secret found by its address (auth.find_credentials), and
    it can read that secret: a program given a token (``token=``,
    ``$FEDEXEC_TOKEN``) or another secret file presents those, and is
    refused if they are wrong, as one that cannot read the secret is; the
    link would let it in regardless, so it keeps to ZeroMQ."""
    if token or os.environ.get(TOKEN_ENV):
        return False
    if secret_file is not None and Path(secret_file) != secret_path(address):
        return False
    return bool(read_secret(secret_path(address)))   # (one it cannot read: refused over ZeroMQ, so here too)


def expected(address: str, *, token: str | None = None, secret_file: str | Path | None = None) -> bool:
    """Whether the relay at ``address`` may soon have a link for this
    program: links are on, the relay is on this machine (a loopback or ipc
    address), and the program presents the local secret published for that
    address, which is there (a local-mode relay that is serving, starting
    again after a kill, or being started: its secret comes before its
    socket). A link it cannot make then means its relay is starting or
    restarting. (A relay stopped cleanly takes its secret away; one never
    started has none yet: ZeroMQ.)"""
    return enabled() and is_loopback(address) and _local_secret_presented(address, token, secret_file)


def connect(address: str, routing_id: bytes, *, token: str | None = None,
            secret_file: str | Path | None = None) -> StreamEnd | None:
    """A link to the relay at ``address`` if it is this user's, on this
    host, and listening for same-host links, and the program's credentials
    (``token``, ``secret_file``) are the ones found by that address; None
    otherwise (the caller keeps to ZeroMQ). The link is introduced with
    ``routing_id``."""
    if not enabled() or not _local_secret_presented(address, token, secret_file):
        return None
    path = socket_path(address)
    try:
        if not path.is_socket():
            return None
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    dir_fd = None
    try:
        name, dir_fd = reachable_path(path)
        # (a Unix socket connects at once or not at all: refused when its relay is gone, EAGAIN
        # when its backlog is full, the relay stopped or too busy: ZeroMQ then)
        sock.connect(name)
        if peer_uid(sock) != os.geteuid():   # only this user could have made it: never talk to anyone else's
            raise OSError(f"{path} is served by uid {peer_uid(sock)}, not this user's")
    except OSError as exc:
        log.debug("no same-host link to the relay at %s: %s", address, exc)
        sock.close()
        return None
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    set_buffers(sock)
    end = StreamEnd(sock)
    try:
        if end.send_message([INTRO, routing_id]) and _answered(end):
            return end
    except Exception as exc:   # (whatever goes wrong here, ZeroMQ is still there)
        log.debug("same-host link to the relay at %s failed: %s", address, exc)
    log.debug("the relay at %s did not take a same-host link (no room, or stopping): ZeroMQ", address)
    end.close()
    return None


def _answered(end: StreamEnd) -> bool:
    """Whether the relay answered the link's INTRO within ANSWER_WAIT (it
    sends nothing else before the program's first message)."""
    deadline = time.monotonic() + ANSWER_WAIT
    poller = select.poll()   # (not select.select: a descriptor may be numbered past 1023)
    while not end.closed:
        end.flush()
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        poller.register(end.fileno(), select.POLLIN | (select.POLLOUT if end.wants_write() else 0))
        if any(event & (select.POLLIN | select.POLLHUP | select.POLLERR)
               for _, event in poller.poll(max(1, int(left * 1000)))):
            messages = end.read()
            if messages:
                return len(messages) == 1 and messages[0] == [INTRO]
    return False
