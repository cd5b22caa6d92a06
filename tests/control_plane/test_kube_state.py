"""The sans-IO side of Kubernetes discovery: Services and EndpointSlices in, endpoints out,
and their merge with the mesh file into the xDS the sidecars get."""

from __future__ import annotations

import asyncio

from envoy.config.core.v3 import base_pb2, health_check_pb2

from control_plane.kube.discovery import MeshSources, merge, protocol_of
from control_plane.kube.state import (
    ENDPOINT_SLICE,
    SERVICE,
    ClusterState,
    MalformedObject,
    PodEndpoint,
    ServicePort,
)
from control_plane.mesh import parse_mesh_text
from control_plane.xds.cache import SnapshotCache, identify
from control_plane.xds.resources import load_assignment, route_configuration
from tests.kube_fake import endpoint, endpoint_slice, service


def _state(*endpoints: dict[str, object]) -> ClusterState:
    state = ClusterState()
    state.replace(SERVICE, [service("quotes", "shop", 7001, "10.96.0.7")])
    state.replace(
        ENDPOINT_SLICE, [endpoint_slice("quotes-1", "shop", "quotes", 8080, list(endpoints))]
    )
    return state


def test_ready_endpoints_become_pods_with_target_port_and_locality() -> None:
    state = _state(endpoint("10.1.0.1", "node-a", "z1"), endpoint("10.1.0.2", "node-b", "z2"))
    found = state.services()["quotes.shop"]
    assert found.info.cluster_ip == "10.96.0.7"
    assert found.endpoints["grpc"] == (
        PodEndpoint("10.1.0.1", 8080, "z1", "node-a"),
        PodEndpoint("10.1.0.2", 8080, "z2", "node-b"),
    )


def test_terminating_serving_is_draining_and_not_serving_is_gone() -> None:
    state = _state(
        endpoint("10.1.0.1"),
        endpoint("10.1.0.2", ready=False, serving=True, terminating=True),
        endpoint("10.1.0.3", ready=False, serving=False, terminating=True),
        endpoint("10.1.0.4", ready=False, serving=False),
    )
    pods = state.services()["quotes.shop"].endpoints["grpc"]
    assert [(p.address, p.draining) for p in pods] == [("10.1.0.1", False), ("10.1.0.2", True)]


def test_events_change_state_and_report_whether_anything_changed() -> None:
    state = _state(endpoint("10.1.0.1"))
    version = state.version
    two = endpoint_slice("quotes-1", "shop", "quotes", 8080, [endpoint("10.1.0.1")])
    assert not state.apply(ENDPOINT_SLICE, "MODIFIED", two)  # same content
    assert state.version == version
    extra = endpoint_slice("quotes-2", "shop", "quotes", 8080, [endpoint("10.1.0.9")])
    assert state.apply(ENDPOINT_SLICE, "ADDED", extra)
    pods = state.services()["quotes.shop"].endpoints["grpc"]
    assert [p.address for p in pods] == ["10.1.0.1", "10.1.0.9"]
    assert state.apply(ENDPOINT_SLICE, "DELETED", extra)
    assert state.apply(SERVICE, "DELETED", service("quotes", "shop", 7001))
    assert state.services() == {}
    assert not state.apply(ENDPOINT_SLICE, "BOOKMARK", extra)


def test_a_pod_in_two_slices_is_one_endpoint_and_serving_wins() -> None:
    state = ClusterState()
    state.replace(SERVICE, [service("quotes", "shop", 7001)])
    state.replace(
        ENDPOINT_SLICE,
        [
            endpoint_slice("a", "shop", "quotes", 8080, [endpoint("10.1.0.1", terminating=True)]),
            endpoint_slice("b", "shop", "quotes", 8080, [endpoint("10.1.0.1")]),
        ],
    )
    (pod,) = state.services()["quotes.shop"].endpoints["grpc"]
    assert not pod.draining


def test_a_relist_forgets_what_it_does_not_hold_in_its_namespace_only() -> None:
    state = ClusterState()
    state.replace(SERVICE, [service("a", "one", 1), service("b", "two", 2)])
    assert state.replace(SERVICE, [], namespace="one")
    assert list(state.services()) == ["b.two"]
    assert not state.replace(SERVICE, [service("b", "two", 2)], namespace="two")


def test_malformed_objects_name_the_field_and_change_nothing() -> None:
    state = _state(endpoint("10.1.0.1"))
    bad = endpoint_slice("quotes-1", "shop", "quotes", 8080, [{"conditions": {}}])
    try:
        state.apply(ENDPOINT_SLICE, "MODIFIED", bad)
    except MalformedObject as exc:
        assert "endpoints[0].addresses" in str(exc)
    else:
        raise AssertionError("accepted an endpoint without addresses")
    assert len(state.services()["quotes.shop"].endpoints["grpc"]) == 1
    # In a list, the bad object is skipped and the good ones are kept.
    good = endpoint_slice("quotes-2", "shop", "quotes", 8080, [endpoint("10.1.0.2")])
    state.replace(ENDPOINT_SLICE, [bad, good])
    assert [p.address for p in state.services()["quotes.shop"].endpoints["grpc"]] == ["10.1.0.2"]


def test_external_name_services_and_fqdn_slices_are_ignored() -> None:
    state = ClusterState()
    external = service("db", "shop", 5432)
    external["spec"] = {"type": "ExternalName", "externalName": "db.example.com"}
    state.replace(SERVICE, [external])
    assert state.services() == {}
    fqdn = endpoint_slice("x", "shop", "db", 5432, [endpoint("db.example.com")])
    fqdn["addressType"] = "FQDN"
    assert not state.apply(ENDPOINT_SLICE, "ADDED", fqdn)


