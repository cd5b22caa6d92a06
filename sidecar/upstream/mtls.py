"""Outbound mTLS: connect with the workload certificate and check who answered.

The server's SPIFFE ID is checked right after the handshake and before the upstream connection
(an HTTP/2 client, which writes its preface as soon as it is connected) sees the transport, so
not one request byte reaches a server that is not who the cluster expects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from pilotfish.identity import SpiffeId
    from sidecar.security.workload import WorkloadCertificates


class UpstreamPeerRejected(ConnectionError):
    """The upstream's certificate names an identity this cluster does not expect."""


class _PeerGate(asyncio.Protocol):
    def __init__(
        self,
        protocol: asyncio.BaseProtocol,
        trust_domain: str,
        expected: Collection[SpiffeId] | None,
    ) -> None:
        self._protocol = protocol
        self._trust_domain = trust_domain
        self._expected = expected
        self.rejected: str | None = None
        self.peer: SpiffeId | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        from sidecar.security.tls import PeerRejected, check_peer

        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        try:
            self.peer = check_peer(
                transport.get_extra_info("ssl_object"), self._trust_domain, self._expected
            )
        except PeerRejected as exc:
            self.rejected = str(exc)
            transport.abort()
            return
        transport.set_protocol(self._protocol)
        self._protocol.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.rejected is None:  # lost before the check: the real protocol never started
            self._protocol.connection_lost(exc)


async def connect_mtls(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str,
    port: int,
    workload: WorkloadCertificates,
    expected: Collection[SpiffeId] | None,
) -> SpiffeId | None:
    """Open an mTLS connection for ``protocol_factory``'s protocol; the peer's identity, or
    ``UpstreamPeerRejected`` (an ``OSError``, so callers count it as a failed connect)."""
    loop = asyncio.get_event_loop()
    gate = _PeerGate(protocol_factory(), workload.identity.trust_domain, expected or None)
    # No SNI: peers are told apart by their SPIFFE IDs, not host names.
    await loop.create_connection(
        lambda: gate, host, port, ssl=workload.client_context(), server_hostname=""
    )
    if gate.rejected is not None:
        raise UpstreamPeerRejected(gate.rejected)
    return gate.peer
