"""Workload certificates end to end: a real control plane with its CA, sidecar-side certificate
managers fetching over gRPC, and real TLS handshakes between them on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from control_plane.ca.settings import CaSettings, build_authority
from control_plane.main import ControlPlane, start_control_plane
from pilotfish.gen.pilotfish.ca.v1 import ca_pb2, ca_pb2_grpc
from pilotfish.identity import SpiffeId
from sidecar.security.csr import build_csr, generate_key
from sidecar.security.tls import PeerRejected, Svid, check_peer, client_context
from sidecar.security.workload import GrpcCertificateSource, WorkloadCertificates
from tests.control_plane.helpers import MESH_YAML
from tests.control_plane.test_metrics import scrape
from tests.support import free_port

DOMAIN = "cluster.local"
ALICE = SpiffeId(DOMAIN, "default", "alice")
BOB = SpiffeId(DOMAIN, "default", "bob")
TOKENS = {ALICE: "alice-secret", BOB: "bob-secret"}
REFUSED = (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)


def _tokens_file(path: Path) -> Path:
    path.write_text(
        "tokens:\n"
        f"  - token: {TOKENS[ALICE]}\n    service: alice\n"
        f"  - sha256: {hashlib.sha256(TOKENS[BOB].encode()).hexdigest()}\n"
        "    service: bob\n    namespace: default\n"
    )
    return path


@asynccontextmanager
async def control_plane(
    tmp: Path, ttl: float = 3600.0, ca_dir: str = "ca", metrics_port: int = 0
) -> AsyncIterator[ControlPlane]:
    tmp.mkdir(exist_ok=True)
    mesh = tmp / "mesh.yaml"
    mesh.write_text(MESH_YAML)
    settings = CaSettings(
        trust_domain=DOMAIN,
        root_dir=tmp / ca_dir,
        leaf_ttl=ttl,
        bootstrap_tokens=_tokens_file(tmp / "tokens.yaml"),
    )
    metrics = ("127.0.0.1", metrics_port) if metrics_port else None
    plane = await start_control_plane(mesh, "127.0.0.1", 0, ca=settings, metrics_address=metrics)
    try:
        yield plane
    finally:
        await plane.stop(grace=None)


@asynccontextmanager
async def workload(
    plane: ControlPlane, identity: SpiffeId, ttl: float | None = None
) -> AsyncIterator[WorkloadCertificates]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel:
        token = TOKENS[identity]
        certs = WorkloadCertificates(GrpcCertificateSource(channel, lambda: token), identity, ttl)
        await certs.start()
        try:
            yield certs
        finally:
            await certs.stop()


@dataclass
class EchoServer:
    """A TLS echo server that checks the client's SPIFFE ID before echoing a byte.

    Each accepted connection is upgraded with the context current at that moment, as the
    sidecar's listener does, so a rotation applies to the next connection.
    """

    context: Callable[[], ssl.SSLContext]
    require: bool = True
    peers: list[SpiffeId | None] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(self.context())
            peer = check_peer(writer.get_extra_info("ssl_object"), DOMAIN, require=self.require)
        except (*REFUSED, PeerRejected) as exc:
            self.rejected.append(repr(exc))
            writer.close()
            return
        self.peers.append(peer)
        try:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@asynccontextmanager
async def echo_server(
    context: Callable[[], ssl.SSLContext], require: bool = True
) -> AsyncIterator[EchoServer]:
    server = EchoServer(context, require)
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


async def call(
    port: int, context: ssl.SSLContext, expect: set[SpiffeId] | None = None
) -> tuple[SpiffeId | None, str | None, int]:
    """Connect, check the server's identity, echo one line; (peer, ALPN, server cert serial)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        tls = writer.get_extra_info("ssl_object")
        peer = check_peer(tls, DOMAIN, expect)
        writer.write(b"ping\n")
        assert await reader.readline() == b"ping\n"
        serial = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number
        return peer, tls.selected_alpn_protocol(), serial
    finally:
        writer.close()


