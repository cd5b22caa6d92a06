"""TCP passthrough: relay bytes both ways to a cluster host, with backpressure both ways."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from sidecar.listener import ListenerRuntime
    from sidecar.upstream import ClusterRuntime

log = logging.getLogger(__name__)


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

    def __init__(self, listener: ListenerRuntime, cluster: ClusterRuntime) -> None:
        self.listener = listener
        self.cluster = cluster
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
        asyncio.get_event_loop().create_task(self._connect())

    async def _connect(self) -> None:
        choice = self.cluster.choose_host(set())
        if choice is None:
            self.close()
            return
        _, host = choice
        loop = asyncio.get_event_loop()
        side = _UpstreamSide(self)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: side, host.endpoint.host, host.endpoint.port),
                timeout=self.cluster.config.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            self.cluster.scope.inc("upstream_cx_connect_fail")
            log.info("tcp passthrough to %s failed: %s", host.endpoint.address, exc)
            self.close()
            return
        if self.closed:
            if side.transport is not None:
                side.transport.close()
            return
        self.upstream = side
        self.cluster.scope.inc("upstream_cx_total")
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
