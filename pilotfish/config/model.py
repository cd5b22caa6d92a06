"""The sidecar's config model: frozen dataclasses, filled from a static bootstrap or from xDS.

Every stage of the request path reads these values and nothing else, so a config update is
one atomic swap of a ``Bootstrap`` (or of one of its parts) and never a partial reload.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from pilotfish.config.cluster_policy import HealthCheckConfig, LbPolicy, OutlierDetectionConfig
from pilotfish.config.matchers import HeaderMatcher as HeaderMatcher  # re-exported
from pilotfish.config.route_policy import (
    ClusterResilience,
    ListenerLimits,
    LoadSheddingConfig,
    RoutePolicy,
)
from pilotfish.config.security import (
    AuthorizationPolicy,
    ListenerJwt,
    MtlsMode,
    RouteSecurity,
    UpstreamMtls,
)
from sidecar.observability.access_log import AccessLogConfig
from sidecar.observability.tracing_config import TracingConfig


class Protocol(enum.Enum):
    """What a cluster's endpoints speak."""

    HTTP2 = "http2"
    HTTP1 = "http1"
    TCP = "tcp"


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    weight: int = 1
    address: str = field(init=False, repr=False, compare=False)  # "host:port", read per request

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", f"{self.host}:{self.port}")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    name: str
    endpoints: tuple[Endpoint, ...]
    protocol: Protocol = Protocol.HTTP2
    connect_timeout: float = 5.0
    idle_timeout: float = 60.0
    # Upper bound on streams we open on one upstream HTTP/2 connection, whatever the peer allows.
    max_concurrent_streams: int = 1024
    max_connections_per_endpoint: int = 64
    lb_policy: LbPolicy = LbPolicy()
    health_check: HealthCheckConfig | None = None
    outlier_detection: OutlierDetectionConfig | None = None
    resilience: ClusterResilience = ClusterResilience()
    # mTLS with the workload certificate to every endpoint, checking its SPIFFE ID.
    mtls: UpstreamMtls | None = None


@dataclass(frozen=True, slots=True)
class PathMatch:
    """How a route matches ``:path`` (without its query string). Exactly one field is set."""

    prefix: str | None = None
    exact: str | None = None
    regex: re.Pattern[str] | None = None

    def matches(self, path: str) -> bool:
        if self.prefix is not None:
            return path.startswith(self.prefix)
        if self.exact is not None:
            return path == self.exact
        assert self.regex is not None
        return self.regex.fullmatch(path) is not None


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path: PathMatch
    headers: tuple[HeaderMatcher, ...] = ()
    methods: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class HeaderMutation:
    """Headers to add (``append=False`` replaces existing values) and names to remove."""

    add: tuple[tuple[str, str, bool], ...] = ()
    remove: frozenset[str] = frozenset()
    empty: bool = field(init=False, repr=False, compare=False)  # read per request

    def __post_init__(self) -> None:
        object.__setattr__(self, "empty", not self.add and not self.remove)


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    name: str
    weight: int


@dataclass(frozen=True, slots=True)
class RouteAction:
    """Where a matched request goes: one cluster, or clusters chosen by weight."""

    clusters: tuple[WeightedCluster, ...]
    timeout: float | None = 15.0
    prefix_rewrite: str | None = None
    host_rewrite: str | None = None

    @property
    def total_weight(self) -> int:
        return sum(c.weight for c in self.clusters)


