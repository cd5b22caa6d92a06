"""A static bootstrap's listeners, route configs and clusters as the Envoy resources they
stand for, for ``/config_dump``'s ``static_listeners``, ``static_route_configs`` and
``static_clusters``. Pure: the model in, protos out.

What maps onto an Envoy field is written there: addresses, the HttpConnectionManager naming its
route config, a TCP passthrough as the listener's ``default_filter_chain``, virtual hosts,
matches, route actions and timeouts, endpoints with their weights, the upstream protocol, the
load balancing policy. Our policies (retries, rate limits, faults, fallbacks, outlier
detection...) keep their own shape in the dump's ``bootstrap`` part; they are not guessed into
Envoy's fields here, where a reader would take them for what Envoy would do.
"""

from __future__ import annotations

from collections.abc import Mapping

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from pilotfish.config.cluster_policy import LbKind
from pilotfish.config.model import (
    ClusterConfig,
    HeaderMatcher,
    ListenerConfig,
    PathMatch,
    Protocol,
    RouteConfig,
    RouteEntry,
    VirtualHost,
)
from pilotfish.envoy_matchers import header_matcher, regex_matcher

ORIGINAL_DST = "original_dst"  # the cluster name a passthrough to the original destination shows
_LB = {
    LbKind.ROUND_ROBIN: cluster_pb2.Cluster.ROUND_ROBIN,
    LbKind.WEIGHTED_ROUND_ROBIN: cluster_pb2.Cluster.ROUND_ROBIN,
    LbKind.LEAST_REQUEST: cluster_pb2.Cluster.LEAST_REQUEST,
    LbKind.PEAK_EWMA: cluster_pb2.Cluster.LEAST_REQUEST,
    LbKind.LEAST_CONNECTIONS: cluster_pb2.Cluster.LEAST_REQUEST,
    LbKind.RANDOM: cluster_pb2.Cluster.RANDOM,
    LbKind.WEIGHTED_RANDOM: cluster_pb2.Cluster.RANDOM,
    LbKind.RING_HASH: cluster_pb2.Cluster.RING_HASH,
    LbKind.MAGLEV: cluster_pb2.Cluster.MAGLEV,
}


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def _address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def _direction(config: ListenerConfig) -> base_pb2.TrafficDirection.ValueType:
    direction = config.direction or ("inbound" if "inbound" in config.name else "")
    direction = direction or ("outbound" if "outbound" in config.name else "")
    return {"inbound": base_pb2.INBOUND, "outbound": base_pb2.OUTBOUND}.get(
        direction, base_pb2.UNSPECIFIED
    )


def static_listener(
    config: ListenerConfig, route_configs: Mapping[str, RouteConfig]
) -> listener_pb2.Listener:
    """A route config of the bootstrap is inlined, as in an Envoy bootstrap (and then listed in
    ``static_route_configs`` too, as Envoy lists it); any other comes from the control plane."""
    listener = listener_pb2.Listener(
        name=config.name,
        address=_address(config.host, config.port),
        traffic_direction=_direction(config),
    )
    if config.route_config is not None and config.mode != "tcp":
        limits = config.limits
        hcm = hcm_pb2.HttpConnectionManager(
            stat_prefix=config.name,
            codec_type=hcm_pb2.HttpConnectionManager.AUTO,
            http_filters=[
                hcm_pb2.HttpFilter(
                    name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router())
                )
            ],
            stream_idle_timeout=_duration(limits.stream_idle_timeout),
            request_headers_timeout=_duration(limits.header_timeout),
        )
        hcm.http2_protocol_options.max_concurrent_streams.value = limits.max_concurrent_streams
        hcm.common_http_protocol_options.idle_timeout.CopyFrom(
            _duration(limits.http2_idle_timeout)
        )
        inline = route_configs.get(config.route_config)
        if inline is not None:
            hcm.route_config.CopyFrom(static_route_config(inline))
        else:
            hcm.rds.route_config_name = config.route_config
            hcm.rds.config_source.ads.SetInParent()
            hcm.rds.config_source.resource_api_version = config_source_pb2.V3
        listener.filter_chains.add(
            filters=[listener_components_pb2.Filter(
                name="envoy.filters.network.http_connection_manager", typed_config=_pack(hcm)
            )]
        )
    passthrough = config.tcp_passthrough_cluster
    if config.tcp_passthrough_original_destination:
        passthrough = ORIGINAL_DST
    if passthrough is not None:
        # What is not HTTP (or, behind interception, not the mesh's) is relayed: Envoy's
        # chain for connections no other chain takes.
        proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=config.name, cluster=passthrough)
        chain = listener_components_pb2.FilterChain(
            filters=[listener_components_pb2.Filter(
                name="envoy.filters.network.tcp_proxy", typed_config=_pack(proxy)
            )]
        )
        if listener.filter_chains:
            listener.default_filter_chain.CopyFrom(chain)
        else:
            listener.filter_chains.append(chain)
    return listener


def _match(path: PathMatch, headers: tuple[HeaderMatcher, ...]) -> route_components_pb2.RouteMatch:
    match = route_components_pb2.RouteMatch(headers=[header_matcher(h) for h in headers])
    if path.prefix is not None:
        match.prefix = path.prefix
    elif path.exact is not None:
        match.path = path.exact
    elif path.regex is not None:
        match.safe_regex.CopyFrom(regex_matcher(path.regex.pattern))
    return match


def _route(entry: RouteEntry) -> route_components_pb2.Route:
    action = route_components_pb2.RouteAction(timeout=_duration(entry.action.timeout or 0))
    clusters = entry.action.clusters
    if len(clusters) == 1:
        action.cluster = clusters[0].name
    else:
        for wc in clusters:
            action.weighted_clusters.clusters.add(
                name=wc.name, weight=wrappers_pb2.UInt32Value(value=wc.weight)
            )
    if entry.action.prefix_rewrite is not None:
        action.prefix_rewrite = entry.action.prefix_rewrite
    if entry.action.host_rewrite is not None:
        action.host_rewrite_literal = entry.action.host_rewrite
    return route_components_pb2.Route(
        name=entry.name, match=_match(entry.match.path, entry.match.headers), route=action
    )


def _virtual_host(vhost: VirtualHost) -> route_components_pb2.VirtualHost:
    return route_components_pb2.VirtualHost(
        name=vhost.name, domains=list(vhost.domains), routes=[_route(r) for r in vhost.routes]
    )


def static_route_config(config: RouteConfig) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=config.name, virtual_hosts=[_virtual_host(v) for v in config.virtual_hosts]
    )


def static_cluster(config: ClusterConfig) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name=config.name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=_duration(config.connect_timeout),
        lb_policy=_LB[config.lb_policy.kind],
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=config.name,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(
                    endpoint=endpoint_components_pb2.Endpoint(address=_address(e.host, e.port)),
                    load_balancing_weight=wrappers_pb2.UInt32Value(value=e.weight),
                )
                for e in config.endpoints
            ])],
        ),
    )
    if config.protocol is Protocol.HTTP2:
        options = http_protocol_options_pb2.HttpProtocolOptions()
        h2 = options.explicit_http_config.http2_protocol_options
        h2.max_concurrent_streams.value = config.max_concurrent_streams
        cluster.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ].Pack(options)
    return cluster