def test_protocol_from_app_protocol_then_port_name() -> None:
    assert protocol_of(ServicePort("web", 80, "kubernetes.io/h2c")) == "http2"
    assert protocol_of(ServicePort("grpc-api", 80)) == "grpc"
    assert protocol_of(ServicePort("http", 80)) == "http1"
    assert protocol_of(ServicePort("postgres", 5432)) == "tcp"


MESH = """
services:
  quotes:
    namespace: shop
    protocol: grpc
    load_balancing: {policy: least_request}
    endpoints: [203.0.113.5:7001]
    routes:
      - name: quotes
        match: {prefix: /}
        timeout: 2s
"""


def test_a_service_gets_the_mesh_file_policy_and_keeps_its_static_endpoints() -> None:
    state = _state(endpoint("10.1.0.1"))
    mesh = merge(parse_mesh_text(MESH), state.services(), "corp.local")
    quotes = mesh.services["quotes"]
    assert quotes.lb_policy.kind.name.lower() == "least_request"
    assert quotes.routes[0].timeout == 2.0
    assert [e.address for e in quotes.endpoints] == ["203.0.113.5:7001"]
    assert [p.address for p in quotes.pods] == ["10.1.0.1"]
    assert quotes.port == 7001
    vhost = route_configuration(quotes).virtual_hosts[0]
    assert set(vhost.domains) >= {
        "quotes",
        "quotes:7001",
        "quotes.shop",
        "quotes.shop:7001",
        "quotes.shop.svc",
        "quotes.shop.svc:7001",
        "quotes.shop.svc.corp.local",
        "quotes.shop.svc.corp.local:7001",
        "10.96.0.7:7001",
    }


def test_a_service_the_mesh_file_does_not_name_gets_defaults() -> None:
    state = _state(endpoint("10.1.0.1"))
    mesh = merge(parse_mesh_text("services: {}"), state.services())
    quotes = mesh.services["quotes.shop"]
    assert (quotes.protocol, quotes.port, quotes.depends_on) == ("grpc", 7001, None)
    assert quotes.routes[0].clusters[0].name == "quotes.shop"


def test_bare_names_only_when_unambiguous() -> None:
    state = ClusterState()
    state.replace(SERVICE, [service("web", "a", 80), service("web", "b", 80)])
    mesh = merge(parse_mesh_text("services: {}"), state.services())
    domains = route_configuration(mesh.services["web.a"]).virtual_hosts[0].domains
    assert "web" not in domains and "web.a:80" in domains


def test_load_assignment_pods_by_locality_with_draining() -> None:
    pods = (
        PodEndpoint("10.1.0.1", 8080, "z1", "node-a"),
        PodEndpoint("10.1.0.2", 8080, "z1", "node-a", draining=True),
        PodEndpoint("10.1.0.3", 8080, "z2", "node-b"),
    )
    cla = load_assignment("quotes", (), pods)
    places = [(loc.locality.zone, loc.locality.sub_zone) for loc in cla.endpoints]
    assert places == [("z1", "node-a"), ("z2", "node-b")]
    statuses = [
        (e.endpoint.address.socket_address.address, e.health_status)
        for loc in cla.endpoints
        for e in loc.lb_endpoints
    ]
    assert statuses == [
        ("10.1.0.1", health_check_pb2.HEALTHY),
        ("10.1.0.2", health_check_pb2.DRAINING),
        ("10.1.0.3", health_check_pb2.HEALTHY),
    ]
    assert all(loc.load_balancing_weight.value == 1 for loc in cla.endpoints)


def test_a_burst_of_discovery_changes_makes_one_rebuild_and_file_edits_keep_pods() -> None:
    state = _state(endpoint("10.1.0.1"))
    file_mesh = parse_mesh_text(MESH)
    cache = SnapshotCache(file_mesh)
    sources = MeshSources(file_mesh, cache.set_mesh, state.services, coalesce=0.01)

    async def burst() -> None:
        for i in range(2, 50):
            extra = endpoint_slice(f"s{i}", "shop", "quotes", 8080, [endpoint(f"10.1.0.{i}")])
            state.apply(ENDPOINT_SLICE, "ADDED", extra)
            sources.discovery_changed()
        await asyncio.sleep(0.1)

    asyncio.run(burst())
    assert sources.rebuilds == 1
    assert len(cache.mesh.services["quotes"].pods) == 49
    # A mesh file edit is merged with what discovery knows: the pods stay.
    edited = parse_mesh_text(MESH.replace("timeout: 2s", "timeout: 3s"))
    sources.set_file_mesh(edited)
    assert cache.mesh.services["quotes"].routes[0].timeout == 3.0
    assert len(cache.mesh.services["quotes"].pods) == 49


def test_a_list_reports_the_objects_it_skipped() -> None:
    state = ClusterState()
    state.replace(SERVICE, [{"metadata": {"name": "x"}}, service("quotes", "shop", 7001)])
    assert state.rejected == ["Service: metadata.name and metadata.namespace are required"]
    assert list(state.services()) == ["quotes.shop"]


def test_a_sidecar_of_a_discovered_service_gets_that_service_view() -> None:
    state = _state(endpoint("10.1.0.1"))
    mesh = merge(parse_mesh_text("services: {}"), state.services())
    node = base_pb2.Node(id="quotes-abc")
    node.metadata.update({"service": "quotes", "namespace": "shop"})
    assert identify(node, mesh).view.service == "quotes.shop"
    node.metadata.update({"service": "quotes", "namespace": "elsewhere"})
    assert identify(node, mesh).view.service is None
