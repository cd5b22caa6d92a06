"""Route matching as a pure function, tested with plain tables."""

from __future__ import annotations

import pytest

from pilotfish.config.bootstrap import parse_route_config
from pilotfish.config.fields import Node
from pilotfish.config.model import HeaderMutation
from sidecar.route.table import RouteTable, apply_mutation, pick_weighted_cluster


def table(virtual_hosts: list[dict[str, object]]) -> RouteTable:
    return RouteTable(
        parse_route_config(Node("rc", {"name": "rc", "virtual_hosts": virtual_hosts}))
    )


def vhost(name: str, domains: list[str], cluster: str | None = None) -> dict[str, object]:
    return {
        "name": name,
        "domains": domains,
        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster or name}}],
    }


DOMAINS = table(
    [
        vhost("exact", ["api.example.com"]),
        vhost("suffix-long", ["*.internal.example.com"]),
        vhost("suffix", ["*.example.com"]),
        vhost("prefix", ["quotes*"]),
        vhost("default", ["*"]),
    ]
)


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("api.example.com", "exact"),
        ("API.Example.com", "exact"),
        ("api.example.com:8080", "exact"),
        ("a.internal.example.com", "suffix-long"),
        ("web.example.com", "suffix"),
        ("example.com", "default"),
        ("quotes:50051", "prefix"),
        ("quotes-canary", "prefix"),
        ("unknown", "default"),
        ("[::1]:80", "default"),
    ],
)
def test_virtual_host_selection(authority: str, expected: str) -> None:
    vh = DOMAINS.virtual_host(authority)
    assert vh is not None and vh.name == expected


def test_no_virtual_host_without_default() -> None:
    assert table([vhost("only", ["a.com"])]).match("b.com", "/", "GET", {}) is None


ROUTES = table(
    [
        {
            "name": "svc",
            "domains": ["*"],
            "routes": [
                {"match": {"path": "/exact"}, "route": {"cluster": "exact"}},
                {"match": {"regex": "/users/[0-9]+"}, "route": {"cluster": "regex"}},
                {
                    "match": {"prefix": "/api", "methods": ["POST"]},
                    "route": {"cluster": "api-post"},
                },
                {
                    "match": {"prefix": "/api", "headers": [{"name": "x-canary", "exact": "1"}]},
                    "route": {"cluster": "api-canary"},
                },
                {
                    "match": {
                        "prefix": "/api",
                        "headers": [{"name": "x-debug", "present": True, "invert": True}],
                    },
                    "route": {"cluster": "api"},
                },
                {
                    "match": {"prefix": "/h", "headers": [{"name": "x-v", "regex": "v[12]"}]},
                    "route": {"cluster": "h-regex"},
                },
                {
                    "match": {"prefix": "/h", "headers": [{"name": "x-v", "prefix": "beta"}]},
                    "route": {"cluster": "h-prefix"},
                },
            ],
        }
    ]
)


@pytest.mark.parametrize(
    ("path", "method", "headers", "expected"),
    [
        ("/exact", "GET", {}, "exact"),
        ("/exact?q=1", "GET", {}, "exact"),
        ("/exact/more", "GET", {}, None),
        ("/users/42", "GET", {}, "regex"),
        ("/users/42x", "GET", {}, None),
        ("/api/x", "POST", {}, "api-post"),
        ("/api/x", "GET", {"x-canary": "1"}, "api-canary"),
        ("/api/x", "GET", {"x-canary": "2"}, "api"),
        ("/api/x", "GET", {"x-debug": "yes"}, None),
        ("/h", "GET", {"x-v": "v2"}, "h-regex"),
        ("/h", "GET", {"x-v": "v3"}, None),
        ("/h", "GET", {"x-v": "beta-7"}, "h-prefix"),
        ("/nothing", "GET", {}, None),
    ],
)
def test_route_matching(
    path: str, method: str, headers: dict[str, str], expected: str | None
) -> None:
    decision = ROUTES.match("any", path, method, headers)
    assert (decision.cluster if decision else None) == expected


def test_a_table_says_whether_any_route_reads_headers() -> None:
    """The exchange hands a table that reads no headers none at all."""
    assert ROUTES.matches_headers
    route = {"match": {"prefix": "/"}, "route": {"cluster": "a"}}
    plain = table([{"name": "v", "domains": ["*"], "routes": [route]}])
    assert not plain.matches_headers
    decision = plain.match("any", "/x", "GET", {})
    assert decision is not None and decision.cluster == "a"


def test_weighted_clusters_follow_weights() -> None:
    rt = table(
        [
            {
                "name": "split",
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"prefix": "/"},
                        "route": {"weighted_clusters": {"stable": 90, "canary": 10}},
                    }
                ],
            }
        ]
    )
    route = rt.config.virtual_hosts[0].routes[0]
    points = iter(i / 1000 for i in range(1000))
    picks = [pick_weighted_cluster(route, lambda: next(points)) for _ in range(1000)]
    assert picks.count("stable") == 900
    assert picks.count("canary") == 100
    assert pick_weighted_cluster(route, lambda: 0.8999) == "stable"
    assert pick_weighted_cluster(route, lambda: 0.9) == "canary"


def test_header_mutation() -> None:
    headers = [(b":path", b"/"), (b"x-a", b"1"), (b"x-b", b"2"), (b"x-c", b"3")]
    mutation = HeaderMutation(
        add=(("x-a", "new", False), ("x-c", "more", True)), remove=frozenset({"x-b"})
    )
    assert apply_mutation(headers, mutation) == [
        (b":path", b"/"),
        (b"x-c", b"3"),
        (b"x-a", b"new"),
        (b"x-c", b"more"),
    ]
    assert apply_mutation(headers, HeaderMutation()) is headers
