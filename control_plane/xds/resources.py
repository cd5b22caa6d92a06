"""Build the xDS resources for one proxy's view of the mesh.

Shapes follow what both gRPC's proxyless xDS client and Envoy accept:

* per service an ``api_listener`` Listener named exactly after the service (a gRPC client
  dialling ``xds:///<service>`` asks for that name), and a second one named
  ``<service>:<port>`` when the mesh gives a port (for ``xds:///<service>:<port>``), whose
  HttpConnectionManager fetches the RouteConfiguration named after the service over ADS, with
  the router filter last;
* a RouteConfiguration with one virtual host whose domains are ``<service>`` and, when the mesh
  gives a port, ``<service>:<port>`` (gRPC matches the dial target's authority against them);
* an EDS Cluster per service, and its ClusterLoadAssignment with one locality that carries a
  ``load_balancing_weight`` (gRPC drops localities without one) and per-endpoint weights.

The outbound side an Envoy sidecar uses (``virtualOutbound``, per-port listeners and route
configurations, ``PassthroughCluster``) is laid out by ``outbound_xds`` from the routes and
HttpConnectionManagers built here.

A proxy that is itself a mesh service and says where its app listens (node metadata
``app_address``) also gets its inbound side: a normal Listener ``inbound|<service>`` on
``inbound_address`` (default ``0.0.0.0:15006``), a RouteConfiguration ``inbound|<service>``
sending everything to the STATIC cluster ``inbound|<service>`` whose one endpoint is the app.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, wrappers_pb2
from google.protobuf.message import Message

from control_plane.kube.state import PodEndpoint
from control_plane.mesh import Mesh, MeshRoute, MeshService, service_view
from control_plane.mesh_telemetry import MeshTelemetry
from control_plane.registry.core import Instance, InstanceState
from control_plane.xds import cluster_policy_xds as cluster_policy
from control_plane.xds import outbound_xds as outbound
from control_plane.xds import route_policy_xds as route_policy
from control_plane.xds.authn_xds import (
    inbound_http_filters,
    jwks_clusters,
    route_filter_configs,
)
from control_plane.xds.policy_blocks import listener_limits_block, load_shedding_block
from control_plane.xds.proto_util import METADATA_KEY, duration, pack
from control_plane.xds.security_xds import apply_inbound_mtls, upstream_tls
from control_plane.xds.telemetry_xds import apply_telemetry
from control_plane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resource
from pilotfish.config.model import Endpoint, HeaderMatcher, PathMatch
from pilotfish.config.route_policy import ListenerLimits, LoadSheddingConfig
from pilotfish.config.security import MeshRouteSecurity, MtlsMode, SecurityConfig, ServiceSecurity
from pilotfish.envoy_matchers import header_matcher, regex_matcher
from pilotfish.identity import SpiffeId

INBOUND_PREFIX = "inbound|"
DEFAULT_INBOUND_ADDRESS = ("0.0.0.0", 15006)
HCM_FILTER = "envoy.filters.network.http_connection_manager"
ROUTER_FILTER = "envoy.filters.http.router"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass(frozen=True, slots=True)
class ViewKey:
    """What decides a proxy's view: its own service (if a known one) and its inbound side."""

    service: str | None = None
    app_address: tuple[str, int] | None = None
    inbound_address: tuple[str, int] = DEFAULT_INBOUND_ADDRESS


ResourceMemo = dict[tuple[str, str, str | None], Resource]


def listener_depends_on_proxy(mesh: Mesh) -> bool:
    """Whether api listeners differ by the proxy's own service (the tracing service name)."""
    tracing = mesh.telemetry.tracing
    return tracing is not None and not tracing.service_name


Registered = Mapping[str, Sequence[Instance]]
"""Registered instances by the mesh service whose endpoints they are."""


