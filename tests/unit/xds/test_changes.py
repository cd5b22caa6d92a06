"""The one-line summary of what a new config changes."""

from __future__ import annotations

from dataclasses import replace

from pilotfish.config.model import (
    Bootstrap,
    ClusterConfig,
    Endpoint,
    ListenerConfig,
    Protocol,
    RouteConfig,
)
from sidecar.xds.changes import describe_changes

BASE = Bootstrap(
    listeners=(ListenerConfig(name="outbound", host="127.0.0.1", port=15001,
                              route_config="outbound"),),
    route_configs={"outbound": RouteConfig("outbound", ())},
    clusters={
        "quotes": ClusterConfig("quotes", (Endpoint("127.0.0.1", 50071),)),
        "web": ClusterConfig("web", (Endpoint("127.0.0.1", 8080),)),
    },
)


def test_no_change() -> None:
    assert describe_changes(BASE, BASE) == "no change"


def test_the_first_config_adds_everything() -> None:
    empty = Bootstrap(listeners=())
    assert describe_changes(empty, BASE) == (
        "listeners: added outbound; routes: added outbound; clusters: added quotes, web"
    )


def test_endpoints_alone_are_reported_as_endpoints() -> None:
    after = replace(BASE, clusters={
        **BASE.clusters,
        "quotes": ClusterConfig("quotes", (Endpoint("127.0.0.1", 50072),
                                           Endpoint("127.0.0.1", 50071, weight=3))),
    })
    assert describe_changes(BASE, after) == (
        "endpoints: quotes +127.0.0.1:50072 ~127.0.0.1:50071"
    )


def test_clusters_added_removed_and_changed() -> None:
    after = replace(BASE, clusters={
        "quotes": replace(BASE.clusters["quotes"], protocol=Protocol.HTTP1),
        "db": ClusterConfig("db", (Endpoint("127.0.0.1", 5432),)),
    })
    assert describe_changes(BASE, after) == (
        "clusters: added db; removed web; changed quotes"
    )


def test_long_lists_are_cut() -> None:
    many = {f"s{i}": ClusterConfig(f"s{i}", ()) for i in range(8)}
    after = replace(BASE, clusters={**BASE.clusters, **many})
    assert describe_changes(BASE, after) == (
        "clusters: added s0, s1, s2, s3, s4 and 3 more"
    )
