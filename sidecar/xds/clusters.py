"""Translate a Cluster and its ClusterLoadAssignment into the model's ``ClusterConfig``."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from pilotfish.config.errors import ConfigError
from pilotfish.config.model import ClusterConfig, Endpoint, Protocol
from sidecar.xds.cluster_policy import translate_cluster_policies
from sidecar.xds.common import METADATA_KEY, seconds, unpack
from sidecar.xds.security import translate_upstream_mtls

HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_SERVING = frozenset({health_check_pb2.UNKNOWN, health_check_pb2.HEALTHY,
                      health_check_pb2.DEGRADED})


def eds_service_name(cluster: cluster_pb2.Cluster) -> str | None:
    """The ClusterLoadAssignment an EDS cluster needs, or None if it needs none."""
    if cluster.type != cluster_pb2.Cluster.EDS:
        return None
    return str(cluster.eds_cluster_config.service_name or cluster.name)


def translate_cluster(
    cluster: cluster_pb2.Cluster, assignment: endpoint_pb2.ClusterLoadAssignment | None = None
) -> ClusterConfig:
    """An EDS cluster takes its endpoints from ``assignment`` (none yet: no endpoints)."""
    path = f"cluster[{cluster.name}]"
    kinds = {cluster_pb2.Cluster.EDS, cluster_pb2.Cluster.STATIC, cluster_pb2.Cluster.STRICT_DNS}
    if cluster.WhichOneof("cluster_discovery_type") != "type" or cluster.type not in kinds:
        raise ConfigError(f"{path}.type", "only EDS, STATIC and STRICT_DNS are supported")
    if cluster.type == cluster_pb2.Cluster.EDS:
        if not cluster.eds_cluster_config.eds_config.HasField("ads"):
            raise ConfigError(f"{path}.eds_cluster_config.eds_config", "only ads is supported")
        endpoints = translate_endpoints(assignment) if assignment is not None else ()
    else:
        endpoints = translate_endpoints(cluster.load_assignment, f"{path}.load_assignment")
    protocol, max_streams = _protocol(cluster, path)
    mtls = translate_upstream_mtls(cluster, path)
    if mtls is not None and protocol is not Protocol.HTTP2:
        raise ConfigError(f"{path}.transport_socket", "mTLS between sidecars needs HTTP/2")
    policies = translate_cluster_policies(cluster, path)
    connect_timeout = (seconds(cluster.connect_timeout)
                       if cluster.HasField("connect_timeout") else 5.0)
    if connect_timeout <= 0:
        raise ConfigError(f"{path}.connect_timeout", "must be more than 0")
    return ClusterConfig(
        name=cluster.name,
        endpoints=endpoints,
        protocol=protocol,
        connect_timeout=connect_timeout,
        max_concurrent_streams=max_streams,
        lb_policy=policies.lb_policy,
        health_check=policies.health_check,
        outlier_detection=policies.outlier_detection,
        resilience=policies.resilience,
        mtls=mtls,
    )


def _protocol(cluster: cluster_pb2.Cluster, path: str) -> tuple[Protocol, int]:
    max_streams = ClusterConfig.__dataclass_fields__["max_concurrent_streams"].default
    assert isinstance(max_streams, int)
    protocol = Protocol.HTTP1  # Envoy's default upstream protocol
    packed = cluster.typed_extension_protocol_options.get(HTTP_OPTIONS_KEY)
    if packed is not None:
        options = http_protocol_options_pb2.HttpProtocolOptions()
        unpack(f"{path}.typed_extension_protocol_options", packed, options)
        if options.explicit_http_config.HasField("http2_protocol_options"):
            protocol = Protocol.HTTP2
            h2 = options.explicit_http_config.http2_protocol_options
            if h2.HasField("max_concurrent_streams"):
                max_streams = h2.max_concurrent_streams.value
    elif cluster.HasField("http2_protocol_options"):
        protocol = Protocol.HTTP2
    declared = cluster.metadata.filter_metadata.get(METADATA_KEY)
    if declared is not None and "protocol" in declared.fields:
        name = declared.fields["protocol"].string_value
        by_name = {"grpc": Protocol.HTTP2, "http2": Protocol.HTTP2, "http1": Protocol.HTTP1,
                   "tcp": Protocol.TCP}
        if name not in by_name:
            raise ConfigError(f"{path}.metadata.filter_metadata.{METADATA_KEY}.protocol",
                              f"expected one of: {', '.join(by_name)}")
        protocol = by_name[name]
    return protocol, max(1, max_streams)


def translate_endpoints(
    cla: endpoint_pb2.ClusterLoadAssignment, path: str | None = None
) -> tuple[Endpoint, ...]:
    """Serving endpoints of priority 0; weights are endpoint weight times locality weight."""
    path = path or f"endpoints[{cla.cluster_name}]"
    endpoints: list[Endpoint] = []
    for i, locality in enumerate(cla.endpoints):
        loc_path = f"{path}.endpoints[{i}]"
        if locality.priority != 0:
            raise ConfigError(f"{loc_path}.priority", "only priority 0 is supported")
        locality_weight = (locality.load_balancing_weight.value
                           if locality.HasField("load_balancing_weight") else 1)
        for j, lb in enumerate(locality.lb_endpoints):
            ep_path = f"{loc_path}.lb_endpoints[{j}]"
            if lb.health_status not in _SERVING:
                continue
            address = lb.endpoint.address
            if not address.HasField("socket_address"):
                raise ConfigError(f"{ep_path}.endpoint.address", "a socket_address is required")
            socket = address.socket_address
            if not socket.address or not 0 < socket.port_value < 65536:
                raise ConfigError(f"{ep_path}.endpoint.address.socket_address",
                                  "needs an address and a port_value")
            weight = lb.load_balancing_weight.value if lb.HasField("load_balancing_weight") else 1
            if weight * locality_weight == 0:
                continue
            endpoints.append(Endpoint(socket.address, socket.port_value,
                                      weight * locality_weight))
    return tuple(endpoints)
