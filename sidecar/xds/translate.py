"""Translate received xDS v3 resources into the sidecar's config model. Pure functions.

Whatever the model cannot express raises ``ConfigError`` naming the field, e.g.
``route_config[greeter].virtual_hosts[0].routes[1].match.query_parameters: not supported``;
the xDS client sends that text back as the NACK's ``error_detail``. Silently dropping a field
would route traffic differently from what the control plane meant.

An ``api_listener`` (what gRPC proxyless clients use, one per service, named after it) has no
address; it becomes an ``ApiListener`` naming its route config. Envoy's outbound shape
(``virtualOutbound`` with ``use_original_dst``, per-port listeners with ``bind_to_port: false``)
becomes ``VirtualOutbound`` and ``OutboundPort`` (``sidecar/xds/outbound.py``): our own
outbound listener routes with them, nothing is bound. Any other listener with an address
becomes a ``ListenerConfig``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.type.matcher.v3 import string_pb2

from pilotfish.config.errors import ConfigError
from pilotfish.config.model import (
    ClusterConfig,
    ConnectionLimits,
    HeaderMatcher,
    HeaderMutation,
    ListenerConfig,
    PathMatch,
    RouteAction,
    RouteConfig,
    RouteEntry,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
)
from sidecar.observability.access_log import AccessLogConfig
from sidecar.observability.tracing_config import TracingConfig
from sidecar.xds.authn import (
    ListenerSecurity,
    reject_http_security,
    translate_http_security,
    translate_route_security,
)
from sidecar.xds.clusters import (
    eds_service_name as eds_service_name,
)
from sidecar.xds.clusters import (
    translate_cluster as translate_cluster,
)
from sidecar.xds.clusters import (
    translate_endpoints as translate_endpoints,
)
from sidecar.xds.common import METADATA_KEY as METADATA_KEY
from sidecar.xds.common import seconds as _seconds
from sidecar.xds.common import type_name as _type_name
from sidecar.xds.common import unpack as _unpack
from sidecar.xds.common import unsupported as _unsupported
from sidecar.xds.outbound import (
    OutboundPort,
    VirtualOutbound,
    is_original_destination,
    outbound_route_configs,
)
from sidecar.xds.route_policy import (
    LISTENER_METADATA_KEYS,
    check_http_filters,
    translate_listener_limits,
    translate_load_shedding,
    translate_route_policy,
)
from sidecar.xds.security import translate_inbound_mtls
from sidecar.xds.telemetry import hcm_telemetry
from sidecar.xds.telemetry import translate_telemetry as translate_telemetry

HCM_TYPE = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TCP_PROXY_TYPE = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
ROUTER_TYPE = "envoy.extensions.filters.http.router.v3.Router"
DEFAULT_ROUTE_TIMEOUT = 15.0  # Envoy's default when a route sets none
JWKS_CLUSTER_PREFIX = "jwks|"  # the clusters control_plane.xds.authn_xds.jwks_clusters makes


@dataclass(frozen=True, slots=True)
class ApiListener:
    """A listener without a socket: calls to ``name`` use route config ``route_config``."""

    name: str
    route_config: str


# ---------------------------------------------------------------- listeners


TranslatedListener = ListenerConfig | ApiListener | OutboundPort | VirtualOutbound


def translate_listener(listener: listener_pb2.Listener) -> TranslatedListener:
    path = f"listener[{listener.name}]"
    if not listener.name:
        raise ConfigError(f"{path}.name", "required")
    if listener.HasField("api_listener"):
        hcm = hcm_pb2.HttpConnectionManager()
        _unpack(f"{path}.api_listener.api_listener", listener.api_listener.api_listener, hcm)
        reject_http_security(hcm, f"{path}.api_listener.api_listener")
        return ApiListener(listener.name, _hcm_route_config(hcm, f"{path}.api_listener"))
    if not listener.address.HasField("socket_address"):
        raise ConfigError(f"{path}.address", "a socket_address is required")
    socket = listener.address.socket_address
    if not socket.address or not 0 < socket.port_value < 65536:
        raise ConfigError(f"{path}.address.socket_address", "needs an address and a port")
    if listener.use_original_dst.value:
        return _virtual_outbound(listener, path)
    if listener.HasField("bind_to_port") and not listener.bind_to_port.value:
        return _outbound_port(listener, path)
    _unsupported(listener, path, {"name", "address", "filter_chains", "traffic_direction",
                                  "metadata", "listener_filters"})
    load_shedding = translate_load_shedding(listener, path)
    listener_limits = translate_listener_limits(listener, path)
    chain, mtls = translate_inbound_mtls(listener, path)
    chain_path = f"{path}.filter_chains[0]"
    if len(chain.filters) != 1:
        raise ConfigError(f"{chain_path}.filters", "exactly one network filter is supported")
    packed = chain.filters[0].typed_config
    filter_path = f"{chain_path}.filters[0].typed_config"
    route_config: str | None = None
    passthrough: str | None = None
    limits = ConnectionLimits()
    security = ListenerSecurity()
    if _type_name(packed) == HCM_TYPE:
        hcm = hcm_pb2.HttpConnectionManager()
        _unpack(filter_path, packed, hcm)
        route_config = _hcm_route_config(hcm, filter_path)
        limits = _hcm_limits(hcm, filter_path)
        security = translate_http_security(
            hcm, listener, filter_path, LISTENER_METADATA_KEYS, _header
        )
    elif _type_name(packed) == TCP_PROXY_TYPE:
        tcp = tcp_proxy_pb2.TcpProxy()
        _unpack(filter_path, packed, tcp)
        if not tcp.cluster:
            raise ConfigError(f"{filter_path}.cluster", "required (weighted_clusters unsupported)")
        passthrough = tcp.cluster
    else:
        raise ConfigError(filter_path, f"unsupported network filter {_type_name(packed)!r}")
    return ListenerConfig(
        name=listener.name,
        host=socket.address,
        port=socket.port_value,
        route_config=route_config,
        tcp_passthrough_cluster=passthrough,
        mode="tcp" if passthrough is not None else "auto",
        load_shedding=load_shedding,
        listener_limits=listener_limits,
        mtls=mtls,
        limits=limits,
        jwt=security.jwt,
        authorization=security.authorization,
        jwt_requirements=security.jwt_requirements,
    )


def _virtual_outbound(listener: listener_pb2.Listener, path: str) -> VirtualOutbound:
    """Its filter chains may only relay (TCP proxy): what the mesh does not know goes where
    the app sent it, which our outbound listener does itself."""
    _unsupported(listener, path, {"name", "address", "filter_chains", "traffic_direction",
                                  "use_original_dst", "metadata"})
    for i, chain in enumerate(listener.filter_chains):
        for j, network_filter in enumerate(chain.filters):
            filter_path = f"{path}.filter_chains[{i}].filters[{j}].typed_config"
            if _type_name(network_filter.typed_config) != TCP_PROXY_TYPE:
                raise ConfigError(filter_path, "only a TCP proxy (the passthrough) is supported")
            _unpack(filter_path, network_filter.typed_config, tcp_proxy_pb2.TcpProxy())
    return VirtualOutbound(listener.name)


def _outbound_port(listener: listener_pb2.Listener, path: str) -> OutboundPort:
    _unsupported(listener, path, {"name", "address", "filter_chains", "traffic_direction",
                                  "bind_to_port", "metadata"})
    chains = listener.filter_chains
    if len(chains) != 1 or len(chains[0].filters) != 1:
        raise ConfigError(f"{path}.filter_chains",
                          "a listener bound to no port needs one chain with one filter")
    _unsupported(chains[0], f"{path}.filter_chains[0]", {"name", "filters"})
    packed = chains[0].filters[0].typed_config
    filter_path = f"{path}.filter_chains[0].filters[0].typed_config"
    if _type_name(packed) != HCM_TYPE:
        raise ConfigError(filter_path, "only an HttpConnectionManager is supported here")
    hcm = hcm_pb2.HttpConnectionManager()
    _unpack(filter_path, packed, hcm)
    route_config = _hcm_route_config(hcm, filter_path)
    return OutboundPort(listener.name, listener.address.socket_address.port_value, route_config)


def _hcm_limits(hcm: hcm_pb2.HttpConnectionManager, path: str) -> ConnectionLimits:
    """The HttpConnectionManager's own names for our connection limits; the rest keep their
    defaults. Envoy reads a zero timeout as "none"; we always keep one, so zero is refused."""
    limits = ConnectionLimits()
    options = hcm.http2_protocol_options
    if options.HasField("max_concurrent_streams"):
        streams = options.max_concurrent_streams.value
        if streams < 1:
            field = f"{path}.http2_protocol_options.max_concurrent_streams"
            raise ConfigError(field, "must be at least 1")
        limits = replace(limits, max_concurrent_streams=streams)

    def timeout(message: Any, name: str, field: str) -> float | None:
        if not message.HasField(name):
            return None
        value = _seconds(getattr(message, name))
        if value <= 0:
            raise ConfigError(f"{path}.{field}", "must be positive (a timeout is always kept)")
        return value

    stream_idle = timeout(hcm, "stream_idle_timeout", "stream_idle_timeout")
    if stream_idle is not None:
        limits = replace(limits, stream_idle_timeout=stream_idle)
    headers = timeout(hcm, "request_headers_timeout", "request_headers_timeout")
    if headers is not None:
        limits = replace(limits, header_timeout=headers)
    common = hcm.common_http_protocol_options
    idle = timeout(common, "idle_timeout", "common_http_protocol_options.idle_timeout")
    if idle is not None:
        limits = replace(limits, http2_idle_timeout=idle)
    return limits


def _hcm_route_config(hcm: hcm_pb2.HttpConnectionManager, path: str) -> str:
    if not hcm.HasField("rds"):
        raise ConfigError(f"{path}.route_specifier", "only rds is supported")
    if not hcm.rds.config_source.HasField("ads"):
        raise ConfigError(f"{path}.rds.config_source", "only ads is supported")
    if not hcm.rds.route_config_name:
        raise ConfigError(f"{path}.rds.route_config_name", "required")
    check_http_filters(hcm, path)
    for i, http_filter in enumerate(hcm.http_filters):
        if _type_name(http_filter.typed_config) == ROUTER_TYPE:
            _unpack(f"{path}.http_filters[{i}]", http_filter.typed_config, router_pb2.Router())
    hcm_telemetry(hcm, path)  # checked here, so a bad one is rejected on arrival
    return str(hcm.rds.route_config_name)


# ---------------------------------------------------------------- routes


def translate_route_config(rc: route_pb2.RouteConfiguration) -> RouteConfig:
    path = f"route_config[{rc.name}]"
    _unsupported(rc, path, {"name", "virtual_hosts", "validate_clusters"})
    return RouteConfig(
        name=rc.name,
        virtual_hosts=tuple(
            _virtual_host(v, f"{path}.virtual_hosts[{i}]") for i, v in enumerate(rc.virtual_hosts)
        ),
    )


def _virtual_host(vhost: route_components_pb2.VirtualHost, path: str) -> VirtualHost:
    _unsupported(vhost, path, {
        "name", "domains", "routes", "request_headers_to_add", "request_headers_to_remove",
        "response_headers_to_add", "response_headers_to_remove",
    })
    if not vhost.domains:
        raise ConfigError(f"{path}.domains", "at least one domain is required")
    domains = tuple(d.lower() for d in vhost.domains)
    for i, domain in enumerate(domains):
        if domain != "*" and "*" in domain.strip("*"):
            raise ConfigError(f"{path}.domains[{i}]", "a wildcard may only lead or trail")
    return VirtualHost(
        name=vhost.name or ",".join(domains),
        domains=domains,
        routes=tuple(_route(r, f"{path}.routes[{i}]", i) for i, r in enumerate(vhost.routes)),
        request_headers=_mutation(vhost.request_headers_to_add,
                                  vhost.request_headers_to_remove, f"{path}.request_headers"),
        response_headers=_mutation(vhost.response_headers_to_add,
                                   vhost.response_headers_to_remove, f"{path}.response_headers"),
    )


def _route(route: route_components_pb2.Route, path: str, index: int) -> RouteEntry:
    _unsupported(route, path, {
        "name", "match", "route", "request_headers_to_add", "request_headers_to_remove",
        "response_headers_to_add", "response_headers_to_remove", "decorator",
        "typed_per_filter_config", "metadata",
    })
    if not route.HasField("route"):
        raise ConfigError(f"{path}.action", "only route actions are supported")
    return RouteEntry(
        name=route.name or str(index),
        match=_route_match(route.match, f"{path}.match"),
        action=_route_action(route.route, f"{path}.route"),
        request_headers=_mutation(route.request_headers_to_add,
                                  route.request_headers_to_remove, f"{path}.request_headers"),
        response_headers=_mutation(route.response_headers_to_add,
                                   route.response_headers_to_remove, f"{path}.response_headers"),
        policy=translate_route_policy(route, route.route, path),
        security=translate_route_security(
            route.typed_per_filter_config, f"{path}.typed_per_filter_config", _header
        ),
    )


def _regex(pattern: str, path: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(path, f"invalid regular expression: {exc}") from None


def _route_match(match: route_components_pb2.RouteMatch, path: str) -> RouteMatch:
    # `grpc` only says "this is a gRPC request"; our gRPC routes are also path-matched.
    _unsupported(match, path, {"prefix", "path", "safe_regex", "headers", "grpc",
                               "case_sensitive"})
    if match.HasField("case_sensitive") and not match.case_sensitive.value:
        raise ConfigError(f"{path}.case_sensitive", "case-insensitive matching is not supported")
    kind = match.WhichOneof("path_specifier")
    if kind == "prefix":
        path_match = PathMatch(prefix=match.prefix)
    elif kind == "path":
        path_match = PathMatch(exact=match.path)
    elif kind == "safe_regex":
        path_match = PathMatch(regex=_regex(match.safe_regex.regex, f"{path}.safe_regex.regex"))
    else:
        raise ConfigError(f"{path}.path_specifier", "one of prefix, path, safe_regex is required")
    headers = tuple(_header(h, f"{path}.headers[{i}]") for i, h in enumerate(match.headers))
    return RouteMatch(path=path_match, headers=headers)


def _header(h: route_components_pb2.HeaderMatcher, path: str) -> HeaderMatcher:
    name, invert = h.name.lower(), h.invert_match
    kind = h.WhichOneof("header_match_specifier")
    if kind is None:
        return HeaderMatcher(name=name, present=True, invert=invert)
    if kind == "present_match":
        return HeaderMatcher(name=name, present=h.present_match, invert=invert)
    if kind == "exact_match":
        return HeaderMatcher(name=name, exact=h.exact_match, invert=invert)
    if kind == "prefix_match":
        return HeaderMatcher(name=name, prefix=h.prefix_match, invert=invert)
    if kind == "safe_regex_match":
        pattern = _regex(h.safe_regex_match.regex, f"{path}.safe_regex_match.regex")
        return HeaderMatcher(name=name, regex=pattern, invert=invert)
    if kind == "string_match":
        return _string_match(name, invert, h.string_match, f"{path}.string_match")
    raise ConfigError(f"{path}.{kind}", "not supported")


def _string_match(
    name: str, invert: bool, sm: string_pb2.StringMatcher, path: str
) -> HeaderMatcher:
    if sm.ignore_case:
        raise ConfigError(f"{path}.ignore_case", "not supported")
    kind = sm.WhichOneof("match_pattern")
    if kind == "exact":
        return HeaderMatcher(name=name, exact=sm.exact, invert=invert)
    if kind == "prefix":
        return HeaderMatcher(name=name, prefix=sm.prefix, invert=invert)
    if kind == "safe_regex":
        return HeaderMatcher(name=name, regex=_regex(sm.safe_regex.regex, f"{path}.safe_regex"),
                             invert=invert)
    if kind == "suffix":
        return HeaderMatcher(name=name, regex=re.compile(".*" + re.escape(sm.suffix)),
                             invert=invert)
    if kind == "contains":
        return HeaderMatcher(name=name, regex=re.compile(f".*{re.escape(sm.contains)}.*"),
                             invert=invert)
    raise ConfigError(f"{path}.{kind or 'match_pattern'}", "not supported")


def _route_action(action: route_components_pb2.RouteAction, path: str) -> RouteAction:
    _unsupported(action, path, {
        "cluster", "weighted_clusters", "timeout", "max_stream_duration", "prefix_rewrite",
        "host_rewrite_literal", "retry_policy", "hash_policy",
    })
    kind = action.WhichOneof("cluster_specifier")
    if kind == "cluster":
        clusters: tuple[WeightedCluster, ...] = (WeightedCluster(action.cluster, 1),)
    elif kind == "weighted_clusters":
        wc_path = f"{path}.weighted_clusters"
        _unsupported(action.weighted_clusters, wc_path, {"clusters", "total_weight"})
        clusters = tuple(
            WeightedCluster(c.name, c.weight.value) for c in action.weighted_clusters.clusters
        )
        for i, c in enumerate(clusters):
            if not c.name:
                raise ConfigError(f"{wc_path}.clusters[{i}].name", "required")
        if sum(c.weight for c in clusters) == 0:
            raise ConfigError(wc_path, "weights must add up to more than 0")
    else:
        raise ConfigError(f"{path}.cluster_specifier", "one of cluster, weighted_clusters")
    if action.HasField("timeout"):
        seconds = _seconds(action.timeout)
    elif action.max_stream_duration.HasField("max_stream_duration"):
        seconds = _seconds(action.max_stream_duration.max_stream_duration)
    else:
        seconds = DEFAULT_ROUTE_TIMEOUT
    return RouteAction(
        clusters=clusters,
        timeout=seconds or None,  # 0 disables the timeout, as in Envoy
        prefix_rewrite=action.prefix_rewrite or None,
        host_rewrite=action.host_rewrite_literal or None,
    )


def _mutation(add: Iterable[Any], remove: Iterable[str], path: str) -> HeaderMutation:
    """``add`` holds HeaderValueOption messages."""
    added: list[tuple[str, str, bool]] = []
    for i, option in enumerate(add):
        item_path = f"{path}_to_add[{i}]"
        name = option.header.key.lower()
        if not name or name.startswith(":") or name == "host":
            raise ConfigError(f"{item_path}.header.key", "pseudo-headers and host cannot be added")
        if option.HasField("append"):
            append = option.append.value
        elif option.append_action == base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD:
            append = True
        elif option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD:
            append = False
        else:
            raise ConfigError(f"{item_path}.append_action", "not supported")
        added.append((name, option.header.value, append))
    removed = frozenset(n.lower() for n in remove)
    for n in removed:
        if n.startswith(":"):
            raise ConfigError(f"{path}_to_remove", "pseudo-headers cannot be removed")
    return HeaderMutation(add=tuple(added), remove=removed)


# ---------------------------------------------------------------- a whole set


def envoy_only(cluster: cluster_pb2.Cluster) -> bool:
    """A cluster an Envoy needs and the sidecar does without: the way to a JWKS URL, which the
    sidecar fetches itself."""
    return str(cluster.name).startswith(JWKS_CLUSTER_PREFIX)


@dataclass(frozen=True, slots=True)
class XdsConfig:
    """Everything received, in model form; merge it into the static ``Bootstrap``."""

    listeners: tuple[ListenerConfig, ...]
    route_configs: dict[str, RouteConfig]
    clusters: dict[str, ClusterConfig]
    # From the first listener (by name) whose HttpConnectionManager sets them; None: keep
    # the sidecar's own settings.
    tracing: TracingConfig | None = None
    access_log: AccessLogConfig | None = None


def translate_all(
    listeners: Iterable[listener_pb2.Listener],
    route_configs: Iterable[route_pb2.RouteConfiguration],
    clusters: Iterable[cluster_pb2.Cluster],
    assignments: Iterable[endpoint_pb2.ClusterLoadAssignment],
    outbound_route_config: str = "outbound",
) -> XdsConfig:
    """Translate a complete set; every name a resource refers to must be in it.

    The virtual hosts of the per-port outbound route configs, then those of ``api_listener``
    route configs not already covered (``outbound.outbound_route_configs``), are gathered into
    one route config named ``outbound_route_config``: the one a sidecar's outbound listener
    (from its static bootstrap) routes with.
    """
    routes = {rc.name: translate_route_config(rc) for rc in route_configs}
    by_eds_name = {cla.cluster_name: cla for cla in assignments}
    translated_clusters: dict[str, ClusterConfig] = {}
    passthrough: set[str] = set()
    for cluster in clusters:
        if envoy_only(cluster):
            continue
        if is_original_destination(cluster):
            passthrough.add(cluster.name)
            continue
        eds_name = eds_service_name(cluster)
        if eds_name is not None and eds_name not in by_eds_name:
            raise ConfigError(f"cluster[{cluster.name}]", f"no endpoints {eds_name!r} received")
        assignment = by_eds_name.get(eds_name) if eds_name is not None else None
        translated_clusters[cluster.name] = translate_cluster(cluster, assignment)
    socket_listeners: list[ListenerConfig] = []
    api_routes: list[str] = []
    ports: list[OutboundPort] = []
    tracing: TracingConfig | None = None
    access_log: AccessLogConfig | None = None
    for listener in sorted(listeners, key=lambda item: str(item.name)):
        translated = translate_listener(listener)
        listener_tracing, listener_log = translate_telemetry(listener)
        tracing = tracing or listener_tracing
        access_log = access_log or listener_log
        route_name = translated.route_config
        if route_name is not None and route_name not in routes:
            raise ConfigError(f"listener[{listener.name}]", f"no route config {route_name!r}")
        if isinstance(translated, ApiListener):
            api_routes.append(translated.route_config)
        elif isinstance(translated, OutboundPort):
            ports.append(translated)
        elif isinstance(translated, ListenerConfig):
            socket_listeners.append(translated)
    routes.update(
        outbound_route_configs(outbound_route_config, ports, api_routes, routes, passthrough)
    )
    for rc in routes.values():
        for vhost in rc.virtual_hosts:
            for entry in vhost.routes:
                for wc in entry.action.clusters:
                    if wc.name not in translated_clusters and wc.name not in passthrough:
                        raise ConfigError(f"route_config[{rc.name}]",
                                          f"no cluster {wc.name!r} received")
    return XdsConfig(tuple(socket_listeners), routes, translated_clusters, tracing, access_log)
