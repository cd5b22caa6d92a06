"""The mesh file's security keys: read into the model, errors naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2

from control_plane.mesh import parse_mesh_text
from control_plane.xds.resources import ViewKey, build_view
from control_plane.xds.types import CLUSTER, LISTENER
from pilotfish.config.errors import ConfigError
from pilotfish.config.security import MtlsMode, UpstreamMtls
from pilotfish.identity import SpiffeId
from sidecar.xds.clusters import translate_cluster
from sidecar.xds.outbound import is_original_destination
from sidecar.xds.translate import translate_listener

MESH = """
security:
  trust_domain: example.org
  mtls: {mode: PERMISSIVE, namespaces: {payments: STRICT}}
  jwt_providers:
    idp:
      issuer: https://idp.example.org/
      audiences: [orders]
      jwks: {uri: https://idp.example.org/jwks.json, refresh: 10m}
      forward_claims: {sub: x-user-id}
services:
  orders:
    namespace: shop
    service_account: orders-sa
    endpoints: [127.0.0.1:50061]
    mtls: STRICT
    jwt: {providers: [idp], required: false}
    authorization:
      deny: [{from: {namespaces: [sandbox]}}]
      allow:
        - from: {principals: ['spiffe://example.org/ns/shop/*']}
          to: {methods: [GET]}
        - when: {claims: {scope: [orders.write]}}
  ledger:
    namespace: payments
    endpoints: [127.0.0.1:50062]
"""


def test_security_keys_reach_the_model() -> None:
    mesh = parse_mesh_text(MESH)
    assert mesh.security.trust_domain == "example.org"
    assert mesh.security.jwt_providers["idp"].jwks.refresh == 600
    orders, ledger = mesh.services["orders"], mesh.services["ledger"]
    assert orders.service_account == "orders-sa"
    assert ledger.service_account == "ledger"
    assert orders.security.jwt is not None and not orders.security.jwt.required
    assert orders.security.authorization is not None
    assert len(orders.security.authorization.allow) == 2
    modes = {
        name: mesh.security.mtls.mode_for(s.namespace, s.security.mtls)
        for name, s in mesh.services.items()
    }
    assert modes == {"orders": MtlsMode.STRICT, "ledger": MtlsMode.STRICT}


@pytest.mark.parametrize(
    ("old", "new", "path"),
    [
        ("mtls: STRICT", "mtls: strictly", "services.orders.mtls"),
        ("providers: [idp]", "providers: [other]", "services.orders.jwt.providers[0]"),
        (
            "namespaces: [sandbox]",
            "namespaces: sandbox",
            "services.orders.authorization.deny[0].from.namespaces",
        ),
        ("service_account: orders-sa", "service_account: a/b", "services.orders.service_account"),
        ("audiences: [orders]", "audience: [orders]", "security.jwt_providers.idp.audience"),
    ],
)
def test_errors_name_the_field(old: str, new: str, path: str) -> None:
    assert old in MESH
    with pytest.raises(ConfigError) as info:
        parse_mesh_text(MESH.replace(old, new))
    assert info.value.path == path


def _round_trip(text: str, service: str) -> tuple[Any, dict[str, Any]]:
    """The views a sidecar of ``service`` gets, read back by the sidecar's translators."""
    view = build_view(parse_mesh_text(text), ViewKey(service, ("127.0.0.1", 9000)))
    listeners = {}
    for name, resource in view[LISTENER].items():
        message = listener_pb2.Listener()
        assert resource.packed.Unpack(message)
        listeners[name] = translate_listener(message)
    clusters = {}
    for name, resource in view[CLUSTER].items():
        message = cluster_pb2.Cluster()
        assert resource.packed.Unpack(message)
        if not is_original_destination(message):  # Envoy's passthrough: the listener's job
            clusters[name] = translate_cluster(message)
    return listeners, clusters


MTLS_MESH = """
security:
  mtls: {mode: PERMISSIVE, namespaces: {payments: STRICT}}
services:
  web:
    endpoints: [127.0.0.1:7001]
    depends_on: [ledger, legacy]
  ledger:
    namespace: payments
    service_account: ledger-sa
    endpoints: [127.0.0.1:7002]
  legacy:
    protocol: http1
    endpoints: [127.0.0.1:7003]
"""


def test_mtls_modes_reach_the_sidecar_through_xds() -> None:
    listeners, clusters = _round_trip(MTLS_MESH, "web")
    assert listeners["inbound|web"].mtls is MtlsMode.PERMISSIVE
    ledger = SpiffeId("cluster.local", "payments", "ledger-sa")
    assert clusters["ledger"].mtls == UpstreamMtls(frozenset({ledger}))
    assert clusters["legacy"].mtls is None  # HTTP/1.1 services keep plaintext
    assert clusters["inbound|web"].mtls is None  # sidecar to its own app: plaintext

    listeners, _ = _round_trip(MTLS_MESH, "ledger")
    assert listeners["inbound|ledger"].mtls is MtlsMode.STRICT


def test_without_mtls_config_nothing_changes() -> None:
    listeners, clusters = _round_trip(
        MTLS_MESH.replace(
            "  mtls: {mode: PERMISSIVE, namespaces: {payments: STRICT}}\n",
            "  trust_domain: cluster.local\n",
        ),
        "web",
    )
    assert listeners["inbound|web"].mtls is None
    assert all(c.mtls is None for c in clusters.values())
