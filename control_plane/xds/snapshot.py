"""An immutable set of resources for one proxy view, checked for consistency before use."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from control_plane.xds.types import ALL_TYPES, CLUSTER, ENDPOINT, LISTENER, ROUTE, Resource
from control_plane.xds.types import content_version as _content_version


class InconsistentSnapshot(ValueError):
    """A resource names another resource that the snapshot does not hold."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    resources: Mapping[str, Mapping[str, Resource]]

    @classmethod
    def build(cls, resources: Mapping[str, Mapping[str, Resource]]) -> Snapshot:
        snapshot = cls({t: dict(resources.get(t, {})) for t in ALL_TYPES})
        check_consistency(snapshot)
        return snapshot

    def of_type(self, type_url: str) -> Mapping[str, Resource]:
        return self.resources.get(type_url, {})

    def select(self, type_url: str, names: Iterable[str] | None) -> list[Resource]:
        """Resources of a type, all of them (``None``: wildcard) or those named, by name."""
        available = self.of_type(type_url)
        wanted = sorted(available) if names is None else sorted(set(names) & set(available))
        return [available[n] for n in wanted]

    def version(self, type_url: str) -> str:
        return content_version(self.select(type_url, None))


def content_version(resources: Iterable[Resource]) -> str:
    """The version of exactly this set of resources: equal sets give equal versions."""
    return _content_version(*(f"{r.name}={r.version}" for r in resources))


def _hcm_route_names(listener: listener_pb2.Listener) -> list[str]:
    packed = [listener.api_listener.api_listener] if listener.HasField("api_listener") else []
    packed += [f.typed_config for chain in listener.filter_chains for f in chain.filters]
    names = []
    for any_msg in packed:
        hcm = hcm_pb2.HttpConnectionManager()
        if any_msg.Unpack(hcm) and hcm.HasField("rds"):
            names.append(hcm.rds.route_config_name)
    return names


def _tcp_proxy_clusters(listener: listener_pb2.Listener) -> list[str]:
    chains = [*listener.filter_chains]
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    names = []
    for chain in chains:
        for network_filter in chain.filters:
            proxy = tcp_proxy_pb2.TcpProxy()
            if network_filter.typed_config.Unpack(proxy) and proxy.cluster:
                names.append(proxy.cluster)
    return names


def check_consistency(snapshot: Snapshot) -> None:
    """Every route, cluster and endpoint name a resource refers to must be in the snapshot."""
    routes, clusters = snapshot.of_type(ROUTE), snapshot.of_type(CLUSTER)
    endpoints = snapshot.of_type(ENDPOINT)
    for name, res in snapshot.of_type(LISTENER).items():
        listener = listener_pb2.Listener()
        res.packed.Unpack(listener)
        for route_name in _hcm_route_names(listener):
            if route_name not in routes:
                raise InconsistentSnapshot(f"listener {name!r} names missing route {route_name!r}")
        for cluster_name in _tcp_proxy_clusters(listener):
            if cluster_name not in clusters:
                raise InconsistentSnapshot(
                    f"listener {name!r} names missing cluster {cluster_name!r}"
                )
    for name, res in routes.items():
        rc = route_pb2.RouteConfiguration()
        res.packed.Unpack(rc)
        for vhost in rc.virtual_hosts:
            for route in vhost.routes:
                targets = [route.route.cluster] if route.route.cluster else []
                targets += [wc.name for wc in route.route.weighted_clusters.clusters]
                for target in targets:
                    if target not in clusters:
                        raise InconsistentSnapshot(
                            f"route config {name!r} names missing cluster {target!r}"
                        )
    for name, res in clusters.items():
        cluster = cluster_pb2.Cluster()
        res.packed.Unpack(cluster)
        if cluster.type == cluster_pb2.Cluster.EDS:
            service_name = cluster.eds_cluster_config.service_name or name
            if service_name not in endpoints:
                raise InconsistentSnapshot(
                    f"cluster {name!r} names missing endpoints {service_name!r}"
                )
