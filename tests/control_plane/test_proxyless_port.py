"""A service with a port is reachable as ``xds:///<service>:<port>``; what proxyless clients
ignore is said, not sent silently."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from control_plane.main import start_control_plane
from control_plane.mesh import parse_mesh_text
from control_plane.proxyless import ignored_by_proxyless
from control_plane.status_cli import format_status
from pilotfish.gen.pilotfish.status.v1 import status_pb2
from tests.control_plane.test_proxyless import (
    PROBE,
    Recorder,
    _backend,
    _bootstrap,
    _finish,
    _round,
    _tell,
)


def test_grpc_client_dials_service_with_its_port(tmp_path: Path) -> None:
    recorder = Recorder()

    async def scenario() -> dict[str, dict[str, int]]:
        backend = await _backend("a")
        mesh = tmp_path / "mesh.yaml"
        mesh.write_text(
            "services:\n  web:\n    endpoints: [127.0.0.1:1]\n"
            f"  echo:\n    port: 50051\n    endpoints: [127.0.0.1:{backend[1]}]\n"
        )
        plane = await start_control_plane(mesh, "127.0.0.1", 0, callbacks=recorder)
        bootstrap = tmp_path / "bootstrap.json"
        bootstrap.write_text(json.dumps(_bootstrap(plane.port)))
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(PROBE), "echo:50051", "5", "/echo.Echo/Who",
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
    assert counts == {"/echo.Echo/Who": {"a": 5}}
    assert recorder.nacks == []
    asked = {names for _, type_url, names in recorder.requests if type_url.endswith("Listener")}
    assert ("echo:50051",) in asked


MESH = """
services:
  lr: {endpoints: [127.0.0.1:1], load_balancing: {policy: least_request}}
  mg: {endpoints: [127.0.0.1:1], load_balancing: {policy: maglev}}
  ew: {endpoints: [127.0.0.1:1], load_balancing: {policy: peak_ewma}}
  lc: {endpoints: [127.0.0.1:1], load_balancing: {policy: least_connections}}
  weighted:
    endpoints: [127.0.0.1:1, {address: 127.0.0.1:2, weight: 3}]
    outlier_detection: {}
  even: {endpoints: [127.0.0.1:1, 127.0.0.1:2], outlier_detection: {enforcing_consecutive_5xx: 0}}
  fast:
    endpoints: [127.0.0.1:1]
    routes:
      - match: {prefix: /}
        timeout: 1500ms
      - match: {prefix: /slow}
        timeout: 2s
"""


def test_what_proxyless_clients_ignore_is_named_field_by_field() -> None:
    lines = ignored_by_proxyless(parse_mesh_text(MESH))
    assert lines == [
        "services.ew.load_balancing.policy: peak_ewma is not in gRPC: proxyless clients use"
        " round_robin",
        "services.fast.routes[0].timeout: 1.5s is under 2s: grpcio ends calls up to 2 s before"
        " max_stream_duration, so proxyless calls may fail at once; give them a client"
        " deadline instead",
        "services.lc.load_balancing.policy: least_connections is not in gRPC: proxyless clients"
        " use round_robin",
        "services.lr.load_balancing.policy: least_request is not in gRPC: proxyless clients use"
        " round_robin",
        "services.mg.load_balancing.policy: maglev is not in gRPC: proxyless clients use"
        " round_robin",
        "services.weighted.endpoints: weights are ignored by gRPC's round_robin: proxyless"
        " clients spread calls evenly",
        "services.weighted.outlier_detection.consecutive_5xx: gRPC ejects only by success rate"
        " and failure percentage",
    ]


def test_status_lists_them() -> None:
    reply = status_pb2.ListProxiesResponse(
        mesh_generation=3, proxyless_ignored=["services.a.health_check: x"]
    )
    assert format_status(reply) == (
        "mesh generation 3\n"
        "proxyless gRPC clients ignore services.a.health_check: x\n"
        "no proxies connected\n"
    )
