"""The relay's links that are not its ZeroMQ socket: to an endpoint agent in
its own process (:class:`LocalLink`), and stream links to its owner's
programs (:class:`StreamLink`): the embedded default's socketpair
(:class:`ClientLink`) and same-host connections (:class:`SameHostListener`,
samehost.py says why and how they are trusted).

A link from the relay to an endpoint agent running in the relay's own process.

The embedded default runs its private relay and its endpoint agent in one
process, on one thread's loop (``fedexec.colocated``): a task then crosses
no ipc hop, with its I/O threads and wake-ups, between them. The agent
reaches the relay over a link in memory (memlink.py), which carries no
ZeroMQ handshake, so neither ZAP nor the ``User-Id`` metadata the relay's
access control keys sessions by (access.py). The link therefore has a
trust rule of its own, and the real listening socket's checks are not
touched:

- it is a pair of queues in this process's memory, one end held by the
  relay and the other given to the colocated agent: nothing outside this
  process can reach it, and inside it only the agent holds the other end;
- it exists only on a relay in ``local`` authentication mode, whose every
  session is its owner's (the holder of its secret file): its peer is by
  construction that owner's embedded endpoint, and gets the owner's
  session, as it would by presenting the secret over the real socket.

Everything past authentication (the endpoint's HELLO checks, ownership,
quotas, message limits) is the relay's usual handling of the messages.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from typing import Any

import zmq

from .. import protocol as P
from ..auth import LOCAL_USER
from ..framelink import LinkError, StreamEnd, set_buffers
from ..memlink import memory_link
from ..samehost import INTRO, INTRO_FRAME, peer_uid, reachable_path, socket_path
from .access import Session

log = logging.getLogger("fedexec.relay")

MAX_SAME_HOST_LINKS = 256   # open at once; past them, programs keep to ZeroMQ (each is a descriptor)
INTRO_TIMEOUT = 5.0         # seconds a same-host link may stay open without introducing itself
_PAUSING_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class LocalLink:
    """The relay's end of the link to a colocated endpoint agent."""

    def __init__(self, auth_mode: str) -> None:
        if auth_mode != "local":
            raise ValueError(f"a local link needs a relay in local authentication mode, not {auth_mode!r}: its "
                             "peer gets the relay owner's session")
        self.sock, self.agent_end = memory_link(zmq.ROUTER, zmq.DEALER)
        self.session = Session(LOCAL_USER)
        # the agent's routing id on the link (as a ROUTER would give its one peer): what the relay
        # sends to it goes here, not to the real socket
        self.peer = P.new_endpoint_routing_id()
        self._peer_frame = zmq.Frame(self.peer)
        self.peers = frozenset([self.peer])

    def readable(self) -> bool:
        """Whether the agent has sent something not read yet."""
        return self.sock.readable()

    def messages(self, limit: int) -> Any:
        """The messages waiting on the link (as :func:`protocol.waiting_messages`,
        the agent's routing id first, as a ROUTER gives it)."""
        peer = self._peer_frame
        for frames in self.sock.messages(limit):
            yield [peer, *frames]

    def send(self, peer: bytes, frames: list[Any]) -> None:
        """Send to the agent (ZMQError when it is gone)."""
        self.sock.send_multipart(frames)

    def close(self) -> None:
        self.sock.close()
        self.agent_end.close()


class StreamLink:
    """The relay's end of a stream link (framelink.py's framing) to one of
    its owner's programs: the embedded default's socketpair (:class:`ClientLink`)
    or a same-host connection (:class:`SameHostListener`, samehost.py). Its
    peer has the owner's session. A same-host link has no routing id until
    its program introduces itself (``samehost.INTRO``), and takes only small
    frames until then; messages for that id come to it (not over ZeroMQ)
    from the program's first message after (``active``)."""

    def __init__(self, sock: socket.socket, peer: bytes | None, pollers: list[zmq.Poller]) -> None:
        self.end = StreamEnd(sock)
        self.fd = self.end.fileno()
        self.session = Session(LOCAL_USER)
        self.peer = peer   # the routing id its messages come from and go to
        self._peer_frame = zmq.Frame(peer) if peer is not None else None
        self.active = peer is not None   # what is sent to its routing id goes over it
        self.opened = time.monotonic()
        if peer is None:
            self.end.reader.max_frame = INTRO_FRAME
        self.pollers = pollers   # the relay's (Relay.register): its descriptor is on each
        self.polling_writes = False
        for poller in pollers:
            poller.register(self.fd, zmq.POLLIN)

    def introduce(self, frames: list[Any], taken: Any) -> bool:
        """Take the link's first message, its program's introduction, and
        answer it; False (the link is to be closed) unless it is ``[INTRO,
        routing id]`` with the id of a client or an endpoint (a letter and
        16 bytes) that no other link in ``taken`` has."""
        if (len(frames) != 2 or bytes(frames[0]) != INTRO or len(frames[1]) != 17
                or bytes(frames[1])[:1] not in (b"C", b"E") or bytes(frames[1]) in taken):
            return False
        self.peer = bytes(frames[1])
        self._peer_frame = zmq.Frame(self.peer)
        self.end.reader.max_frame = P.MAX_FRAME
        return self.send([INTRO])

    def poll_writes(self, wanted: bool) -> None:
        """Whether the pollers it is on wake the loop when its socket takes more."""
        if wanted == self.polling_writes or self.end.closed:
            return
        self.polling_writes = wanted
        for poller in self.pollers:
            poller.modify(self.fd, zmq.POLLIN | (zmq.POLLOUT if wanted else 0))

    def unpoll(self) -> None:
        """Take the closed link's descriptor off every poller (readable at its end for good, it would spin them)."""
        for poller in self.pollers:
            try:
                poller.unregister(self.fd)
            except (KeyError, ValueError, OSError):
                pass

    def read(self) -> list[list[Any]]:
        """The whole messages that have come, as they came (framelink.py bounds one call's reads)."""
        return self.end.read()

    def framed(self, frames: list[Any]) -> list[Any]:
        """A message as the relay's handling takes it: the routing id first, as a ROUTER gives it."""
        return [self._peer_frame, *(zmq.Frame(f) for f in frames)]

    def send(self, frames: list[Any]) -> bool:
        """Send to the program; False once it is gone (or a message past the link's limits)."""
        try:
            return self.end.send_message(frames)
        except LinkError as exc:
            log.warning("not sent to the program: %s", exc)
            return False

    def close(self) -> None:
        self.unpoll()
        self.end.close()


