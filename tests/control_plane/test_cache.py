"""Snapshot consistency, proxy identity and views, and the cache's change notifications."""

from __future__ import annotations

import pytest
from envoy.config.route.v3 import route_pb2

from control_plane.xds.cache import SnapshotCache, identify
from control_plane.xds.resources import ViewKey, build_view
from control_plane.xds.snapshot import InconsistentSnapshot, Snapshot
from control_plane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, Resource
from tests.control_plane.helpers import MESH_YAML, mesh, node


def test_snapshot_with_missing_route_is_refused() -> None:
    view = build_view(mesh(), ViewKey())
    del view[ROUTE]["quotes"]
    with pytest.raises(InconsistentSnapshot, match="listener 'quotes' names missing route"):
        Snapshot.build(view)


def test_snapshot_with_missing_cluster_is_refused() -> None:
    view = build_view(mesh(), ViewKey())
    rc = route_pb2.RouteConfiguration()
    view[ROUTE]["quotes"].packed.Unpack(rc)
    rc.virtual_hosts[0].routes[0].route.cluster = "ghost"
    view[ROUTE]["quotes"] = Resource.of("quotes", rc)
    with pytest.raises(InconsistentSnapshot, match="names missing cluster 'ghost'"):
        Snapshot.build(view)


def test_snapshot_with_missing_endpoints_is_refused() -> None:
    view = build_view(mesh(), ViewKey())
    del view[ENDPOINT]["greeter-canary"]
    with pytest.raises(InconsistentSnapshot, match="names missing endpoints 'greeter-canary'"):
        Snapshot.build(view)


def test_identify_picks_the_view() -> None:
    m = mesh()
    proxy = identify(node("sidecar-1", service="greeter", namespace="default",
                          app_address="127.0.0.1:50061"), m)
    assert proxy.view == ViewKey(service="greeter", app_address=("127.0.0.1", 50061))
    other_ns = identify(node("x", service="greeter", namespace="prod"), m)
    assert other_ns.view == ViewKey()
    assert other_ns.service == "greeter"  # reported as given, but served the full view
    bad = identify(node("y", service="greeter", app_address="nowhere"), m)
    assert bad.view == ViewKey(service="greeter")


def test_views_differ_per_proxy_and_include_the_inbound_side() -> None:
    cache = SnapshotCache(mesh())
    everything = cache.snapshot(ViewKey())
    passthrough = "PassthroughCluster"  # every view has Envoy's outbound passthrough
    assert sorted(everything.of_type(CLUSTER)) == [
        passthrough, "greeter", "greeter-canary", "quotes"
    ]
    greeter = cache.snapshot(ViewKey(service="greeter"))
    assert sorted(greeter.of_type(CLUSTER)) == [passthrough, "quotes"]
    sidecar = cache.snapshot(ViewKey(service="greeter", app_address=("127.0.0.1", 50061)))
    assert [n for n in sorted(sidecar.of_type(LISTENER)) if n[0].isalpha()] == [
        "inbound|greeter", "quotes", "virtualOutbound"
    ]
    assert sorted(sidecar.of_type(CLUSTER)) == [passthrough, "inbound|greeter", "quotes"]
    assert sorted(sidecar.of_type(ENDPOINT)) == ["quotes"]  # the inbound cluster is STATIC


def test_set_mesh_notifies_and_bumps_generation() -> None:
    cache = SnapshotCache(mesh())
    calls: list[int] = []
    stop = cache.on_change(lambda: calls.append(cache.generation))
    before = cache.snapshot(ViewKey()).version(ENDPOINT)
    cache.set_mesh(mesh(MESH_YAML.replace("50071", "50072")))
    assert calls == [2]
    assert cache.snapshot(ViewKey()).version(ENDPOINT) != before
    assert cache.snapshot(ViewKey()).version(LISTENER) == SnapshotCache(mesh()).snapshot(
        ViewKey()).version(LISTENER)
    stop()
    cache.set_mesh(mesh())
    assert calls == [2]
