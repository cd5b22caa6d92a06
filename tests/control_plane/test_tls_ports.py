"""The control plane's TLS ports with real grpcio TLS on loopback.

The CA port (server-side TLS) issues a first certificate against a bootstrap token; the xDS
port (mTLS) serves a proxy the view of its certificate's SPIFFE ID, refuses a proxy whose node
metadata claims another service, and refuses callers without a certificate of the mesh CA. It
also serves the status service, and the registry with every write bound to the caller's
identity; the sidecar's registration agent registers there over mTLS.
"""

from __future__ import annotations

import asyncio
import io
import time
from argparse import Namespace
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from control_plane.ca.authority import CertificateAuthority, Signer, TrustBundle, create_root
from control_plane.ca.settings import CaSettings
from control_plane.main import ControlPlane, TlsPorts, start_control_plane, tls_ports_from_args
from control_plane.status_cli import run_status
from control_plane.xds.outbound_xds import PASSTHROUGH_CLUSTER
from control_plane.xds.types import CLUSTER
from pilotfish.cli import build_parser
from pilotfish.config.cluster_policy import HealthCheckConfig, HealthCheckType
from pilotfish.config.errors import ConfigError
from pilotfish.gen.pilotfish.ca.v1 import ca_pb2, ca_pb2_grpc
from pilotfish.gen.pilotfish.registry.v1 import registry_pb2, registry_pb2_grpc
from pilotfish.gen.pilotfish.status.v1 import status_pb2, status_pb2_grpc
from pilotfish.identity import SpiffeId
from sidecar.main import identity_options
from sidecar.register.agent import RegistrationAgent, RegistrationOptions
from sidecar.security.agent import start_identity_agent
from sidecar.security.csr import build_csr, generate_key
from sidecar.security.workload import CaChannel, CertificateError, GrpcCertificateSource
from tests.control_plane.helpers import node

T = TypeVar("T")
WAIT = 10.0
DOMAIN = "cluster.local"

MESH = """
services:
  checkout:
    namespace: shop
    protocol: grpc
    endpoints: [127.0.0.1:50061]
    depends_on: [cart]
  cart:
    namespace: shop
    endpoints: [127.0.0.1:50071]
    depends_on: [ledger]
  ledger:
    namespace: shop
    endpoints: [127.0.0.1:50081]
    depends_on: []
"""
TOKENS = """
tokens:
  - token: checkout-token
    service: checkout
    namespace: shop
"""
CHECKOUT = SpiffeId(DOMAIN, "shop", "checkout")
CART = SpiffeId(DOMAIN, "shop", "cart")


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 60))


@asynccontextmanager
async def control_plane(tmp_path: Path, ttl: float = 3600.0, **tls: Any) -> AsyncIterator[
    ControlPlane
]:
    (tmp_path / "mesh.yaml").write_text(MESH)
    (tmp_path / "tokens.yaml").write_text(TOKENS)
    settings = CaSettings(
        trust_domain=DOMAIN,
        root_dir=tmp_path / "ca",
        bootstrap_tokens=tmp_path / "tokens.yaml",
        leaf_ttl=ttl,
    )
    ports = TlsPorts(ca_port=0, xds_port=0, **tls)
    plane = await start_control_plane(
        tmp_path / "mesh.yaml", "127.0.0.1", 0, ca=settings, tls=ports, poll_interval=0.05,
        unknown_nodes="reject",
    )
    try:
        yield plane
    finally:
        await plane.stop(grace=None)


def _bundle(plane: ControlPlane) -> bytes:
    assert plane.ca is not None
    return plane.ca.authority.bundle.pem()


def _key_pem(key: Any) -> bytes:
    return bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))


def _issue(authority: CertificateAuthority, identity: SpiffeId) -> tuple[bytes, bytes]:
    """(key, chain) for ``identity`` from ``authority``."""
    key = generate_key()
    issued = authority.sign(build_csr(key, identity), identity)
    return _key_pem(key), issued.chain_pem