class ClientLink(StreamLink):
    """The relay's end of a socketpair to the program that started it (the
    embedded default's: fedexec.colocated, embedded.py): that program's
    executor talks to the relay over it, with no ZeroMQ I/O thread in
    either process. Its trust rule is the local link's (above): the other
    end was made by the program and handed to this process alone, at its
    start (nothing else can reach an unnamed socketpair), and the relay is
    in ``local`` mode, so the peer gets the owner's session, as it would
    with the secret file it holds over the real socket."""

    def __init__(self, fd: int, auth_mode: str, pollers: list[zmq.Poller] | None = None) -> None:
        if auth_mode != "local":
            raise ValueError(f"a client link needs a relay in local authentication mode, not {auth_mode!r}")
        os.set_inheritable(fd, False)   # (not passed on to the workers)
        # the client's routing id, as a ROUTER would give it
        super().__init__(socket.socket(fileno=fd), b"C" + os.urandom(16), pollers if pollers is not None else [])


class SameHostListener:
    """A local-mode relay's Unix socket for its owner's programs on its
    host (samehost.py): at ``samehost.socket_path`` of its address, with a
    symbolic link there for each other address it is published under. It
    accepts only connections from processes of the relay's own uid."""

    def __init__(self, address: str, aliases: list[str]) -> None:
        self.path = socket_path(address)
        self.path.unlink(missing_ok=True)   # one a relay on this address left (killed): this address is ours now
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            name, dir_fd = reachable_path(self.path)
            try:
                self.sock.bind(name)
            finally:
                if dir_fd is not None:
                    os.close(dir_fd)
            os.chmod(self.path, 0o600)   # (its directory is this user's alone already: auth.write_secret_value)
            self.sock.listen(64)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.inode = self.path.stat().st_ino
        self.links: list[Path] = []
        for alias in aliases:
            link = socket_path(alias)
            if link == self.path:
                continue
            try:
                link.unlink(missing_ok=True)
                link.symlink_to(self.path.name)
                self.links.append(link)
            except OSError as exc:
                log.debug("no same-host socket under %s: %s", alias, exc)
        self.warned = -60.0   # when accepting last failed for want of descriptors (logged once a minute)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self, room: int) -> tuple[list[socket.socket], bool]:
        """The connections waiting, of this uid, up to ``room`` of them (the
        others are closed), and whether accepting failed (out of
        descriptors, say: the rest wait in the backlog, and the listener,
        still readable, would spin the loop: the caller stops polling it a
        while)."""
        taken: list[socket.socket] = []
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return taken, False
            except OSError as exc:
                # out of descriptors or memory: the rest wait in the backlog (the caller pauses);
                # anything else (a connection reset before it was taken, say) concerns that one
                if exc.errno in _PAUSING_ERRORS:
                    now = time.monotonic()
                    if now - self.warned >= 60:
                        self.warned = now
                        log.warning("could not accept same-host links (they wait): %s", exc)
                    return taken, True
                continue
            try:
                uid = peer_uid(conn)
            except OSError:
                uid = -1
            if uid != os.geteuid():
                log.warning("refused a same-host link from uid %d: only this relay's owner (uid %d) may use it",
                            uid, os.geteuid())
                conn.close()
                continue
            if len(taken) >= room:
                log.warning("refused a same-host link: %d are open already (its program goes on over ZeroMQ)",
                            MAX_SAME_HOST_LINKS)
                conn.close()
                continue
            conn.setblocking(False)
            set_buffers(conn)
            taken.append(conn)

    def close(self) -> None:
        """Stop listening; remove the socket file and links, when still ours."""
        self.sock.close()
        try:
            if self.path.stat().st_ino != self.inode:
                return   # a relay started since on this address has its own
        except OSError:
            return
        self.path.unlink(missing_ok=True)
        for link in self.links:
            try:
                if os.readlink(link) == self.path.name:
                    link.unlink()
            except OSError:
                pass
