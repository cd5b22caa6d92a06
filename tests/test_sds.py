"""SDS: the workload certificate served to a co-located Envoy over a Unix socket, pushed again
when it rotates; the stream protocol's ACK/NACK rules on their own."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

from sidecar.security.sds import (
    CERTIFICATE_NAME,
    ROOT_NAME,
    SECRET_TYPE,
    SdsProtocolError,
    SdsStream,
    SecretDiscovery,
    SecretSource,
)
from tests.test_workload_identity import ALICE, control_plane, workload


def _request(
    version: str = "",
    nonce: str = "",
    error: str | None = None,
    names: tuple[str, ...] = (CERTIFICATE_NAME, ROOT_NAME),
) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest(
        type_url=SECRET_TYPE, resource_names=list(names), version_info=version, response_nonce=nonce
    )
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return request


def _secrets(response: discovery_pb2.DiscoveryResponse) -> dict[str, Any]:
    out = {}
    for packed in response.resources:
        secret = secret_pb2.Secret()
        packed.Unpack(secret)
        out[secret.name] = secret
    return out


def test_certificate_served_over_sds_and_pushed_on_rotation(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with control_plane(tmp_path, ttl=2.0) as plane, workload(plane, ALICE) as alice:
            source = SecretSource()
            source.update(alice.svid)
            alice.on_change.append(source.update)
            server = grpc.aio.server()
            sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(
                SecretDiscovery(source), server
            )
            socket = f"unix:{tmp_path}/sds.sock"
            assert server.add_insecure_port(socket) == 1
            await server.start()
            try:
                async with grpc.aio.insecure_channel(socket) as channel:
                    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
                    call = stub.StreamSecrets()
                    await call.write(_request())
                    first = await asyncio.wait_for(call.read(), 10)
                    secrets = _secrets(first)
                    assert set(secrets) == {CERTIFICATE_NAME, ROOT_NAME}
                    tls = secrets[CERTIFICATE_NAME].tls_certificate
                    leaf = x509.load_pem_x509_certificate(tls.certificate_chain.inline_bytes)
                    key = serialization.load_pem_private_key(tls.private_key.inline_bytes, None)
                    assert leaf.public_key() == key.public_key()
                    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
                        ALICE.uri
                    ]
                    validation = secrets[ROOT_NAME].validation_context
                    assert validation.trusted_ca.inline_bytes == alice.svid.bundle_pem
                    assert (
                        validation.match_typed_subject_alt_names[0].matcher.prefix
                        == "spiffe://cluster.local/"
                    )
                    await call.write(_request(first.version_info, first.nonce))  # ACK

                    pushed = await asyncio.wait_for(call.read(), 10)  # the 2 s certificate rotates
                    assert pushed.version_info != first.version_info
                    assert pushed.version_info == format(alice.svid.serial, "x")
                    new_chain = _secrets(pushed)[CERTIFICATE_NAME].tls_certificate.certificate_chain
                    assert new_chain.inline_bytes == alice.svid.chain_pem
                    call.cancel()
            finally:
                await server.stop(None)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_stream_protocol_acks_nacks_and_stale_nonces() -> None:
    secrets = {CERTIFICATE_NAME: secret_pb2.Secret(name=CERTIFICATE_NAME)}
    stream = SdsStream()
    [first] = stream.handle_request(_request(names=(CERTIFICATE_NAME,)), secrets, "v1")
    assert first.version_info == "v1" and len(first.resources) == 1
    assert (
        stream.handle_request(_request("v1", first.nonce, names=(CERTIFICATE_NAME,)), secrets, "v1")
        == []
    )
    assert stream.acked_version == "v1"

    [second] = stream.handle_update(secrets, "v2")
    # The client rejects v2: it is recorded and not sent again until a new version exists.
    assert (
        stream.handle_request(
            _request("v1", second.nonce, "bad key", (CERTIFICATE_NAME,)), secrets, "v2"
        )
        == []
    )
    assert (stream.nacked_version, stream.nack_message) == ("v2", "bad key")
    assert stream.handle_update(secrets, "v2") == []
    [third] = stream.handle_update(secrets, "v3")
    # A request answering an older nonce is stale and ignored.
    assert (
        stream.handle_request(
            _request("v1", second.nonce, names=(CERTIFICATE_NAME,)), secrets, "v3"
        )
        == []
    )
    assert third.version_info == "v3"

    with pytest.raises(SdsProtocolError):
        SdsStream().handle_request(
            discovery_pb2.DiscoveryRequest(
                type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster"
            ),
            secrets,
            "v1",
        )
