"""Inbound mTLS through a real sidecar to a real grpcio app: STRICT and PERMISSIVE listeners,
real TLS handshakes on loopback, the caller's SPIFFE ID in a header the client cannot forge."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events

from control_plane.ca.authority import CertificateAuthority
from control_plane.ca.settings import CaSettings, build_authority
from pilotfish.config.security import IDENTITY_HEADER
from pilotfish.identity import SpiffeId
from sidecar.security.csr import build_csr, generate_key
from sidecar.security.tls import Svid, check_peer, client_context
from sidecar.security.workload import SignedCertificate, WorkloadCertificates
from tests.support import GrpcServer, ThreadedSidecar, identity, running_sidecar, simple_config

DOMAIN = "cluster.local"
ALICE = SpiffeId(DOMAIN, "default", "alice")
BOB = SpiffeId(DOMAIN, "default", "bob")
FORGED = "spiffe://cluster.local/ns/kube-system/sa/admin"


class LocalCa:
    """A ``CertificateSource`` that signs in process (the gRPC path is tested elsewhere)."""

    def __init__(self, authority: CertificateAuthority, identity: SpiffeId) -> None:
        self.authority = authority
        self.identity = identity

    async def sign(self, csr_pem: bytes, ttl: float | None) -> SignedCertificate:
        issued = self.authority.sign(csr_pem, self.identity, ttl)
        return SignedCertificate(
            issued.chain_pem, self.authority.bundle.pem(), self.identity.uri, issued.not_after
        )


def svid(authority: CertificateAuthority, who: SpiffeId) -> Svid:
    key = generate_key()
    issued = authority.sign(build_csr(key, who), who)
    return Svid(who, key, issued.chain_pem, authority.bundle.pem(), issued.not_after, time.time())


class App:
    """A grpcio echo service that records the identity header of each call."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []

        def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
            metadata = dict(context.invocation_metadata())
            self.seen.append(metadata.get(IDENTITY_HEADER))
            return request

        handler = grpc.unary_unary_rpc_method_handler(
            echo, request_deserializer=identity, response_serializer=identity
        )
        self.server = GrpcServer("test.Echo", {"Echo": handler})


@contextmanager
def meshed_sidecar(
    tmp: Path, mode: str, ttl: float | None = None
) -> Iterator[tuple[ThreadedSidecar, App, CertificateAuthority]]:
    authority = build_authority(CaSettings(root_dir=tmp / "ca"), time.time)
    app = App()
    config = simple_config([app.server.address], extra_listener={"mtls": mode})
    try:
        with running_sidecar(config) as sc:
            assert sc.loop is not None and sc.sidecar is not None
            sidecar = sc.sidecar

            async def start() -> None:
                certs = WorkloadCertificates(LocalCa(authority, BOB), BOB, ttl)
                await certs.start()
                sidecar.workload = certs

            asyncio.run_coroutine_threadsafe(start(), sc.loop).result(10)
            yield sc, app, authority
            workload = sidecar.workload
            assert workload is not None
            asyncio.run_coroutine_threadsafe(workload.stop(), sc.loop).result(10)
    finally:
        app.server.stop()


def grpc_over_h2(
    sock: socket.socket, payload: bytes, forged: str | None = None
) -> tuple[str, bytes]:
    """One unary gRPC call over an already connected (TLS or plain) socket: (grpc-status, body)."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    headers = [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", "bob"),
        (":path", "/test.Echo/Echo"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    if forged is not None:
        headers.append((IDENTITY_HEADER, forged))
    conn.send_headers(1, headers)
    conn.send_data(1, b"\x00" + len(payload).to_bytes(4, "big") + payload, end_stream=True)
    sock.sendall(conn.data_to_send())
    body = b""
    status = ""
    sock.settimeout(10)
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the response ended")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, 1)
            elif isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                fields: dict[Any, Any] = dict(event.headers or [])  # str: header_encoding is set
                status = str(fields.get("grpc-status", status))
            if isinstance(event, h2.events.StreamEnded):
                return status, body[5:]
        sock.sendall(conn.data_to_send())


def mtls_call(port: int, context: ssl.SSLContext, forged: str | None = None) -> tuple[str, bytes]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        assert check_peer(tls, DOMAIN, {BOB}) == BOB  # the server is who EDS would expect
        assert tls.selected_alpn_protocol() == "h2"
        return grpc_over_h2(tls, b"hello", forged)


def refused(port: int, context: ssl.SSLContext | None) -> bool:
    """True when the sidecar closes the connection instead of answering the call."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            if context is None:
                grpc_over_h2(raw, b"hello")
                return False
            with context.wrap_socket(raw) as tls:
                grpc_over_h2(tls, b"hello")
                return False
    except (ssl.SSLError, ConnectionError, TimeoutError):
        return True


