"""The outbound side an Envoy sidecar is served, read by ours. Pure.

The control plane serves Envoy's shape (``control_plane/xds/outbound_xds.py``): a listener
``virtualOutbound`` with ``use_original_dst``, a listener per port bound to no socket
(``bind_to_port: false``) whose HttpConnectionManager names that port's route configuration,
and ``PassthroughCluster`` (ORIGINAL_DST) for destinations the mesh does not know.

Our sidecar's outbound listener is its own (``--outbound-address``), so it binds none of these:

* ``virtualOutbound`` becomes ``VirtualOutbound``, which says the shape is served;
* each per-port listener becomes ``OutboundPort``: its route configuration is the one for
  connections whose original destination port is that port;
* ORIGINAL_DST clusters, and the virtual hosts that only route to them (Istio's ``allow_any``),
  are not translated: the outbound listener relays what the mesh does not know to its original
  destination itself (``--outbound-passthrough original-destination``).

``outbound_route_configs`` gathers the route configuration the outbound listener routes with
by authority: the per-port configurations' virtual hosts, then those of ``api_listener`` route
configurations (what proxyless gRPC reads) for services the per-port ones do not cover (a
service without a port), so a control plane that serves only ``api_listener``s still works.
Those services also get a route config of their own, ``<name>|0``, for redirected connections to
any port no per-port configuration claims.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

from envoy.config.cluster.v3 import cluster_pb2

from pilotfish.config.errors import ConfigError
from pilotfish.config.model import RouteConfig, VirtualHost

OTHER_PORTS = 0
"""In ``RouteConfig.original_port_routes``: the route config for every port not listed."""


@dataclass(frozen=True, slots=True)
class OutboundPort:
    """A per-port listener bound to no socket: connections to ``port`` use ``route_config``."""

    name: str
    port: int
    route_config: str


@dataclass(frozen=True, slots=True)
class VirtualOutbound:
    """A listener with ``use_original_dst``: our own outbound listener plays its part."""

    name: str
    route_config: None = None


def is_original_destination(cluster: cluster_pb2.Cluster) -> bool:
    """An ORIGINAL_DST cluster (Envoy's passthrough): checked, then left to the listener."""
    if cluster.WhichOneof("cluster_discovery_type") != "type":
        return False
    if cluster.type != cluster_pb2.Cluster.ORIGINAL_DST:
        return False
    if cluster.lb_policy != cluster_pb2.Cluster.CLUSTER_PROVIDED:
        raise ConfigError(f"cluster[{cluster.name}].lb_policy",
                          "an ORIGINAL_DST cluster needs CLUSTER_PROVIDED")
    return True


def _only_to(vhost: VirtualHost, clusters: Collection[str]) -> bool:
    return bool(vhost.routes) and all(
        wc.name in clusters for route in vhost.routes for wc in route.action.clusters
    )


def outbound_route_configs(
    name: str,
    ports: Sequence[OutboundPort],
    api_route_configs: Sequence[str],
    routes: Mapping[str, RouteConfig],
    passthrough: Collection[str],
) -> dict[str, RouteConfig]:
    """The per-port route configs without their passthrough hosts, and ``name``: the one the
    outbound listener routes with (absent when there is nothing to route).

    ``api_route_configs``: those ``api_listener``s name, in listener name order. Per-port hosts
    come first; an api host is added only if it brings a domain not yet covered.
    """
    result: dict[str, RouteConfig] = {}
    hosts: list[VirtualHost] = []
    claimed: set[str] = set()
    by_port: dict[int, str] = {}
    for listener in sorted(ports, key=lambda p: p.port):
        if listener.port in by_port:
            raise ConfigError(f"listener[{listener.name}].address.socket_address.port_value",
                              f"port {listener.port} has two outbound listeners")
        rc = routes[listener.route_config]
        kept = tuple(v for v in rc.virtual_hosts if not _only_to(v, passthrough))
        result[rc.name] = replace(rc, virtual_hosts=kept)
        by_port[listener.port] = rc.name
        for vhost in kept:
            hosts.append(vhost)
            claimed.update(vhost.domains)
    portless: list[VirtualHost] = []
    for rc_name in dict.fromkeys(api_route_configs):
        for vhost in routes[rc_name].virtual_hosts:
            if not claimed.issuperset(vhost.domains):
                portless.append(vhost)
                claimed.update(vhost.domains)
    if by_port and portless:
        # A service without a port has no per-port route config: a connection to any port
        # the others do not claim is looked up in these.
        other = f"{name}|{OTHER_PORTS}"
        result[other] = RouteConfig(other, tuple(portless))
        by_port[OTHER_PORTS] = other
    hosts += portless
    if hosts or by_port:
        result[name] = RouteConfig(name, tuple(hosts), tuple(sorted(by_port.items())))
    return result
