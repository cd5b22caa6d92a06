"""Inbound mTLS: terminate TLS on a connection whose first bytes were already read.

Protocol detection has consumed the ClientHello's first bytes by the time it knows this is TLS,
and ``loop.start_tls`` cannot be given bytes already read. asyncio's own TLS protocol can: it
reads through ``get_buffer``/``buffer_updated``, so the bytes are handed to it exactly as the
socket would have. (It is what ``start_tls`` uses underneath, with uvloop's loop too.)

After the handshake, and before any application byte, the peer's SPIFFE ID is checked; the
decrypted stream then goes through protocol detection again (HTTP/2 or HTTP/1.1 inside TLS).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from asyncio import sslproto
from collections.abc import Callable
from typing import Any, cast

from pilotfish.identity import SpiffeId

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10  # seconds


def looks_like_tls(head: bytes) -> bool | None:
    """A TLS record carrying a handshake starts 0x16 0x03; None while one byte is all we have."""
    if not head:
        return None
    if head[0] != 0x16:
        return False
    if len(head) < 2:
        return None
    return head[1] == 0x03


class _PeerGate(asyncio.Protocol):
    """The first application protocol on the decrypted stream: checks the peer, then hands over."""

    def __init__(
        self,
        trust_domain: str,
        require_certificate: bool,
        hand_over: Callable[[asyncio.Transport, SpiffeId | None], None],
        refused: Callable[[str], None],
    ) -> None:
        self._trust_domain = trust_domain
        self._require = require_certificate
        self._hand_over = hand_over
        self._refused = refused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Imported on the first mTLS connection: a sidecar without it never loads cryptography.
        from sidecar.security.tls import PeerRejected, check_peer

        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        try:
            peer = check_peer(
                transport.get_extra_info("ssl_object"), self._trust_domain, require=self._require
            )
        except PeerRejected as exc:
            self._refused(str(exc))
            transport.abort()
            return
        self._hand_over(transport, peer)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - replaced before any data
        raise AssertionError("the peer gate must hand over before application data")


def terminate(
    transport: asyncio.Transport,
    head: bytes,
    context: ssl.SSLContext,
    trust_domain: str,
    require_certificate: bool,
    hand_over: Callable[[asyncio.Transport, SpiffeId | None], None],
    refused: Callable[[str], None],
) -> None:
    """Run a TLS server handshake on ``transport``, starting with the bytes in ``head``.

    ``hand_over(tls_transport, peer)`` gets the decrypted stream once the peer is accepted;
    ``refused(reason)`` is called (and the connection closed) when the handshake or the peer
    check fails.
    """
    loop = asyncio.get_event_loop()
    waiter: asyncio.Future[Any] = loop.create_future()
    gate = _PeerGate(trust_domain, require_certificate, hand_over, refused)
    protocol = sslproto.SSLProtocol(
        loop,
        gate,
        context,
        waiter,
        server_side=True,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
    )

    def handshake_done(future: asyncio.Future[Any]) -> None:
        exc = None if future.cancelled() else future.exception()
        if exc is not None:
            refused(f"TLS handshake failed: {exc}")

    waiter.add_done_callback(handshake_done)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    view = memoryview(head)
    while view:
        buffer = protocol.get_buffer(len(view))
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]