def _mtls_channel(plane: ControlPlane, key_chain: tuple[bytes, bytes] | None,
                  roots: bytes | None = None) -> grpc.aio.Channel:
    key, chain = key_chain if key_chain is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(roots or _bundle(plane), key, chain)
    return grpc.aio.secure_channel(f"localhost:{plane.xds_port}", credentials)


async def _first_clusters(channel: grpc.aio.Channel, **metadata: str) -> set[str]:
    """Open an ADS stream, ask for clusters, and return the names of the first response's
    service clusters (every view also holds the passthrough cluster)."""
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    request = discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=node("n1", **metadata))
    call = stub.StreamAggregatedResources(iter([request]), timeout=WAIT)
    try:
        async for response in call:
            names = set()
            for resource in response.resources:
                cluster = cluster_pb2.Cluster()
                resource.Unpack(cluster)
                names.add(cluster.name)
            return names - {PASSTHROUGH_CLUSTER}
    finally:
        call.cancel()
    raise AssertionError("the stream ended without a response")


@asynccontextmanager
async def _open_stream(
    channel: grpc.aio.Channel, node_id: str, **metadata: str
) -> AsyncIterator[None]:
    """An ADS stream kept open (its requests do not end) until the block ends."""
    done = asyncio.Event()

    async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        yield discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=node(node_id, **metadata))
        await done.wait()

    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    call = stub.StreamAggregatedResources(requests(), timeout=WAIT)
    await anext(aiter(call))  # answered: the control plane has identified it
    try:
        yield
    finally:
        done.set()
        call.cancel()


def test_first_certificate_from_the_ca_port_then_own_view_on_the_mtls_port(
    tmp_path: Path,
) -> None:
    async def test() -> None:
        async with control_plane(tmp_path) as plane:
            assert plane.ca_port and plane.xds_port and plane.port
            # A new workload: no certificate yet, only its token, over server-side TLS.
            key = generate_key()
            credentials = grpc.ssl_channel_credentials(_bundle(plane))
            async with grpc.aio.secure_channel(
                f"localhost:{plane.ca_port}", credentials
            ) as channel:
                reply = await ca_pb2_grpc.CertificateAuthorityStub(channel).SignCertificate(
                    ca_pb2.SignCertificateRequest(csr_pem=build_csr(key, CHECKOUT).decode()),
                    metadata=(("authorization", "Bearer checkout-token"),), timeout=WAIT,
                )
            assert reply.spiffe_id == CHECKOUT.uri
            pair = (_key_pem(key), reply.certificate_chain_pem.encode())
            # The first stream of each port: their ids must not collide.
            async with (
                _mtls_channel(plane, pair) as channel,
                grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as plain,
                _open_stream(plain, "cart-1", service="cart", namespace="shop"),
                _open_stream(channel, "checkout-1", service="checkout"),
            ):
                stub = status_pb2_grpc.ControlPlaneStatusStub(plain)
                status = await stub.ListProxies(status_pb2.ListProxiesRequest())
            # Streams of both ports, each listed once.
            assert sorted(p.node_id for p in status.proxies) == ["cart-1", "checkout-1"]
            [plain_proxy] = [p for p in status.proxies if p.node_id == "cart-1"]
            assert plain_proxy.spiffe_id == "" and not plain_proxy.HasField("certificate_expires")
            [proxy] = [p for p in status.proxies if p.node_id == "checkout-1"]
            assert proxy.spiffe_id == CHECKOUT.uri
            assert (proxy.service, proxy.namespace) == ("checkout", "shop")
            leaf = x509.load_pem_x509_certificate(pair[1])
            expires = leaf.not_valid_after_utc.timestamp()
            assert proxy.certificate_expires.seconds == int(expires)
            async with _mtls_channel(plane, pair) as channel:
                assert await _first_clusters(
                    channel, service="checkout", namespace="shop"
                ) == {"cart"}
                # No metadata at all: the certificate alone names the view.
                assert await _first_clusters(channel) == {"cart"}

    run(test)


