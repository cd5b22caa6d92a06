"""The mesh file's security keys: read into the model, errors naming the field."""

from __future__ import annotations

import pytest

from control_plane.mesh import parse_mesh_text
from pilotfish.config.errors import ConfigError
from pilotfish.config.security import MtlsMode

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