def no_certificate(authority: CertificateAuthority) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=authority.bundle.pem().decode())
    context.set_alpn_protocols(["h2"])
    return context


def other_ca_client(tmp: Path, authority: CertificateAuthority) -> ssl.SSLContext:
    other = build_authority(CaSettings(root_dir=tmp / "other-ca"), time.time)
    context = client_context(svid(other, ALICE))
    context.load_verify_locations(cadata=authority.bundle.pem().decode())
    return context


def expired_client(tmp: Path) -> ssl.SSLContext:
    past = time.time() - 30  # the root is backdated a minute, so it could sign then
    authority = build_authority(CaSettings(root_dir=tmp / "ca", leaf_ttl=10), lambda: past)
    return client_context(svid(authority, ALICE))


def test_strict_listener_serves_mtls_callers_and_tells_the_app_who_called(tmp_path: Path) -> None:
    with meshed_sidecar(tmp_path, "STRICT") as (sc, app, authority):
        alice = client_context(svid(authority, ALICE))
        assert mtls_call(sc.port, alice) == ("0", b"hello")
        assert mtls_call(sc.port, alice, forged=FORGED) == ("0", b"hello")
        assert app.seen == [ALICE.uri, ALICE.uri]  # the forged copy was replaced

        assert refused(sc.port, None)  # plaintext
        assert refused(sc.port, no_certificate(authority))
        assert refused(sc.port, other_ca_client(tmp_path, authority))
        assert refused(sc.port, expired_client(tmp_path))
        assert app.seen == [ALICE.uri, ALICE.uri]
        assert sc.stat("http.ingress.downstream_cx_mtls") == 2
        assert sc.stat("http.ingress.downstream_cx_mtls_refused") == 4


def test_permissive_listener_takes_plaintext_without_identity_and_mtls_with_it(
    tmp_path: Path,
) -> None:
    with meshed_sidecar(tmp_path, "PERMISSIVE") as (sc, app, authority):
        with grpc.insecure_channel(sc.address) as channel:
            echo = channel.unary_unary(
                "/test.Echo/Echo", request_serializer=identity, response_deserializer=identity
            )
            assert echo(b"plain", timeout=10) == b"plain"
            # A plaintext caller cannot pose as a meshed one: its copy of the header is removed.
            assert echo(b"plain", metadata=((IDENTITY_HEADER, FORGED),), timeout=10) == b"plain"
        assert app.seen == [None, None]

        alice = client_context(svid(authority, ALICE))
        assert mtls_call(sc.port, alice) == ("0", b"hello")
        assert app.seen[-1] == ALICE.uri
        # A certificate that is presented must verify, PERMISSIVE or not.
        assert refused(sc.port, other_ca_client(tmp_path, authority))
        assert refused(sc.port, expired_client(tmp_path))
        # No certificate at all over TLS is accepted, without an identity.
        assert mtls_call(sc.port, no_certificate(authority)) == ("0", b"hello")
        assert app.seen[-1] is None
        assert sc.stat("http.ingress.downstream_cx_mtls_refused") == 2


def test_a_sidecar_without_a_certificate_refuses_tls(tmp_path: Path) -> None:
    authority = build_authority(CaSettings(root_dir=tmp_path / "ca"), time.time)
    app = App()
    try:
        config = simple_config([app.server.address], extra_listener={"mtls": "PERMISSIVE"})
        with running_sidecar(config) as sc:
            assert refused(sc.port, client_context(svid(authority, ALICE)))
            with grpc.insecure_channel(sc.address) as channel:
                echo = channel.unary_unary(
                    "/test.Echo/Echo", request_serializer=identity, response_deserializer=identity
                )
                assert echo(b"plain", timeout=10) == b"plain"
    finally:
        app.server.stop()


def test_rotation_under_load_fails_no_call(tmp_path: Path) -> None:
    """Calls keep flowing across several rotations of a 2 s server certificate."""
    with meshed_sidecar(tmp_path, "STRICT", ttl=2.0) as (sc, app, authority):
        assert sc.sidecar is not None
        workload = sc.sidecar.workload
        assert workload is not None
        alice = client_context(svid(authority, ALICE))
        failures = calls = 0
        deadline = time.monotonic() + 30
        while workload.rotations < 3 and time.monotonic() < deadline and calls < 2000:
            try:
                assert mtls_call(sc.port, alice) == ("0", b"hello")
            except (AssertionError, OSError):
                failures += 1
            calls += 1
        assert workload.rotations >= 3, calls
        assert failures == 0
        assert len(app.seen) == calls
