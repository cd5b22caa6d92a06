"""A meshed call: a grpcio client → its sidecar → mTLS → the server's sidecar → a grpcio app,
which sees the caller's SPIFFE ID. The client sidecar refuses a server it does not expect."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from control_plane.ca.authority import CertificateAuthority
from control_plane.ca.settings import CaSettings, build_authority
from pilotfish.config.bootstrap import parse_bootstrap
from pilotfish.config.errors import ConfigError
from pilotfish.identity import SpiffeId
from sidecar.security.workload import WorkloadCertificates
from tests.support import (
    ThreadedSidecar,
    free_port,
    http_get,
    identity,
    running_sidecar,
    simple_config,
)
from tests.test_mtls_inbound import ALICE, BOB, DOMAIN, App, LocalCa

CAROL = SpiffeId(DOMAIN, "default", "carol")
SHOP_WEB = SpiffeId(DOMAIN, "shop", "web")


def give_certificate(sc: ThreadedSidecar, authority: CertificateAuthority, who: SpiffeId) -> None:
    assert sc.loop is not None and sc.sidecar is not None
    sidecar = sc.sidecar

    async def start() -> None:
        certs = WorkloadCertificates(LocalCa(authority, who), who)
        await certs.start()
        sidecar.workload = certs

    asyncio.run_coroutine_threadsafe(start(), sc.loop).result(10)


def take_certificate(sc: ThreadedSidecar) -> None:
    assert sc.loop is not None and sc.sidecar is not None
    workload = sc.sidecar.workload
    if workload is not None:
        asyncio.run_coroutine_threadsafe(workload.stop(), sc.loop).result(10)


@contextmanager
def mesh(
    tmp: Path,
    expect: Any,
    client_has_certificate: bool = True,
    client: SpiffeId = ALICE,
    authorization: dict[str, Any] | None = None,
) -> Iterator[tuple[ThreadedSidecar, ThreadedSidecar, App]]:
    authority = build_authority(CaSettings(root_dir=tmp / "ca"), time.time)
    app = App()
    try:
        listener: dict[str, Any] = {"mtls": "STRICT"}
        if authorization is not None:
            listener["authorization"] = authorization
        server_config = simple_config([app.server.address], extra_listener=listener)
        with running_sidecar(server_config) as server:
            give_certificate(server, authority, BOB)
            client_config = simple_config([server.address], timeout="5s")
            client_config["clusters"][0]["mtls"] = expect
            with running_sidecar(client_config) as client_sidecar:
                if client_has_certificate:
                    give_certificate(client_sidecar, authority, client)
                try:
                    yield client_sidecar, server, app
                finally:
                    take_certificate(client_sidecar)
                    take_certificate(server)
    finally:
        app.server.stop()


def echo(address: str, payload: bytes) -> bytes:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            "/test.Echo/Echo", request_serializer=identity, response_deserializer=identity
        )
        result: bytes = call(payload, timeout=10)
        return result


def test_a_meshed_call_goes_out_over_mtls_and_the_app_sees_the_caller(tmp_path: Path) -> None:
    with mesh(tmp_path, {"identities": [BOB.uri]}) as (client, server, app):
        for i in range(20):
            assert echo(client.address, b"call %d" % i) == b"call %d" % i
        assert app.seen == [ALICE.uri] * 20
        assert server.stat("http.ingress.downstream_cx_mtls") >= 1
        assert server.stat("http.ingress.downstream_cx_mtls_refused") == 0


def test_any_identity_in_the_trust_domain_with_mtls_true(tmp_path: Path) -> None:
    with mesh(tmp_path, True) as (client, _, app):
        assert echo(client.address, b"x") == b"x"
        assert app.seen == [ALICE.uri]


def test_the_client_sidecar_refuses_a_server_it_does_not_expect(tmp_path: Path) -> None:
    with mesh(tmp_path, {"identities": [CAROL.uri]}) as (client, _, app):
        with pytest.raises(grpc.RpcError) as info:
            echo(client.address, b"x")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert app.seen == []
        assert client.stat("cluster.app.upstream_cx_mtls_peer_rejected") >= 1


def test_a_client_sidecar_without_a_certificate_does_not_connect(tmp_path: Path) -> None:
    with mesh(tmp_path, True, client_has_certificate=False) as (client, _, app):
        with pytest.raises(grpc.RpcError) as info:
            echo(client.address, b"x")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert app.seen == []
        assert client.stat("cluster.app.upstream_cx_mtls_unavailable") >= 1


def test_cluster_mtls_config_errors_name_the_field() -> None:
    config = simple_config(["127.0.0.1:1"], protocol="http1")
    config["clusters"][0]["mtls"] = True
    with pytest.raises(ConfigError) as info:
        parse_bootstrap(config)
    assert info.value.path == "clusters[0].mtls"
    config = simple_config(["127.0.0.1:1"])
    config["clusters"][0]["mtls"] = {"identities": ["bob"]}
    with pytest.raises(ConfigError) as info:
        parse_bootstrap(config)
    assert info.value.path == "clusters[0].mtls.identities[0]"


def _code(address: str) -> grpc.StatusCode:
    try:
        echo(address, b"x")
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("rules", "allowed", "denied"),
    [
        ({"allow": [{"from": {"principals": [ALICE.uri]}}]}, ALICE, CAROL),
        (
            {"allow": [{"from": {"principals": ["spiffe://cluster.local/ns/shop/*"]}}]},
            SHOP_WEB,
            ALICE,
        ),
        ({"deny": [{"from": {"namespaces": ["default"]}}]}, SHOP_WEB, CAROL),
        (
            {
                "deny": [
                    {"from": {"not_principals": [ALICE.uri]}, "to": {"paths": ["/test.Echo/*"]}}
                ]
            },
            ALICE,
            CAROL,
        ),
    ],
)
def test_authorization_by_caller_identity(
    tmp_path: Path, rules: dict[str, Any], allowed: SpiffeId, denied: SpiffeId
) -> None:
    for who, code in ((allowed, grpc.StatusCode.OK), (denied, grpc.StatusCode.PERMISSION_DENIED)):
        with mesh(tmp_path / who.service_account, True, client=who, authorization=rules) as (
            client,
            server,
            app,
        ):
            assert _code(client.address) == code
            refused = server.stat("http.ingress.downstream_rq_rbac_denied")
            assert refused == (1 if code != grpc.StatusCode.OK else 0)
            assert app.seen == ([who.uri] if code == grpc.StatusCode.OK else [])


def test_authorization_by_method_path_and_header_for_plaintext_callers(tmp_path: Path) -> None:
    """On a PERMISSIVE listener without mTLS: HTTP/1.1 callers get 403 with the RBAC flag."""
    rules = {
        "deny": [
            {"to": {"methods": ["DELETE"]}},
            {"to": {"headers": [{"name": "x-debug", "present": True}]}},
        ],
        "allow": [{"to": {"paths": ["/public/*"]}}],
    }
    config = simple_config(
        [f"127.0.0.1:{free_port()}"],
        protocol="http1",
        extra_listener={"authorization": rules},
    )
    with running_sidecar(config) as sc:
        url = f"http://{sc.address}"
        assert http_get(url + "/private")[0] == 403
        assert http_get(url + "/public/x", method="DELETE")[0] == 403
        status, _ = http_get(url + "/public/x")
        assert status == 503  # allowed through; nothing listens upstream
        request = urllib.request.Request(url + "/public/x", headers={"x-debug": "1"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=5)
        assert info.value.code == 403
        assert info.value.headers["x-pilotfish-response-flags"] == "RBAC"
        assert sc.stat("http.ingress.downstream_rq_rbac_denied") == 3


def test_mtls_listener_config_errors_name_the_field() -> None:
    config = simple_config(["127.0.0.1:1"], extra_listener={"mtls": "strict"})
    with pytest.raises(ConfigError) as info:
        parse_bootstrap(config)
    assert info.value.path == "listeners[0].mtls"
    config = simple_config(
        ["127.0.0.1:1"],
        extra_listener={"mtls": "STRICT", "mode": "tcp", "tcp_passthrough": {"cluster": "app"}},
    )
    with pytest.raises(ConfigError) as info:
        parse_bootstrap(config)
    assert info.value.path == "listeners[0].mtls"