async def refused(port: int, context: ssl.SSLContext) -> bool:
    """True when the server refuses us at the TLS layer (with TLS 1.3 the client learns it on
    its first read, after its side of the handshake completed)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    except REFUSED:
        return True
    try:
        writer.write(b"ping\n")
        return await reader.readline() == b""
    except REFUSED:
        return True
    finally:
        writer.close()


def run(coro: Callable[[], object]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 60))  # type: ignore[arg-type]


def test_ca_authenticates_the_caller_and_signs_only_its_own_identity(tmp_path: Path) -> None:
    async def scenario() -> None:
        metrics_port = free_port()
        async with (
            control_plane(tmp_path, metrics_port=metrics_port) as plane,
            grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel,
        ):
            stub = ca_pb2_grpc.CertificateAuthorityStub(channel)

            def request(identity: SpiffeId) -> ca_pb2.SignCertificateRequest:
                return ca_pb2.SignCertificateRequest(
                    csr_pem=build_csr(generate_key(), identity).decode()
                )

            async def code(
                req: ca_pb2.SignCertificateRequest, token: str | None
            ) -> grpc.StatusCode:
                metadata = (("authorization", f"Bearer {token}"),) if token else ()
                try:
                    await stub.SignCertificate(req, metadata=metadata, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            assert await code(request(ALICE), None) == grpc.StatusCode.UNAUTHENTICATED
            assert await code(request(ALICE), "guess") == grpc.StatusCode.UNAUTHENTICATED
            assert await code(request(BOB), TOKENS[ALICE]) == grpc.StatusCode.PERMISSION_DENIED
            garbage = ca_pb2.SignCertificateRequest(csr_pem="not a csr")
            assert await code(garbage, TOKENS[ALICE]) == grpc.StatusCode.INVALID_ARGUMENT
            assert await code(request(ALICE), TOKENS[ALICE]) == grpc.StatusCode.OK
            assert await code(request(BOB), TOKENS[BOB]) == grpc.StatusCode.OK

            response = await stub.SignCertificate(
                request(ALICE), metadata=(("authorization", f"Bearer {TOKENS[ALICE]}"),)
            )
            assert response.spiffe_id == ALICE.uri
            assert response.trust_bundle_pem.count("BEGIN CERTIFICATE") == 1
            assert plane.ca is not None
            assert plane.ca.counters.as_dict() == {
                "issued": 3,
                "unauthenticated": 2,
                "denied": 1,
                "invalid": 1,
                "unavailable": 0,
            }
            metrics = await asyncio.to_thread(scrape, metrics_port)
            assert metrics[("pilotfish_ca_requests_total", (("outcome", "denied"),))] == 1
            assert metrics[("pilotfish_ca_requests_total", (("outcome", "issued"),))] == 3

    run(scenario)


def test_mutual_tls_between_workloads_carries_spiffe_ids(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (
            control_plane(tmp_path) as plane,
            workload(plane, ALICE) as alice,
            workload(plane, BOB) as bob,
            echo_server(lambda: bob.server_context(strict=True)) as server,
        ):
            peer, alpn, _ = await call(server.port, alice.client_context(), expect={BOB})
            assert peer == BOB
            assert alpn == "h2"
            assert server.peers == [ALICE]
            # The client side refuses a server whose identity is not the one expected.
            with pytest.raises(
                PeerRejected, match=r"expected spiffe://cluster\.local/ns/default/sa/carol"
            ):
                await call(
                    server.port,
                    alice.client_context(),
                    expect={SpiffeId(DOMAIN, "default", "carol")},
                )

    run(scenario)


def _context_without_certificate(bundle_pem: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=bundle_pem.decode())
    return context


def _expired_svid(tmp: Path, identity: SpiffeId) -> Svid:
    """A certificate from the same root CA that expired 20 seconds ago (the root is backdated a
    minute, so 30 seconds ago it could already sign)."""
    past = time.time() - 30
    authority = build_authority(CaSettings(root_dir=tmp / "ca", leaf_ttl=10), lambda: past)
    key = generate_key()
    issued = authority.sign(build_csr(key, identity), identity)
    return Svid(identity, key, issued.chain_pem, authority.bundle.pem(), issued.not_after, past)


def test_strict_refuses_missing_expired_foreign_certificates_permissive_takes_plaintext_peers(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with (
            control_plane(tmp_path) as plane,
            control_plane(tmp_path / "other", ca_dir="other-ca") as other_plane,
            workload(plane, ALICE) as alice,
            workload(plane, BOB) as bob,
            workload(other_plane, ALICE) as foreign_alice,
            echo_server(lambda: bob.server_context(strict=True)) as strict,
            echo_server(lambda: bob.server_context(strict=False), require=False) as permissive,
        ):
            bundle = alice.svid.bundle_pem
            no_cert = _context_without_certificate(bundle)
            expired = client_context(_expired_svid(tmp_path, ALICE))
            foreign = foreign_alice.client_context()
            foreign.load_verify_locations(cadata=bundle.decode())  # trusts us; we do not trust it

            assert await refused(strict.port, no_cert)
            assert await refused(strict.port, expired)
            assert await refused(strict.port, foreign)
            assert strict.peers == []
            assert len(strict.rejected) == 3

            # PERMISSIVE: a client without a certificate gets through, without an identity...
            assert (await call(permissive.port, no_cert, expect={BOB}))[0] == BOB
            assert permissive.peers == [None]
            # ...but a certificate that is presented must verify.
            assert await refused(permissive.port, expired)
            assert await refused(permissive.port, foreign)
            assert permissive.peers == [None]

            assert (await call(strict.port, alice.client_context()))[0] == BOB
            assert strict.peers == [ALICE]

    run(scenario)


def test_rotation_keeps_established_connections_and_new_ones_get_the_new_certificate(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with (
            control_plane(tmp_path, ttl=2.0) as plane,
            workload(plane, ALICE) as alice,
            workload(plane, BOB) as bob,
            echo_server(lambda: bob.server_context(strict=True)) as server,
        ):
            first_serial = bob.svid.serial
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", server.port, ssl=alice.client_context()
            )
            calls = failures = 0
            serials: set[int] = set()
            for _ in range(200):  # bounded: 200 calls, or until both rotated three times
                if alice.rotations >= 3 and bob.rotations >= 3:
                    break
                try:
                    peer, _, serial = await call(server.port, alice.client_context(), {BOB})
                    assert peer == BOB
                    serials.add(serial)
                except (*REFUSED, PeerRejected):
                    failures += 1
                calls += 1
                await asyncio.sleep(0.05)
            assert alice.rotations >= 3 and bob.rotations >= 3
            assert failures == 0
            assert alice.failures == bob.failures == 0
            assert len(serials) >= 3  # new connections saw rotated server certificates
            # The connection opened before every rotation still works, on its old certificate.
            writer.write(b"still here\n")
            assert await reader.readline() == b"still here\n"
            old = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert x509.load_der_x509_certificate(old).serial_number == first_serial
            writer.close()
            assert len(server.peers) == calls + 1

    run(scenario)