def build_view(
    mesh: Mesh,
    key: ViewKey,
    memo: ResourceMemo | None = None,
    registered: Registered | None = None,
) -> dict[str, dict[str, Resource]]:
    """All resources of one view, by type URL and then by name.

    ``memo`` (one per mesh) shares a service's resources between the views that hold it:
    they are the same bytes in every view, except listeners when tracing names the proxy.
    ``registered``: the registry's instances for services with ``discovery`` other than static.
    """
    registered = registered or {}
    view: dict[str, dict[str, Resource]] = {t: {} for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT)}
    memo = {} if memo is None else memo

    def add(
        type_url: str, name: str, build: Callable[[], Message], variant: str | None = None
    ) -> None:
        found = memo.get((type_url, name, variant))
        if found is None:
            found = memo[(type_url, name, variant)] = Resource.of(name, build())
        view[type_url][name] = found

    own = mesh.services.get(key.service) if key.service is not None else None
    own_name = own.name if own is not None else None
    listener_variant = own_name if listener_depends_on_proxy(mesh) else None
    view_names = service_view(mesh, key.service)
    for name in view_names:
        service = mesh.services[name]
        if service.protocol != "tcp":
            add(
                LISTENER,
                name,
                partial(api_listener, service, mesh.telemetry, own_name),
                listener_variant,
            )
            if service.port is not None:
                # `xds:///greeter:50051` asks for the Listener `greeter:50051`.
                with_port = f"{name}:{service.port}"
                add(
                    LISTENER,
                    with_port,
                    partial(api_listener, service, mesh.telemetry, own_name, with_port),
                    listener_variant,
                )
            add(ROUTE, name, partial(route_configuration, service, mesh))
        add(CLUSTER, name, partial(eds_cluster, service, mesh.security))
        add(ENDPOINT, name, partial(service_load_assignment, service, registered.get(name, ())))
    for port, group in outbound.outbound_ports(mesh, view_names).items():
        # Which services share the port decides both resources: a view of other services
        # has its own.
        members = ",".join(s.name for s in group)
        add(ROUTE, str(port), partial(_port_routes, port, group, mesh), members)
        add(
            LISTENER,
            outbound.port_listener_name(port),
            partial(_port_listener, port, group, mesh.telemetry, own_name),
            f"{members}|{listener_variant or ''}",
        )
    add(LISTENER, outbound.VIRTUAL_OUTBOUND, outbound.virtual_outbound_listener)
    add(CLUSTER, outbound.PASSTHROUGH_CLUSTER, outbound.passthrough_cluster)
    if own is not None and key.app_address is not None and own.protocol != "tcp":
        inbound = INBOUND_PREFIX + own.name
        # Per proxy (its app address): not shared, so not memoised.
        view[LISTENER][inbound] = Resource.of(
            inbound,
            inbound_listener(
                inbound,
                key.inbound_address,
                own.load_shedding,
                mesh.telemetry,
                own.name,
                mesh.security.mtls.effective(own.namespace, own.security.mtls),
                mesh.security.trust_domain,
                limits=own.listener_limits,
                security=(own.security, mesh.security),
                routes=tuple(r.security for r in own.routes),
            ),
        )
        view[ROUTE][inbound] = Resource.of(
            inbound, inbound_route_configuration(inbound, own.routes)
        )
        view[CLUSTER][inbound] = Resource.of(
            inbound, inbound_cluster(inbound, own, key.app_address)
        )
        route_security = [r.security for r in own.routes]
        for name, cluster in jwks_clusters(own.security, mesh.security, route_security).items():
            view[CLUSTER][name] = Resource.of(name, cluster)
    return view


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def http_connection_manager(
    route_config_name: str,
    fault: bool = False,
    rate_limit: bool = False,
    telemetry: MeshTelemetry | None = None,
    own_service: str | None = None,
    first: Sequence[hcm_pb2.HttpFilter] = (),
) -> hcm_pb2.HttpConnectionManager:
    """``fault`` and ``rate_limit`` add those filters (no-ops until a route configures them);
    ``first`` go before them (authentication and authorization)."""
    filters: list[hcm_pb2.HttpFilter] = list(first)
    if fault:
        filters.append(
            hcm_pb2.HttpFilter(
                name=route_policy.FAULT_FILTER, typed_config=pack(fault_pb2.HTTPFault())
            )
        )
    if rate_limit:
        # gRPC clients have no local rate limit filter: optional, so they skip it.
        filters.append(
            hcm_pb2.HttpFilter(
                name=route_policy.RATE_LIMIT_FILTER,
                typed_config=pack(route_policy.local_rate_limit(None)),
                is_optional=True,
            )
        )
    # The router must be the last filter: it is the one that forwards the request.
    filters.append(hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=pack(router_pb2.Router())))
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=route_config_name,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=route_config_name),
        http_filters=filters,
    )
    if telemetry is not None:
        apply_telemetry(hcm, telemetry, own_service)
    return hcm


