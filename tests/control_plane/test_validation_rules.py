"""Values a client would refuse are refused first: in ``pilotfish validate`` and in a live edit.

Each bad value below is one that Envoy's validation rules, Envoy itself or gRPC's xDS client
would NACK (or, for a duplicate key, that YAML would silently drop). The edge values next to
them are accepted, and a real grpcio proxyless client ACKs them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from google.protobuf import duration_pb2

from control_plane.main import run_validate, start_control_plane
from control_plane.mesh import load_mesh_file, parse_mesh_text
from control_plane.watcher import MeshFileWatcher
from control_plane.xds import pgv
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.resources import eds_cluster
from pilotfish.config import yaml_loader
from pilotfish.config.errors import ConfigError
from tests.control_plane.test_authn_xds import EVERY as EVERY_SECURITY_FEATURE
from tests.control_plane.test_outbound_xds import every_view
from tests.control_plane.test_proxyless import (
    PROBE,
    Recorder,
    _backend,
    _bootstrap,
    _finish,
    _round,
    _tell,
)

GOOD = """
services:
  web:
    endpoints: [127.0.0.1:1]
  echo:
    endpoints: [127.0.0.1:{port}]
    connect_timeout: {connect_timeout}
    routes:
      - match: {{regex: '{regex}'}}
        rate_limit: {{max_tokens: 1000, fill_interval: {fill_interval}}}
        fallback: {{response: {{grpc_status: {grpc_status}}}}}
