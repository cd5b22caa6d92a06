"""The README's three ways for an app to call a service through its sidecar, done for real:
a gRPC client that sets the authority, curl with a Host header, and a plain HTTP client; and
the gRPC client that keeps its default authority, which gets NR."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support import free_port
from tests.test_xds_e2e import (
    METHOD,
    Backend,
    ControlPlane,
    MeshFile,
    Processes,
    Sidecar,
    processes,
)

__all__ = ["processes"]  # the fixture, imported for this module's tests


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello from web, {self.path}, Host {self.headers['Host']}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def web() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_readme_ways(processes: Processes, tmp_path: Path, web: str) -> None:
    quotes = Backend("quotes")
    try:
        mesh = MeshFile(tmp_path / "mesh.yaml")
        mesh.write({
            "quotes": {"protocol": "grpc", "endpoints": [quotes.address]},
            "web": {"protocol": "http1", "endpoints": [web]},
            "greeter": {"endpoints": [f"127.0.0.1:{free_port()}"]},
        })
        control_plane = ControlPlane(processes, mesh.path, free_port())
        control_plane.wait_serving()
        sidecar = Sidecar(processes, control_plane.address, "greeter-1", "greeter")
        sidecar.wait_ready()

        options = [("grpc.default_authority", "quotes")]
        with grpc.insecure_channel(sidecar.outbound, options=options) as channel:
            assert channel.unary_unary(METHOD)(b"", timeout=10) == b"quotes"
        with (
            grpc.insecure_channel(sidecar.outbound) as channel,
            pytest.raises(grpc.RpcError) as failure,
        ):
            channel.unary_unary(METHOD)(b"", timeout=10)
        assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert quotes.calls == 1

        request = urllib.request.Request(
            f"http://{sidecar.outbound}/hello", headers={"Host": "web"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.read() == b"hello from web, /hello, Host web"

        curl = shutil.which("curl")
        assert curl is not None, "curl is installed by .ci/run"
        result = subprocess.run(
            [curl, "-sS", "-H", "Host: web", f"http://{sidecar.outbound}/hello"],
            capture_output=True, text=True, timeout=20,
        )
        assert result.stdout == "hello from web, /hello, Host web", result.stderr
        host, port = sidecar.outbound.split(":")
        result = subprocess.run(
            [curl, "-sS", "--connect-to", f"web:80:{host}:{port}", "http://web/hello"],
            capture_output=True, text=True, timeout=20,
        )
        assert result.stdout == "hello from web, /hello, Host web", result.stderr

        # pilotfish proxy-config finds the sidecar's admin through the control plane.
        result = subprocess.run(
            [sys.executable, "-m", "pilotfish", "proxy-config", "greeter-1",
             "--address", control_plane.address],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0, result.stderr
        rows = proxy_config_rows(result.stdout)
        assert rows["LISTENERS"] == [["outbound", sidecar.outbound, "route", "config", "outbound"]]
        # The outbound route config the sidecar assembles, a virtual host per service.
        assert [r for r in rows["ROUTES"] if r[0] == "outbound"] == [
            ["outbound", name, name, "prefix", "/", name, "15s"]
            for name in ("greeter", "quotes", "web")
        ]
        assert [r for r in rows["CLUSTERS"] if r[0] != "greeter"] == [
            ["quotes", "http2", "weighted_round_robin", "1", "1"],
            ["web", "http1", "weighted_round_robin", "1", "1"],
        ]
        assert [r for r in rows["ENDPOINTS"] if r[0] != "greeter"] == [
            ["quotes", quotes.address, "1", "healthy", "0"],
            ["web", web, "1", "healthy", "0"],
        ]
    finally:
        quotes.server.stop()


def proxy_config_rows(text: str) -> dict[str, list[list[str]]]:
    """The rows of each table of ``pilotfish proxy-config``, split on blanks, headers left out."""
    tables: dict[str, list[list[str]]] = {}
    current: list[list[str]] | None = None
    header = False
    for line in text.splitlines():
        if line.isupper() and " " not in line.strip():
            current, header = tables.setdefault(line, []), True
        elif not line.strip() or current is None:
            current = None if not line.strip() else current
        elif header:
            header = False
        else:
            current.append(line.split())
    return tables
