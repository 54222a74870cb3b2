"""One-shot questions to a relay, for the CLI and for tools that are not executors."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import zmq

from .. import protocol as P
from ..auth import REFUSED_GRACE, HandshakeWatch
from ..errors import AuthenticationFailed, NotAuthorized


def ask_relay(address: str, msg_type: str, fields: dict[str, Any], answer_type: str, timeout: float = 2.0,
              token: str | None = None, relay_key: str | None = None) -> dict[str, Any]:
    """Send one request as a client and return the fields of the answer
    (:func:`ask_relay_message` gives its frames too)."""
    return ask_relay_message(address, msg_type, fields, answer_type, timeout, token, relay_key).fields


def ask_relay_message(address: str, msg_type: str, fields: dict[str, Any], answer_type: str, timeout: float = 2.0,
                      token: str | None = None, relay_key: str | None = None, *, blobs: Sequence[Any] = (),
                      secret_file: str | Path | None = None) -> P.Message:
    """Send one request as a client (with ``blobs`` as its frames) and
    return the answer, header and frames. ``secret_file``: a private
    relay's secret (the embedded default's).

    Raises :class:`AuthenticationFailed` or :class:`NotAuthorized` when the
    relay refuses, :class:`TimeoutError` when it does not answer in time. A
    refused handshake is an :class:`AuthenticationFailed` once it has lasted
    ``auth.REFUSED_GRACE`` seconds (other credentials may turn up meanwhile),
    or at ``timeout`` if that comes first.
    """
    ctx = zmq.Context.instance()
    sock = P.limit_frames(ctx.socket(zmq.DEALER))
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:port as well as IPv4
    sock.setsockopt(zmq.IDENTITY, b"Q" + uuid.uuid4().bytes)
    watch = HandshakeWatch(sock, address, token, secret_file, relay_key=relay_key)
    request = [P.encode(P.HELLO, {"role": "client", "py": P.PYTHON_VERSION}), P.encode(msg_type, fields, blobs)]

    def send_request() -> None:
        # never blocking: with no connection (a refused handshake, which
        # libzmq does not retry) a send would wait forever
        for frames in request:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                return

    try:
        send_request()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sock.poll(50):
                msg = P.decode(sock.recv_multipart(copy=False))
                if msg.type == answer_type:
                    return msg
                if msg.type == P.ERROR:
                    text = str(msg.fields.get("msg"))
                    if msg.fields.get("auth"):
                        raise AuthenticationFailed(f"the relay at {address} refused: {text}")
                    if msg.fields.get("refused"):
                        raise NotAuthorized(f"the relay at {address} refused: {text}")
                    raise RuntimeError(f"the relay at {address} answered: {text}")
            if watch.read():  # other credentials: the request went with the refused connection
                send_request()
            refused = watch.refused_for(REFUSED_GRACE)
            if refused:
                raise AuthenticationFailed(refused)
        refused = watch.refused_for(0.0)  # refused for less than the grace when the time was up
        if refused:
            raise AuthenticationFailed(refused)
        raise TimeoutError(f"the relay at {address} did not answer within {timeout:g} s")
    finally:
        watch.close()
        sock.close(linger=0)


def lookup_endpoint(address: str, endpoint_id: str, timeout: float = 2.0, token: str | None = None,
                    relay_key: str | None = None) -> dict[str, Any] | None:
    """The relay's view of an endpoint (``None`` if it does not know it)."""
    reply = ask_relay(address, P.LOOKUP, {"ep": endpoint_id}, P.LOOKUP_REPLY, timeout, token, relay_key)
    if reply.get("refused"):
        raise NotAuthorized(f"the relay at {address} refused: {reply['refused']}")
    return reply["endpoint"] if reply.get("found") else None


def share_endpoint(address: str, endpoint_id: str, *, public: bool | None = None,
                   add_users: list[str] = (), remove_users: list[str] = (), add_groups: list[str] = (),
                   remove_groups: list[str] = (), share_memo: bool | None = None, timeout: float = 5.0,
                   token: str | None = None, relay_key: str | None = None) -> dict[str, Any]:
    """Change who may use an endpoint (its owner only); who may, afterwards.

    ``share_memo``: whether a memoized result computed on it for one user
    answers the same call of any other user of it (off by default: each
    user's memoized results are their own)."""
    fields: dict[str, Any] = {"ep": endpoint_id, "add_users": list(add_users), "remove_users": list(remove_users),
                              "add_groups": list(add_groups), "remove_groups": list(remove_groups)}
    if public is not None:
        fields["public"] = public
    if share_memo is not None:
        fields["share_memo"] = share_memo
    return ask_relay(address, P.SHARE, fields, P.SHARED, timeout, token, relay_key)["endpoint"]


def deregister_endpoint(address: str, endpoint_id: str, *, timeout: float = 5.0, token: str | None = None,
                        relay_key: str | None = None) -> dict[str, Any]:
    """Delete an endpoint at its relay (its owner only: relay/deregister.py).
    The answer: ``known`` (False for an id the relay does not know, and for
    another user's endpoint alike) and ``failed``, its tasks failed."""
    return ask_relay(address, P.DEREGISTER, {"ep": endpoint_id}, P.DEREGISTERED, timeout, token, relay_key)
