"""The sidecar's ADS bookkeeping, driven with real xDS resources and no sockets."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from control_plane.mesh import parse_mesh_text
from control_plane.xds.resources import ViewKey, build_view
from sidecar.xds.state import CLUSTER, ENDPOINT, LISTENER, ROUTE, AdsClientState, XdsSnapshot

MESH = """
services:
  quotes:
    protocol: grpc
    endpoints: [127.0.0.1:50071, {address: 127.0.0.1:50072, weight: 3}]
  greeter:
    protocol: grpc
    endpoints: [127.0.0.1:50061]
    depends_on: [quotes]
"""


def view(text: str = MESH) -> dict[str, list[any_pb2.Any]]:
    resources = build_view(parse_mesh_text(text), ViewKey(service="greeter"))
    return {t: [r.packed for r in by_name.values()] for t, by_name in resources.items()}


def response(type_url: str, resources: list[any_pb2.Any], version: str, nonce: str) -> Any:
    return discovery_pb2.DiscoveryResponse(
        type_url=type_url, version_info=version, resources=resources, nonce=nonce
    )


def new_state() -> AdsClientState:
    return AdsClientState(base_pb2.Node(id="greeter-1"))


def test_starts_with_wildcard_listeners_and_clusters() -> None:
    requests = new_state().initial_requests()
    assert [r.type_url for r in requests] == [LISTENER, CLUSTER]
    assert all(not r.resource_names and not r.response_nonce for r in requests)
    assert requests[0].node.id == "greeter-1"


def test_warming_then_one_complete_config() -> None:
    state = new_state()
    resources = view()
    applied: list[XdsSnapshot] = []

    def apply(snapshot: XdsSnapshot) -> str | None:
        applied.append(snapshot)
        return None

    lds = state.on_response(response(LISTENER, resources[LISTENER], "v1", "n1"), apply)
    ack, rds_request = lds.requests
    assert (ack.type_url, ack.version_info, ack.response_nonce) == (LISTENER, "v1", "n1")
    assert not ack.HasField("error_detail")
    assert rds_request.type_url == ROUTE and list(rds_request.resource_names) == ["quotes"]
    assert lds.snapshot is None  # the listener waits for its route config

    cds = state.on_response(response(CLUSTER, resources[CLUSTER], "v1", "n2"), apply)
    assert [r.type_url for r in cds.requests] == [CLUSTER, ENDPOINT]
    assert list(cds.requests[1].resource_names) == ["quotes"]
    assert cds.snapshot is None

    rds = state.on_response(response(ROUTE, resources[ROUTE], "v1", "n3"), apply)
    assert rds.snapshot is None  # the cluster still waits for its endpoints
    eds = state.on_response(response(ENDPOINT, resources[ENDPOINT], "v1", "n4"), apply)
    assert eds.snapshot is not None and applied == [eds.snapshot]
    snapshot = eds.snapshot
    assert [e.address for e in snapshot.clusters["quotes"].endpoints] == [
        "127.0.0.1:50071",
        "127.0.0.1:50072",
    ]
    assert [e.weight for e in snapshot.clusters["quotes"].endpoints] == [1, 3]
    outbound = snapshot.route_configs["outbound"]
    assert "quotes" in outbound.virtual_hosts[0].domains
    assert state.dump()[0]["type"] == "CDS"


def complete(state: AdsClientState, text: str = MESH) -> None:
    resources = view(text)
    for i, type_url in enumerate((LISTENER, CLUSTER, ROUTE, ENDPOINT)):
        state.on_response(response(type_url, resources[type_url], "v1", f"n{i}"))
    assert state.applied is not None


def test_invalid_resource_is_nacked_and_the_last_good_stays() -> None:
    state = new_state()
    complete(state)
    bad = route_pb2.RouteConfiguration(name="quotes")
    vhost = bad.virtual_hosts.add(name="quotes", domains=["quotes"])
    route = vhost.routes.add()
    route.match.prefix = "/"
    route.match.query_parameters.add(name="debug")
    route.route.cluster = "quotes"
    packed = any_pb2.Any()
    packed.Pack(bad)
    before = state.applied
    actions = state.on_response(response(ROUTE, [packed], "v2", "n9"))
    (nack,) = actions.requests
    assert nack.version_info == "v1" and nack.response_nonce == "n9"
    assert "query_parameters" in nack.error_detail.message
    assert actions.rejected is not None and actions.snapshot is None
    assert state.applied is before
    assert state.received[ROUTE].last_nack == nack.error_detail.message
    # The next good version is accepted and clears the NACK.
    good = state.on_response(response(ROUTE, view()[ROUTE], "v3", "n10"))
    assert good.requests[0].version_info == "v3" and not good.requests[0].HasField("error_detail")
    assert state.received[ROUTE].last_nack == ""


def test_a_config_that_cannot_be_applied_is_nacked_and_rolled_back() -> None:
    state = new_state()
    complete(state)
    edited = MESH.replace("127.0.0.1:50071, ", "")
    actions = state.on_response(
        response(ENDPOINT, view(edited)[ENDPOINT], "v2", "n7"), lambda _: "port 15006 is taken"
    )
    (nack,) = actions.requests
    assert nack.error_detail.message == "port 15006 is taken"
    assert nack.version_info == "v1"
    assert len(state.received[ENDPOINT].messages["quotes"].endpoints[0].lb_endpoints) == 2


def test_a_new_stream_resends_versions_without_nonces() -> None:
    state = new_state()
    complete(state)
    requests = state.initial_requests()
    assert {r.type_url: r.version_info for r in requests} == {
        LISTENER: "v1",
        CLUSTER: "v1",
        ROUTE: "v1",
        ENDPOINT: "v1",
    }
    assert all(r.response_nonce == "" for r in requests)
    assert list(requests[2].resource_names) == ["quotes"]


def test_removed_cluster_drops_its_endpoint_subscription() -> None:
    state = new_state()
    complete(state)
    actions = state.on_response(response(CLUSTER, [], "v2", "n8"))
    assert [r.type_url for r in actions.requests] == [CLUSTER, ENDPOINT]
    assert list(actions.requests[1].resource_names) == []


def test_policies_from_the_mesh_reach_the_applied_config() -> None:
    from pilotfish.config.cluster_policy import LbKind
    from pilotfish.config.route_policy import RetryOn

    policies = MESH.replace(
        "    endpoints: [127.0.0.1:50071, {address: 127.0.0.1:50072, weight: 3}]",
        "    endpoints: [127.0.0.1:50071, {address: 127.0.0.1:50072, weight: 3}]\n"
        "    load_balancing: {policy: peak_ewma}\n"
        "    outlier_detection: {}\n"
        "    routes:\n"
        "      - match: {prefix: /}\n"
        "        retry: {attempts: 3, retry_on: [unavailable]}\n"
        "        fallback: {response: {status: 503}}",
    )
    state = new_state()
    complete(state, policies)
    assert state.applied is not None
    quotes = state.applied.clusters["quotes"]
    assert quotes.lb_policy.kind is LbKind.PEAK_EWMA
    assert quotes.outlier_detection is not None
    [route] = state.applied.route_configs["outbound"].virtual_hosts[0].routes
    assert route.policy.retry.attempts == 3
    assert route.policy.retry.retry_on == frozenset({RetryOn.UNAVAILABLE})
    assert route.policy.fallback is not None
