"""The sidecar's metric families, in Prometheus text format 0.0.4 (``MeshMetrics.render``).

==========================================  =========  ============================================
name                                        type       labels
==========================================  =========  ============================================
pilotfish_requests_total                    counter    direction, service, route, response_code,
                                                       grpc_status, response_flags
pilotfish_request_duration_seconds          histogram  (same as pilotfish_requests_total)
pilotfish_request_bytes_total               counter    direction, service, route
pilotfish_response_bytes_total              counter    direction, service, route
pilotfish_upstream_retries_total            counter    cluster
pilotfish_upstream_timeouts_total           counter    cluster
pilotfish_upstream_overflows_total          counter    cluster
pilotfish_upstream_ejections_total          counter    cluster
pilotfish_upstream_hosts                    gauge      cluster, health (healthy, unhealthy)
pilotfish_active_connections                gauge      direction
pilotfish_active_streams                    gauge      direction
pilotfish_xds_updates_total                 counter    type, result (accepted, rejected)
pilotfish_tracing_spans_dropped_total       counter    (none)
pilotfish_process_cpu_seconds_total         counter    (none)
pilotfish_process_resident_memory_bytes     gauge      (none)
pilotfish_process_open_fds                  gauge      (none)
==========================================  =========  ============================================

Label values: ``direction`` is ``inbound`` (to the local app) or ``outbound`` (from it);
``service`` is the destination service (the route's cluster); ``response_code`` is the HTTP
status, ``0`` when none was sent (the downstream went away); ``grpc_status`` is the numeric gRPC
status, empty for plain HTTP; ``response_flags`` is the response flag code (``UF``, ``UT``…),
empty when the upstream answered. Request bytes are body bytes received from the downstream,
response bytes body bytes sent to it. Process values are read from ``/proc/self`` at scrape time
(absent off Linux).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from sidecar.observability.registry import (
    CONTENT_TYPE,
    CounterChild,
    HistogramChild,
    Registry,
    Sample,
)

__all__ = ["CONTENT_TYPE", "ClusterStats", "MeshMetrics", "RouteStats"]

DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
INBOUND = "inbound"
OUTBOUND = "outbound"
_REQUEST_LABELS = (
    "direction",
    "service",
    "route",
    "response_code",
    "grpc_status",
    "response_flags",
)
_ROUTE_LABELS = ("direction", "service", "route")


class RouteStats:
    """The request metrics of one (direction, service, route), for the request path to keep.

    ``record`` finds the children for an outcome (status, gRPC status, flag) in a small dict,
    resolving them in the registry on the first request with that outcome."""

    __slots__ = ("_by_outcome", "_metrics", "_route", "request_bytes", "response_bytes")

    def __init__(self, metrics: MeshMetrics, direction: str, service: str, route: str) -> None:
        self._metrics = metrics
        self._route = (direction, service, route)
        self._by_outcome: dict[tuple[int, int | None, str], tuple[CounterChild, HistogramChild]]
        self._by_outcome = {}
        self.request_bytes = metrics.request_bytes.labels(*self._route)
        self.response_bytes = metrics.response_bytes.labels(*self._route)

    def record(
        self,
        status: int,
        grpc_status: int | None,
        flag: str,
        duration_s: float,
        bytes_in: int = 0,
        bytes_out: int = 0,
    ) -> None:
        key = (status, grpc_status, flag)
        children = self._by_outcome.get(key)
        if children is None:
            children = self._resolve(key)
        children[0].value += 1
        children[1].observe(duration_s)
        if bytes_in:
            self.request_bytes.value += bytes_in
        if bytes_out:
            self.response_bytes.value += bytes_out

    def _resolve(self, key: tuple[int, int | None, str]) -> tuple[CounterChild, HistogramChild]:
        status, grpc_status, flag = key
        values = (*self._route, str(status), "" if grpc_status is None else str(grpc_status), flag)
        children = (
            self._metrics.requests.labels(*values),
            self._metrics.request_duration.labels(*values),
        )
        self._by_outcome[key] = children
        return children


class ClusterStats:
    """The upstream counters of one cluster; bump ``retries.value += 1`` and so on."""

    __slots__ = (
        "ejections",
        "healthy_hosts",
        "overflows",
        "retries",
        "timeouts",
        "unhealthy_hosts",
    )

    def __init__(self, metrics: MeshMetrics, cluster: str) -> None:
        self.retries = metrics.upstream_retries.labels(cluster)
        self.timeouts = metrics.upstream_timeouts.labels(cluster)
        self.overflows = metrics.upstream_overflows.labels(cluster)
        self.ejections = metrics.upstream_ejections.labels(cluster)
        self.healthy_hosts = metrics.upstream_hosts.labels(cluster, "healthy")
        self.unhealthy_hosts = metrics.upstream_hosts.labels(cluster, "unhealthy")


class MeshMetrics:
    """All the families above in one registry. One per sidecar; not thread-safe (event loop)."""

    def __init__(self, *, proc: str = "/proc/self") -> None:
        r = self.registry = Registry()
        self.requests = r.counter(
            "pilotfish_requests_total", "Requests completed by the proxy.", _REQUEST_LABELS
        )
        self.request_duration = r.histogram(
            "pilotfish_request_duration_seconds",
            "Time from the request's headers to the end of the response.",
            _REQUEST_LABELS,
            DURATION_BUCKETS,
        )
        self.request_bytes = r.counter(
            "pilotfish_request_bytes_total", "Request body bytes received.", _ROUTE_LABELS
        )
        self.response_bytes = r.counter(
            "pilotfish_response_bytes_total", "Response body bytes sent.", _ROUTE_LABELS
        )
        cluster = ("cluster",)
        self.upstream_retries = r.counter(
            "pilotfish_upstream_retries_total", "Upstream attempts after the first.", cluster
        )
        self.upstream_timeouts = r.counter(
            "pilotfish_upstream_timeouts_total", "Requests that timed out upstream.", cluster
        )
        self.upstream_overflows = r.counter(
            "pilotfish_upstream_overflows_total",
            "Requests refused by a circuit breaker (pending or connection limits).",
            cluster,
        )
        self.upstream_ejections = r.counter(
            "pilotfish_upstream_ejections_total", "Hosts ejected by outlier detection.", cluster
        )
        self.upstream_hosts = r.gauge(
            "pilotfish_upstream_hosts", "Upstream hosts by health.", ("cluster", "health")
        )
        self.active_connections = r.gauge(
            "pilotfish_active_connections", "Open connections.", ("direction",)
        )
        self.active_streams = r.gauge(
            "pilotfish_active_streams", "Requests in flight.", ("direction",)
        )
        self.xds_updates = r.counter(
            "pilotfish_xds_updates_total", "xDS responses applied or refused.", ("type", "result")
        )
        self._span_drops: Callable[[], int] = lambda: 0
        r.callback(
            "pilotfish_tracing_spans_dropped_total",
            "Spans lost: export queue full, export failed, or ended after shutdown.",
            "counter",
            lambda: [((), float(self._span_drops()))],
        )
        self._proc = proc
        r.callback(
            "pilotfish_process_cpu_seconds_total",
            "User and system CPU time of the sidecar process.",
            "counter",
            self._cpu_seconds,
        )
        r.callback(
            "pilotfish_process_resident_memory_bytes",
            "Resident set size of the sidecar process.",
            "gauge",
            self._rss_bytes,
        )
        r.callback(
            "pilotfish_process_open_fds",
            "Open file descriptors of the sidecar process.",
            "gauge",
            self._open_fds,
        )
        self._routes: dict[tuple[str, str, str], RouteStats] = {}
        self._clusters: dict[str, ClusterStats] = {}

    # -- handles for the request path ------------------------------------------------------

    def route(self, direction: str, service: str, route: str) -> RouteStats:
        """The (cached) request metrics of a route; resolve once per route, not per request."""
        key = (direction, service, route)
        stats = self._routes.get(key)
        if stats is None:
            stats = self._routes[key] = RouteStats(self, direction, service, route)
        return stats

    def cluster(self, name: str) -> ClusterStats:
        stats = self._clusters.get(name)
        if stats is None:
            stats = self._clusters[name] = ClusterStats(self, name)
        return stats

    def xds_update(self, type_name: str, accepted: bool) -> None:
        self.xds_updates.labels(type_name, "accepted" if accepted else "rejected").value += 1

    def read_span_drops(self, source: Callable[[], int]) -> None:
        """Where the span drop count comes from: ``lambda: tracer.dropped_spans``."""
        self._span_drops = source

    def render(self) -> str:
        """The exposition text; serve it with ``CONTENT_TYPE``."""
        return self.registry.render()

    # -- process, from /proc ---------------------------------------------------------------

    def _read(self, name: str) -> str | None:
        try:
            with open(os.path.join(self._proc, name), encoding="ascii") as f:
                return f.read()
        except OSError:
            return None

    def _cpu_seconds(self) -> Iterator[Sample]:
        stat = self._read("stat")
        if stat is None:
            return
        # Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
        fields = stat.rpartition(")")[2].split()
        ticks = int(fields[11]) + int(fields[12])
        yield (), ticks / os.sysconf("SC_CLK_TCK")

    def _rss_bytes(self) -> Iterator[Sample]:
        statm = self._read("statm")
        if statm is None:
            return
        yield (), float(int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE"))

    def _open_fds(self) -> Iterator[Sample]:
        try:
            yield (), float(len(os.listdir(os.path.join(self._proc, "fd"))))
        except OSError:
            return
