"""The control plane's own metrics, in Prometheus text format on ``--metrics-address``.

========================================  =========  =====================================
name                                      type       labels
========================================  =========  =====================================
pilotfish_xds_connected_proxies           gauge      stream (sotw, delta)
pilotfish_xds_requests_total              counter    type
pilotfish_xds_pushes_total                counter    type
pilotfish_xds_push_latency_seconds        histogram  (none): mesh change to response sent
pilotfish_xds_nacks_total                 counter    type
pilotfish_mesh_generation                 gauge      (none): bumps on every accepted edit
pilotfish_mesh_reload_errors_total        counter    (none): edits rejected as invalid
pilotfish_ca_requests_total               counter    outcome (issued, unauthenticated,
                                                     denied, invalid, unavailable); with a CA
pilotfish_xds_streams_refused_total       counter    reason: unauthenticated (no acceptable
                                                     certificate), identity (metadata
                                                     contradicts it), unknown_node,
                                                     certificate_expired (stream ended)
pilotfish_serving_certificate_expiry      gauge      (none): Unix time the TLS ports'
                                                     certificate expires (with TLS ports)
pilotfish_kubernetes_watch_total          counter    what: list, watch, event, bookmark,
                                                     gone (410, relisted), failure,
                                                     malformed (with ``--kubernetes``)
pilotfish_kubernetes_services             gauge      (none): Services discovered
========================================  =========  =====================================

``type`` is the xDS resource type's short name: LDS, RDS, CDS, EDS.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from envoy.service.discovery.v3 import discovery_pb2

from control_plane.xds.callbacks import Callbacks
from control_plane.xds.stream_state import NackReceived
from control_plane.xds.types import SHORT_NAMES
from pilotfish.plainhttp import Response
from sidecar.observability.registry import Registry, Sample

CONTENT_TYPE = "text/plain; version=0.0.4"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _short(type_url: str) -> str:
    return SHORT_NAMES.get(type_url, type_url.rpartition(".")[2] or "unknown")


class ControlPlaneMetrics(Callbacks):
    """Counts what the ADS server does; forwards every callback to ``inner`` too."""

    def __init__(self, inner: Callbacks | None = None) -> None:
        self.inner = inner or Callbacks()
        self.registry = Registry()
        r = self.registry
        self.connected = r.gauge(
            "pilotfish_xds_connected_proxies", "ADS streams open now.", ("stream",)
        )
        self.requests = r.counter("pilotfish_xds_requests_total", "xDS requests.", ("type",))
        self.pushes = r.counter("pilotfish_xds_pushes_total", "xDS responses sent.", ("type",))
        self.push_latency = r.histogram(
            "pilotfish_xds_push_latency_seconds",
            "From a mesh change to a response carrying it.",
            (),
            LATENCY_BUCKETS,
        )
        self.nacks = r.counter("pilotfish_xds_nacks_total", "Responses rejected.", ("type",))
        self._kinds: dict[int, str] = {}
        self.generation: Callable[[], int] = lambda: 0
        self.reload_errors: Callable[[], int] = lambda: 0
        # With --kubernetes: the watch's counters, by what, and the Services known.
        self.kube_watch: Callable[[], dict[str, int]] = dict
        self.kube_services: Callable[[], int | None] = lambda: None
        r.callback("pilotfish_mesh_generation", "Mesh edits accepted, plus one.", "gauge",
                   self._generation)  # fmt: skip
        r.callback("pilotfish_mesh_reload_errors_total", "Mesh edits rejected.", "counter",
                   self._reload_errors)  # fmt: skip
        self.ca_outcomes: Callable[[], dict[str, int]] = dict
        r.callback("pilotfish_ca_requests_total", "Certificate requests by outcome.", "counter",
                   self._ca_outcomes, ("outcome",))  # fmt: skip
        self.xds_refused: Callable[[], dict[str, int]] = dict
        r.callback("pilotfish_xds_streams_refused_total", "ADS streams ended by the control "
                   "plane, by reason.", "counter", self._xds_refused, ("reason",))  # fmt: skip
        self.serving_expiry: Callable[[], float | None] = lambda: None
        r.callback("pilotfish_serving_certificate_expiry", "When the serving certificate of "
                   "the TLS ports expires (Unix seconds).", "gauge",
                   self._serving_expiry)  # fmt: skip
        r.callback("pilotfish_kubernetes_watch_total", "Kubernetes list/watch activity.",
                   "counter", self._kube_watch, ("what",))  # fmt: skip
        r.callback("pilotfish_kubernetes_services", "Kubernetes Services discovered.", "gauge",
                   self._kube_services)  # fmt: skip

    def _kube_watch(self) -> Iterator[Sample]:
        for what, value in sorted(self.kube_watch().items()):
            yield (what,), float(value)

    def _kube_services(self) -> Iterator[Sample]:
        count = self.kube_services()
        if count is not None:
            yield (), float(count)

    def _generation(self) -> Iterator[Sample]:
        yield (), float(self.generation())

    def _reload_errors(self) -> Iterator[Sample]:
        yield (), float(self.reload_errors())

    def _ca_outcomes(self) -> Iterator[Sample]:
        for outcome, count in self.ca_outcomes().items():
            yield (outcome,), float(count)

    def _xds_refused(self) -> Iterator[Sample]:
        for reason, count in sorted(self.xds_refused().items()):
            yield (reason,), float(count)

    def _serving_expiry(self) -> Iterator[Sample]:
        expiry = self.serving_expiry()
        if expiry is not None:
            yield (), expiry

    def on_stream_open(self, stream_id: int, kind: str) -> None:
        self._kinds[stream_id] = kind
        self.connected.labels(kind).add(1)
        self.inner.on_stream_open(stream_id, kind)

    def on_stream_close(self, stream_id: int, node_id: str) -> None:
        kind = self._kinds.pop(stream_id, None)
        if kind is not None:
            self.connected.labels(kind).add(-1)
        self.inner.on_stream_close(stream_id, node_id)

    def on_request(
        self,
        stream_id: int,
        request: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest,
    ) -> None:
        self.requests.labels(_short(request.type_url)).inc()
        self.inner.on_request(stream_id, request)

    def on_nack(self, stream_id: int, node_id: str, nack: NackReceived) -> None:
        self.nacks.labels(_short(nack.type_url)).inc()
        self.inner.on_nack(stream_id, node_id, nack)

    def on_response(self, stream_id: int, type_url: str, mesh_changed_at: float | None) -> None:
        self.pushes.labels(_short(type_url)).inc()
        if mesh_changed_at is not None:
            self.push_latency.labels().observe(time.monotonic() - mesh_changed_at)
        self.inner.on_response(stream_id, type_url, mesh_changed_at)

    def handle(self, method: str, target: str) -> Response:
        path = target.split("?", 1)[0]
        if method == "GET" and path in ("/metrics", "/stats/prometheus"):
            return 200, CONTENT_TYPE, self.registry.render().encode()
        if method == "GET" and path == "/ready":
            # For the kubelet, whose probes cannot speak TLS to the gRPC ports: this port
            # opens only once every gRPC port is serving.
            return 200, "text/plain", b"ready\n"
        return 404, "text/plain", b"GET /metrics or /ready\n"
