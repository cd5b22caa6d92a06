"""SPIFFE IDs: the one shape the mesh issues, and everything else refused."""

from __future__ import annotations

import pytest

from pilotfish.identity import InvalidSpiffeId, SpiffeId


def test_round_trip() -> None:
    ident = SpiffeId("cluster.local", "shop", "checkout")
    assert ident.uri == "spiffe://cluster.local/ns/shop/sa/checkout"
    assert SpiffeId.parse(ident.uri) == ident


@pytest.mark.parametrize(
    "uri",
    [
        "https://cluster.local/ns/shop/sa/checkout",
        "spiffe://cluster.local/ns/shop/sa/checkout/extra",
        "spiffe://cluster.local/ns/shop/checkout",
        "spiffe://Cluster.Local/ns/shop/sa/checkout",
        "spiffe://cluster.local/ns/../sa/checkout",
        "spiffe://cluster.local/ns/shop/sa/",
        "spiffe://cluster.local:443/ns/shop/sa/checkout",
        "spiffe://cluster.local/ns/shop/sa/checkout?x=1",
    ],
)
def test_refuses_other_shapes(uri: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.parse(uri)
