"""The Envoy-shaped part of /config_dump: typed dumps, durations as strings, RFC 3339 times."""

from __future__ import annotations

from typing import Any

import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import duration_pb2

from control_plane.xds import pgv
from pilotfish.config.bootstrap import parse_bootstrap
from pilotfish.config.model import Bootstrap, ListenerConfig
from sidecar.xds.config_dump import envoy_configs, rfc3339
from sidecar.xds.state import CLUSTER, ENDPOINT, LISTENER, ROUTE, Received
from sidecar.xds.static_dump import static_cluster, static_listener, static_route_config
from tests.test_bootstrap_reference import complete_example

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


# --- a static bootstrap's parts, as Envoy shows its own static parts -------------------------

STATIC = """
node_id: edge-1
listeners:
  - {name: ingress, address: "127.0.0.1:15001", route_config: outbound,
     tcp_passthrough: {cluster: db}}
route_configs:
  - name: outbound
    virtual_hosts:
      - name: greeter
        domains: [greeter, "greeter:50051"]
        routes:
          - name: hello
            match: {regex: "/helloworld\\\\.Greeter/S.*", headers: [{name: x-canary, exact: "1"}]}
            route: {weighted_clusters: {greeter: 9, canary: 1},
                    timeout: 2s}
clusters:
  - {name: greeter, protocol: http2, connect_timeout: 250ms,
     endpoints: ["127.0.0.1:50061", {address: "127.0.0.1:50062", weight: 3}]}
  - {name: canary, protocol: http1, endpoints: ["127.0.0.1:50063"],
     load_balancing: {policy: least_request}}
  - {name: db, protocol: tcp, endpoints: ["127.0.0.1:5432"]}
"""


def static_dumps() -> tuple[list[dict[str, Any]], Bootstrap]:
    bootstrap = parse_bootstrap(yaml.safe_load(STATIC))
    node = base_pb2.Node(id=bootstrap.node_id)
    return envoy_configs(node, None, 1_764_000_000.0, bootstrap, 1_764_000_000.0), bootstrap


def test_a_static_bootstrap_in_envoys_static_shape() -> None:
    configs, _ = static_dumps()
    listeners, clusters, routes, endpoints = configs[1:]
    # No control plane: no dynamic lists at all, as Envoy prints a static-only config.
    assert set(listeners) == {"@type", "static_listeners"}
    assert set(endpoints) == {"@type", "static_endpoint_configs"}
    assert [e["endpoint_config"]["cluster_name"] for e in endpoints["static_endpoint_configs"]] == [
        "canary", "db", "greeter"]
    [ingress] = (entry["listener"] for entry in listeners["static_listeners"])
    assert listeners["static_listeners"][0]["last_updated"] == "2025-11-24T16:00:00.000Z"
    assert ingress["@type"] == "type.googleapis.com/envoy.config.listener.v3.Listener"
    assert ingress["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 15001}}
    hcm = ingress["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["@type"].endswith("HttpConnectionManager")
    # The bootstrap's own route config is inlined, as in an Envoy bootstrap...
    assert hcm["route_config"]["name"] == "outbound"
    assert hcm["stream_idle_timeout"] == "300s"
    passthrough = ingress["default_filter_chain"]["filters"][0]["typed_config"]
    assert passthrough["cluster"] == "db"

    [route_config] = routes["static_route_configs"]
    assert route_config["route_config"] == hcm["route_config"] | {
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"}
    [route] = route_config["route_config"]["virtual_hosts"][0]["routes"]
    assert route["match"] == {
        "safe_regex": {"regex": r"/helloworld\.Greeter/S.*"},
        "headers": [{"name": "x-canary", "string_match": {"exact": "1"}}],
    }
    assert route["route"]["timeout"] == "2s"
    assert route["route"]["weighted_clusters"]["clusters"] == [
        {"name": "greeter", "weight": 9}, {"name": "canary", "weight": 1}]

    by_name = {c["cluster"]["name"]: c["cluster"] for c in clusters["static_clusters"]}
    assert list(by_name) == ["canary", "db", "greeter"]
    greeter = by_name["greeter"]
    assert greeter["type"] == "STATIC" and greeter["connect_timeout"] == "0.250s"
    lb_endpoints = greeter["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [(e["endpoint"]["address"]["socket_address"]["port_value"],
             e["load_balancing_weight"]) for e in lb_endpoints] == [(50061, 1), (50062, 3)]
    assert "typed_extension_protocol_options" in greeter  # HTTP/2 upstream
    assert "typed_extension_protocol_options" not in by_name["canary"]
    assert by_name["canary"]["lb_policy"] == "LEAST_REQUEST"


def test_every_static_resource_passes_envoys_rules() -> None:
    _, bootstrap = static_dumps()
    documented = parse_bootstrap(yaml.safe_load(complete_example()))
    for b in (bootstrap, documented):
        for listener in b.listeners:
            pgv.check(static_listener(listener, b.route_configs), f"listener[{listener.name}]")
        for name, rc in b.route_configs.items():
            pgv.check(static_route_config(rc), f"route_config[{name}]")
        for name, cluster in b.clusters.items():
            pgv.check(static_cluster(cluster), f"cluster[{name}]")


def test_an_xds_sidecar_lists_its_static_and_dynamic_parts_side_by_side() -> None:
    # What `pilotfish sidecar --xds` starts with: one listener whose routes come over ADS.
    outbound = ListenerConfig(name="outbound", host="127.0.0.1", port=15001,
                              route_config="outbound", tcp_passthrough_original_destination=True)
    static = Bootstrap(listeners=(outbound,))
    received = {t: Received() for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)}
    received[LISTENER].messages["inbound"] = listener_pb2.Listener(name="inbound")
    configs = envoy_configs(base_pb2.Node(id="n"), received, 1.0, static, 1.0)
    listeners = configs[1]
    [entry] = listeners["static_listeners"]
    assert [e["name"] for e in listeners["dynamic_listeners"]] == ["inbound"]
    assert entry["listener"]["traffic_direction"] == "OUTBOUND"
    rds = entry["listener"]["filter_chains"][0]["filters"][0]["typed_config"]["rds"]
    assert rds == {"config_source": {"ads": {}, "resource_api_version": "V3"},
                   "route_config_name": "outbound"}
    passthrough = entry["listener"]["default_filter_chain"]["filters"][0]["typed_config"]
    assert passthrough["cluster"] == "original_dst"
    assert "static_clusters" not in configs[2] and configs[2]["dynamic_active_clusters"] == []
    pgv.check(static_listener(outbound, {}), "listener[outbound]")
