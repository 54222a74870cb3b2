"""One-shot questions to a relay, for the CLI and for tools that are not executors."""

from __future__ import annotations

import time
import uuid
from typing import Any

import zmq

from .. import protocol as P
from ..auth import HandshakeWatch
from ..errors import AuthenticationFailed


def lookup_endpoint(address: str, endpoint_id: str, timeout: float = 2.0,
                    token: str | None = None) -> dict[str, Any] | None:
    """The relay's view of an endpoint (``None`` if it does not know it).

    Raises :class:`TimeoutError` when the relay does not answer in time.
    """
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:port as well as IPv4
    sock.setsockopt(zmq.IDENTITY, b"Q" + uuid.uuid4().bytes)
    watch = HandshakeWatch(sock, address, token)
    try:
        sock.send_multipart(P.encode(P.HELLO, {"role": "client", "py": P.PYTHON_VERSION}))
        sock.send_multipart(P.encode(P.LOOKUP, {"ep": endpoint_id}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sock.poll(50):
                msg = P.decode(sock.recv_multipart())
                if msg.type == P.LOOKUP_REPLY:
                    return msg.fields["endpoint"] if msg.fields.get("found") else None
            watch.read()
        if watch.failure and not watch.succeeded:
            raise AuthenticationFailed(watch.failure)
        raise TimeoutError(f"the relay at {address} did not answer within {timeout:g} s")
    finally:
        watch.close()
        sock.close(linger=0)