def api_listener(
    service: MeshService,
    telemetry: MeshTelemetry | None = None,
    own_service: str | None = None,
    name: str | None = None,
) -> listener_pb2.Listener:
    """``name``: the service's name (the default), or ``<service>:<port>``."""
    fault, rate_limit = route_policy.uses_filters([r.policy for r in service.routes])
    hcm = http_connection_manager(service.name, fault, rate_limit, telemetry, own_service)
    return listener_pb2.Listener(
        name=name or service.name,
        api_listener=api_listener_pb2.ApiListener(api_listener=pack(hcm)),
    )


def _port_routes(
    port: int, services: Sequence[MeshService], mesh: Mesh
) -> route_pb2.RouteConfiguration:
    routes = [(s, [mesh_route(r, mesh) for r in s.routes]) for s in services]
    return outbound.port_route_configuration(port, routes, mesh.cluster_domain)


def _port_listener(
    port: int,
    services: Sequence[MeshService],
    telemetry: MeshTelemetry,
    own_service: str | None,
) -> listener_pb2.Listener:
    policies = [r.policy for s in services for r in s.routes]
    fault, rate_limit = route_policy.uses_filters(policies)
    hcm = http_connection_manager(str(port), fault, rate_limit, telemetry, own_service)
    return outbound.port_listener(port, hcm)


def inbound_listener(
    name: str,
    address: tuple[str, int],
    load_shedding: LoadSheddingConfig = LoadSheddingConfig(),
    telemetry: MeshTelemetry | None = None,
    own_service: str | None = None,
    mtls: MtlsMode | None = None,
    trust_domain: str = "cluster.local",
    limits: ListenerLimits = ListenerLimits(),
    security: tuple[ServiceSecurity, SecurityConfig] | None = None,
    routes: tuple[MeshRouteSecurity, ...] = (),
) -> listener_pb2.Listener:
    """``security``: the service's JWT and authorization become HTTP filters, with what its
    ``routes`` need to override them."""
    first, jwt_metadata = inbound_http_filters(*security, routes) if security else ([], {})
    hcm = http_connection_manager(
        name, telemetry=telemetry, own_service=own_service, first=first
    )
    listener = listener_pb2.Listener(
        name=name,
        address=_socket_address(*address),
        traffic_direction=base_pb2.INBOUND,
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[listener_components_pb2.Filter(name=HCM_FILTER, typed_config=pack(hcm))]
            )
        ],
    )
    if load_shedding != LoadSheddingConfig():
        # Envoy's overload manager is process-wide; per-listener shedding is ours alone.
        listener.metadata.filter_metadata[METADATA_KEY].update(
            {"load_shedding": load_shedding_block(load_shedding)}
        )
    if limits != ListenerLimits():
        # Envoy's are process-wide (overload manager) or per HCM; ours ride with the listener.
        listener.metadata.filter_metadata[METADATA_KEY].update(
            {"listener_limits": listener_limits_block(limits)}
        )
    if jwt_metadata:
        listener.metadata.filter_metadata[METADATA_KEY].update({"jwt_providers": jwt_metadata})
    if mtls is not None:
        apply_inbound_mtls(listener, mtls, trust_domain)
    return listener


def route_configuration(
    service: MeshService, mesh: Mesh | None = None
) -> route_pb2.RouteConfiguration:
    domains = [service.name]
    if service.port is not None:
        domains.append(f"{service.name}:{service.port}")
    domains += [alias for alias in service.aliases if alias not in domains]
    return route_pb2.RouteConfiguration(
        name=service.name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=service.name,
                domains=domains,
                routes=[mesh_route(r, mesh) for r in service.routes],
            )
        ],
    )


def inbound_route_configuration(
    name: str, routes: tuple[MeshRoute, ...] = ()
) -> route_pb2.RouteConfiguration:
    """Everything to the app; first, the service's routes with their own JWT or authorization,
    matched as the caller's sidecar matches them, each carrying its per-filter configs."""
    # The caller's sidecar already enforces the route timeout; 0 disables it here.
    action = route_components_pb2.RouteAction(cluster=name, timeout=duration(0))
    secured = [
        route_components_pb2.Route(
            name=route.name,
            match=_route_match(route.match.path, route.match.headers),
            route=action,
            typed_per_filter_config=route_filter_configs(route.security, i),
        )
        for i, route in enumerate(routes)
        if route.security.overrides
    ]
    to_app = route_components_pb2.Route(
        name="to-app", match=route_components_pb2.RouteMatch(prefix="/"), route=action
    )
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="app", domains=["*"], routes=[*secured, to_app]
            )
        ],
    )


