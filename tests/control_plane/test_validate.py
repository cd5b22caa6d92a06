"""``pilotfish validate``: every error in one run, at its line and column; bootstraps too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from control_plane.validate import validate_text

BROKEN_MESH = """\
services:
  quotes:
    protocol: grpc
    endpoints: [127.0.0.1:50071]
    routes:
      - match: {prefix: /}
        timeout: 2x
  greeter:
    endpoints: [127.0.0.1:99999]
    routes:
      - match: {prefix: /}
        split: {quotes: 50, greeter: 50}
  Bad_Name:
    endpoints: [1.2.3.4:5]
  web:
    endpoints: [127.0.0.1:8080]
    routes:
      - match: {prefix: /}
        cluster: nowhere
telemetry:
  tracing: {sampling: 200%}
"""

BOOTSTRAP = """\
admin: {address: 127.0.0.1, port: 15000}
listeners:
  - name: inbound
    address: 127.0.0.1:15006
    route_config: local
route_configs:
  - name: local
    virtual_hosts:
      - domains: ["*"]
        routes:
          - match: {prefix: /}
            route: {cluster: app, timeout: 15s}
clusters:
  - name: app
    protocol: http2
    endpoints: [127.0.0.1:50051]
"""


def test_every_error_of_a_mesh_file_with_its_position() -> None:
    report = validate_text(BROKEN_MESH)
    assert report.kind == "mesh file"
    assert [(f.line, f.column, f.path) for f in report.findings] == [
        (7, 9, "services.quotes.routes[0].timeout"),
        (9, 17, "services.greeter.endpoints[0]"),
        (13, 3, "services.Bad_Name"),
        (19, 9, "services.web.routes[0].cluster"),
        (21, 3, "telemetry.tracing.otlp_endpoint"),
    ]
    assert report.findings[0].format("m.yaml") == (
        "m.yaml:7:9: services.quotes.routes[0].timeout: expected a duration like 250ms"
    )


def test_a_clean_mesh_file() -> None:
    report = validate_text("services:\n  quotes:\n    endpoints: [127.0.0.1:50071]\n")
    assert (report.kind, report.findings, report.summary) == ("mesh file", (), "1 services")


def test_a_bootstrap_is_recognised_and_checked_as_one() -> None:
    report = validate_text(BOOTSTRAP)
    assert report.kind == "sidecar bootstrap"
    assert report.findings == ()
    broken = BOOTSTRAP.replace("port: 15000", "port: abc").replace("cluster: app,", "cluster: x,")
    report = validate_text(broken)
    assert [(f.line, f.column, f.path, f.message) for f in report.findings] == [
        (1, 29, "admin.port", "expected an integer"),
        (12, 13, "route_configs[0].virtual_hosts[0].routes[0].route", "no cluster named 'x'"),
    ]


def test_yaml_syntax_errors_name_line_and_column_once() -> None:
    report = validate_text("services:\n  a: [\n")
    (finding,) = report.findings
    assert (finding.line, finding.column) == (3, 1)
    assert "<unicode string>" not in finding.message
    assert finding.message.startswith("not valid YAML: ")


def test_the_command(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(BROKEN_MESH)
    result = subprocess.run(
        [sys.executable, "-m", "pilotfish", "validate", str(mesh)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{mesh}:7:9: services.quotes.routes[0].timeout")
    assert lines[-1] == f"{mesh}: 5 errors (mesh file)"
    boot = tmp_path / "boot.yaml"
    boot.write_text(BOOTSTRAP)
    result = subprocess.run(
        [sys.executable, "-m", "pilotfish", "validate", str(boot)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"{boot}: ok (sidecar bootstrap: 1 listeners, 1 route configs, 1 clusters)"
    )
