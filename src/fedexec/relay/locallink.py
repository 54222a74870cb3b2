"""A link from the relay to an endpoint agent running in the relay's own process.

The embedded default runs its private relay and its endpoint agent in one
process (``fedexec.colocated``): a task then crosses no ipc hop, with its
I/O threads and wake-ups, between them. The agent reaches the relay over
``inproc://``, which carries no ZeroMQ handshake, so neither ZAP nor the
``User-Id`` metadata the relay's access control keys sessions by
(access.py). The link therefore has a trust rule of its own, and the real
listening socket's checks are not touched:

- it is a second ROUTER, bound in the relay's ZeroMQ context on an
  ``inproc://`` name of 128 random bits. inproc names exist only inside
  one context of one process: nothing outside this process can connect,
  and inside it only code given the name (the colocated agent) does;
- it exists only on a relay in ``local`` authentication mode, whose every
  session is its owner's (the holder of its secret file): its peer is by
  construction that owner's embedded endpoint, and gets the owner's
  session, as it would by presenting the secret over the real socket.

Everything past authentication (the endpoint's HELLO checks, ownership,
quotas, message limits) is the relay's usual handling of the messages.
"""

from __future__ import annotations

import secrets
from typing import Any, Callable

import zmq

from .. import protocol as P
from ..auth import LOCAL_USER
from .access import Session


class LocalLink:
    """The relay's inproc ROUTER for a colocated endpoint agent."""

    def __init__(self, ctx: zmq.Context, auth_mode: str) -> None:
        if auth_mode != "local":
            raise ValueError(f"a local link needs a relay in local authentication mode, not {auth_mode!r}: its "
                             "peer gets the relay owner's session")
        self.sock = P.limit_frames(ctx.socket(zmq.ROUTER))
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = f"inproc://fedexec-relay-local-{secrets.token_hex(16)}"
        self.sock.bind(self.address)
        self.session = Session(LOCAL_USER)
        # routing ids that wrote on this link: what the relay sends them goes here, not to the real socket
        self.peers: set[bytes] = set()
        self._before_close: list[Callable[[], None]] = []

    def on_close(self, stop: Callable[[], None]) -> None:
        """Call ``stop`` (it stops the colocated agent and waits for it)
        before the link closes: the agent's sockets share the relay's
        context, which cannot end while they are open."""
        self._before_close.append(stop)

    def messages(self, limit: int) -> Any:
        """The messages waiting on the link (as :func:`protocol.waiting_messages`),
        their senders noted as peers of the link."""
        for frames in P.waiting_messages(self.sock, limit):
            self.peers.add(frames[0].bytes)
            yield frames

    def send(self, peer: bytes, frames: list[Any]) -> None:
        """Send to a peer of the link (ZMQError when it is gone)."""
        self.sock.send_multipart([peer, *frames], copy=False)

    def close(self) -> None:
        for stop in self._before_close:
            stop()
        self._before_close.clear()
        self.sock.close(linger=0)
