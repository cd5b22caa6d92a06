"""Bootstrap validation: every error names the path of the bad field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from pilotfish.config.bootstrap import parse_bootstrap
from pilotfish.config.errors import ConfigError
from pilotfish.config.model import Protocol

GOOD: dict[str, Any] = {
    "admin": {"address": "127.0.0.1", "port": 15000},
    "listeners": [
        {
            "name": "in",
            "address": "127.0.0.1:15001",
            "route_config": "rc",
            "tcp_passthrough": {"cluster": "raw"},
        }
    ],
    "route_configs": [
        {
            "name": "rc",
            "virtual_hosts": [
                {
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "250ms"}},
                        {"match": {"path": "/x"}, "route": {"cluster": "app", "timeout": "0s"}},
                    ],
                }
            ],
        }
    ],
    "clusters": [
        {
            "name": "app",
            "protocol": "http1",
            "endpoints": ["127.0.0.1:8080", {"address": "[::1]:8081", "weight": 3}],
        },
        {"name": "raw", "protocol": "tcp", "endpoints": ["127.0.0.1:9000"]},
    ],
}


def test_good_config_parses() -> None:
    b = parse_bootstrap(GOOD)
    assert b.listeners[0].tcp_passthrough_cluster == "raw"
    app = b.clusters["app"]
    assert app.protocol is Protocol.HTTP1
    assert [(e.host, e.port, e.weight) for e in app.endpoints] == [
        ("127.0.0.1", 8080, 1),
        ("::1", 8081, 3),
    ]
    routes = b.route_configs["rc"].virtual_hosts[0].routes
    assert routes[0].action.timeout == 0.25
    assert routes[1].action.timeout is None


def test_tracing_protocol_and_its_default_endpoint() -> None:
    doc = {**GOOD, "tracing": {"protocol": "http/protobuf", "sampling": "1%"}}
    tracing = parse_bootstrap(doc).telemetry.tracing
    assert tracing.protocol == "http/protobuf"
    assert tracing.export_endpoint == "http://127.0.0.1:4318/v1/traces"
    doc = {**GOOD, "tracing": {"endpoint": "http://jaeger:4317"}}
    tracing = parse_bootstrap(doc).telemetry.tracing
    assert (tracing.protocol, tracing.export_endpoint) == ("grpc", "http://jaeger:4317")


def broken(path: list[str | int], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            broken(["route_configs", 0, "virtual_hosts", 0, "routes", 1, "route", "timeout"], "2x"),
            "route_configs[0].virtual_hosts[0].routes[1].route.timeout: "
            "expected a duration like 250ms",
        ),
        (
            broken(["clusters", 0, "endpoints", 1, "address"], "nowhere"),
            "clusters[0].endpoints[1].address: expected an address like 127.0.0.1:8080",
        ),
        (
            broken(["clusters", 0, "protocol"], "http3"),
            "clusters[0].protocol: expected one of: http2, http1, tcp",
        ),
        (broken(["listeners"], KeyError), "listeners: required field is missing"),
        (
            broken(["listeners", 0, "route_config"], "missing"),
            "listeners[0].route_config: no route config named 'missing'",
        ),
        (
            broken(["route_configs", 0, "virtual_hosts", 0, "routes", 0, "route", "cluster"], "x"),
            "route_configs[0].virtual_hosts[0].routes[0].route: no cluster named 'x'",
        ),
        (
            broken(["route_configs", 0, "virtual_hosts", 0, "routes", 0, "match"], {"regex": "("}),
            "route_configs[0].virtual_hosts[0].routes[0].match.regex: invalid regular expression",
        ),
        (
            broken(["clusters", 0, "colour"], "red"),
            "clusters[0].colour: unknown field",
        ),
        (
            {**GOOD, "tracing": {"protocol": "http/json"}},
            "tracing.protocol: expected one of: grpc, http/protobuf",
        ),
        (
            {**GOOD, "tracing": {"endpoint": "grpc://collector:4317"}},
            "tracing.endpoint: expected a URL like http://collector:4317",
        ),
        (
            broken(["route_configs", 0, "virtual_hosts", 0, "domains"], ["a.*.com"]),
            "route_configs[0].virtual_hosts[0].domains[0]: a wildcard may only lead or trail",
        ),
        (
            broken(["listeners", 0, "limits"], {"max_concurrent_streams": 0}),
            "listeners[0].limits.max_concurrent_streams: expected an integer at least 1",
        ),
        (
            broken(["listeners", 0, "limits"], {"stream_reset_rate": "fast"}),
            "listeners[0].limits.stream_reset_rate: expected a positive number",
        ),
        (
            broken(["listeners", 0, "limits"], {"stream_idle_timeout": "0s"}),
            "listeners[0].limits.stream_idle_timeout: expected a positive duration",
        ),
        (
            broken(["listeners", 0, "limits"], {"max_streams": 5}),
            "listeners[0].limits.max_streams: unknown field",
        ),
        (broken(["listeners", 0, "backlog"], 0), "listeners[0].backlog: expected an integer"),
    ],
)
def test_errors_name_the_field(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_bootstrap(doc)
    assert str(info.value).startswith(message)


def test_listener_limits_default_to_safe_values_and_parse() -> None:
    default = parse_bootstrap(GOOD).listeners[0]
    assert default.limits.max_concurrent_streams == 100
    assert default.backlog == 1024
    doc = broken(
        ["listeners", 0, "limits"],
        {"max_concurrent_streams": 10, "control_frame_rate": 5, "header_timeout": "2s"},
    )
    limits = parse_bootstrap(doc).listeners[0].limits
    assert (limits.max_concurrent_streams, limits.control_frame_rate) == (10, 5.0)
    assert limits.header_timeout == 2.0
    assert limits.stream_reset_burst == default.limits.stream_reset_burst
