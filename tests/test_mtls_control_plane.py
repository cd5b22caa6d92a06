"""Sidecar processes and a control plane process over its TLS ports.

The sidecar gets its first certificate from the CA's TLS port with a bootstrap token, trusting
the mesh root it was given, then holds its ADS stream over mTLS with that certificate. With
3 s certificates, both its own and the control plane's serving certificate rotate several times
and the control plane ends each stream when its client certificate expires: the sidecar
reconnects with its renewed certificate and keeps receiving config; its ``--register`` goes to
the registry over the same mTLS port and keeps its lease across the rotations. A sidecar that
names another service in its node metadata is refused.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import yaml

from pilotfish.gen.pilotfish.registry.v1 import registry_pb2, registry_pb2_grpc
from pilotfish.gen.pilotfish.status.v1 import status_pb2, status_pb2_grpc
from tests.support import free_port, wait_for
from tests.test_xds_e2e import Processes, Sidecar

WEB = "spiffe://cluster.local/ns/default/sa/web"


def _mesh(billing_endpoints: list[str]) -> str:
    return yaml.safe_dump({
        "services": {
            "web": {"endpoints": [], "depends_on": ["billing"]},
            "billing": {"endpoints": billing_endpoints},
        },
    })


def _proxies(address: str) -> list[status_pb2.ProxyStatus]:
    with grpc.insecure_channel(address) as channel:
        reply = status_pb2_grpc.ControlPlaneStatusStub(channel).ListProxies(
            status_pb2.ListProxiesRequest(), timeout=5
        )
    return list(reply.proxies)


def _registered(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        reply = registry_pb2_grpc.RegistryStub(channel).List(registry_pb2.ListRequest(), timeout=5)
    return [i.id for i in reply.instances]


def test_sidecar_over_the_mtls_port_across_certificate_rotations(tmp_path: Path) -> None:
    processes = Processes(tmp_path)
    try:
        first_endpoint = f"127.0.0.1:{free_port()}"
        mesh = tmp_path / "mesh.yaml"
        mesh.write_text(_mesh([first_endpoint]))
        (tmp_path / "tokens.yaml").write_text("tokens:\n  - {token: web-secret, service: web}\n")
        (tmp_path / "web.token").write_text("web-secret\n")
        plain, ca_port, xds_port = free_port(), free_port(), free_port()
        plane = processes.start(
            "control-plane",
            [
                "control-plane", "--config", str(mesh), "--port", str(plain),
                "--ca-dir", str(tmp_path / "ca"), "--cert-ttl", "3s",
                "--bootstrap-tokens", str(tmp_path / "tokens.yaml"),
                "--ca-tls-port", str(ca_port), "--xds-mtls-port", str(xds_port),
                "--unknown-nodes", "reject",
            ],
        )  # fmt: skip
        assert wait_for(lambda: "control plane serving" in plane.log(), 15), plane.log()
        secure = (
            "--ca", f"localhost:{ca_port}",
            "--control-plane-roots", str(tmp_path / "ca" / "root-cert.pem"),
            "--ca-token-file", str(tmp_path / "web.token"),
        )
        inbound = f"127.0.0.1:{free_port()}"
        # Its "app" is the control plane's plaintext port, whose gRPC health service answers
        # SERVING: the registration agent needs a healthy app, and nothing calls it here.
        web = Sidecar(
            processes, f"localhost:{xds_port}", "web-1", "web", *secure,
            "--app-address", f"127.0.0.1:{plain}", "--inbound-address", inbound,
            "--register", "--register-health-interval", "0.2",
        )  # fmt: skip
        web.wait_ready()
        assert web.config_dump()["xds"]["tls"] is True
        # Registered over mTLS (the only registry port it was given), under its own service.
        assert wait_for(lambda: f"web/{inbound}" in _registered(f"127.0.0.1:{plain}"), 15), (
            web.log()
        )

        # Seen from the control plane: the stream's identity and its certificate's expiry.
        # Each new expiry is a new stream, opened with a renewed certificate.
        expiries: set[int] = set()

        def rotated_three_times() -> bool:
            for proxy in _proxies(f"127.0.0.1:{plain}"):
                if proxy.node_id == "web-1":
                    assert proxy.spiffe_id == WEB, proxy
                    assert proxy.service == "web"
                    expiries.add(proxy.certificate_expires.seconds)
            return len(expiries) >= 3

        assert wait_for(rotated_three_times, 20, interval=0.2), (expiries, web.log())
        assert "client certificate expired; closing" in plane.log()
        # Heartbeats kept the lease through the rotations.
        assert _registered(f"127.0.0.1:{plain}") == [f"web/{inbound}"]

        # Config still flows on the current stream: a new endpoint reaches the sidecar.
        second_endpoint = f"127.0.0.1:{free_port()}"
        mesh.write_text(_mesh([first_endpoint, second_endpoint]))
        assert wait_for(
            lambda: f"billing::{second_endpoint}::" in web.admin("/clusters")[1], 10
        ), web.log()

        # The same token and certificate, but node metadata claiming billing: refused.
        liar = Sidecar(
            processes, f"localhost:{xds_port}", "liar-1", "billing", "--service-account", "web",
            *secure,
        )
        assert wait_for(lambda: "PERMISSION_DENIED" in liar.log(), 15), liar.log()
        assert "claims service 'billing'" in liar.log()
        time.sleep(0.5)
        assert liar.admin("/ready")[0] != 200
        # Refused on its own stream; the honest sidecar carries on (its stream is replaced at
        # each certificate expiry, so it may be between two streams for an instant).
        assert all(p.node_id != "liar-1" for p in _proxies(f"127.0.0.1:{plain}"))
        assert wait_for(
            lambda: any(p.node_id == "web-1" for p in _proxies(f"127.0.0.1:{plain}")), 5
        )
    finally:
        processes.stop_all()
