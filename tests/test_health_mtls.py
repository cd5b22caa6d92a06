"""Active health checks of an mTLS cluster: a sidecar probes a STRICT sidecar's endpoint over
mTLS with its workload certificate, HTTP and gRPC alike, and checks who answered.

A STRICT server refuses plaintext probes, so without mTLS the host would never turn healthy;
a server whose SPIFFE ID the cluster does not expect fails the probe and the host is taken out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from control_plane.ca.settings import CaSettings, build_authority
from pilotfish.identity import SpiffeId
from tests.support import ThreadedSidecar, running_sidecar, simple_config, wait_for
from tests.test_mtls_inbound import ALICE, BOB
from tests.test_mtls_mesh import CAROL, give_certificate, take_certificate

CHECK = {
    "interval": "100ms",
    "timeout": "2s",
    "unhealthy_threshold": 1,
    "healthy_threshold": 1,
}


@contextmanager
def grpc_app() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait(5)


class _Health(BaseHTTPRequestHandler):
    probes = 0

    def do_GET(self) -> None:
        type(self).probes += 1
        status = 200 if self.path == "/healthz" else 404
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def http_app() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def probing(
    tmp: Path, app: str, app_protocol: str, check: dict[str, Any], expect: SpiffeId
) -> Iterator[tuple[ThreadedSidecar, ThreadedSidecar]]:
    """A STRICT sidecar (BOB) in front of ``app``; a sidecar (ALICE) whose cluster probes it."""
    authority = build_authority(CaSettings(root_dir=tmp / "ca"), time.time)
    server_config = simple_config([app], protocol=app_protocol, extra_listener={"mtls": "STRICT"})
    with running_sidecar(server_config) as server:
        give_certificate(server, authority, BOB)
        client_config = simple_config([server.address])
        cluster = client_config["clusters"][0]
        cluster["mtls"] = {"identities": [expect.uri]}
        cluster["health_check"] = check
        # The certificate arrives after the cluster starts: probes fail until it is there.
        with running_sidecar(client_config) as client:
            give_certificate(client, authority, ALICE)
            try:
                yield client, server
            finally:
                take_certificate(client)
                take_certificate(server)


@pytest.mark.parametrize("kind", ["grpc", "http"])
def test_probes_go_over_mtls_and_a_strict_server_answers(tmp_path: Path, kind: str) -> None:
    check = {**CHECK, "type": kind}
    if kind == "http":
        check["path"] = "/healthz"
    apps = {"grpc": (grpc_app, "http2"), "http": (http_app, "http1")}
    make_app, protocol = apps[kind]
    before = _Health.probes
    with make_app() as app, probing(tmp_path, app, protocol, check, BOB) as (client, server):
        assert wait_for(lambda: client.stat("cluster.app.membership_healthy") == 1, 10)
        assert client.stat("cluster.app.health_check.success") == 1
        assert server.stat("http.ingress.downstream_cx_mtls") >= 1
        assert server.stat("http.ingress.downstream_cx_mtls_refused") == 0
        if kind == "http":
            assert _Health.probes > before  # the GET went through to the app


def test_a_server_with_another_identity_fails_the_probe(tmp_path: Path) -> None:
    check = {**CHECK, "type": "grpc", "initially_healthy": True}
    with grpc_app() as app, probing(tmp_path, app, "http2", check, CAROL) as (client, server):
        assert wait_for(lambda: client.stat("cluster.app.health_check.failure") == 1, 10)
        assert client.stat("cluster.app.membership_healthy") == 0
        assert client.stat("cluster.app.health_check.success") == 0
        # The handshake completed, then the client hung up on seeing BOB's certificate.
        assert server.stat("http.ingress.downstream_cx_mtls_refused") == 0
