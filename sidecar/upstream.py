"""Clusters, their hosts, and the connections to them.

A ``ClusterRuntime`` is built from a ``ClusterConfig``; each endpoint becomes an ``UpstreamHost``
with its own connection pool. Config updates keep the hosts that stay (and their warm
connections) and drain the hosts that leave: no new requests, in-flight ones finish.
"""

from __future__ import annotations

import asyncio
import logging

from pilotfish.config.model import ClusterConfig, Endpoint, Protocol
from sidecar.balancer import SmoothWeightedRoundRobin
from sidecar.flags import ResponseFlag
from sidecar.h1conn import H1ClientConnection
from sidecar.h2conn import H2Connection, H2Stream
from sidecar.pool import ConnectionPool, PooledConnection
from sidecar.stats import Scope, StatsStore
from sidecar.streams import Headers, ResetReason, StreamHandler

log = logging.getLogger(__name__)

UPSTREAM_STREAM_WINDOW = 256 * 1024
UPSTREAM_CONNECTION_WINDOW = 4 * 1024 * 1024


class H2ClientConnection(H2Connection):
    """An upstream HTTP/2 connection shared by many streams."""

    def __init__(self, host: UpstreamHost) -> None:
        super().__init__(
            client_side=True,
            stream_window=UPSTREAM_STREAM_WINDOW,
            connection_window=UPSTREAM_CONNECTION_WINDOW,
            max_concurrent_streams=100,
        )
        self.host = host
        self.stream_cap = host.cluster.config.max_concurrent_streams
        self._idle_timer: asyncio.TimerHandle | None = None
        # Set once the server's first SETTINGS arrive: only then is its stream limit known.
        self.ready: asyncio.Future[None] = asyncio.get_event_loop().create_future()
        # Nobody awaits ``ready`` once the connect timed out; don't log its failure then.
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())

    @property
    def max_streams(self) -> int:
        return min(self.h2.remote_settings.max_concurrent_streams, self.stream_cap)

    def is_available(self) -> bool:
        return (
            not self.closed
            and not self.goaway_received
            and not self.goaway_sent
            and len(self.streams) < self.max_streams
        )

    def is_idle(self) -> bool:
        return not self.streams

    def open_stream(self, headers: Headers, end_stream: bool, handler: StreamHandler) -> H2Stream:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        stream_id = self.h2.get_next_available_stream_id()
        stream = H2Stream(self, stream_id, handler)
        self.streams[stream_id] = stream
        stream.send_headers(headers, end_stream)
        return stream

    def on_stream_closed(self, stream: H2Stream) -> None:
        if self.goaway_received and not self.streams:
            self.close()
            return
        if not self.streams and not self.closed:
            loop = asyncio.get_event_loop()
            self._idle_timer = loop.call_later(self.host.cluster.config.idle_timeout, self.close)
        self.host.released(self)

    def on_settings_changed(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)
            return
        self.host.pool.capacity_changed(self)

    def on_goaway(self, last_stream_id: int | None, error_code: int) -> None:
        """No new streams here; streams the peer never processed may go elsewhere."""
        self.host.scope.inc("upstream_cx_goaway")
        unprocessed = [
            s
            for sid, s in self.streams.items()
            if last_stream_id is not None and sid > last_stream_id
        ]
        for stream in unprocessed:
            self._close_stream(stream, ResetReason.REFUSED, 0x7)
        if not self.streams:
            self.close()
        self.host.pool.capacity_changed(self)

    def on_closed(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before SETTINGS"))
            return
        self.host.connection_closed(self)

    def protocol_error(self, exc: Exception) -> None:
        self.host.scope.inc("upstream_cx_protocol_error")
        super().protocol_error(exc)


Upstream = H2ClientConnection | H1ClientConnection


class UpstreamHost:
    """One endpoint of a cluster and its connection pool."""

    def __init__(self, cluster: ClusterRuntime, endpoint: Endpoint) -> None:
        self.cluster = cluster
        self.endpoint = endpoint
        self.scope = cluster.scope
        config = cluster.config
        http2 = config.protocol is Protocol.HTTP2
        self.pool = ConnectionPool(
            self._connect,
            max_connections=config.max_connections_per_endpoint,
            max_pending=1024,
            streams_per_connection_hint=100 if http2 else 1,
        )
        self.active_requests = 0
        self.connections: set[Upstream] = set()

    def _connect(self, pool: ConnectionPool) -> None:
        asyncio.get_event_loop().create_task(self._open_connection())

    async def _open_connection(self) -> None:
        loop = asyncio.get_event_loop()
        config = self.cluster.config
        self.scope.inc("upstream_cx_total")
        conn: Upstream
        if config.protocol is Protocol.HTTP2:
            conn = H2ClientConnection(self)
        else:
            conn = H1ClientConnection(self, UPSTREAM_STREAM_WINDOW, config.idle_timeout)
        try:
            async with asyncio.timeout(config.connect_timeout):
                await loop.create_connection(lambda: conn, self.endpoint.host, self.endpoint.port)
                if isinstance(conn, H2ClientConnection):
                    await conn.ready
        except TimeoutError:
            conn.abort()
            self.scope.inc("upstream_cx_connect_timeout")
            self.scope.inc("upstream_cx_connect_fail")
            log.info("connect to %s timed out", self.endpoint.address)
            self.pool.connect_failed(ResponseFlag.UPSTREAM_CONNECT_FAILURE)
            return
        except OSError as exc:  # ConnectionError included
            conn.abort()
            self.scope.inc("upstream_cx_connect_fail")
            log.info("connect to %s failed: %s", self.endpoint.address, exc)
            self.pool.connect_failed(ResponseFlag.UPSTREAM_CONNECT_FAILURE)
            return
        self.connections.add(conn)
        self.scope.gauge_add("upstream_cx_active", 1)
        self.pool.connected(conn)

    def released(self, conn: PooledConnection) -> None:
        self.pool.released(conn)
        if self.pool.draining and conn.is_idle():
            conn.close()

    def connection_closed(self, conn: Upstream) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.scope.gauge_add("upstream_cx_active", -1)
            self.scope.inc("upstream_cx_destroy")
        self.pool.closed(conn)

    def drain(self) -> None:
        self.pool.drain()


class ClusterRuntime:
    def __init__(self, config: ClusterConfig, stats: StatsStore) -> None:
        self.config = config
        self.scope: Scope = stats.scope(f"cluster.{config.name}")
        self.hosts: list[UpstreamHost] = [UpstreamHost(self, e) for e in config.endpoints]
        self.balancer = SmoothWeightedRoundRobin([e.weight for e in config.endpoints])
        self.scope.gauges["membership_total"] = len(self.hosts)

    def choose_host(self, exclude: set[int]) -> tuple[int, UpstreamHost] | None:
        index = self.balancer.pick(exclude)
        if index is None:
            return None
        return index, self.hosts[index]

    def updated(self, config: ClusterConfig, stats: StatsStore) -> ClusterRuntime:
        """A new runtime for ``config`` that keeps the hosts (and connections) that stay."""
        new = ClusterRuntime.__new__(ClusterRuntime)
        new.config = config
        new.scope = self.scope
        same_shape = (config.protocol, config.max_concurrent_streams) == (
            self.config.protocol,
            self.config.max_concurrent_streams,
        )
        old_hosts = {h.endpoint.address: h for h in self.hosts} if same_shape else {}
        hosts: list[UpstreamHost] = []
        for endpoint in config.endpoints:
            host = old_hosts.pop(endpoint.address, None)
            if host is None:
                host = UpstreamHost(new, endpoint)
            else:
                host.cluster = new
                host.endpoint = endpoint
            hosts.append(host)
        kept = {id(h) for h in hosts}
        for host in self.hosts:
            if id(host) not in kept:
                host.drain()
        new.hosts = hosts
        new.balancer = SmoothWeightedRoundRobin([e.weight for e in config.endpoints])
        new.scope.gauges["membership_total"] = len(hosts)
        return new

    def drain(self) -> None:
        for host in self.hosts:
            host.drain()


class ClusterManager:
    def __init__(self, stats: StatsStore) -> None:
        self.stats = stats
        self.clusters: dict[str, ClusterRuntime] = {}

    def apply(self, configs: dict[str, ClusterConfig]) -> None:
        clusters: dict[str, ClusterRuntime] = {}
        for name, config in configs.items():
            old = self.clusters.get(name)
            if old is None:
                clusters[name] = ClusterRuntime(config, self.stats)
            elif old.config == config:
                clusters[name] = old
            else:
                clusters[name] = old.updated(config, self.stats)
        for name, old in self.clusters.items():
            if name not in clusters:
                old.drain()
        self.clusters = clusters

    def get(self, name: str) -> ClusterRuntime | None:
        return self.clusters.get(name)

    def close_all(self) -> None:
        for cluster in self.clusters.values():
            for host in cluster.hosts:
                for conn in list(host.connections):
                    conn.close()
