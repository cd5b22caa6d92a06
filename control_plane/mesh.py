"""The mesh file: which services exist, where their endpoints are, and how calls to them route.

The schema is documented in ``docs/mesh-reference.md``. Every error names the path of the bad
field, e.g. ``services.greeter.routes[1].timeout: expected a duration like 250ms``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from control_plane.kube.state import PodEndpoint
from control_plane.mesh_telemetry import MeshTelemetry, parse_telemetry
from pilotfish.config import yaml_loader
from pilotfish.config.bootstrap import parse_endpoint
from pilotfish.config.cluster_policy import (
    HealthCheckConfig,
    LbPolicy,
    OutlierDetectionConfig,
    parse_health_check,
    parse_lb_policy,
    parse_outlier_detection,
)
from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import Node, yaml_error
from pilotfish.config.matchers import parse_header_matcher
from pilotfish.config.model import Endpoint, PathMatch, RouteMatch, WeightedCluster
from pilotfish.config.route_policy import (
    ClusterResilience,
    ListenerLimits,
    LoadSheddingConfig,
    RoutePolicy,
)
from pilotfish.config.route_policy_yaml import (
    CLUSTER_RESILIENCE_KEYS,
    LISTENER_POLICY_KEYS,
    ROUTE_POLICY_KEYS,
    as_positive_duration,
    parse_cluster_resilience,
    parse_listener_limits,
    parse_load_shedding,
    parse_route_policy,
)
from pilotfish.config.security import (
    ROUTE_SECURITY_KEYS,
    SERVICE_SECURITY_KEYS,
    JwtRequirement,
    MeshRouteSecurity,
    SecurityConfig,
    ServiceSecurity,
    parse_route_security,
    parse_security,
    parse_service_security,
)

PROTOCOLS = ("grpc", "http2", "http1", "tcp")
# Where a service's endpoints come from: the file, the registry, or both.
DISCOVERY = ("static", "registry", "mixed")
DEFAULT_TIMEOUT = 15.0
# Service names become listener, route and cluster names and the host part of `xds:///<name>`.
SERVICE_POLICY_KEYS = frozenset(
    {"load_balancing", "health_check", "outlier_detection"}
    | CLUSTER_RESILIENCE_KEYS
    | LISTENER_POLICY_KEYS
)
_SERVICE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class MeshRoute:
    name: str
    match: RouteMatch
    clusters: tuple[WeightedCluster, ...]
    # None: no timeout (written ``0s`` in the file).
    timeout: float | None
    policy: RoutePolicy = RoutePolicy()
    # Enforced on the service's inbound side, for the requests this route matches.
    security: MeshRouteSecurity = field(default_factory=MeshRouteSecurity)


@dataclass(frozen=True, slots=True)
class MeshService:
    name: str
    namespace: str
    protocol: str
    port: int | None
    endpoints: tuple[Endpoint, ...]
    # None: the file did not say, so the service may call every service in the mesh.
    depends_on: tuple[str, ...] | None
    routes: tuple[MeshRoute, ...]
    connect_timeout: float
    lb_policy: LbPolicy = LbPolicy()
    health_check: HealthCheckConfig | None = None
    outlier_detection: OutlierDetectionConfig | None = None
    resilience: ClusterResilience = ClusterResilience()
    # Inbound: applies on the service's own sidecar (its inbound listener).
    load_shedding: LoadSheddingConfig = LoadSheddingConfig()
    listener_limits: ListenerLimits = ListenerLimits()
    # Its workload identity is spiffe://<trust domain>/ns/<namespace>/sa/<service_account>.
    service_account: str = ""
    security: ServiceSecurity = ServiceSecurity()
    # Discovered in Kubernetes: the Service's pods, served beside the static endpoints, and
    # the other names callers use for it (``name.ns.svc.cluster.local:port``, ClusterIP:port).
    pods: tuple[PodEndpoint, ...] = ()
    aliases: tuple[str, ...] = ()
    # The Kubernetes Service's ClusterIP, when discovered: callers that dial it by address.
    cluster_ips: tuple[str, ...] = ()
    discovery: str = "static"
    registry: RegistrySelector | None = None
    """Which registered instances are endpoints; None unless ``discovery`` names the registry."""


@dataclass(frozen=True, slots=True)
class RegistrySelector:
    """Registered instances of ``service`` whose labels include all of ``labels``."""

    service: str
    labels: tuple[tuple[str, str], ...] = ()

    def selects(self, service: str, labels: tuple[tuple[str, str], ...]) -> bool:
        return service == self.service and set(self.labels) <= set(labels)


@dataclass(frozen=True, slots=True)
class Mesh:
    services: dict[str, MeshService]
    telemetry: MeshTelemetry = field(default_factory=MeshTelemetry)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    # The DNS domain of ``name.ns.svc.<cluster_domain>``: the control plane's --cluster-domain.
    cluster_domain: str = "cluster.local"


def load_mesh_file(path: str | Path) -> Mesh:
    return parse_mesh_text(Path(path).read_text(encoding="utf-8"), str(path))


def parse_mesh_text(text: str, source: str = "mesh file") -> Mesh:
    try:
        document = yaml_loader.load(text)  # safe, and refuses duplicate keys
    except yaml_loader.DuplicateKeyError as exc:
        raise ConfigError("", f"{source}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise yaml_error(source, exc) from None
    return parse_mesh(document)


def parse_mesh(document: Any) -> Mesh:
    root = Node("", document).mapping({"services", "telemetry", "security"})
    security = parse_security(root.get("security"))
    services_node = root.require("services").mapping()
    services: dict[str, MeshService] = {}
    for name, node in services_node.items():
        if not _SERVICE_NAME.match(name):
            raise node.error(
                "service names are lower-case letters, digits, '-' and '.', "
                "starting and ending with a letter or digit"
            )
        if name.isdigit():
            # Envoy's outbound route configuration for port N is named N.
            raise node.error("a service name needs a letter (digits alone name a port)")
        services[name] = _parse_service(name, node, security)
    _check_references(services_node, services)
    return Mesh(
        services=services, telemetry=parse_telemetry(root.get("telemetry")), security=security
    )


def _parse_service(name: str, node: Node, security: SecurityConfig) -> MeshService:
    if node.value is None:
        raise node.error("expected a mapping")
    node.mapping(
        {
            "namespace",
            "protocol",
            "port",
            "endpoints",
            "depends_on",
            "routes",
            "connect_timeout",
            "discovery",
            "registry",
            "service_account",
            *SERVICE_POLICY_KEYS,
            *SERVICE_SECURITY_KEYS,
        }
    )
    protocol = node.get("protocol").as_choice(PROTOCOLS, "grpc")
    discovery = node.get("discovery").as_choice(DISCOVERY, "static")
    registry = _parse_registry(name, node, discovery)
    if discovery == "registry":
        if node.has("endpoints"):
            raise node.get("endpoints").error(
                "not with discovery: registry (use discovery: mixed for both)"
            )
        endpoints: tuple[Endpoint, ...] = ()
    elif discovery == "mixed" and not node.has("endpoints"):
        endpoints = ()
    else:
        endpoints = tuple(parse_endpoint(e) for e in node.require("endpoints").elements())
    seen: set[str] = set()
    for i, endpoint in enumerate(endpoints):
        if endpoint.address in seen:
            raise ConfigError(
                f"{node.path}.endpoints[{i}]", f"duplicate endpoint {endpoint.address}"
            )
        seen.add(endpoint.address)
    depends_on: tuple[str, ...] | None = None
    if node.has("depends_on"):
        depends_on = tuple(d.as_str() for d in node.get("depends_on").elements())
    service_security = parse_service_security(node, security)
    if node.has("routes"):
        if protocol == "tcp":
            raise node.get("routes").error("a tcp service cannot have routes")
        routes = tuple(
            _parse_route(name, r, i, security, service_security.jwt)
            for i, r in enumerate(node.get("routes").elements())
        )
    elif protocol == "tcp":
        routes = ()
    else:
        routes = (_default_route(name),)
    port = node.get("port").as_int(minimum=1, maximum=65535) if node.has("port") else None
    if protocol == "tcp":
        for key in ("load_shedding", "adaptive_throttling", "max_requests_per_connection"):
            if node.has(key):
                raise node.get(key).error("not for a tcp service (it has no HTTP requests)")
    outlier = node.get("outlier_detection")
    return MeshService(
        name=name,
        namespace=_identity_segment(node.get("namespace"), "default"),
        protocol=protocol,
        port=port,
        endpoints=endpoints,
        depends_on=depends_on,
        routes=routes,
        # 0s: Envoy's rules and gRPC both refuse a cluster that may never connect.
        connect_timeout=as_positive_duration(node.get("connect_timeout"), 5.0),
        lb_policy=parse_lb_policy(node.get("load_balancing")),
        health_check=(
            parse_health_check(node.get("health_check")) if node.has("health_check") else None
        ),
        outlier_detection=parse_outlier_detection(outlier) if outlier.value is not None else None,
        resilience=parse_cluster_resilience(node),
        load_shedding=parse_load_shedding(node.get("load_shedding"), protocol != "tcp"),
        listener_limits=parse_listener_limits(node),
        service_account=_identity_segment(node.get("service_account"), name),
        security=service_security,
        discovery=discovery,
        registry=registry,
    )


def _identity_segment(node: Node, default: str) -> str:
    value = node.as_str(default)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", value) or value in {".", ".."}:
        raise node.error("expected letters, digits, '.', '-' and '_'")
    return value


def _parse_registry(name: str, node: Node, discovery: str) -> RegistrySelector | None:
    """``registry: {service: NAME, labels: {version: v2}}``; by default the service itself."""
    if discovery == "static":
        if node.has("registry"):
            raise node.get("registry").error("needs discovery: registry or mixed")
        return None
    if not node.has("registry"):
        return RegistrySelector(name)
    selector = node.get("registry")
    selector.mapping({"service", "labels"})
    service = selector.get("service").as_str(name)
    if not _SERVICE_NAME.match(service):
        raise selector.get("service").error("not a service name")
    labels: list[tuple[str, str]] = []
    if selector.has("labels"):
        for key, value in selector.get("labels").mapping().items():
            if not isinstance(value.value, str | int | float) or isinstance(value.value, bool):
                raise value.error("expected a label value (a string)")
            labels.append((key, str(value.value)))
    return RegistrySelector(service, tuple(sorted(labels)))


def _default_route(service: str) -> MeshRoute:
    return MeshRoute(
        name="default",
        match=RouteMatch(path=PathMatch(prefix="/")),
        clusters=(WeightedCluster(service, 1),),
        timeout=DEFAULT_TIMEOUT,
    )


def _parse_route(
    service: str,
    node: Node,
    index: int,
    security: SecurityConfig,
    service_jwt: JwtRequirement | None,
) -> MeshRoute:
    node.mapping(
        {"name", "match", "timeout", "cluster", "split", *ROUTE_POLICY_KEYS, *ROUTE_SECURITY_KEYS}
    )
    if node.has("cluster") and node.has("split"):
        raise node.error("at most one of cluster, split")
    clusters: tuple[WeightedCluster, ...]
    if node.has("split"):
        split = node.get("split")
        clusters = tuple(
            WeightedCluster(target, weight.as_int(minimum=0, maximum=1_000_000))
            for target, weight in split.items()
        )
        if not clusters or sum(c.weight for c in clusters) == 0:
            raise split.error("weights must add up to more than 0")
    else:
        clusters = (WeightedCluster(node.get("cluster").as_str(service), 1),)
    timeout_node = node.get("timeout")
    timeout: float | None = timeout_node.as_duration(DEFAULT_TIMEOUT)
    if timeout == 0:
        timeout = None
    return MeshRoute(
        name=node.get("name").as_str(str(index)),
        match=_parse_match(node.require("match")),
        clusters=clusters,
        timeout=timeout,
        policy=parse_route_policy(node),
        security=parse_route_security(node, security, service_jwt),
    )


def _parse_match(node: Node) -> RouteMatch:
    node.mapping({"prefix", "path", "regex", "headers"})
    kinds = [k for k in ("prefix", "path", "regex") if node.has(k)]
    if len(kinds) != 1:
        raise node.error("exactly one of prefix, path, regex is required")
    if kinds[0] == "prefix":
        path = PathMatch(prefix=_as_path(node.get("prefix"), allow_empty=True))
    elif kinds[0] == "path":
        path = PathMatch(exact=_as_path(node.get("path"), allow_empty=False))
    else:
        path = PathMatch(regex=node.get("regex").as_regex())
    headers = (
        tuple(parse_header_matcher(h) for h in node.get("headers").elements())
        if node.has("headers")
        else ()
    )
    return RouteMatch(path=path, headers=headers)


def _as_path(node: Node, allow_empty: bool) -> str:
    value = node.value
    if isinstance(value, str) and (value.startswith("/") or (allow_empty and value == "")):
        return value
    raise node.error("expected a path starting with /")


def _check_references(services_node: Node, services: dict[str, MeshService]) -> None:
    for name, service in services.items():
        node = services_node.get(name)
        for i, dep in enumerate(service.depends_on or ()):
            if dep not in services:
                raise ConfigError(f"{node.path}.depends_on[{i}]", f"no service named {dep!r}")
        for r, route in enumerate(service.routes):
            route_node = Node(f"{node.path}.routes[{r}]", _route_value(node, r))
            for wc in route.clusters:
                if wc.name in services and services[wc.name].protocol == "tcp":
                    raise _target_error(route_node, wc.name, "is a tcp service")
                if wc.name not in services:
                    raise _target_error(route_node, wc.name, "does not exist")
            fallback = route.policy.fallback
            if fallback is not None and fallback.cluster is not None:
                target = services.get(fallback.cluster)
                problem = (
                    "does not exist"
                    if target is None
                    else "is a tcp service"
                    if target.protocol == "tcp"
                    else None
                )
                if problem is not None:
                    raise ConfigError(
                        f"{route_node.path}.fallback.cluster",
                        f"service {fallback.cluster!r} {problem}",
                    )


def _route_value(service_node: Node, index: int) -> Any:
    routes = service_node.value.get("routes") if isinstance(service_node.value, dict) else None
    return routes[index] if isinstance(routes, list) else {}


def _target_error(route_node: Node, target: str, problem: str) -> ConfigError:
    if route_node.has("split"):
        return ConfigError(f"{route_node.path}.split.{target}", f"service {target!r} {problem}")
    return ConfigError(f"{route_node.path}.cluster", f"service {target!r} {problem}")


def service_view(mesh: Mesh, service: str | None) -> list[str]:
    """Names of the services a proxy of ``service`` may call, with split and fallback targets.

    A proxy that is not a mesh service (``None`` or unknown) sees every service.
    """
    own = mesh.services.get(service) if service is not None else None
    roots = list(mesh.services if own is None or own.depends_on is None else own.depends_on)
    seen: set[str] = set()
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in seen or name not in mesh.services:
            continue
        seen.add(name)
        for route in mesh.services[name].routes:
            pending.extend(route_targets(route))
    return sorted(seen)


def route_targets(route: MeshRoute) -> list[str]:
    """The services a route may send to: its clusters and its fallback cluster."""
    targets = [wc.name for wc in route.clusters]
    fallback = route.policy.fallback
    if fallback is not None and fallback.cluster is not None:
        targets.append(fallback.cluster)
    return targets