def test_a_proxy_claiming_another_service_is_refused(tmp_path: Path) -> None:
    async def test() -> None:
        async with control_plane(tmp_path) as plane:
            assert plane.ca is not None
            pair = _issue(plane.ca.authority, CHECKOUT)
            async with _mtls_channel(plane, pair) as channel:
                for claim in ({"service": "cart", "namespace": "shop"},
                              {"service": "ledger"},
                              {"service": "checkout", "namespace": "other"}):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await _first_clusters(channel, **claim)
                    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, claim
                    assert CHECKOUT.uri in (refused.value.details() or "")
                # The same certificate still gets its own view afterwards.
                assert await _first_clusters(channel, service="checkout") == {"cart"}
            text = plane.metrics.registry.render()
            assert 'pilotfish_xds_streams_refused_total{reason="identity"} 3' in text
            # Over plaintext, the claim is all there is: cart's view (for development).
            async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as plain:
                assert await _first_clusters(plain, service="cart", namespace="shop") == {
                    "ledger"
                }

    run(test)


def test_callers_without_a_mesh_certificate_are_refused(tmp_path: Path) -> None:
    async def test() -> None:
        async with control_plane(tmp_path) as plane:
            # A certificate from another CA, for the very same identity.
            root, root_key = create_root(DOMAIN, time.time())
            stranger = CertificateAuthority(
                Signer(root, root_key), TrustBundle((root,)), DOMAIN, time.time
            )
            foreign = _issue(stranger, CHECKOUT)
            for pair in (None, foreign):
                async with _mtls_channel(plane, pair) as channel:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await _first_clusters(channel, service="checkout")
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            # An identity of the mesh CA that runs no service, with --unknown-nodes reject.
            assert plane.ca is not None
            nobody = _issue(plane.ca.authority, SpiffeId(DOMAIN, "shop", "nobody"))
            async with _mtls_channel(plane, nobody) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _first_clusters(channel)
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            text = plane.metrics.registry.render()
            assert 'pilotfish_xds_streams_refused_total{reason="unknown_node"} 1' in text
            # A client that does not trust the mesh bundle does not talk to the CA port.
            other_roots = root.public_bytes(serialization.Encoding.PEM)
            async with grpc.aio.secure_channel(
                f"localhost:{plane.ca_port}", grpc.ssl_channel_credentials(other_roots)
            ) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await ca_pb2_grpc.CertificateAuthorityStub(channel).SignCertificate(
                        ca_pb2.SignCertificateRequest(csr_pem="x"), timeout=WAIT
                    )
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    run(test)


def test_serving_certificate_names_and_rotation(tmp_path: Path) -> None:
    async def test() -> None:
        async with control_plane(tmp_path, ttl=4.0, plaintext=False) as plane:
            assert plane.port == 0 and plane.serving is not None
            assert plane.ca is not None
            first = x509.load_pem_x509_certificate(plane.serving.current.chain_pem)
            san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.DNSName) == ["localhost"]
            assert san.get_values_for_type(x509.UniformResourceIdentifier) == []
            first_expiry = first.not_valid_after_utc.timestamp()
            connected = 0
            # New connections go on succeeding after the first serving certificate expired:
            # each handshake picked up the renewed one (the client would refuse an expired one).
            for _ in range(40):
                pair = _issue(plane.ca.authority, CHECKOUT)  # client leaves live 4 s too
                async with _mtls_channel(plane, pair) as channel:
                    assert await _first_clusters(channel, service="checkout") == {"cart"}
                connected += 1
                if time.time() > first_expiry + 1:
                    break
                await asyncio.sleep(0.5)
            assert time.time() > first_expiry + 1, "the loop ended before the expiry"
            assert plane.serving.rotations >= 2
            # The gauge follows the renewals; the kubelet's probe path answers without TLS.
            gauge = f"pilotfish_serving_certificate_expiry {plane.serving.current.not_after}"
            assert gauge in plane.metrics.registry.render()
            assert plane.metrics.handle("GET", "/ready")[0] == 200
            assert connected >= 4

    run(test)


