"""Load a sidecar's static bootstrap YAML into the config model.

The schema is documented in ``docs/sidecar-bootstrap.md``. Every error names the field path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pilotfish.config.cluster_policy import (
    parse_health_check,
    parse_lb_policy,
    parse_outlier_detection,
)
from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import Node, parse_address, yaml_error
from pilotfish.config.matchers import parse_header_matcher
from pilotfish.config.model import (
    AdminConfig,
    Bootstrap,
    ClusterConfig,
    ConnectionLimits,
    Endpoint,
    HeaderMutation,
    ListenerConfig,
    PathMatch,
    Protocol,
    RouteAction,
    RouteConfig,
    RouteEntry,
    RouteMatch,
    TelemetryConfig,
    VirtualHost,
    WeightedCluster,
)
from pilotfish.config.route_policy_yaml import (
    CLUSTER_RESILIENCE_KEYS,
    LISTENER_POLICY_KEYS,
    ROUTE_POLICY_KEYS,
    parse_cluster_resilience,
    parse_listener_limits,
    parse_load_shedding,
    parse_route_policy,
)
from pilotfish.config.security import (
    AuthorizationPolicy,
    MtlsMode,
    parse_authorization,
    parse_listener_jwt,
    parse_upstream_mtls,
)
from sidecar.observability.access_log import ALL_FIELDS, AccessLogConfig
from sidecar.observability.tracing_config import PROTOCOLS, TracingConfig, split_endpoint


def load_bootstrap_file(path: str | Path) -> Bootstrap:
    text = Path(path).read_text(encoding="utf-8")
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise yaml_error(str(path), exc) from None
    return parse_bootstrap(document)


def parse_bootstrap(document: Any) -> Bootstrap:
    root = Node("", document).mapping(
        {
            "node_id",
            "admin",
            "listeners",
            "route_configs",
            "clusters",
            "drain_timeout",
            "tracing",
            "access_log",
        }
    )
    clusters: dict[str, ClusterConfig] = {}
    for node in root.get("clusters").elements() if root.has("clusters") else ():
        cluster = parse_cluster(node)
        if cluster.name in clusters:
            raise node.get("name").error(f"duplicate cluster name {cluster.name!r}")
        clusters[cluster.name] = cluster

    route_configs: dict[str, RouteConfig] = {}
    for node in root.get("route_configs").elements() if root.has("route_configs") else ():
        rc = parse_route_config(node)
        if rc.name in route_configs:
            raise node.get("name").error(f"duplicate route config name {rc.name!r}")
        route_configs[rc.name] = rc

    listeners = tuple(parse_listener(n) for n in root.require("listeners").elements())
    _check_references(root, listeners, route_configs, clusters)
    return Bootstrap(
        node_id=root.get("node_id").as_str("sidecar"),
        listeners=listeners,
        route_configs=route_configs,
        clusters=clusters,
        admin=parse_admin(root.get("admin")),
        drain_timeout=root.get("drain_timeout").as_duration(5.0),
        telemetry=TelemetryConfig(
            tracing=parse_tracing(root.get("tracing")),
            access_log=parse_access_log(root.get("access_log")),
        ),
    )


def _check_references(
    root: Node,
    listeners: tuple[ListenerConfig, ...],
    route_configs: dict[str, RouteConfig],
    clusters: dict[str, ClusterConfig],
) -> None:
    for i, listener in enumerate(listeners):
        path = f"listeners[{i}]"
        if listener.route_config is not None and listener.route_config not in route_configs:
            raise ConfigError(
                f"{path}.route_config", f"no route config named {listener.route_config!r}"
            )
        passthrough = listener.tcp_passthrough_cluster
        if passthrough is not None and passthrough not in clusters:
            raise ConfigError(
                f"{path}.tcp_passthrough.cluster", f"no cluster named {passthrough!r}"
            )
    for r, rc in enumerate(route_configs.values()):
        for v, vhost in enumerate(rc.virtual_hosts):
            for e, entry in enumerate(vhost.routes):
                for wc in entry.action.clusters:
                    if wc.name not in clusters:
                        raise ConfigError(
                            f"route_configs[{r}].virtual_hosts[{v}].routes[{e}].route",
                            f"no cluster named {wc.name!r}",
                        )


def parse_admin(node: Node) -> AdminConfig:
    if node.value is None:
        return AdminConfig()
    node.mapping({"address", "port", "prometheus_address", "health_address"})
    prometheus = node.get("prometheus_address")
    health = node.get("health_address")
    return AdminConfig(
        host=node.get("address").as_str("127.0.0.1"),
        port=node.get("port").as_int(15000, maximum=65535),
        prometheus=parse_address(prometheus.path, prometheus.value)
        if node.has("prometheus_address")
        else None,
        health=parse_address(health.path, health.value) if node.has("health_address") else None,
    )


def parse_tracing(node: Node) -> TracingConfig:
    """``tracing: {endpoint: http://jaeger:4317, sampling: 1%, service_name: ..., ...}``."""
    if node.value is None:
        return TracingConfig()
    node.mapping({"enabled", "endpoint", "protocol", "sampling", "service_name", "propagators"})
    default = TracingConfig()
    sampling = node.get("sampling")
    ratio = default.sample_ratio
    if sampling.value is not None:
        text = str(sampling.value).strip()
        try:
            ratio = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise sampling.error("expected a percentage like 1% or a ratio like 0.01") from None
        if not 0 <= ratio <= 1:
            raise sampling.error("expected a percentage from 0% to 100%")
    endpoint = node.get("endpoint")
    if endpoint.value is not None:
        try:
            split_endpoint(endpoint.as_str())
        except ValueError as exc:
            raise endpoint.error(f"expected a URL like http://collector:4317 ({exc})") from None
    propagators = default.propagators
    if node.has("propagators"):
        allowed = ("tracecontext", "b3", "b3multi")
        propagators = tuple(p.as_choice(allowed) for p in node.get("propagators").elements())
    return TracingConfig(
        enabled=node.get("enabled").as_bool(True),
        endpoint=node.get("endpoint").as_str(default.endpoint),
        protocol=node.get("protocol").as_choice(PROTOCOLS, default.protocol),
        sample_ratio=ratio,
        service_name=node.get("service_name").as_str(default.service_name),
        propagators=propagators,
    )


def parse_access_log(node: Node) -> AccessLogConfig:
    """``access_log: {sink: stdout|file|off, path: ..., fields: [...]}``."""
    if node.value is None:
        return AccessLogConfig()
    node.mapping({"sink", "path", "fields"})
    sink = node.get("sink").as_choice(("stdout", "file", "off"), "stdout")
    path = node.get("path").as_str() if node.has("path") else ""
    if sink == "file" and not path:
        raise node.get("path").error("the file sink needs a path")
    fields = AccessLogConfig().fields
    if node.has("fields"):
        fields = tuple(f.as_choice(ALL_FIELDS) for f in node.get("fields").elements())
    return AccessLogConfig(sink=sink, path=path, fields=fields)  # type: ignore[arg-type]


def _positive_rate(node: Node, default: float) -> float:
    if node.value is None:
        return default
    value = node.value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise node.error("expected a positive number (per second)")
    return float(value)


def parse_connection_limits(node: Node) -> ConnectionLimits:
    default = ConnectionLimits()
    if node.value is None:
        return default
    node.mapping(set(ConnectionLimits.__dataclass_fields__))

    def count(key: str, minimum: int = 1) -> int:
        value: int = getattr(default, key)
        return node.get(key).as_int(value, minimum=minimum, maximum=2**31 - 1)

    def duration(key: str) -> float:
        value = node.get(key).as_duration(getattr(default, key))
        if value <= 0:
            raise node.get(key).error("expected a positive duration")
        return value

    return ConnectionLimits(
        max_concurrent_streams=count("max_concurrent_streams"),
        stream_reset_burst=count("stream_reset_burst"),
        stream_reset_rate=_positive_rate(
            node.get("stream_reset_rate"), default.stream_reset_rate
        ),
        control_frame_burst=count("control_frame_burst"),
        control_frame_rate=_positive_rate(
            node.get("control_frame_rate"), default.control_frame_rate
        ),
        http2_idle_timeout=duration("http2_idle_timeout"),
        header_timeout=duration("header_timeout"),
        stream_idle_timeout=duration("stream_idle_timeout"),
    )


def parse_listener(node: Node) -> ListenerConfig:
    node.mapping(
        {
            "name",
            "address",
            "route_config",
            "tcp_passthrough",
            "protocol_detect_timeout",
            "mode",
            "per_stream_buffer",
            "max_request_headers",
            "http1_idle_timeout",
            "direction",
            "mtls",
            "authorization",
            "jwt",
            "limits",
            "backlog",
            *LISTENER_POLICY_KEYS,
        }
    )
    host, port = parse_address(node.get("address").path, node.require("address").value)
    passthrough: str | None = None
    original_destination = False
    original_destination_timeout = 5.0
    if node.has("tcp_passthrough"):
        tp = node.get("tcp_passthrough").mapping(
            {"cluster", "original_destination", "connect_timeout"}
        )
        original_destination = tp.get("original_destination").as_bool(False)
        if tp.has("cluster") == original_destination:
            raise tp.error("exactly one of cluster, original_destination: true is required")
        if tp.has("cluster"):
            passthrough = tp.get("cluster").as_str()
            if tp.has("connect_timeout"):
                raise tp.get("connect_timeout").error(
                    "only with original_destination; a cluster has its own connect_timeout"
                )
        original_destination_timeout = tp.get("connect_timeout").as_duration(5.0)
    has_passthrough = passthrough is not None or original_destination
    mode = node.get("mode").as_choice(("auto", "tcp"), "auto")
    if mode == "tcp" and not has_passthrough:
        raise node.get("mode").error("mode tcp needs tcp_passthrough")
    if mode == "tcp" and node.has("mtls"):
        # mode tcp relays before reading a byte, so it could not tell TLS from plaintext.
        raise node.get("mtls").error("not with mode tcp")
    route_config = node.get("route_config").as_str() if node.has("route_config") else None
    if route_config is None and mode == "auto" and not has_passthrough:
        raise node.get("route_config").error("a listener needs route_config or tcp_passthrough")
    return ListenerConfig(
        name=node.get("name").as_str(f"{host}:{port}"),
        host=host,
        port=port,
        route_config=route_config,
        tcp_passthrough_cluster=passthrough,
        tcp_passthrough_original_destination=original_destination,
        original_destination_connect_timeout=original_destination_timeout,
        protocol_detect_timeout=node.get("protocol_detect_timeout").as_duration(0.5),
        mode=mode,
        per_stream_buffer_bytes=node.get("per_stream_buffer").as_int(256 * 1024, minimum=16384),
        max_request_headers_bytes=node.get("max_request_headers").as_int(60 * 1024, minimum=1024),
        http1_idle_timeout=node.get("http1_idle_timeout").as_duration(300.0),
        load_shedding=parse_load_shedding(node.get("load_shedding")),
        listener_limits=parse_listener_limits(node),
        limits=parse_connection_limits(node.get("limits")),
        backlog=node.get("backlog").as_int(1024, minimum=1, maximum=65535),
        direction=node.get("direction").as_choice(("inbound", "outbound"), "")
        if node.has("direction")
        else "",
        mtls=MtlsMode(node.get("mtls").as_choice(("STRICT", "PERMISSIVE")))
        if node.has("mtls")
        else None,
        authorization=_listener_authorization(node),
        jwt=parse_listener_jwt(node.get("jwt")) if node.has("jwt") else None,
    )


def _listener_authorization(node: Node) -> AuthorizationPolicy | None:
    if not node.has("authorization"):
        return None
    policy = parse_authorization(node.get("authorization"))
    if node.has("jwt"):
        return policy
    for kind, rules in (("allow", policy.allow), ("deny", policy.deny)):
        for i, rule in enumerate(rules):
            if rule.claims:
                raise ConfigError(
                    f"{node.get('authorization').path}.{kind}[{i}].when",
                    "matches JWT claims, but the listener has no jwt",
                )
    return policy


def parse_endpoint(node: Node) -> Endpoint:
    if isinstance(node.value, str):
        host, port = parse_address(node.path, node.value)
        return Endpoint(host, port)
    node.mapping({"address", "weight"})
    host, port = parse_address(node.get("address").path, node.require("address").value)
    return Endpoint(host, port, node.get("weight").as_int(1, minimum=1, maximum=1_000_000))


def parse_cluster(node: Node) -> ClusterConfig:
    node.mapping(
        {
            "name",
            "endpoints",
            "protocol",
            "connect_timeout",
            "idle_timeout",
            "max_concurrent_streams",
            "max_connections_per_endpoint",
            "load_balancing",
            "health_check",
            "outlier_detection",
            "mtls",
            *CLUSTER_RESILIENCE_KEYS,
        }
    )
    protocol = node.get("protocol").as_choice(tuple(p.value for p in Protocol), "http2")
    mtls = parse_upstream_mtls(node.get("mtls")) if node.has("mtls") else None
    if mtls is not None and protocol != Protocol.HTTP2.value:
        raise node.get("mtls").error("mTLS between sidecars speaks HTTP/2: needs protocol http2")
    health_check = (
        parse_health_check(node.get("health_check")) if node.has("health_check") else None
    )
    outlier = node.get("outlier_detection")
    outlier_detection = parse_outlier_detection(outlier) if outlier.value is not None else None
    return ClusterConfig(
        name=node.require("name").as_str(),
        endpoints=tuple(parse_endpoint(e) for e in node.require("endpoints").elements()),
        protocol=Protocol(protocol),
        connect_timeout=node.get("connect_timeout").as_duration(5.0),
        idle_timeout=node.get("idle_timeout").as_duration(60.0),
        max_concurrent_streams=node.get("max_concurrent_streams").as_int(1024, minimum=1),
        max_connections_per_endpoint=node.get("max_connections_per_endpoint").as_int(64, minimum=1),
        lb_policy=parse_lb_policy(node.get("load_balancing")),
        health_check=health_check,
        outlier_detection=outlier_detection,
        resilience=parse_cluster_resilience(node),
        mtls=mtls,
    )


def parse_route_config(node: Node) -> RouteConfig:
    node.mapping({"name", "virtual_hosts"})
    return RouteConfig(
        name=node.require("name").as_str(),
        virtual_hosts=tuple(
            parse_virtual_host(v) for v in node.require("virtual_hosts").elements()
        ),
    )


def parse_virtual_host(node: Node) -> VirtualHost:
    node.mapping(
        {
            "name",
            "domains",
            "routes",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
        }
    )
    domains = tuple(d.as_str().lower() for d in node.require("domains").elements())
    for i, domain in enumerate(domains):
        if domain != "*" and "*" in domain.strip("*"):
            raise ConfigError(f"{node.path}.domains[{i}]", "a wildcard may only lead or trail")
    return VirtualHost(
        name=node.get("name").as_str(",".join(domains)),
        domains=domains,
        routes=tuple(
            parse_route(r, f"{i}") for i, r in enumerate(node.require("routes").elements())
        ),
        request_headers=parse_mutation(node, "request"),
        response_headers=parse_mutation(node, "response"),
    )


def parse_mutation(node: Node, direction: str) -> HeaderMutation:
    add: list[tuple[str, str, bool]] = []
    if node.has(f"{direction}_headers_to_add"):
        for h in node.get(f"{direction}_headers_to_add").elements():
            h.mapping({"name", "value", "append"})
            name = h.require("name").as_str().lower()
            if name.startswith(":") or name == "host":
                raise h.get("name").error("pseudo-headers and host cannot be added")
            value = h.get("value")
            if not isinstance(value.value, str):
                raise value.error("expected a string")
            add.append((name, value.value, h.get("append").as_bool(False)))
    remove: set[str] = set()
    if node.has(f"{direction}_headers_to_remove"):
        for r in node.get(f"{direction}_headers_to_remove").elements():
            name = r.as_str().lower()
            if name.startswith(":"):
                raise r.error("pseudo-headers cannot be removed")
            remove.add(name)
    return HeaderMutation(add=tuple(add), remove=frozenset(remove))


def parse_route(node: Node, default_name: str) -> RouteEntry:
    node.mapping(
        {
            "name",
            "match",
            "route",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            *ROUTE_POLICY_KEYS,
        }
    )
    return RouteEntry(
        name=node.get("name").as_str(default_name),
        match=parse_match(node.require("match")),
        action=parse_action(node.require("route")),
        request_headers=parse_mutation(node, "request"),
        response_headers=parse_mutation(node, "response"),
        policy=parse_route_policy(node),
    )


def parse_match(node: Node) -> RouteMatch:
    node.mapping({"prefix", "path", "regex", "headers", "methods"})
    kinds = [k for k in ("prefix", "path", "regex") if node.has(k)]
    if len(kinds) != 1:
        raise node.error("exactly one of prefix, path, regex is required")
    kind = kinds[0]
    if kind == "prefix":
        path = PathMatch(prefix=node.get("prefix").as_str())
    elif kind == "path":
        path = PathMatch(exact=node.get("path").as_str())
    else:
        path = PathMatch(regex=node.get("regex").as_regex())
    headers = (
        tuple(parse_header_matcher(h) for h in node.get("headers").elements())
        if node.has("headers")
        else ()
    )
    methods = (
        frozenset(m.as_str().upper() for m in node.get("methods").elements())
        if node.has("methods")
        else frozenset()
    )
    return RouteMatch(path=path, headers=headers, methods=methods)


def parse_action(node: Node) -> RouteAction:
    node.mapping({"cluster", "weighted_clusters", "timeout", "prefix_rewrite", "host_rewrite"})
    if node.has("cluster") == node.has("weighted_clusters"):
        raise node.error("exactly one of cluster, weighted_clusters is required")
    if node.has("cluster"):
        clusters: tuple[WeightedCluster, ...] = (WeightedCluster(node.get("cluster").as_str(), 1),)
    else:
        wc_node = node.get("weighted_clusters")
        clusters = tuple(
            WeightedCluster(name, weight.as_int(minimum=0, maximum=1_000_000))
            for name, weight in wc_node.items()
        )
        if not clusters or sum(c.weight for c in clusters) == 0:
            raise wc_node.error("weights must add up to more than 0")
    timeout_node = node.get("timeout")
    # 0 disables the timeout, as in Envoy.
    disabled = timeout_node.value in (0, "0", "0s")
    timeout = None if disabled else timeout_node.as_duration(15.0)
    return RouteAction(
        clusters=clusters,
        timeout=timeout,
        prefix_rewrite=node.get("prefix_rewrite").as_str() if node.has("prefix_rewrite") else None,
        host_rewrite=node.get("host_rewrite").as_str() if node.has("host_rewrite") else None,
    )
