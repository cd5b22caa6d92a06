"""The sidecar process: listeners, clusters and routes, live config, admin, draining."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from pilotfish.config.model import Bootstrap, ListenerConfig, TelemetryConfig
from sidecar.listen.cgroup_cpu import CgroupCpu
from sidecar.listen.listener import ListenerRuntime, SniffingProtocol
from sidecar.observability.access_log import AccessEntry, AccessLog
from sidecar.observability.metrics import MeshMetrics, RouteStats
from sidecar.observability.tracing import Tracer
from sidecar.route.policy.runtime import RoutePolicyRuntime
from sidecar.route.table import RouteTable
from sidecar.stats import StatsStore
from sidecar.timer_wheel import TimerWheel
from sidecar.upstream.clusters import ClusterManager

if TYPE_CHECKING:
    from sidecar.route.exchange import Exchange
    from sidecar.route.table import RouteDecision
    from sidecar.security.workload import WorkloadCertificates

log = logging.getLogger("pilotfish.sidecar")

CPU_SAMPLE_INTERVAL = 0.25


class ApplyError(Exception):
    """A config could not be put in force (a listener would not bind); the old one stays."""


class Sidecar:
    def __init__(
        self,
        bootstrap: Bootstrap,
        *,
        reuse_port: bool = False,
        dynamic: bool = False,
        handed_off: dict[str, tuple[str, int]] | None = None,
    ) -> None:
        """``handed_off``: listeners (name: address) another process accepts on, handing this
        one their connections (``serve_accepted``); it does not bind those addresses."""
        self.bootstrap = bootstrap
        self.reuse_port = reuse_port
        self.handed_off = handed_off or {}
        self.handoff_closed: Callable[[], None] | None = None
        # Dynamic (xDS) sidecars are not ready until their first complete config arrives.
        self.dynamic = dynamic
        # Until the first complete xDS config: routing misses are "no config yet", not NR.
        self.awaiting_config = dynamic
        self.stats = StatsStore()
        self.metrics = MeshMetrics()
        # Each request's metrics, by (listener, route plan, cluster): found once per
        # combination, not per request. Emptied when listeners change (their direction may).
        self._route_stats: dict[tuple[object, object, object], RouteStats] = {}
        self.clusters = ClusterManager(self.stats, self.metrics)
        self.route_tables: dict[str, RouteTable] = {}
        self.listeners: dict[str, ListenerRuntime] = {}
        self.health_check_failed = False
        self.initialized = False
        self.draining = False
        self.started_at = time.time()
        self.config_updated_at = 0.0
        self.stopped = asyncio.Event()
        self.config_dump_extra: Callable[[], dict[str, Any]] | None = None
        # Registration hooks: leave the registry before draining, and tell it about
        # /healthcheck/fail and /healthcheck/ok.
        self.before_drain: Callable[[], Awaitable[None]] | None = None
        self.on_health_check: Callable[[bool], None] | None = None
        self.telemetry = bootstrap.telemetry
        self.tracer = Tracer.create(bootstrap.telemetry.tracing)
        self.metrics.read_span_drops(lambda: self.tracer.dropped_spans)
        self.access = AccessLog(bootstrap.telemetry.access_log)
        self.timers = TimerWheel()  # request deadlines and per-try timeouts
        self._drain_task: asyncio.Task[None] | None = None
        self._started = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._route_policies_by_key: dict[tuple[str, str, str], RoutePolicyRuntime] = {}
        self._route_policies: dict[int, RoutePolicyRuntime] = {}
        self._cpu_task: asyncio.Task[None] | None = None

    @property
    def workload(self) -> WorkloadCertificates | None:
        """The workload certificate for mTLS listeners and clusters; None: they refuse TLS.
        Kept by the cluster manager, which hands it to every cluster."""
        return self.clusters.workload

    @workload.setter
    def workload(self, workload: WorkloadCertificates | None) -> None:
        self.clusters.workload = workload

    # -- config ----------------------------------------------------------------------------

    def apply(self, bootstrap: Bootstrap) -> None:
        """Put ``bootstrap`` in force at once, or raise ``ApplyError`` and change nothing.

        Streams already routed keep the route, cluster and connection they hold; hosts and
        listeners that leave are drained, not cut.
        """
        bound = self._bind_new_listeners(bootstrap) if self._started else {}
        try:
            access = self._new_access_log(bootstrap.telemetry)
            tracer = self._new_tracer(bootstrap.telemetry)
        except ApplyError:
            for sock in bound.values():
                sock.close()
            raise
        # From here on the new config goes in force.
        self.clusters.apply(bootstrap.clusters)
        self.route_tables = {name: RouteTable(rc) for name, rc in bootstrap.route_configs.items()}
        self._update_route_policies(bootstrap)
        self._update_telemetry(bootstrap.telemetry, access, tracer)
        self.bootstrap = bootstrap
        self.config_updated_at = time.time()
        self.stats.scope("server").inc("config_updates")
        if self._started:
            self._sync_listeners(bound)

    def check_listeners(self, listeners: list[ListenerConfig]) -> str | None:
        """Whether these listeners could listen now; the reason if one could not."""
        for config in listeners:
            current = self.listeners.get(config.name)
            if self._is_handed_off(config) or (
                current is not None
                and (current.config.host, current.config.port) == (config.host, config.port)
            ):
                continue
            try:
                self._bind(config).close()
            except OSError as exc:
                return (
                    f"listener {config.name}: cannot listen on {config.host}:{config.port}: {exc}"
                )
        return None

    def _bind_new_listeners(self, bootstrap: Bootstrap) -> dict[str, socket.socket]:
        bound: dict[str, socket.socket] = {}
        for config in bootstrap.listeners:
            current = self.listeners.get(config.name)
            if self._is_handed_off(config) or (
                current is not None
                and (current.config.host, current.config.port) == (config.host, config.port)
            ):
                continue
            try:
                bound[config.name] = self._bind(config)
            except OSError as exc:
                for sock in bound.values():
                    sock.close()
                raise ApplyError(
                    f"listener {config.name}: cannot listen on {config.host}:{config.port}: "
                    f"{exc.strerror or exc}"
                ) from exc
        return bound

    def _is_handed_off(self, config: ListenerConfig) -> bool:
        return self.handed_off.get(config.name) == (config.host, config.port)

    def serve_accepted(self, name: str, sock: socket.socket) -> bool:
        """Serve a connection accepted for listener ``name`` by another process; False if
        there is no such listener (any more) or the sidecar is draining."""
        runtime = self.listeners.get(name)
        if runtime is None or self.draining or runtime.draining:
            return False
        runtime.closed_hook = self.handoff_closed
        loop = asyncio.get_event_loop()
        task = loop.create_task(self._serve_accepted(runtime, sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _serve_accepted(self, runtime: ListenerRuntime, sock: socket.socket) -> None:
        loop = asyncio.get_event_loop()
        try:
            await loop.connect_accepted_socket(lambda: SniffingProtocol(runtime), sock)
        except OSError as exc:  # the client left before the connection was set up
            log.debug("listener %s: handed connection lost: %s", runtime.config.name, exc)
            sock.close()
            if runtime.closed_hook is not None:
                runtime.closed_hook()

    def _bind(self, config: ListenerConfig) -> socket.socket:
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((config.host, config.port))
            sock.listen(config.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _sync_listeners(self, bound: dict[str, socket.socket]) -> None:
        self._route_stats.clear()
        wanted = {config.name: config for config in self.bootstrap.listeners}
        for name in list(self.listeners):
            runtime = self.listeners[name]
            if name not in wanted or name in bound:
                del self.listeners[name]
                log.info("listener %s removed; draining its connections", name)
                if runtime.server is not None:
                    runtime.server.close()
                runtime.start_drain()
        loop = asyncio.get_event_loop()
        for name, config in wanted.items():
            existing = self.listeners.get(name)
            if existing is not None:
                existing.update(config)
                continue
            runtime = ListenerRuntime(self, config)
            self.listeners[name] = runtime
            if name not in bound:  # handed off: its connections arrive by serve_accepted
                continue
            task = loop.create_task(self._serve_listener(runtime, bound[name]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve_listener(self, runtime: ListenerRuntime, sock: socket.socket) -> None:
        loop = asyncio.get_event_loop()
        # create_server listens on the socket again, with its own backlog (100 by default).
        runtime.server = await loop.create_server(
            lambda: SniffingProtocol(runtime), sock=sock, backlog=runtime.config.backlog
        )
        config = runtime.config
        log.info("listener %s on %s:%d", config.name, config.host, config.port)

    def _update_route_policies(self, bootstrap: Bootstrap) -> None:
        """One policy runtime per route; rate-limit buckets survive unchanged routes."""
        clock = asyncio.get_event_loop().time
        by_key: dict[tuple[str, str, str], RoutePolicyRuntime] = {}
        by_id: dict[int, RoutePolicyRuntime] = {}
        for rc in bootstrap.route_configs.values():
            for vhost in rc.virtual_hosts:
                for index, route in enumerate(vhost.routes):
                    # The index too: route names are not required to be unique.
                    key = (rc.name, vhost.name, f"{index}:{route.name}")
                    old = self._route_policies_by_key.get(key)
                    runtime = (
                        old.updated(route.policy)
                        if old is not None
                        else RoutePolicyRuntime(route.policy, clock)
                    )
                    by_key[key] = runtime
                    by_id[id(route)] = runtime
        self._route_policies_by_key = by_key
        self._route_policies = by_id

    def _new_access_log(self, telemetry: TelemetryConfig) -> AccessLog | None:
        """The access log ``telemetry`` asks for if it changed; ApplyError if it cannot open."""
        config = telemetry.access_log
        if config == self.telemetry.access_log:
            return None
        try:
            return AccessLog(config)
        except OSError as exc:
            raise ApplyError(f"access log {config.path}: {exc}") from exc

    def _new_tracer(self, telemetry: TelemetryConfig) -> Tracer | None:
        """The tracer a new config needs (None: keep ours), built before anything changes."""
        if telemetry.tracing == self.telemetry.tracing:
            return None
        try:
            return Tracer.create(telemetry.tracing)
        except (ValueError, OSError) as exc:
            raise ApplyError(f"tracing: {exc}") from exc

    def _update_telemetry(
        self, telemetry: TelemetryConfig, access: AccessLog | None, tracer: Tracer | None
    ) -> None:
        if telemetry == self.telemetry:
            return
        if tracer is not None:
            old_tracer, self.tracer = self.tracer, tracer
            self._in_background(asyncio.to_thread(old_tracer.shutdown))
        if access is not None:
            self.access.close()
            self.access = access
        self.telemetry = telemetry

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_event_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def route_policy(self, decision: RouteDecision) -> RoutePolicyRuntime:
        runtime = self._route_policies.get(id(decision.route))
        if runtime is None:  # routed under a config that has since been replaced
            runtime = RoutePolicyRuntime(decision.route.policy, asyncio.get_event_loop().time)
        return runtime

    async def _sample_cpu(self) -> None:
        """Feed each load shedder that names a cgroup its pod's CPU use, four times a second.

        Not this process's CPU: the sidecar is busy relaying, which says nothing of whether
        the app behind it is saturated."""
        loop = asyncio.get_event_loop()
        readers: dict[str, CgroupCpu] = {}
        while True:
            await asyncio.sleep(CPU_SAMPLE_INTERVAL)
            now = loop.time()
            usage: dict[str, float | None] = {}
            for runtime in self.listeners.values():
                shedder = runtime.shedder
                directory = shedder.config.cgroup if shedder is not None else None
                if shedder is None or directory is None:
                    continue
                if directory not in usage:
                    reader = readers.setdefault(directory, CgroupCpu(directory))
                    usage[directory] = reader.sample(now)
                sample = usage[directory]
                if sample is not None:
                    shedder.record_cpu(sample)

    def set_health_check_failed(self, failed: bool) -> None:
        self.health_check_failed = failed
        if self.on_health_check is not None:
            self.on_health_check(failed)

    @property
    def ready(self) -> bool:
        return self.initialized and not self.draining and not self.health_check_failed

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.clusters.apply(self.bootstrap.clusters)
        self.clusters.start()
        self.route_tables = {
            name: RouteTable(rc) for name, rc in self.bootstrap.route_configs.items()
        }
        self._update_route_policies(self.bootstrap)
        self._cpu_task = asyncio.get_event_loop().create_task(self._sample_cpu())
        bound = self._bind_new_listeners(self.bootstrap)  # ApplyError names a busy listener
        self._started = True
        self._sync_listeners(bound)
        await asyncio.sleep(0)  # let the listeners start serving
        if not self.dynamic:
            self.initialized = True

    def request_stop(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_event_loop().create_task(self.drain_and_stop())
            self._drain_task.add_done_callback(self._drained)

    def _drained(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("draining failed; stopping now", exc_info=task.exception())
        self.stopped.set()

    async def drain_and_stop(self) -> None:
        """Stop accepting, GOAWAY everyone, let streams finish within the drain timeout."""
        self.draining = True  # /ready fails from now on
        if self.before_drain is not None:
            # Leave the registry first, and keep serving until the callers' proxies have
            # dropped this instance: a GOAWAY before that would only turn into retries.
            await self.before_drain()
        log.info("draining (up to %.1fs)", self.bootstrap.drain_timeout)
        for runtime in self.listeners.values():
            if runtime.server is not None:
                runtime.server.close()
            runtime.start_drain()
        deadline = time.monotonic() + self.bootstrap.drain_timeout
        while time.monotonic() < deadline:
            if not any(rt.active_streams for rt in self.listeners.values()):
                break
            await asyncio.sleep(0.05)
        leftover = sum(rt.active_streams for rt in self.listeners.values())
        if leftover:
            log.warning("drain timeout: closing %d streams still open", leftover)
        for runtime in self.listeners.values():
            for conn in list(runtime.connections):
                conn.close()
        self.clusters.close_all()
        self.timers.close()
        if self._cpu_task is not None:
            self._cpu_task.cancel()
        self.access.close()
        # Flushing spans blocks (bounded by the tracer's shutdown timeout): not on the loop.
        await asyncio.to_thread(self.tracer.shutdown)
        self.stopped.set()

    # -- logging ---------------------------------------------------------------------------

    def _request_metrics(
        self, key: tuple[object, object, object], listener: ListenerRuntime, exchange: Exchange
    ) -> RouteStats:
        if len(self._route_stats) >= 4096:  # plans and clusters of configs long replaced
            self._route_stats.clear()
        decision = exchange.decision
        route = decision.route.name if decision is not None else ""
        if exchange.cluster is not None:
            service = exchange.cluster.config.name
        elif decision is not None:
            # Answered before an upstream was picked (a fault, a rate limit): still the service
            # the route chose, so its error rate shows the failure. Not kept under this key,
            # which a split route shares among its clusters; metrics.route has its own cache.
            return self.metrics.route(listener.direction, decision.cluster, route)
        else:
            service = ""
        stats = self._route_stats[key] = self.metrics.route(listener.direction, service, route)
        return stats

    def access_log(self, listener: ListenerRuntime, exchange: Exchange) -> None:
        """The end of a request: metrics, and its access log line."""
        duration = time.monotonic() - exchange.start
        flags = ",".join(exchange.flags)
        key = (listener, exchange.plan, exchange.cluster)
        stats = self._route_stats.get(key)
        if stats is None:
            stats = self._request_metrics(key, listener, exchange)
        stats.record(
            exchange.status,
            exchange.grpc_status,
            flags,
            duration,
            exchange.bytes_in,
            exchange.bytes_out,
        )
        if self.access.enabled:
            decision = exchange.decision
            route = decision.route.name if decision is not None else ""
            service = exchange.cluster.config.name if exchange.cluster is not None else ""
            trace = exchange.trace
            request_id: bytes | None
            if trace is not None:
                trace_id, request_id = trace.trace_id_hex, trace.request_id
            else:  # an unsampled new trace: no handle, only the ids
                trace_id = f"{exchange.trace_id:032x}" if exchange.trace_id else ""
                request_id = exchange.request_id
            self.access.log(
                AccessEntry(
                    start_time=exchange.start_wall,
                    method=exchange.method,
                    authority=exchange.authority,
                    path=exchange.path,
                    protocol=exchange.protocol,
                    status=exchange.status,
                    duration_ms=duration * 1000,
                    grpc_status=exchange.grpc_status,
                    bytes_in=exchange.bytes_in,
                    bytes_out=exchange.bytes_out,
                    upstream_host=exchange.upstream_host or None,
                    attempts=exchange.attempts,
                    response_flags=flags or None,
                    trace_id=trace_id or None,
                    request_id=request_id.decode("latin-1") if request_id is not None else None,
                    listener=listener.config.name,
                    route=route or None,
                    cluster=service or None,
                )
            )
