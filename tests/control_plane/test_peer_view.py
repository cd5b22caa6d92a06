"""Binding a proxy's view to its verified SPIFFE ID: pure functions over a mesh, no sockets."""

from __future__ import annotations

import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from control_plane.ca.authority import CertificateAuthority, Signer, TrustBundle, create_root
from control_plane.mesh import parse_mesh_text
from control_plane.xds.cache import identify
from control_plane.xds.peer_view import (
    IdentityMismatch,
    PeerRefused,
    authenticate_peer,
    bind_node,
    registrable_services,
)
from pilotfish.identity import SpiffeId
from sidecar.security.csr import build_csr, generate_key
from tests.control_plane.helpers import node

MESH = parse_mesh_text("""
services:
  web:
    namespace: shop
    endpoints: [127.0.0.1:1]
  web-admin:
    namespace: shop
    service_account: web
    endpoints: [127.0.0.1:2]
  cart:
    namespace: shop
    service_account: cart-sa
    endpoints: [127.0.0.1:3]
  ledger:
    namespace: bank
    endpoints: [127.0.0.1:4]
""")
WEB = SpiffeId("cluster.local", "shop", "web")
CART = SpiffeId("cluster.local", "shop", "cart-sa")
STRANGER = SpiffeId("cluster.local", "shop", "stranger")


def _view(identity: SpiffeId, **metadata: str) -> str | None:
    bound = bind_node(node("n", **metadata), MESH, identity)
    return identify(bound, MESH).view.service


def test_the_certificate_names_the_view() -> None:
    assert _view(CART) == "cart"  # service account differs from the service's name
    assert _view(CART, service="cart", namespace="shop") == "cart"
    assert _view(CART, namespace="shop") == "cart"
    # A service account shared by two services: metadata picks one of them.
    assert _view(WEB, service="web") == "web"
    assert _view(WEB, service="web-admin") == "web-admin"


@pytest.mark.parametrize(
    ("identity", "metadata", "message"),
    [
        (CART, {"service": "web"}, "claims service 'web'"),
        (CART, {"service": "ledger", "namespace": "bank"}, "claims namespace 'bank'"),
        (CART, {"service": "cart", "namespace": "bank"}, "claims namespace 'bank'"),
        (WEB, {}, "runs web, web-admin; name one"),
        (STRANGER, {"service": "cart"}, "runs no service of the mesh"),
        # A name that is the service account of another service, not a service, is no way in.
        (STRANGER, {"service": "cart-sa"}, None),
    ],
)
def test_contradicting_metadata_is_refused(
    identity: SpiffeId, metadata: dict[str, str], message: str | None
) -> None:
    if message is None:
        assert _view(identity, **metadata) is None
        return
    with pytest.raises(IdentityMismatch, match=message):
        bind_node(node("n", **metadata), MESH, identity)


def test_an_identity_without_a_service_gets_the_unknown_view() -> None:
    assert _view(STRANGER) is None
    assert _view(STRANGER, service="not-in-mesh") is None
    # The identity's own name is no service either when the mesh gives that service an account.
    assert _view(SpiffeId("cluster.local", "shop", "cart")) is None


class _Context:
    """What ``authenticate_peer`` reads of a grpc call: the auth context grpc fills in."""

    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self._auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def test_the_peer_is_the_spiffe_id_of_its_verified_certificate() -> None:
    now = time.time()
    root, key = create_root("cluster.local", now)
    ca = CertificateAuthority(Signer(root, key), TrustBundle((root,)), "cluster.local", time.time)
    leaf = ca.sign(build_csr(generate_key(), CART), CART).certificate
    peer = authenticate_peer(_Context({"x509_pem_cert": [_pem(leaf)]}), "cluster.local")
    assert peer.spiffe_id == CART
    assert peer.not_after == leaf.not_valid_after_utc.timestamp()
    serving = ca.issue_server(generate_key().public_key(), ["cp"]).certificate
    refusals = {
        "no client certificate": {},
        "outside trust domain 'example.org'": {"x509_pem_cert": [_pem(leaf)]},
        # The control plane's own serving certificate names DNS names only.
        "0 URI SANs": {"x509_pem_cert": [_pem(serving)]},
    }
    for message, auth in refusals.items():
        domain = "example.org" if "example.org" in message else "cluster.local"
        with pytest.raises(PeerRefused, match=message):
            authenticate_peer(_Context(auth), domain)


def test_a_new_mesh_rebinds() -> None:
    assert _view(CART) == "cart"
    moved = parse_mesh_text("""
services:
  cart:
    namespace: shop
    service_account: other-sa
    endpoints: [127.0.0.1:3]
""")
    # cart now runs as another account: the same certificate no longer gets its view.
    with pytest.raises(IdentityMismatch, match="runs no service of the mesh"):
        bind_node(node("n", service="cart"), moved, CART)
    assert _view(CART) == "cart"  # and the first mesh still binds as before


def test_an_identity_registers_under_its_services_and_their_registry_names() -> None:
    mesh = parse_mesh_text("""
services:
  greeter:
    namespace: shop
    discovery: registry
  greeter-canary:
    namespace: shop
    discovery: registry
    registry: {service: greeter, labels: {version: v2}}
  pricing:
    namespace: shop
    service_account: greeter-canary
    discovery: mixed
    registry: {service: prices}
  ledger:
    namespace: bank
    endpoints: [127.0.0.1:4]
""")
    canary = SpiffeId("cluster.local", "shop", "greeter-canary")
    assert registrable_services(canary, mesh) == ["greeter-canary", "greeter", "pricing", "prices"]
    assert registrable_services(SpiffeId("cluster.local", "shop", "greeter"), mesh) == ["greeter"]
    assert registrable_services(SpiffeId("cluster.local", "bank", "greeter"), mesh) == []