def mesh_route(route: MeshRoute, mesh: Mesh | None = None) -> route_components_pb2.Route:
    action = route_components_pb2.RouteAction()
    if len(route.clusters) == 1:
        action.cluster = route.clusters[0].name
    else:
        for wc in route.clusters:
            action.weighted_clusters.clusters.add(
                name=wc.name, weight=wrappers_pb2.UInt32Value(value=wc.weight)
            )
    # Envoy reads `timeout`; gRPC clients read `max_stream_duration`. 0 means none in both.
    timeout = duration(route.timeout or 0)
    action.timeout.CopyFrom(timeout)
    action.max_stream_duration.max_stream_duration.CopyFrom(timeout)
    policy = route.policy
    retry = route_policy.retry_policy(policy.retry)
    if retry is not None:
        action.retry_policy.CopyFrom(retry)
        action.retry_policy.SetInParent()
    for wc in route.clusters:
        target = mesh.services.get(wc.name) if mesh is not None else None
        if target is not None and target.lb_policy.kind.hashing:
            action.hash_policy.extend(cluster_policy.hash_policies(target.lb_policy))
            break
    message = route_components_pb2.Route(
        name=route.name,
        match=_route_match(route.match.path, route.match.headers),
        route=action,
        typed_per_filter_config=route_policy.per_filter_config(policy),
    )
    metadata = route_policy.route_metadata(policy)
    if metadata:
        message.metadata.filter_metadata[METADATA_KEY].update(metadata)
    return message


def _route_match(
    path: PathMatch, headers: tuple[HeaderMatcher, ...]
) -> route_components_pb2.RouteMatch:
    match = route_components_pb2.RouteMatch(headers=[header_matcher(h) for h in headers])
    if path.prefix is not None:
        match.prefix = path.prefix
    elif path.exact is not None:
        match.path = path.exact
    else:
        assert path.regex is not None
        match.safe_regex.CopyFrom(regex_matcher(path.regex.pattern))
    return match


def _protocol_options(service: MeshService) -> dict[str, any_pb2.Any]:
    """Envoy needs to be told to speak HTTP/2 upstream; gRPC clients ignore this."""
    if service.protocol not in ("grpc", "http2"):
        return {}
    options = http_protocol_options_pb2.HttpProtocolOptions()
    options.explicit_http_config.http2_protocol_options.SetInParent()
    return {HTTP_PROTOCOL_OPTIONS: pack(options)}


def _metadata(service: MeshService) -> base_pb2.Metadata:
    """``pilotfish.protocol`` tells our sidecar what the endpoints speak, tcp included."""
    metadata = base_pb2.Metadata()
    metadata.filter_metadata[METADATA_KEY].update({"protocol": service.protocol})
    return metadata


def workload_identity(service: MeshService, trust_domain: str) -> SpiffeId:
    return SpiffeId(trust_domain, service.namespace, service.service_account or service.name)


def eds_cluster(
    service: MeshService, security: SecurityConfig | None = None
) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name=service.name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=_ads(), service_name=service.name
        ),
        connect_timeout=duration(service.connect_timeout),
        typed_extension_protocol_options=_protocol_options(service),
    )
    extra: dict[str, object] = {}
    cluster_policy.apply_lb_policy(cluster, service.lb_policy, extra)
    if service.health_check is not None:
        cluster.health_checks.append(cluster_policy.health_check(service.health_check))
        if service.health_check.initially_healthy:
            extra["health_check"] = {"initially_healthy": True}
    if service.outlier_detection is not None:
        cluster.outlier_detection.CopyFrom(
            cluster_policy.outlier_detection(service.outlier_detection)
        )
    cluster.circuit_breakers.CopyFrom(cluster_policy.circuit_breakers(service.resilience))
    throttling = cluster_policy.adaptive_throttling_metadata(service.resilience.adaptive_throttling)
    if throttling is not None:
        extra["adaptive_throttling"] = throttling
    metadata = _metadata(service)
    metadata.filter_metadata[METADATA_KEY].update(extra)
    cluster.metadata.CopyFrom(metadata)
    # Callers originate mTLS to every service that takes it, PERMISSIVE ones too, so turning a
    # service STRICT later breaks no caller. Sidecar-to-sidecar mTLS is HTTP/2.
    if (
        security is not None
        and service.protocol in ("grpc", "http2")
        and security.mtls.effective(service.namespace, service.security.mtls) is not None
    ):
        cluster.transport_socket.CopyFrom(
            upstream_tls(workload_identity(service, security.trust_domain))
        )
    return cluster