def test_status_table_shows_identity_and_expiry(tmp_path: Path) -> None:
    async def test() -> None:
        async with control_plane(tmp_path) as plane:
            assert plane.ca is not None
            pair = _issue(plane.ca.authority, CHECKOUT)
            async with (
                _mtls_channel(plane, pair) as channel,
                _open_stream(channel, "checkout-1", service="checkout"),
            ):
                out = io.StringIO()
                args = Namespace(address=f"127.0.0.1:{plane.port}", timeout=WAIT)
                code = await asyncio.to_thread(run_status, args, out)
            assert code == 0
            leaf = x509.load_pem_x509_certificate(pair[1])
            expiry = leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
            row = next(line for line in out.getvalue().splitlines()
                       if line.startswith("checkout-1"))
            assert CHECKOUT.uri in row and expiry in row

    run(test)


@pytest.mark.parametrize(
    ("extra", "flag", "message"),
    [
        (["--no-plaintext"], "--no-plaintext", "needs a TLS port"),
        (["--xds-mtls-port", "70000"], "--xds-mtls-port", "70000 is not a port"),
        (["--ca-tls-port", "1", "--tls-names", " , "], "--tls-names", "at least one"),
    ],
)
def test_bad_tls_flags_name_the_flag(extra: list[str], flag: str, message: str) -> None:
    args = build_parser().parse_args(["control-plane", "--config", "m.yaml", *extra])
    with pytest.raises(ConfigError) as error:
        tls_ports_from_args(args)
    assert error.value.path == flag and message in str(error.value)


