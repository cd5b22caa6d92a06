"""The outbound side an Envoy sidecar reads, in the shape Istio serves it.

Envoy ignores ``api_listener``s over LDS, so besides them (for proxyless gRPC) every view holds:

* Listener ``virtualOutbound`` on ``0.0.0.0:15001`` (where iptables redirects the app's
  outbound connections) with ``use_original_dst``: Envoy hands each connection to the listener
  bound to no port whose address is the connection's original destination, ``0.0.0.0_<port>``
  for a port of the mesh; any other connection takes the listener's own filter chain, a TCP
  proxy to ``PassthroughCluster`` (type ORIGINAL_DST), so the app reaches what the mesh does
  not know as if there were no sidecar;
* per port that HTTP services of the view use, Listener ``0.0.0.0_<port>`` (``bind_to_port:
  false``) whose HttpConnectionManager takes RouteConfiguration ``<port>`` over ADS;
* RouteConfiguration ``<port>``: a virtual host per service on that port, with every name a
  Kubernetes pod may use for it (``svc``, ``svc.ns``, ``svc.ns.svc``,
  ``svc.ns.svc.<cluster domain>``, its ClusterIPs, each alone and with ``:<port>``), and last a
  virtual host ``allow_any`` (domain ``*``) to ``PassthroughCluster``, as Istio's
  ``outboundTrafficPolicy: ALLOW_ANY`` does;
* Cluster ``PassthroughCluster``.

A tcp service is reached through the passthrough, without the mesh's policies. This module only
arranges what ``resources`` builds (routes, HttpConnectionManagers) into that shape. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import wrappers_pb2

from control_plane.mesh import Mesh, MeshService
from control_plane.xds.proto_util import duration, pack

VIRTUAL_OUTBOUND = "virtualOutbound"
PASSTHROUGH_CLUSTER = "PassthroughCluster"
# The port sidecar/listen/iptables.py redirects the app's outbound connections to.
OUTBOUND_ADDRESS = ("0.0.0.0", 15001)
HCM_FILTER = "envoy.filters.network.http_connection_manager"
TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
ALLOW_ANY = "allow_any"
PASSTHROUGH_CONNECT_TIMEOUT = 10.0


def port_listener_name(port: int) -> str:
    return f"{OUTBOUND_ADDRESS[0]}_{port}"


def outbound_ports(mesh: Mesh, names: Iterable[str]) -> dict[int, list[MeshService]]:
    """The HTTP services of a view by port, each port's in name order."""
    by_port: dict[int, list[MeshService]] = {}
    for name in sorted(names):
        service = mesh.services[name]
        if service.protocol != "tcp" and service.port is not None:
            by_port.setdefault(service.port, []).append(service)
    return dict(sorted(by_port.items()))


def service_domains(service: MeshService, port: int, cluster_domain: str) -> list[str]:
    """Every name a caller may put in the authority for ``service`` on ``port``.

    A Service discovered in Kubernetes and not named in the mesh file is keyed ``name.ns``;
    its bare ``name`` is only among its aliases when no other namespace has a Service so named.
    """
    short, suffix = service.name, f".{service.namespace}"
    names = [service.name]
    if short.endswith(suffix):
        short = short[: -len(suffix)]
        if short in service.aliases:
            names.append(short)
    names += [f"{short}.{service.namespace}", f"{short}.{service.namespace}.svc",
              f"{short}.{service.namespace}.svc.{cluster_domain}"]
    names += [f"[{ip}]" if ":" in ip else ip for ip in service.cluster_ips]
    domains = [form for name in names for form in (name, f"{name}:{port}")]
    return list(dict.fromkeys([*domains, *service.aliases]))


def fqdn(service: MeshService, cluster_domain: str) -> str:
    short = service.name.removesuffix(f".{service.namespace}")
    return f"{short}.{service.namespace}.svc.{cluster_domain}"


def port_route_configuration(
    port: int,
    services: Sequence[tuple[MeshService, Sequence[route_components_pb2.Route]]],
    cluster_domain: str,
) -> route_pb2.RouteConfiguration:
    """``services``: each service on ``port`` with its routes, built by the caller.

    Envoy refuses a domain named by two virtual hosts of one route configuration; should two
    services' names collide (``a.b`` in namespace ``c`` and ``a`` in namespace ``b``), the
    first by name keeps it.
    """
    claimed: set[str] = {"*"}
    hosts = []
    for service, routes in services:
        domains = [d for d in service_domains(service, port, cluster_domain) if d not in claimed]
        claimed.update(domains)
        hosts.append(
            route_components_pb2.VirtualHost(
                name=f"{fqdn(service, cluster_domain)}:{port}", domains=domains, routes=routes
            )
        )
    passthrough = route_components_pb2.Route(
        name=ALLOW_ANY,
        match=route_components_pb2.RouteMatch(prefix="/"),
        # No timeout: the mesh has no say over calls to what it does not know.
        route=route_components_pb2.RouteAction(cluster=PASSTHROUGH_CLUSTER, timeout=duration(0)),
    )
    hosts.append(
        route_components_pb2.VirtualHost(name=ALLOW_ANY, domains=["*"], routes=[passthrough])
    )
    # Envoy would otherwise check each route's cluster against CDS at once, and refuse the
    # whole configuration while one is still arriving.
    return route_pb2.RouteConfiguration(
        name=str(port), virtual_hosts=hosts, validate_clusters=wrappers_pb2.BoolValue(value=False)
    )


def _address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def port_listener(port: int, hcm: hcm_pb2.HttpConnectionManager) -> listener_pb2.Listener:
    """``hcm`` takes RouteConfiguration ``<port>``; its stat prefix is set here."""
    name = port_listener_name(port)
    hcm.stat_prefix = f"outbound_{name}"
    return listener_pb2.Listener(
        name=name,
        address=_address(OUTBOUND_ADDRESS[0], port),
        # Bound to no socket: only reached through virtualOutbound's use_original_dst.
        bind_to_port=wrappers_pb2.BoolValue(value=False),
        traffic_direction=base_pb2.OUTBOUND,
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[listener_components_pb2.Filter(name=HCM_FILTER, typed_config=pack(hcm))]
            )
        ],
    )


def virtual_outbound_listener() -> listener_pb2.Listener:
    passthrough = tcp_proxy_pb2.TcpProxy(
        stat_prefix=PASSTHROUGH_CLUSTER, cluster=PASSTHROUGH_CLUSTER
    )
    return listener_pb2.Listener(
        name=VIRTUAL_OUTBOUND,
        address=_address(*OUTBOUND_ADDRESS),
        use_original_dst=wrappers_pb2.BoolValue(value=True),
        traffic_direction=base_pb2.OUTBOUND,
        filter_chains=[
            listener_components_pb2.FilterChain(
                name="PassthroughFilterChain",
                filters=[
                    listener_components_pb2.Filter(
                        name=TCP_PROXY_FILTER, typed_config=pack(passthrough)
                    )
                ],
            )
        ],
    )


def passthrough_cluster() -> cluster_pb2.Cluster:
    """Connections go to the address the app dialled (Envoy's ORIGINAL_DST)."""
    return cluster_pb2.Cluster(
        name=PASSTHROUGH_CLUSTER,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=duration(PASSTHROUGH_CONNECT_TIMEOUT),
    )