@dataclass(frozen=True, slots=True)
class RouteEntry:
    name: str
    match: RouteMatch
    action: RouteAction
    request_headers: HeaderMutation = HeaderMutation()
    response_headers: HeaderMutation = HeaderMutation()
    policy: RoutePolicy = RoutePolicy()
    # On an inbound listener: JWT and authorization for this route instead of the listener's.
    security: RouteSecurity | None = None


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[RouteEntry, ...]
    request_headers: HeaderMutation = HeaderMutation()
    response_headers: HeaderMutation = HeaderMutation()


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    virtual_hosts: tuple[VirtualHost, ...]
    # (port, route config) pairs, from the control plane's per-port outbound listeners: a
    # connection whose original destination (behind interception) is one of these ports is
    # routed with that port's route config; port 0 stands for every other port (services
    # without a port), and without it a connection to any other port is not the mesh's.
    original_port_routes: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one downstream connection may cost the proxy, and how long it may sit idle.

    Defaults follow nghttpx and Envoy: a client over a budget gets GOAWAY ENHANCE_YOUR_CALM,
    a client that stops making progress gets its stream reset or its connection closed.
    """

    # Advertised in our SETTINGS and enforced: the stream after the limit is refused.
    max_concurrent_streams: int = 100
    # Streams the client may reset (or make us reset) in a burst, then per second (nghttp2's
    # defaults) plus one per stream that completed: rapid reset (CVE-2023-44487) goes over
    # this at once, a client whose calls mostly complete never does.
    stream_reset_burst: int = 1000
    stream_reset_rate: float = 33.0
    # Frames that carry no request (SETTINGS, PING, PRIORITY, WINDOW_UPDATE, RST_STREAM on a
    # closed stream, empty DATA, unknown types): a burst, then per second plus ten for each
    # DATA frame we send (window updates and pings follow the data a client receives).
    control_frame_burst: int = 1000
    control_frame_rate: float = 100.0
    # An HTTP/2 connection without streams is closed (GOAWAY NO_ERROR) after this.
    http2_idle_timeout: float = 180.0
    # The request head (HTTP/1.1) or an open HTTP/2 header block must complete within this.
    header_timeout: float = 60.0
    # A stream that neither sends nor receives anything for this long is reset.
    stream_idle_timeout: float = 300.0


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    host: str
    port: int
    route_config: str | None
    # Connections that are neither HTTP/2 nor HTTP/1.1 go here; without it they are closed.
    tcp_passthrough_cluster: str | None = None
    # Instead of a cluster: relay to where the client meant to go before iptables redirected
    # it here (SO_ORIGINAL_DST). The outbound listener of an intercepting sidecar uses this.
    tcp_passthrough_original_destination: bool = False
    original_destination_connect_timeout: float = 5.0
    # How long a silent client may wait before it is treated as server-first TCP.
    protocol_detect_timeout: float = 0.5
    # "auto" sniffs the preface; "tcp" relays everything to the passthrough target at once.
    mode: str = "auto"
    per_stream_buffer_bytes: int = 256 * 1024
    load_shedding: LoadSheddingConfig = LoadSheddingConfig()
    listener_limits: ListenerLimits = ListenerLimits()
    # "inbound" (to the local app) or "outbound" (from it), for metrics; "" guesses by name.
    direction: str = ""
    max_request_headers_bytes: int = 60 * 1024
    http1_idle_timeout: float = 300.0
    limits: ConnectionLimits = ConnectionLimits()
    # The kernel's accept queue (capped by net.core.somaxconn).
    backlog: int = 1024
    # Inbound mTLS with the workload certificate: None plaintext only; PERMISSIVE both (told
    # apart by the first bytes); STRICT only mTLS with a mesh certificate.
    mtls: MtlsMode | None = None
    # Allow/deny rules for requests on this listener (inbound), by peer identity and request.
    authorization: AuthorizationPolicy | None = None
    # Requests must carry a valid JWT of one of these providers (401 / UNAUTHENTICATED if not).
    jwt: ListenerJwt | None = None
    # Named JWT requirements that routes choose instead of ``jwt`` (Envoy's requirement_map).
    jwt_requirements: tuple[tuple[str, ListenerJwt], ...] = ()


@dataclass(frozen=True, slots=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 15000
    # A second port that serves only /stats/prometheus, for scrapers (Envoy's 15090).
    prometheus: tuple[str, int] | None = None
    # A port that serves only readiness, for kubelet probes (Istio's 15021).
    health: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """Where traces and access logs go; the ``OTEL_*`` environment overrides tracing."""

    tracing: TracingConfig = TracingConfig()
    access_log: AccessLogConfig = AccessLogConfig()


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """The whole static config of one sidecar."""

    listeners: tuple[ListenerConfig, ...]
    route_configs: dict[str, RouteConfig] = field(default_factory=dict)
    clusters: dict[str, ClusterConfig] = field(default_factory=dict)
    admin: AdminConfig = AdminConfig()
    drain_timeout: float = 5.0
    node_id: str = "sidecar"
    telemetry: TelemetryConfig = TelemetryConfig()