def test_tls_ports_without_a_ca_are_refused(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(MESH)

    async def test() -> None:
        with pytest.raises(ConfigError) as error:
            await start_control_plane(tmp_path / "mesh.yaml", tls=TlsPorts(xds_port=0))
        assert error.value.path == "--xds-mtls-port"

    run(test)


@pytest.mark.parametrize(
    ("extra", "flag", "message"),
    [
        (["--control-plane-roots", "r.pem"], "--control-plane-roots", "needs --ca-token-file"),
        (["--control-plane-roots", "r.pem", "--ca-token-file", "t"], "--ca", "TLS port"),
        (
            ["--control-plane-roots", "/nonexistent.pem", "--ca-token-file", "t", "--ca", "h:1"],
            "--control-plane-roots", "No such file",
        ),
    ],
)
def test_bad_sidecar_tls_flags_name_the_flag(extra: list[str], flag: str, message: str) -> None:
    args = build_parser().parse_args(
        ["sidecar", "--xds", "localhost:1", "--service", "web", *extra]
    )
    with pytest.raises(ConfigError) as error:
        identity_options(args)
    assert error.value.path == flag and message in str(error.value)


def test_identity_agent_over_the_ca_port_and_its_certificate_on_the_mtls_port(
    tmp_path: Path,
) -> None:
    async def test() -> None:
        async with control_plane(tmp_path) as plane:
            token = tmp_path / "checkout.token"
            token.write_text("checkout-token\n")
            agent = await start_identity_agent(
                f"localhost:{plane.ca_port}", token, CHECKOUT, tmp_path / "sds.sock",
                control_plane_roots=_bundle(plane),
            )
            try:
                assert agent.certificates.svid.identity == CHECKOUT
                # What it serves Envoy over SDS is what an Envoy would present on the mTLS port.
                async with grpc.aio.secure_channel(
                    f"localhost:{plane.xds_port}", agent.certificates.channel_credentials()
                ) as channel:
                    assert await _first_clusters(channel, service="checkout") == {"cart"}
            finally:
                await agent.stop()
            # Roots that did not sign the serving certificate: no token is sent, no certificate.
            other, _ = create_root(DOMAIN, time.time())
            with pytest.raises(CertificateError, match="UNAVAILABLE"):
                await start_identity_agent(
                    f"localhost:{plane.ca_port}", token, CHECKOUT, tmp_path / "sds2.sock",
                    control_plane_roots=other.public_bytes(serialization.Encoding.PEM),
                )
            assert plane.ca is not None and plane.ca.counters.issued == 1

    run(test)


def test_the_ca_channel_comes_to_trust_the_bundle_the_ca_sends(tmp_path: Path) -> None:
    """After a root rotation the roots a workload started with may no longer be the serving
    certificate's: each certificate's bundle is trusted from then on."""

    async def test() -> None:
        async with control_plane(tmp_path) as plane:
            retired, _ = create_root(DOMAIN, time.time())
            channel = CaChannel(
                f"localhost:{plane.ca_port}", retired.public_bytes(serialization.Encoding.PEM)
            )
            source = GrpcCertificateSource(channel, lambda: "checkout-token")
            csr = build_csr(generate_key(), CHECKOUT)
            try:
                with pytest.raises(CertificateError, match="UNAVAILABLE"):
                    await source.sign(csr, None)
                channel.trust(_bundle(plane))  # what a certificate's response carries
                assert (await source.sign(csr, None)).spiffe_id == CHECKOUT.uri
            finally:
                await channel.close()

    run(test)


async def _listed(channel: grpc.aio.Channel) -> list[str]:
    stub = registry_pb2_grpc.RegistryStub(channel)
    reply = await stub.List(registry_pb2.ListRequest(), timeout=WAIT)
    return sorted(i.id for i in reply.instances)


def test_registration_on_the_mtls_port_is_bound_to_the_callers_identity(tmp_path: Path) -> None:
    async def test() -> None:
        async with control_plane(tmp_path) as plane:
            assert plane.ca is not None
            pair = _issue(plane.ca.authority, CHECKOUT)

            def instance(service: str, port: int) -> registry_pb2.RegisterRequest:
                return registry_pb2.RegisterRequest(
                    instance=registry_pb2.Instance(service=service, address="127.0.0.1",
                                                   port=port)
                )

            async with (
                _mtls_channel(plane, pair) as channel,
                grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as plain,
            ):
                # The plaintext port binds nothing (development): anyone may register cart.
                await registry_pb2_grpc.RegistryStub(plain).Register(
                    instance("cart", 7002), timeout=WAIT
                )
                stub = registry_pb2_grpc.RegistryStub(channel)
                reply = await stub.Register(instance("checkout", 7001), timeout=WAIT)
                assert reply.id == "checkout/127.0.0.1:7001"
                await stub.Heartbeat(registry_pb2.HeartbeatRequest(id=reply.id), timeout=WAIT)
                refusals = [
                    stub.Register(instance("cart", 7003), timeout=WAIT),
                    stub.Heartbeat(
                        registry_pb2.HeartbeatRequest(id="cart/127.0.0.1:7002"), timeout=WAIT
                    ),
                    stub.Deregister(
                        registry_pb2.DeregisterRequest(id="cart/127.0.0.1:7002"), timeout=WAIT
                    ),
                ]
                for refused_call in refusals:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await refused_call
                    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    details = refused.value.details() or ""
                    assert CHECKOUT.uri in details and "'cart'" in details, details
                    assert "it runs checkout" in details
                assert await _listed(channel) == ["cart/127.0.0.1:7002", "checkout/127.0.0.1:7001"]
                # The status service answers on the mTLS port too.
                status = await status_pb2_grpc.ControlPlaneStatusStub(channel).ListProxies(
                    status_pb2.ListProxiesRequest(), timeout=WAIT
                )
                assert list(status.proxies) == []

                # The sidecar's agent, given its workload credentials, registers over mTLS.
                # Its "app" is the control plane's own gRPC health service (SERVING).
                options = RegistrationOptions(
                    registry=f"localhost:{plane.xds_port}", service="checkout",
                    host="127.0.0.1", port=7004, app_host="127.0.0.1", app_port=plane.port,
                    health=HealthCheckConfig(type=HealthCheckType.GRPC, interval=0.1,
                                             unhealthy_threshold=1, healthy_threshold=1,
                                             timeout=1.0),
                )  # fmt: skip
                key, chain = pair
                agent = RegistrationAgent(
                    options, ready=lambda: True,
                    credentials=lambda: grpc.ssl_channel_credentials(_bundle(plane), key, chain),
                )
                agent.start()
                joined = "checkout/127.0.0.1:7004"
                try:
                    for _ in range(100):
                        if joined in await _listed(plain):
                            break
                        await asyncio.sleep(0.05)
                    assert joined in await _listed(plain)
                finally:
                    await agent.leave()
                assert joined not in await _listed(plain)

    run(test)