"""
EDGE = {
    "port": 50001,
    "connect_timeout": "1ms",
    "regex": r"/echo\.Echo/W\w+",
    "fill_interval": "50ms",
    "grpc_status": "unavailable",
}
ROUTE = "services.echo.routes[0]"
BAD = [
    ({"regex": "/echo(?=x).*"}, f"{ROUTE}.match.regex: not RE2 syntax"),
    ({"regex": r"/(echo)/\1"}, f"{ROUTE}.match.regex: not RE2 syntax"),
    ({"fill_interval": "49ms"}, f"{ROUTE}.rate_limit.fill_interval: expected at least 50ms"),
    ({"connect_timeout": "0s"}, "services.echo.connect_timeout: expected a duration above 0"),
    ({"grpc_status": "ok"}, f"{ROUTE}.fallback.response.grpc_status: an OK needs a response"),
]


def mesh_text(**changes: object) -> str:
    return GOOD.format(**{**EDGE, **changes})


def test_edge_values_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(mesh_text())
    assert run_validate(Namespace(file=str(path))) == 0, capsys.readouterr().err


@pytest.mark.parametrize(("change", "message"), BAD)
def test_validate_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, str], message: str
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(mesh_text(**change))
    assert run_validate(Namespace(file=str(path))) == 1
    first = capsys.readouterr().err.splitlines()[0]
    assert re.match(rf"{re.escape(str(path))}:\d+:\d+: {re.escape(message)}", first), first


def test_validate_refuses_duplicate_keys_anywhere_naming_both_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mesh.yaml"
    service = "  web:\n    endpoints: [127.0.0.1:1]\n"
    nested = "  api:\n    endpoints: []\n    connect_timeout: 1s\n    connect_timeout: 2s\n"
    for text, lines in (
        (f"services:\n{service}  echo:\n    endpoints: []\n{service}", (2, 6)),
        (f"services:\n{nested}", (4, 5)),
    ):
        path.write_text(text)
        assert run_validate(Namespace(file=str(path))) == 1
        err = capsys.readouterr().err
        assert "duplicate key" in err and f"at lines {lines[0]} and {lines[1]}" in err, err


def test_yaml_merge_keys_may_still_be_overridden() -> None:
    document = yaml_loader.load("d: &d {a: 1, b: 2}\ne: {<<: *d, a: 3}\n")
    assert document["e"] == {"a": 3, "b": 2}


def test_a_live_edit_with_a_refused_value_keeps_the_last_good_mesh(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(mesh_text())
    cache = SnapshotCache(load_mesh_file(path))
    watcher = MeshFileWatcher(path, cache.set_mesh)
    tick = 10
    edits = [(mesh_text(**change), message) for change, message in BAD]
    edits.append((mesh_text() + "  web:\n    endpoints: [127.0.0.1:2]\n", "duplicate key"))
    for text, message in edits:
        tick += 1
        path.write_text(text)
        os.utime(path, ns=(tick * 10**9, tick * 10**9))
        assert watcher.poll() is False
        assert watcher.last_error is not None and message in watcher.last_error
        assert "still serving the last good mesh" in watcher.last_error
        assert cache.mesh.services["echo"].connect_timeout == 0.001  # the good one


# --- Envoy's rules, read from the descriptors -----------------------------------------------


def test_envoys_rules_catch_what_the_mesh_parser_might_miss() -> None:
    cluster = cluster_pb2.Cluster(name="a", connect_timeout=duration_pb2.Duration())
    with pytest.raises(ConfigError, match=r"^Cluster\[a\].connect_timeout: must be greater than"):
        pgv.check(cluster, "Cluster[a]")
    with pytest.raises(ConfigError, match=r"^Cluster\[\].name: must be at least 1 long"):
        pgv.check(
            cluster_pb2.Cluster(connect_timeout=duration_pb2.Duration(seconds=1)), "Cluster[]"
        )
    route = route_pb2.RouteConfiguration(
        name="r",
        virtual_hosts=[route_components_pb2.VirtualHost(name="v", domains=[], routes=[])],
    )
    with pytest.raises(ConfigError, match=r"virtual_hosts\[0\].domains: needs at least 1"):
        pgv.check(route, "RouteConfiguration[r]")
    # A route's action is a oneof Envoy requires: a route that does nothing is refused.
    route.virtual_hosts[0].domains.append("*")
    route.virtual_hosts[0].routes.add(match=route_components_pb2.RouteMatch(prefix="/"))
    with pytest.raises(ConfigError, match=r"routes\[0\]: one of .*route.* is required"):
        pgv.check(route, "RouteConfiguration[r]")


def test_what_we_generate_passes_envoys_rules() -> None:
    """The edge values, in every resource of every view; a mesh using every feature is
    checked the same way in test_outbound_xds.py."""
    mesh = parse_mesh_text(mesh_text())
    pgv.check(eds_cluster(mesh.services["echo"]), "Cluster[echo]")
    for view in every_view(mesh):
        for type_url, resources in view.items():
            for name, message in resources.items():
                pgv.check(message, f"{type_url}[{name}]")
    # Every JWT and authorization feature, as jwt_authn and RBAC filters on inbound listeners.
    for view in every_view(parse_mesh_text(EVERY_SECURITY_FEATURE)):
        for type_url, resources in view.items():
            for name, message in resources.items():
                pgv.check(message, f"{type_url}[{name}]")


# --- a real gRPC client ACKs the edge values ---------------------------------------------------


def test_grpc_proxyless_client_acks_the_edge_values(tmp_path: Path) -> None:
    recorder = Recorder()

    async def scenario() -> dict[str, dict[str, int]]:
        backend = await _backend("a")
        mesh = tmp_path / "mesh.yaml"
        mesh.write_text(mesh_text(port=backend[1]))
        plane = await start_control_plane(mesh, "127.0.0.1", 0, callbacks=recorder)
        bootstrap = tmp_path / "bootstrap.json"
        bootstrap.write_text(json.dumps(_bootstrap(plane.port)))
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(PROBE), "echo", "5", "/echo.Echo/Who",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap)},
        )  # fmt: skip
        try:
            counts = await _round(process)
            await _tell(process, "quit")
            await asyncio.wait_for(process.communicate(), 30)
        finally:
            await _finish(process, plane, [backend])
        return counts

    counts = asyncio.run(asyncio.wait_for(scenario(), 50))
    assert recorder.nacks == []
    assert counts == {"/echo.Echo/Who": {"a": 5}}
