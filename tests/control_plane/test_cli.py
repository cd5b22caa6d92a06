"""``pilotfish validate`` and ``pilotfish control-plane`` as a user runs them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control_plane.main import run_validate
from control_plane.status_cli import format_status, run_status
from pilotfish.gen.pilotfish.status.v1 import status_pb2
from tests.control_plane.helpers import MESH_YAML

ROOT = Path(__file__).resolve().parents[2]


def test_validate_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH_YAML)
    assert run_validate(Namespace(file=str(path))) == 0
    assert capsys.readouterr().out == (
        f"{path}: ok (mesh file: 3 services)\n"
        # Endpoint weights 1 and 3: the sidecars honour them, gRPC's round_robin does not.
        f"{path}: proxyless gRPC clients ignore services.greeter.endpoints: weights are"
        " ignored by gRPC's round_robin: proxyless clients spread calls evenly\n"
    )


def test_validate_names_the_bad_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH_YAML.replace("timeout: 2s", "timeout: 2"))
    assert run_validate(Namespace(file=str(path))) == 1
    assert capsys.readouterr().err == (
        f"{path}:10:9: services.greeter.routes[0].timeout: expected a duration like 250ms\n"
        f"{path}: 1 error (mesh file)\n"
    )


RETRY_MESH = """
services:
  quotes:
    protocol: grpc
    endpoints: [127.0.0.1:50071]
    routes:
      - {match: {prefix: /a}, retry: {attempts: 2, retry_on: [reset, internal]}}
      - {match: {prefix: /b}, retry: {attempts: 2, retry_on: [connect-failure]}}
      - {match: {prefix: /c}, retry: {attempts: 2, retry_on: []}}
      - {match: {prefix: /d}, retry: {attempts: 2, retry_on: [unavailable, connect-failure]}}
      - {match: {prefix: /e}, retry: {attempts: 2, retry_on: [reset], retry_non_idempotent: true}}
      - {match: {prefix: /f}, retry: {attempts: 0, retry_on: [reset]}}
  web:
    protocol: http1
    endpoints: [127.0.0.1:8080]
    routes:
      - {match: {prefix: /}, retry: {attempts: 2, retry_on: [reset]}}
"""


def test_validate_warns_about_retry_policies_that_never_fire(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(RETRY_MESH)
    assert run_validate(Namespace(file=str(path))) == 0  # warnings do not fail the file
    out = capsys.readouterr()
    assert out.out == f"{path}: ok (mesh file: 2 services)\n"
    warnings = out.err.splitlines()
    assert [w.split(": ")[2] for w in warnings] == [
        "services.quotes.routes[0].retry",
        "services.quotes.routes[1].retry",
        "services.quotes.routes[2].retry",
    ]
    assert "never fires for gRPC calls: internal, reset may follow a call the app already ran" \
        in warnings[0]
    assert "connect failures and refused streams are retried on another host" in warnings[1]
    assert "with an empty retry_on never retries" in warnings[2]


def test_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_validate(Namespace(file=str(tmp_path / "nope.yaml"))) == 1
    assert "cannot read" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_control_plane_command_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH_YAML)
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pilotfish", "control-plane", "--config", str(path),
         "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=15, wait_for_ready=True)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)


def test_control_plane_command_refuses_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("services: {a: {endpoints: [oops]}}")
    result = subprocess.run(
        [sys.executable, "-m", "pilotfish", "control-plane", "--config", str(path), "--port", "0"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2
    assert "services.a.endpoints[0]: expected an address like 127.0.0.1:8080" in result.stderr


def test_status_reports_an_unreachable_control_plane(capsys: pytest.CaptureFixture[str]) -> None:
    args = Namespace(address=f"127.0.0.1:{_free_port()}", timeout=2.0)
    assert run_status(args) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_status_table_without_proxies() -> None:
    reply = status_pb2.ListProxiesResponse(mesh_generation=3, mesh_error="mesh.yaml: bad")
    assert format_status(reply) == (
        "mesh generation 3\n"
        "MESH FILE ERROR (last good mesh still served): mesh.yaml: bad\n"
        "no proxies connected\n"
    )
