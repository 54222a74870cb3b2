"""A link from the relay to an endpoint agent running in the relay's own process.

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

import logging
import os
import socket
from typing import Any

import zmq

from .. import protocol as P
from ..auth import LOCAL_USER
from ..framelink import LinkError, StreamEnd
from ..memlink import memory_link
from .access import Session

log = logging.getLogger("fedexec.relay")


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


class ClientLink:
    """The relay's end of a socketpair to the program that started it (the
    embedded default's: fedexec.colocated, embedded.py): that program's
    executor talks to the relay over it, with no ZeroMQ I/O thread in
    either process. Its trust rule is the local link's (above): the other
    end was made by the program and handed to this process alone, at its
    start (nothing else can reach an unnamed socketpair), and the relay is
    in ``local`` mode, so the peer gets the owner's session, as it would
    with the secret file it holds over the real socket."""

    def __init__(self, fd: int, auth_mode: str) -> None:
        if auth_mode != "local":
            raise ValueError(f"a client link needs a relay in local authentication mode, not {auth_mode!r}")
        os.set_inheritable(fd, False)   # (not passed on to the workers)
        self.end = StreamEnd(socket.socket(fileno=fd))
        self.session = Session(LOCAL_USER)
        self.peer = b"C" + os.urandom(16)   # the client's routing id, as a ROUTER would give it
        self._peer_frame = zmq.Frame(self.peer)
        self.pollers: list[zmq.Poller] = []   # those its descriptor is on (Relay.register)
        self.polling_writes = False

    def poll_writes(self, wanted: bool) -> None:
        """Whether the pollers it is on wake the loop when its socket takes more."""
        if wanted == self.polling_writes or self.end.closed:
            return
        self.polling_writes = wanted
        for poller in self.pollers:
            poller.modify(self.end.fileno(), zmq.POLLIN | (zmq.POLLOUT if wanted else 0))

    def unpoll(self) -> None:
        """Take the closed link's descriptor off every poller (readable at its end for good, it would spin them)."""
        for poller in self.pollers:
            try:
                poller.unregister(self.end.fileno())
            except (KeyError, ValueError, OSError):
                pass
        self.pollers.clear()

    def messages(self) -> Any:
        """What the program sent (its routing id first, as a ROUTER gives it)."""
        peer = self._peer_frame
        for frames in self.end.read():
            yield [peer, *(zmq.Frame(f) for f in frames)]

    def send(self, frames: list[Any]) -> bool:
        """Send to the program; False once it is gone (or a message past the link's limits)."""
        try:
            return self.end.send_message(frames)
        except LinkError as exc:
            log.warning("not sent to the program: %s", exc)
            return False

    def close(self) -> None:
        self.end.close()
