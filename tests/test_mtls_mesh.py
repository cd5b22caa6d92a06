"""A meshed call: a grpcio client → its sidecar → mTLS → the server's sidecar → a grpcio app,
which sees the caller's SPIFFE ID. The client sidecar refuses a server it does not expect."""

from __future__ import annotations

import asyncio
import time
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
from tests.support import ThreadedSidecar, identity, running_sidecar, simple_config
from tests.test_mtls_inbound import ALICE, BOB, DOMAIN, App, LocalCa

CAROL = SpiffeId(DOMAIN, "default", "carol")


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
    tmp: Path, expect: Any, client_has_certificate: bool = True
) -> Iterator[tuple[ThreadedSidecar, ThreadedSidecar, App]]:
    authority = build_authority(CaSettings(root_dir=tmp / "ca"), time.time)
    app = App()
    try:
        server_config = simple_config([app.server.address], extra_listener={"mtls": "STRICT"})
        with running_sidecar(server_config) as server:
            give_certificate(server, authority, BOB)
            client_config = simple_config([server.address], timeout="5s")
            client_config["clusters"][0]["mtls"] = expect
            with running_sidecar(client_config) as client:
                if client_has_certificate:
                    give_certificate(client, authority, ALICE)
                try:
                    yield client, server, app
                finally:
                    take_certificate(client)
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
