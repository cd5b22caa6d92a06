"""Clusters, their hosts, and the connections to them.

A ``ClusterRuntime`` is built from a ``ClusterConfig``; each endpoint becomes an ``UpstreamHost``
with its own connection pool. Config updates keep the hosts that stay (and their warm
connections) and drain the hosts that leave: no new requests, in-flight ones finish.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Collection
from typing import TYPE_CHECKING

from pilotfish.config.cluster_policy import LOCAL_ORIGIN_ONLY, LbKind
from pilotfish.config.model import ClusterConfig, Endpoint, Protocol
from sidecar.flags import ResponseFlag
from sidecar.http.h1conn import H1ClientConnection
from sidecar.http.h2conn import H2Connection, H2Stream
from sidecar.http.streams import Headers, ResetReason, StreamHandler
from sidecar.idle import IdleTimer
from sidecar.observability.metrics import ClusterStats, MeshMetrics
from sidecar.stats import Scope, StatsStore
from sidecar.upstream.mtls import UpstreamPeerRejected, connect_mtls
from sidecar.upstream.policy.breaker import Permit
from sidecar.upstream.policy.cluster import ClusterBalancer
from sidecar.upstream.policy.health import HealthChanged, HostBecameHealthy
from sidecar.upstream.policy.health_probes import HealthCheckRunner, make_probe
from sidecar.upstream.policy.lb import NO_CONTEXT, LbContext
from sidecar.upstream.policy.outlier import HostEjected
from sidecar.upstream.policy.resilience import ClusterResilienceRuntime
from sidecar.upstream.pool import ConnectionPool, PooledConnection

if TYPE_CHECKING:
    from pilotfish.config.security import UpstreamMtls
    from sidecar.security.workload import WorkloadCertificates

log = logging.getLogger(__name__)

UPSTREAM_STREAM_WINDOW = 256 * 1024
# Per-stream windows bound what a stream buffers; the connection window must not let a few
# stalled streams starve the others sharing the connection (Envoy defaults to 256 MiB too).
UPSTREAM_CONNECTION_WINDOW = 256 * 1024 * 1024


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
        self._max_streams = 0  # none until the server's SETTINGS say how many
        loop = asyncio.get_event_loop()
        self.idle_timer = IdleTimer(loop, host.cluster.config.idle_timeout, self.close)
        # Set once the server's first SETTINGS arrive: only then is its stream limit known.
        self.ready: asyncio.Future[None] = loop.create_future()
        # Nobody awaits ``ready`` once the connect timed out; don't log its failure then.
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())

    @property
    def max_streams(self) -> int:
        return min(self.h2.remote_settings.max_concurrent_streams, self.stream_cap)

    def is_available(self) -> bool:
        return (
            len(self.streams) < self._max_streams
            and not self.closed
            and not self.goaway_received
            and not self.goaway_sent
        )

    def is_idle(self) -> bool:
        return not self.streams

    def open_stream(self, headers: Headers, end_stream: bool, handler: StreamHandler) -> H2Stream:
        self.idle_timer.busy()
        stream_id = self.h2.get_next_available_stream_id()
        stream = H2Stream(self, stream_id, handler)
        self.streams[stream_id] = stream
        stream.send_headers(headers, end_stream)
        return stream

    def on_stream_closed(self, stream: H2Stream) -> None:
        if self.goaway_received and not self.streams:
            self.close()
            return
        if not self.streams:
            self.arm_idle_timer()
        self.host.released(self)

    def arm_idle_timer(self) -> None:
        if not self.closed:
            self.idle_timer.idle()

    def on_settings_changed(self) -> None:
        self._max_streams = self.max_streams  # read by every pool lookup
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
        self.idle_timer.cancel()
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
        self.connection_permits: dict[Upstream, Permit] = {}

    def _connect(self, pool: ConnectionPool) -> None:
        permit = self.cluster.resilience.breakers.try_acquire_connection()
        if permit is None:  # counted as upstream_cx_overflow by the breaker
            pool.connect_failed(ResponseFlag.UPSTREAM_OVERFLOW)
            return
        task = asyncio.get_event_loop().create_task(self._open_connection(permit))
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _open_connection(self, permit: Permit) -> None:
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
                if config.mtls is None:
                    await loop.create_connection(
                        lambda: conn, self.endpoint.host, self.endpoint.port
                    )
                else:
                    await self._connect_mtls(conn, config.mtls)
                if isinstance(conn, H2ClientConnection):
                    await conn.ready
        except TimeoutError:
            conn.abort()
            self.scope.inc("upstream_cx_connect_timeout")
            self.scope.inc("upstream_cx_connect_fail")
            log.info("connect to %s timed out", self.endpoint.address)
            permit.release()
            self.pool.connect_failed(ResponseFlag.UPSTREAM_CONNECT_FAILURE)
            return
        except OSError as exc:  # ConnectionError included
            conn.abort()
            self.scope.inc("upstream_cx_connect_fail")
            log.info("connect to %s failed: %s", self.endpoint.address, exc)
            permit.release()
            self.pool.connect_failed(ResponseFlag.UPSTREAM_CONNECT_FAILURE)
            return
        self.connection_permits[conn] = permit
        self.connections.add(conn)
        self.scope.gauge_add("upstream_cx_active", 1)
        self.pool.connected(conn)
        if conn.is_idle():
            # The waiters it was opened for gave up, or the host left meanwhile: no stream's
            # end will close it or start its idle timer.
            if self.pool.draining:
                conn.close()
            else:
                conn.arm_idle_timer()

    async def _connect_mtls(self, conn: Upstream, mtls: UpstreamMtls) -> None:
        workload = self.cluster.workload
        if workload is None:
            self.scope.inc("upstream_cx_mtls_unavailable")
            raise ConnectionRefusedError("mTLS cluster, but this sidecar has no certificate")
        try:
            await connect_mtls(
                lambda: conn, self.endpoint.host, self.endpoint.port, workload, mtls.identities
            )
        except UpstreamPeerRejected:
            self.scope.inc("upstream_cx_mtls_peer_rejected")
            raise
        except ssl.SSLError:
            self.scope.inc("upstream_cx_mtls_handshake_failed")
            raise

    def released(self, conn: PooledConnection) -> None:
        self.pool.released(conn)
        if self.pool.draining and conn.is_idle():
            conn.close()

    def connection_closed(self, conn: Upstream) -> None:
        permit = self.connection_permits.pop(conn, None)
        if permit is not None:
            permit.release()
        if conn in self.connections:
            self.connections.discard(conn)
            self.scope.gauge_add("upstream_cx_active", -1)
            self.scope.inc("upstream_cx_destroy")
        self.pool.closed(conn)

    def drain(self) -> None:
        self.pool.drain()


class ClusterRuntime:
    """One cluster: its hosts, and the balancer narrowed by health checks and ejections."""

    # What every request asks of the config and the balancer, decided when they change.
    needs_context: bool  # the balancer hashes on something of the request
    tracks_requests: bool  # the balancer wants ``request_started`` (and ends, with latency)

    def __init__(self, config: ClusterConfig, stats: StatsStore, metrics: MeshMetrics) -> None:
        self.config = config
        self.scope: Scope = stats.scope(f"cluster.{config.name}")
        self.metrics: ClusterStats = metrics.cluster(config.name)
        # The workload certificate for mTLS clusters; kept current by the ClusterManager.
        self.workload: WorkloadCertificates | None = None
        self.hosts: list[UpstreamHost] = [UpstreamHost(self, e) for e in config.endpoints]
        # Filled in place: a balancer kept across updates still reads the current hosts.
        self._host_of: dict[str, UpstreamHost] = {}
        self.balancer = self._new_balancer(config)
        self._balancer_set()
        loop = asyncio.get_event_loop()
        self.resilience = ClusterResilienceRuntime(
            config.resilience, loop.time, random.random, self.scope.counters
        )
        self.scope.sources["circuit_breakers"] = self.resilience.breakers.gauges
        self._health_runner: HealthCheckRunner | None = None
        self._outlier_timer: asyncio.TimerHandle | None = None
        self._ramp_timer: asyncio.TimerHandle | None = None
        self._set_hosts()

    def _new_balancer(self, config: ClusterConfig) -> ClusterBalancer:
        loop = asyncio.get_event_loop()
        return ClusterBalancer(
            config.lb_policy,
            health_check=config.health_check,
            outlier_detection=config.outlier_detection or LOCAL_ORIGIN_ONLY,
            clock=loop.time,
            rng=random.Random(),
            connections=self._open_connections,
        )

    def _balancer_set(self) -> None:
        self.needs_context = self.config.lb_policy.kind in (LbKind.RING_HASH, LbKind.MAGLEV)
        self.tracks_requests = self.balancer.tracks_requests

    def _open_connections(self, key: str) -> int:
        host = self._host_of.get(key)
        return host.pool.total_connections if host is not None else 0

    def _set_hosts(self) -> None:
        self._host_of.clear()
        self._host_of.update((h.endpoint.address, h) for h in self.hosts)
        self.balancer.set_hosts([(h.endpoint.address, h.endpoint.weight) for h in self.hosts])
        self.scope.gauges["membership_total"] = len(self.hosts)
        self._update_health_gauges()
        self._schedule_ramp()

    def _schedule_ramp(self) -> None:
        """While endpoints are in slow start, raise their weights a step at a time."""
        when = self.balancer.next_ramp_at
        if when is None or self._ramp_timer is not None:
            return
        self._ramp_timer = asyncio.get_event_loop().call_at(when, self._ramp)

    def _ramp(self) -> None:
        self._ramp_timer = None
        self.balancer.ramp()
        self._schedule_ramp()

    def start(self) -> None:
        """Start health checking and outlier sweeps (they need a running loop)."""
        checker = self.balancer.health_checker
        if checker is not None and self.config.health_check is not None:
            if self._health_runner is None:
                probe = make_probe(
                    self.config.health_check,
                    self.config.name,
                    self.config.mtls,
                    lambda: self.workload,
                )
                self._health_runner = HealthCheckRunner(checker, probe, self._health_changed)
            self._health_runner.set_hosts(
                {h.endpoint.address: (h.endpoint.host, h.endpoint.port) for h in self.hosts}
            )
        self._schedule_outlier_sweep()

    def _health_changed(self, event: HealthChanged) -> None:
        self.balancer.health_changed(event)
        healthy = isinstance(event, HostBecameHealthy)
        self.scope.inc("health_check.success" if healthy else "health_check.failure")
        self._update_health_gauges()

    def _update_health_gauges(self) -> None:
        states = self.balancer.states()
        self.scope.gauges["membership_healthy"] = sum(
            1 for s in states if s.health_check_ok and not s.ejected
        )
        self.scope.gauges["outlier_detection.ejections_active"] = sum(
            1 for s in states if s.ejected
        )
        healthy = self.scope.gauges["membership_healthy"]
        self.metrics.healthy_hosts.value = healthy
        self.metrics.unhealthy_hosts.value = len(states) - healthy

    def _schedule_outlier_sweep(self) -> None:
        when = self.balancer.next_outlier_evaluation_at
        if when is None or self._outlier_timer is not None:
            return
        loop = asyncio.get_event_loop()
        self._outlier_timer = loop.call_at(when, self._sweep_outliers)

    def _sweep_outliers(self) -> None:
        self._outlier_timer = None
        for event in self.balancer.evaluate_outliers():
            ejected = isinstance(event, HostEjected)
            self.scope.inc(
                "outlier_detection.ejections_enforced_total"
                if ejected
                else "outlier_detection.unejections_total"
            )
            log.info("outlier detection: %s %s", event.key, "ejected" if ejected else "back")
        self._update_health_gauges()
        self._schedule_outlier_sweep()

    def choose_host(
        self, exclude: Collection[int], ctx: LbContext = NO_CONTEXT
    ) -> tuple[int, UpstreamHost] | None:
        index = self.balancer.choose(ctx, exclude)
        if index is None:
            return None
        return index, self.hosts[index]

    def has_untried_host(self, tried: Collection[int]) -> bool:
        """Whether a retry could go to an eligible host this request has not tried yet."""
        return any(h.index not in tried for h in self.balancer.eligible)

    def request_started(self, index: int) -> None:
        self.balancer.request_started(self.hosts[index].endpoint.address)

    def request_finished(
        self, index: int, host: UpstreamHost, latency: float, status: int | None
    ) -> None:
        """``status`` is what the upstream answered, None for a connect failure or reset."""
        ejected = self.balancer.request_finished(host.endpoint.address, latency, status)
        if ejected:
            self._update_health_gauges()
            self.scope.inc("outlier_detection.ejections_enforced_total")
            self.metrics.ejections.value += 1
            log.info("outlier detection: %s ejected", host.endpoint.address)
        if self._outlier_timer is None and (ejected or self.balancer.sweeps_periodically):
            self._schedule_outlier_sweep()

    def host_health(self, index: int) -> str:
        """Envoy's ``health_flags`` for /clusters."""
        state = self.balancer.states()[index]
        flags = []
        if not state.health_check_ok:
            flags.append("/failed_active_hc")
        if state.ejected:
            flags.append("/failed_outlier_check")
        return "".join(flags) or "healthy"

    def updated(self, config: ClusterConfig, stats: StatsStore) -> ClusterRuntime:
        """A new runtime for ``config`` that keeps the hosts (and connections) that stay."""
        new = ClusterRuntime.__new__(ClusterRuntime)
        new.config = config
        new.scope = self.scope
        new.metrics = self.metrics
        new.resilience = self.resilience
        new.resilience.update(config.resilience)
        same_shape = (config.protocol, config.max_concurrent_streams, config.mtls) == (
            self.config.protocol,
            self.config.max_concurrent_streams,
            self.config.mtls,
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
        new._host_of = self._host_of
        same_policy = (config.lb_policy, config.health_check, config.outlier_detection) == (
            self.config.lb_policy,
            self.config.health_check,
            self.config.outlier_detection,
        )
        # Health and ejection state carry over when the policies did not change.
        new.balancer = self.balancer if same_policy else new._new_balancer(config)
        new._balancer_set()
        new._health_runner = self._health_runner if same_policy else None
        new._outlier_timer = None
        new._ramp_timer = None
        if self._ramp_timer is not None:
            self._ramp_timer.cancel()
            self._ramp_timer = None
        if not same_policy:
            self._stop_background()
        elif self._outlier_timer is not None:
            self._outlier_timer.cancel()
            self._outlier_timer = None
        new._set_hosts()
        return new

    def _stop_background(self) -> None:
        if self._outlier_timer is not None:
            self._outlier_timer.cancel()
            self._outlier_timer = None
        if self._ramp_timer is not None:
            self._ramp_timer.cancel()
            self._ramp_timer = None
        runner, self._health_runner = self._health_runner, None
        if runner is not None:
            task = asyncio.get_event_loop().create_task(runner.close())
            _background.add(task)
            task.add_done_callback(_background.discard)

    def drain(self) -> None:
        self._stop_background()
        for host in self.hosts:
            host.drain()


_background: set[asyncio.Task[None]] = set()


class ClusterManager:
    def __init__(self, stats: StatsStore, metrics: MeshMetrics) -> None:
        self.stats = stats
        self.metrics = metrics
        self.clusters: dict[str, ClusterRuntime] = {}
        self.running = False
        self._workload: WorkloadCertificates | None = None

    @property
    def workload(self) -> WorkloadCertificates | None:
        return self._workload

    @workload.setter
    def workload(self, workload: WorkloadCertificates | None) -> None:
        self._workload = workload
        for cluster in self.clusters.values():
            cluster.workload = workload

    def apply(self, configs: dict[str, ClusterConfig]) -> None:
        clusters: dict[str, ClusterRuntime] = {}
        for name, config in configs.items():
            old = self.clusters.get(name)
            if old is None:
                clusters[name] = ClusterRuntime(config, self.stats, self.metrics)
            elif old.config == config:
                clusters[name] = old
            else:
                clusters[name] = old.updated(config, self.stats)
        for name, old in self.clusters.items():
            if name not in clusters:
                old.drain()
        for cluster in clusters.values():
            cluster.workload = self._workload
        self.clusters = clusters
        if self.running:
            for cluster in clusters.values():
                cluster.start()

    def start(self) -> None:
        self.running = True
        for cluster in self.clusters.values():
            cluster.start()

    def get(self, name: str) -> ClusterRuntime | None:
        return self.clusters.get(name)

    def close_all(self) -> None:
        self.running = False
        for cluster in self.clusters.values():
            cluster.drain()
            for host in cluster.hosts:
                for conn in list(host.connections):
                    conn.close()
