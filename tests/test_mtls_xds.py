"""The whole path with a control plane: a mesh file turns on STRICT mTLS; two sidecar
processes configured over xDS get their certificates from the control plane's CA; a grpcio
client's call leaves one sidecar over mTLS and the app behind the other sees its SPIFFE ID."""

from __future__ import annotations

import socket
from pathlib import Path

import grpc
import yaml

from tests.support import free_port, identity, wait_for
from tests.test_mtls_inbound import App
from tests.test_xds_e2e import Processes, Sidecar


def test_mesh_file_strict_mtls_between_xds_sidecars(tmp_path: Path) -> None:
    app = App()
    processes = Processes(tmp_path)
    try:
        inbound = f"127.0.0.1:{free_port()}"
        (tmp_path / "mesh.yaml").write_text(
            yaml.safe_dump(
                {
                    "security": {"mtls": {"mode": "STRICT"}},
                    "services": {
                        "web": {"endpoints": []},
                        "billing": {"endpoints": [inbound], "service_account": "billing-sa"},
                    },
                }
            )
        )
        (tmp_path / "tokens.yaml").write_text(
            "tokens:\n"
            "  - {token: web-secret, service: web}\n"
            "  - {token: billing-secret, service: billing-sa}\n"
        )
        for who in ("web", "billing"):
            (tmp_path / f"{who}.token").write_text(f"{who}-secret\n")
        port = free_port()
        plane = processes.start(
            "control-plane",
            [
                "control-plane", "--config", str(tmp_path / "mesh.yaml"), "--port", str(port),
                "--ca-dir", str(tmp_path / "ca"),
                "--bootstrap-tokens", str(tmp_path / "tokens.yaml"),
            ],
        )  # fmt: skip
        assert wait_for(lambda: "control plane serving" in plane.log(), 15), plane.log()
        xds = f"127.0.0.1:{port}"
        billing = Sidecar(
            processes, xds, "billing-1", "billing",
            "--app-address", app.server.address, "--inbound-address", inbound,
            "--ca-token-file", str(tmp_path / "billing.token"), "--service-account", "billing-sa",
        )  # fmt: skip
        web = Sidecar(
            processes, xds, "web-1", "web", "--ca-token-file", str(tmp_path / "web.token")
        )
        billing.wait_ready()
        web.wait_ready()

        def call() -> bytes:
            options = [("grpc.default_authority", "billing")]
            with grpc.insecure_channel(web.outbound, options=options) as channel:
                echo = channel.unary_unary(
                    "/test.Echo/Echo", request_serializer=identity, response_deserializer=identity
                )
                result: bytes = echo(b"hi", timeout=10)
                return result

        for _ in range(5):
            assert call() == b"hi"
        assert app.seen == ["spiffe://cluster.local/ns/default/sa/web"] * 5
        assert billing.stat("http.inbound|billing.downstream_cx_mtls") >= 1

        # Around the sidecars, in plaintext, STRICT refuses.
        host, port_text = inbound.rsplit(":", 1)
        with socket.create_connection((host, int(port_text)), timeout=5) as raw:
            raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            raw.settimeout(5)
            assert raw.recv(100) == b""
        assert billing.stat("http.inbound|billing.downstream_cx_mtls_refused") == 1
    finally:
        processes.stop_all()
        app.server.stop()
