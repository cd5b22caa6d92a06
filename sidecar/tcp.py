"""TCP passthrough: relay bytes both ways to a target, with backpressure both ways.

The target is a cluster host, or the connection's original destination (where the client
meant to go before iptables redirected it to the sidecar).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    from sidecar.listener import ListenerRuntime
    from sidecar.stats import Scope
    from sidecar.upstream import ClusterRuntime

log = logging.getLogger(__name__)


class RelayTarget(Protocol):
    """Where a passthrough connection goes, and where its upstream stats are counted."""

    @property
    def scope(self) -> Scope: ...

    @property
    def connect_timeout(self) -> float: ...

    def choose(self) -> tuple[str, int] | None:
        """``(host, port)`` to connect to, or None when there is nowhere to go."""
        ...


class ClusterTarget:
    """A host of a cluster, picked by the cluster's balancer."""

    def __init__(self, cluster: ClusterRuntime) -> None:
        self.cluster = cluster

    @property
    def scope(self) -> Scope:
        return self.cluster.scope

    @property
    def connect_timeout(self) -> float:
        return self.cluster.config.connect_timeout

    def choose(self) -> tuple[str, int] | None:
        choice = self.cluster.choose_host(set())
        if choice is None:
            return None
        endpoint = choice[1].endpoint
        return endpoint.host, endpoint.port


class OriginalDestination:
    """The one address the client dialled; stats go to ``cluster.original_dst``."""

    def __init__(self, host: str, port: int, connect_timeout: float, scope: Scope) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.scope = scope

    def choose(self) -> tuple[str, int] | None:
        return self.host, self.port


class _UpstreamSide(asyncio.Protocol):
    def __init__(self, relay: TcpRelay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.relay.to_downstream(data)

    def eof_received(self) -> bool | None:
        self.relay.upstream_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.upstream_lost()

    def pause_writing(self) -> None:
        self.relay.pause_downstream_reading()

    def resume_writing(self) -> None:
        self.relay.resume_downstream_reading()


class TcpRelay(asyncio.Protocol):
    """The downstream side of a passthrough connection."""

    def __init__(self, listener: ListenerRuntime, target: RelayTarget) -> None:
        self.listener = listener
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.upstream: _UpstreamSide | None = None
        self.buffered: list[bytes] = []
        self.closed = False
        self.downstream_eof = False
        self.upstream_eof_seen = False

    @property
    def active_streams(self) -> int:
        return 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.listener.connection_opened(self)
        self.listener.scope.inc("downstream_cx_tcp_passthrough")
        self.transport.pause_reading()  # until upstream is connected
        self.connect_task = asyncio.get_event_loop().create_task(self._connect())

    async def _connect(self) -> None:
        target = self.target
        address = target.choose()
        if address is None:
            self.close()
            return
        host, port = address
        loop = asyncio.get_event_loop()
        side = _UpstreamSide(self)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: side, host, port),
                timeout=target.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            target.scope.inc("upstream_cx_connect_fail")
            log.info("tcp passthrough to %s:%d failed: %r", host, port, exc)
            self.close()
            return
        if self.closed:
            if side.transport is not None:
                side.transport.close()
            return
        self.upstream = side
        target.scope.inc("upstream_cx_total")
        assert side.transport is not None
        for chunk in self.buffered:
            side.transport.write(chunk)
        self.buffered.clear()
        if self.downstream_eof and side.transport.can_write_eof():
            side.transport.write_eof()
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.write(data)
        else:
            self.buffered.append(data)

    def eof_received(self) -> bool | None:
        self.downstream_eof = True
        upstream = self.upstream.transport if self.upstream is not None else None
        if upstream is not None and upstream.can_write_eof():
            upstream.write_eof()
        if self.upstream_eof_seen:
            self.close()  # both directions are finished
        return True

    def to_downstream(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def upstream_eof(self) -> None:
        self.upstream_eof_seen = True
        if self.transport is not None and not self.closed and self.transport.can_write_eof():
            self.transport.write_eof()
        if self.downstream_eof:
            self.close()  # both directions are finished

    def upstream_lost(self) -> None:
        self.close()

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def pause_downstream_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_downstream_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.connection_closed(self)
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def start_drain(self) -> None:
        """Opaque bytes have no graceful end: let the connection run until the drain ends."""
