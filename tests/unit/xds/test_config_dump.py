"""The Envoy-shaped part of /config_dump: typed dumps, durations as strings, RFC 3339 times."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import duration_pb2

from sidecar.xds.config_dump import envoy_configs, rfc3339
from sidecar.xds.state import CLUSTER, ENDPOINT, LISTENER, ROUTE, Received

ADMIN = "type.googleapis.com/envoy.admin.v3."


def test_typed_dumps_in_envoys_shape() -> None:
    received = {t: Received() for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)}
    cluster = cluster_pb2.Cluster(
        name="quotes", connect_timeout=duration_pb2.Duration(seconds=1, nanos=500_000_000)
    )
    received[CLUSTER].messages["quotes"] = cluster
    received[CLUSTER].versions["quotes"] = "v7"
    received[CLUSTER].version_info = "v7"
    received[LISTENER].messages["inbound"] = listener_pb2.Listener(name="inbound")
    received[LISTENER].versions["inbound"] = "v3"
    node = base_pb2.Node(id="greeter-1", cluster="greeter")

    configs = envoy_configs(node, received, 1_764_000_000.25)

    assert [c["@type"] for c in configs] == [
        f"{ADMIN}BootstrapConfigDump", f"{ADMIN}ListenersConfigDump",
        f"{ADMIN}ClustersConfigDump", f"{ADMIN}RoutesConfigDump", f"{ADMIN}EndpointsConfigDump",
    ]
    assert configs[0]["bootstrap"] == {"node": {"id": "greeter-1", "cluster": "greeter"}}
    assert configs[0]["last_updated"] == "2025-11-24T16:00:00.250Z"
    assert configs[1]["dynamic_listeners"] == [{
        "name": "inbound",
        "active_state": {
            "version_info": "v3",
            "listener": {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
                         "name": "inbound"},
            "last_updated": "2025-11-24T16:00:00.250Z",
        },
    }]
    assert configs[2]["version_info"] == "v7"
    assert configs[2]["dynamic_active_clusters"] == [{
        "version_info": "v7",
        "cluster": {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                    "name": "quotes", "connect_timeout": "1.500s"},
        "last_updated": "2025-11-24T16:00:00.250Z",
    }]
    assert configs[3]["dynamic_route_configs"] == []


def test_rfc3339() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
