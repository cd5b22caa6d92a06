"""What a user sees when a command cannot start: one line naming what, where and why."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BOOTSTRAP = """\
admin: {{address: 127.0.0.1, port: {admin}}}
listeners:
  - name: inbound
    address: 127.0.0.1:{listener}
    route_config: local
route_configs:
  - name: local
    virtual_hosts:
      - domains: ["*"]
        routes:
          - match: {{prefix: /}}
            route: {{cluster: app}}
clusters:
  - name: app
    endpoints: [127.0.0.1:9]
"""


@contextmanager
def listening() -> Iterator[int]:
    """A port someone else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pilotfish(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pilotfish", *argv], capture_output=True, text=True, timeout=60
    )


def test_a_busy_listener_port(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    with listening() as busy:
        config.write_text(BOOTSTRAP.format(admin=free_port(), listener=busy))
        result = pilotfish("sidecar", "--config", str(config))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"pilotfish sidecar: listener inbound: cannot listen on 127.0.0.1:{busy}: "
        "Address already in use"
    )


def test_a_busy_admin_port(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    with listening() as busy:
        config.write_text(BOOTSTRAP.format(admin=busy, listener=free_port()))
        result = pilotfish("sidecar", "--config", str(config))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"pilotfish sidecar: admin: cannot listen on 127.0.0.1:{busy}: Address already in use"
    )


def test_a_busy_control_plane_port(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services:\n  quotes:\n    endpoints: [127.0.0.1:50071]\n")
    with listening() as busy:
        result = pilotfish("control-plane", "--config", str(mesh), "--port", str(busy))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"pilotfish control-plane: xDS: cannot listen on 127.0.0.1:{busy}: Address already in use"
    )


def test_invalid_yaml_names_the_file_once_with_line_and_column(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text("listeners:\n  - name: [\n")
    result = pilotfish("sidecar", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.count(str(config)) == 1
    assert f"{config}:3:1: not valid YAML: " in result.stderr
    assert "<unicode string>" not in result.stderr


def test_a_busy_listener_port_with_workers(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    with listening() as busy:
        config.write_text(BOOTSTRAP.format(admin=free_port(), listener=busy))
        result = pilotfish("sidecar", "--config", str(config), "--concurrency", "2")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"pilotfish sidecar: listener inbound: cannot listen on 127.0.0.1:{busy}: "
        "Address already in use"
    )
