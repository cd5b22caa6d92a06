"""Mesh file validation (errors name the field path) and the file watcher."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from control_plane.mesh import Mesh, parse_mesh_text, service_view
from control_plane.watcher import MeshFileWatcher
from pilotfish.config.errors import ConfigError
from pilotfish.config.model import Endpoint, WeightedCluster
from tests.control_plane.helpers import MESH_YAML, mesh


def test_example_parses() -> None:
    m = mesh()
    greeter = m.services["greeter"]
    assert greeter.protocol == "grpc"
    assert greeter.endpoints == (Endpoint("127.0.0.1", 50061, 1), Endpoint("127.0.0.1", 50062, 3))
    assert greeter.depends_on == ("quotes",)
    [route] = greeter.routes
    assert route.timeout == 2.0
    assert route.clusters == (WeightedCluster("greeter", 90), WeightedCluster("greeter-canary", 10))
    quotes = m.services["quotes"]
    assert quotes.depends_on is None
    assert quotes.routes[0].match.path.prefix == "/"
    assert quotes.routes[0].clusters == (WeightedCluster("quotes", 1),)


def test_views_follow_depends_on_and_split_targets() -> None:
    m = mesh()
    assert service_view(m, "greeter") == ["quotes"]
    assert service_view(m, "quotes") == ["greeter", "greeter-canary", "quotes"]
    assert service_view(m, None) == ["greeter", "greeter-canary", "quotes"]
    assert service_view(m, "unknown") == ["greeter", "greeter-canary", "quotes"]


BAD_TIMEOUT = """
services:
  greeter:
    endpoints: [127.0.0.1:1]
    routes:
      - match: {prefix: /a}
      - match: {prefix: /b}
        timeout: soon
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BAD_TIMEOUT, "services.greeter.routes[1].timeout: expected a duration like 250ms"),
        ("services: {a: {endpoints: [nope]}}",
         "services.a.endpoints[0]: expected an address like 127.0.0.1:8080"),
        ("services: {a: {endpoints: [{address: 127.0.0.1:1, weight: 0}]}}",
         "services.a.endpoints[0].weight: expected an integer at least 1 and at most 1000000"),
        ("services: {a: {endpoints: [127.0.0.1:1], protocol: udp}}",
         "services.a.protocol: expected one of: grpc, http2, http1, tcp"),
        ("services: {a: {endpoints: [127.0.0.1:1], depends_on: [b]}}",
         "services.a.depends_on[0]: no service named 'b'"),
        ("services: {a: {endpoints: [127.0.0.1:1], "
         "routes: [{match: {prefix: /}, split: {a: 1, b: 1}}]}}",
         "services.a.routes[0].split.b: service 'b' does not exist"),
        ("services: {a: {endpoints: [127.0.0.1:1], routes: [{match: {prefix: /}, cluster: c}]}}",
         "services.a.routes[0].cluster: service 'c' does not exist"),
        ("services: {a: {endpoints: [127.0.0.1:1], routes: [{match: {prefix: /}, split: {a: 0}}]}}",
         "services.a.routes[0].split: weights must add up to more than 0"),
        ("services: {a: {endpoints: [127.0.0.1:1], routes: [{match: {prefix: /, path: /x}}]}}",
         "services.a.routes[0].match: exactly one of prefix, path, regex is required"),
        ("services: {a: {endpoints: [127.0.0.1:1], routes: [{match: {regex: '('}}]}}",
         "services.a.routes[0].match.regex: invalid regular expression: "
         "missing ), unterminated subpattern at position 0"),
        ("services: {a: {endpoints: [127.0.0.1:1], routes: [{match: {path: x}}]}}",
         "services.a.routes[0].match.path: expected a path starting with /"),
        ("services: {a: {endpoints: [127.0.0.1:1], color: red}}",
         "services.a.color: unknown field (expected one of: adaptive_throttling, "
         "authorization, circuit_breakers, connect_timeout, depends_on, discovery, endpoints, "
         "health_check, jwt, load_balancing, load_shedding, max_downstream_connections, "
         "max_requests_per_connection, mtls, namespace, outlier_detection, port, "
         "protocol, registry, retry_budget, routes, service_account)"),
        ("services: {a: {}}", "services.a.endpoints: required field is missing"),
        ("services: {A_b: {endpoints: []}}",
         "services.A_b: service names are lower-case letters, digits, '-' and '.', "
         "starting and ending with a letter or digit"),
        ("services: {a: {endpoints: [127.0.0.1:1, 127.0.0.1:1]}}",
         "services.a.endpoints[1]: duplicate endpoint 127.0.0.1:1"),
        ("services: {t: {protocol: tcp, endpoints: [127.0.0.1:1], routes: []}}",
         "services.t.routes: a tcp service cannot have routes"),
        ("services: {a: {endpoints: [127.0.0.1:1], routes: [{match: {headers: [{name: x, "
         "exact: y, prefix: z}], prefix: /}}]}}",
         "services.a.routes[0].match.headers[0]: at most one of exact, prefix, regex, present"),
        ("servces: {}", "servces: unknown field (expected one of: security, services, telemetry)"),
        ("[1, 2]", "expected a mapping"),
    ],
)
def test_errors_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_mesh_text(text)
    assert str(info.value) == message


def test_invalid_yaml() -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_mesh_text("services: [", "mesh.yaml")


def _write(path: Path, text: str, tick: int) -> None:
    path.write_text(text)
    # Distinct mtimes even on filesystems with coarse timestamps.
    os.utime(path, ns=(tick * 1_000_000_000, tick * 1_000_000_000))


def test_watcher_applies_good_edit_and_keeps_last_good_on_bad(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    _write(path, MESH_YAML, 1)
    applied: list[Mesh] = []
    watcher = MeshFileWatcher(path, applied.append,
                              digest=MeshFileWatcher.digest_of(path.read_bytes()))
    assert watcher.poll() is False  # the loaded content is not applied twice
    assert applied == []

    _write(path, MESH_YAML.replace("50071", "50072"), 2)
    assert watcher.poll() is True
    assert applied[-1].services["quotes"].endpoints == (Endpoint("127.0.0.1", 50072),)

    _write(path, MESH_YAML.replace("timeout: 2s", "timeout: soon"), 3)
    assert watcher.poll() is False
    assert len(applied) == 1
    assert watcher.last_error is not None
    assert watcher.last_error.endswith(
        "services.greeter.routes[0].timeout: expected a duration like 250ms"
    )

    _write(path, MESH_YAML, 4)
    assert watcher.poll() is True
    assert watcher.last_error is None
    assert len(applied) == 2


def test_watcher_ignores_touch_and_survives_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    _write(path, MESH_YAML, 1)
    applied: list[Mesh] = []
    watcher = MeshFileWatcher(path, applied.append)
    assert watcher.poll() is True
    _write(path, MESH_YAML, 2)  # same bytes, new mtime
    assert watcher.poll() is False
    path.unlink()
    assert watcher.poll() is False
    assert watcher.last_error is not None and "cannot read" in watcher.last_error
    _write(path, MESH_YAML.replace("50071", "50079"), 3)
    assert watcher.poll() is True