def inbound_cluster(
    name: str, service: MeshService, app_address: tuple[str, int]
) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration(service.connect_timeout),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        load_assignment=load_assignment(name, (Endpoint(*app_address),)),
        typed_extension_protocol_options=_protocol_options(service),
        metadata=_metadata(service),
    )


def _socket_address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def _lb_endpoint(
    host: str, port: int, weight: int = 1, draining: bool = False
) -> endpoint_components_pb2.LbEndpoint:
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=_socket_address(host, port)),
        # DRAINING: a terminating pod still serving; clients finish what they have sent it
        # and send it nothing new.
        health_status=health_check_pb2.DRAINING if draining else health_check_pb2.HEALTHY,
        load_balancing_weight=wrappers_pb2.UInt32Value(value=weight),
    )


def load_assignment(
    cluster_name: str, endpoints: tuple[Endpoint, ...], pods: tuple[PodEndpoint, ...] = ()
) -> endpoint_pb2.ClusterLoadAssignment:
    """Static endpoints in one locality; pods in one locality per (zone, node).

    Every locality has weight 1 (gRPC drops localities without one). Our sidecar multiplies
    endpoint and locality weights, so pods are weighted alike wherever they run.
    """
    localities = []
    if endpoints:
        localities.append(
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(region="pilotfish", zone=DEFAULT_ZONE),
                lb_endpoints=[_lb_endpoint(e.host, e.port, e.weight) for e in endpoints],
                load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
            )
        )
    by_place: dict[tuple[str, str], list[PodEndpoint]] = {}
    for pod in pods:
        by_place.setdefault((pod.zone, pod.node), []).append(pod)
    for (zone, node), members in sorted(by_place.items()):
        localities.append(
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(zone=zone, sub_zone=node),
                lb_endpoints=[
                    _lb_endpoint(p.address, p.port, draining=p.draining) for p in members
                ],
                load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
            )
        )
    if not localities:
        # An empty service keeps its one (empty) locality, as before pods were known.
        localities.append(
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(region="pilotfish", zone=DEFAULT_ZONE),
                load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
            )
        )
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name, endpoints=localities)


DEFAULT_ZONE = "local"
ENDPOINT_LABELS_KEY = "envoy.lb"
"""Endpoint metadata that Envoy's subset load balancer matches on: instance labels go here."""


def service_load_assignment(
    service: MeshService, instances: Sequence[Instance] = ()
) -> endpoint_pb2.ClusterLoadAssignment:
    """A service's endpoints: from the mesh file, Kubernetes, the registry (``discovery``)."""
    cla = load_assignment(service.name, service.endpoints, service.pods)
    if service.discovery == "static" or not instances:
        return cla
    static = {(e.host, e.port) for e in service.endpoints}
    by_zone: dict[str, list[Instance]] = {}
    for instance in instances:
        if (instance.host, instance.port) not in static:  # the file wins over the registry
            by_zone.setdefault(instance.zone or DEFAULT_ZONE, []).append(instance)
    # One locality per zone: a locality named twice is rejected (gRPC's EDS validation), so
    # instances without a zone join the static endpoints' own.
    localities = {
        (loc.locality.region, loc.locality.zone, loc.locality.sub_zone): loc
        for loc in cla.endpoints
    }
    for zone in sorted(by_zone):
        locality = localities.get(("pilotfish", zone, ""))
        if locality is None:
            locality = cla.endpoints.add(
                locality=base_pb2.Locality(region="pilotfish", zone=zone),
                load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
            )
            localities["pilotfish", zone, ""] = locality
        for instance in by_zone[zone]:
            lb = _lb_endpoint(
                instance.host, instance.port, instance.weight,
                draining=instance.state is InstanceState.DRAINING,
            )
            if instance.labels:
                lb.metadata.filter_metadata[ENDPOINT_LABELS_KEY].update(dict(instance.labels))
            locality.lb_endpoints.append(lb)
    return cla
