"""The outbound side an Envoy sidecar needs, and every resource of a mesh that uses every
feature checked against Envoy's own validation rules; then our sidecar reading the same
resources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf.message import Message

from control_plane.kube.discovery import merge
from control_plane.kube.state import DiscoveredService, PodEndpoint, ServiceInfo, ServicePort
from control_plane.mesh import Mesh, load_mesh_file, parse_mesh_text
from control_plane.xds import pgv
from control_plane.xds.resources import ViewKey, build_view
from control_plane.xds.snapshot import InconsistentSnapshot, Snapshot
from control_plane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE
from pilotfish.config.errors import ConfigError
from sidecar.listen.iptables import InterceptionOptions
from sidecar.route.table import RouteTable
from sidecar.xds.translate import translate_all, translate_listener

EVERY_FEATURE = Path(__file__).with_name("every_feature.yaml")
MESSAGES: dict[str, type[Message]] = {
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
}
CLUSTER_IP = "10.96.0.10"


def full_mesh() -> Mesh:
    """The mesh file, with two Kubernetes Services: one the file names, one it does not."""
    discovered = {
        "greeter.shop": DiscoveredService(
            ServiceInfo("greeter", "shop", CLUSTER_IP, (ServicePort("grpc", 50051),)),
            {"grpc": (PodEndpoint("10.1.0.5", 50051, zone="z1", node="n1"),)},
        ),
        "billing.pay": DiscoveredService(
            ServiceInfo("billing", "pay", "10.96.0.11", (ServicePort("http", 80),)),
            {"http": (PodEndpoint("10.1.0.6", 8080, zone="z1", node="n1"),)},
        ),
    }
    return merge(load_mesh_file(EVERY_FEATURE), discovered, cluster_domain="corp.local")


def decoded(view: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for type_url, resources in view.items():
        out[type_url] = {}
        for name, resource in resources.items():
            message = MESSAGES[type_url]()
            assert resource.packed.Unpack(message)
            out[type_url][name] = message
    return out


def every_view(mesh: Mesh) -> list[dict[str, dict[str, Any]]]:
    keys = [ViewKey()] + [
        ViewKey(service=name, app_address=("127.0.0.1", 9000)) for name in mesh.services
    ]
    views = []
    for key in keys:
        view = build_view(mesh, key)
        Snapshot.build(view)  # every name a resource refers to is in the view
        views.append(decoded(view))
    return views


def test_every_resource_of_a_mesh_using_every_feature_passes_envoys_rules() -> None:
    mesh = full_mesh()
    seen: set[tuple[str, str]] = set()
    for view in every_view(mesh):
        for type_url, resources in view.items():
            for name, message in resources.items():
                pgv.check(message, f"{type_url.rsplit('.', 1)[-1]}[{name}]")
                # The deprecated regex engine field is gone everywhere.
                assert "google_re2" not in str(message), name
                seen.add((type_url, name))
    names = {name for _, name in seen}
    # The check covered every shape: outbound, per port, inbound, api listeners, passthrough.
    for expected in ("virtualOutbound", "0.0.0.0_50051", "0.0.0.0_80", "50051", "80",
                     "PassthroughCluster", "inbound|greeter", "greeter:50051", "ewma",
                     "billing.pay", "db"):
        assert expected in names, expected


def test_the_outbound_listeners_an_envoy_sidecar_needs() -> None:
    view = decoded(build_view(full_mesh(), ViewKey()))
    listeners = view[LISTENER]

    virtual = listeners["virtualOutbound"]
    socket = virtual.address.socket_address
    # The port our iptables rules redirect the app's outbound connections to.
    assert (socket.address, socket.port_value) == ("0.0.0.0", InterceptionOptions().outbound_port)
    assert virtual.use_original_dst.value is True
    [chain] = virtual.filter_chains
    proxy = tcp_proxy_pb2.TcpProxy()
    assert chain.filters[0].typed_config.Unpack(proxy)
    assert proxy.cluster == "PassthroughCluster"
    passthrough = view[CLUSTER]["PassthroughCluster"]
    assert passthrough.type == cluster_pb2.Cluster.ORIGINAL_DST
    assert passthrough.lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED

    # One listener per port of an HTTP service; none for tcp (db: 5432) or a portless one.
    per_port = sorted(n for n in listeners if n.startswith("0.0.0.0_"))
    assert per_port == ["0.0.0.0_50051", "0.0.0.0_80"]
    for name in per_port:
        listener = listeners[name]
        port = int(name.rsplit("_", 1)[1])
        assert listener.address.socket_address.port_value == port
        assert listener.bind_to_port.value is False
        hcm = hcm_pb2.HttpConnectionManager()
        assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
        assert hcm.rds.route_config_name == str(port)
        assert hcm.rds.config_source.HasField("ads")
        assert hcm.http_filters[-1].name == "envoy.filters.http.router"
    # The routes on 50051 use faults and rate limits: that port's listener has the filters.
    hcm = hcm_pb2.HttpConnectionManager()
    listeners["0.0.0.0_50051"].filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert [f.name for f in hcm.http_filters] == [
        "envoy.filters.http.fault", "envoy.filters.http.local_ratelimit",
        "envoy.filters.http.router",
    ]
    # Proxyless gRPC clients keep their api_listeners.
    assert listeners["greeter"].HasField("api_listener")
    assert listeners["greeter:50051"].HasField("api_listener")


def test_per_port_route_configurations_carry_every_kubernetes_name() -> None:
    routes = decoded(build_view(full_mesh(), ViewKey()))[ROUTE]
    by_host = {v.name: list(v.domains) for v in routes["50051"].virtual_hosts}
    assert list(by_host) == [
        "greeter.shop.svc.corp.local:50051", "greeter-canary.shop.svc.corp.local:50051",
        "allow_any",
    ]
    greeter = by_host["greeter.shop.svc.corp.local:50051"]
    forms = ["greeter", "greeter.shop", "greeter.shop.svc", "greeter.shop.svc.corp.local",
             CLUSTER_IP]
    assert greeter[: 2 * len(forms)] == [f for n in forms for f in (n, f"{n}:50051")]
    assert set(greeter) == {f for n in forms for f in (n, f"{n}:50051")}
    assert by_host["allow_any"] == ["*"]
    [allow_any] = routes["50051"].virtual_hosts[-1].routes
    assert allow_any.route.cluster == "PassthroughCluster"

    # Port 80: a file service without Kubernetes, and a Service only Kubernetes knows, keyed
    # `billing.pay`: its names are not doubled (`billing.pay.pay`), its ClusterIP is there.
    by_host = {v.name: list(v.domains) for v in routes["80"].virtual_hosts}
    assert set(by_host) == {"billing.pay.svc.corp.local:80", "quotes.default.svc.corp.local:80",
                            "web.default.svc.corp.local:80", "allow_any"}
    billing = by_host["billing.pay.svc.corp.local:80"]
    assert {"billing", "billing:80", "billing.pay", "billing.pay.svc.corp.local:80",
            "10.96.0.11", "10.96.0.11:80"} <= set(billing)
    assert not any("pay.pay" in d for d in billing)
    assert by_host["web.default.svc.corp.local:80"][:4] == ["web", "web:80", "web.default",
                                                             "web.default:80"]
    for rc in routes.values():
        domains = [d for v in rc.virtual_hosts for d in v.domains]
        assert len(domains) == len(set(domains)), rc.name  # Envoy refuses a domain twice

    # Regexes in the current safe_regex shape: RE2 by default, no engine field.
    regex = routes["50051"].virtual_hosts[0].routes[2].match.safe_regex
    assert regex.regex == r"/helloworld\.Greeter/S\w+"
    assert regex.WhichOneof("engine_type") is None
    header = routes["greeter"].virtual_hosts[0].routes[0].match.headers[2]
    assert header.string_match.safe_regex.WhichOneof("engine_type") is None


def test_a_view_without_the_passthrough_cluster_is_inconsistent() -> None:
    view = build_view(full_mesh(), ViewKey())
    del view[CLUSTER]["PassthroughCluster"]
    with pytest.raises(InconsistentSnapshot, match="'virtualOutbound' names missing cluster"):
        Snapshot.build(view)


def test_a_digits_only_service_name_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"services\.80: .*digits alone name a port"):
        parse_mesh_text("services:\n  '80':\n    endpoints: []\n")


# --- our sidecar reads the same resources ------------------------------------------------------


def _all(view: dict[str, dict[str, Any]]) -> Any:
    return translate_all(
        view[LISTENER].values(), view[ROUTE].values(), view[CLUSTER].values(),
        view[ENDPOINT].values(),
    )


def test_the_sidecar_routes_with_the_per_port_route_configurations() -> None:
    config = _all(decoded(build_view(full_mesh(), ViewKey())))
    # Nothing of Envoy's outbound side is bound; the passthrough is the listener's own.
    assert [listener.name for listener in config.listeners] == []
    assert "PassthroughCluster" not in config.clusters
    outbound = config.route_configs["outbound"]
    assert outbound.original_port_routes == ((0, "outbound|0"), (80, "80"), (50051, "50051"))
    table = RouteTable(outbound)
    # Any name form, with or without the port, and a service without a port (from its
    # api_listener's route config, the only place it is).
    greeter = "greeter.shop.svc.corp.local:50051"
    for authority, host in ((greeter, greeter), (f"{CLUSTER_IP}:50051", greeter),
                            ("greeter", greeter), ("billing", "billing.pay.svc.corp.local:80"),
                            ("ewma", "ewma")):
        found = table.virtual_host(authority)
        assert found is not None and found.name == host, authority
    decision = table.match("billing.pay:80", "/x", "GET", {})
    assert decision is not None and decision.cluster == "billing.pay"
    assert table.virtual_host("example.org") is None  # allow_any is the listener's job
    port_80 = RouteTable(config.route_configs["80"])
    assert port_80.virtual_host("web") is not None
    assert port_80.virtual_host("greeter") is None  # greeter is on 50051
    assert port_80.virtual_host("example.org") is None
    other_ports = RouteTable(config.route_configs["outbound|0"])
    assert other_ports.virtual_host("ewma") is not None
    assert other_ports.virtual_host("web") is None


def test_a_control_plane_serving_only_api_listeners_still_routes() -> None:
    view = decoded(build_view(full_mesh(), ViewKey()))
    for name in [n for n in view[LISTENER] if n.startswith("0.0.0.0_") or n == "virtualOutbound"]:
        del view[LISTENER][name]
    for name in ("80", "50051"):
        del view[ROUTE][name]
    outbound = _all(view).route_configs["outbound"]
    assert outbound.original_port_routes == ()
    table = RouteTable(outbound)
    for authority in ("greeter", "greeter:50051", "ewma", "billing.pay.svc.corp.local"):
        assert table.virtual_host(authority) is not None, authority


def test_the_sidecar_refuses_what_it_cannot_do_with_envoys_shape() -> None:
    view = decoded(build_view(full_mesh(), ViewKey()))
    per_port = view[LISTENER]["0.0.0.0_80"]
    per_port.filter_chains[0].filters[0].typed_config.Pack(
        tcp_proxy_pb2.TcpProxy(stat_prefix="x", cluster="db")
    )
    with pytest.raises(ConfigError, match=r"^listener\[0\.0\.0\.0_80\]\.filter_chains\[0\]"
                       r"\.filters\[0\]\.typed_config: only an HttpConnectionManager"):
        translate_listener(per_port)
    virtual = view[LISTENER]["virtualOutbound"]
    virtual.per_connection_buffer_limit_bytes.value = 1024
    with pytest.raises(ConfigError, match=r"virtualOutbound\]\.per_connection_buffer_limit"):
        translate_listener(virtual)
    passthrough = view[CLUSTER]["PassthroughCluster"]
    passthrough.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
    with pytest.raises(ConfigError, match=r"PassthroughCluster\]\.lb_policy: .*CLUSTER_PROVIDED"):
        _all(view)

