"""SDS: the workload certificate for an Envoy in the same pod (Envoy's secret discovery).

The private key must not leave the pod, so the control plane cannot serve it; the sidecar,
which holds the key, serves it instead, on a Unix socket only the pod can reach (as Istio's
node agent does). Two secrets, under the names Envoy's SDS configs conventionally use:

- ``default``: ``tls_certificate`` (the chain and the key);
- ``ROOTCA``: ``validation_context`` (the trust bundle, and a URI SAN matcher that accepts only
  SPIFFE IDs of our trust domain).

``SdsStream`` is the state-of-the-world protocol of one stream, sans-IO; ``SecretDiscovery`` is
the gRPC service around it. A rotation pushes a new version to every open stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2

from sidecar.security.tls import Svid

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
CERTIFICATE_NAME = "default"
ROOT_NAME = "ROOTCA"


def build_secrets(svid: Svid) -> dict[str, secret_pb2.Secret]:
    key_pem = svid.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    certificate = secret_pb2.Secret(
        name=CERTIFICATE_NAME,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=svid.chain_pem),
            private_key=base_pb2.DataSource(inline_bytes=key_pem),
        ),
    )
    san = common_pb2.SubjectAltNameMatcher(
        san_type=common_pb2.SubjectAltNameMatcher.URI,
        matcher=string_pb2.StringMatcher(prefix=f"spiffe://{svid.identity.trust_domain}/"),
    )
    roots = secret_pb2.Secret(
        name=ROOT_NAME,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=svid.bundle_pem),
            match_typed_subject_alt_names=[san],
        ),
    )
    return {CERTIFICATE_NAME: certificate, ROOT_NAME: roots}


class SdsProtocolError(ValueError):
    """The client asked for another resource type; the stream ends with INVALID_ARGUMENT."""


@dataclass
class SdsStream:
    """One SotW SDS stream. Versions are the certificate's serial number in hex."""

    names: set[str] = field(default_factory=set)
    sent_version: str = ""
    acked_version: str = ""
    nacked_version: str = ""
    nack_message: str = ""
    last_nonce: str = ""
    _nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def response(
        self, secrets: Mapping[str, secret_pb2.Secret], version: str
    ) -> discovery_pb2.DiscoveryResponse:
        resources = []
        for name in sorted(self.names):
            if name in secrets:
                packed = any_pb2.Any()
                packed.Pack(secrets[name])
                resources.append(packed)
        self.last_nonce = str(next(self._nonces))
        self.sent_version = version
        return discovery_pb2.DiscoveryResponse(
            version_info=version, resources=resources, type_url=SECRET_TYPE, nonce=self.last_nonce
        )

    def handle_request(
        self,
        request: discovery_pb2.DiscoveryRequest,
        secrets: Mapping[str, secret_pb2.Secret],
        version: str,
    ) -> list[discovery_pb2.DiscoveryResponse]:
        if request.type_url and request.type_url != SECRET_TYPE:
            raise SdsProtocolError(f"this server serves only {SECRET_TYPE}")
        if request.response_nonce and request.response_nonce != self.last_nonce:
            return []  # stale: an answer to a newer response is on its way
        names = set(request.resource_names)
        changed = names != self.names
        self.names = names
        if request.response_nonce:
            if request.HasField("error_detail"):
                # version_info of a NACK is the last version the client accepted; the one it
                # rejected is the one this nonce (the latest) carried.
                self.nacked_version = self.sent_version
                self.nack_message = request.error_detail.message
            else:
                self.acked_version = request.version_info
        if changed or (not request.response_nonce and version != self.sent_version):
            return [self.response(secrets, version)]
        return []

    def handle_update(
        self, secrets: Mapping[str, secret_pb2.Secret], version: str
    ) -> list[discovery_pb2.DiscoveryResponse]:
        # A version the client rejected is never resent; only a different one is pushed.
        if not self.names or version in (self.sent_version, self.nacked_version):
            return []
        return [self.response(secrets, version)]


class SecretSource:
    """What ``SecretDiscovery`` serves: the current secrets, and a wake-up on rotation."""

    def __init__(self) -> None:
        self.secrets: dict[str, secret_pb2.Secret] = {}
        self.version = ""
        self._changed = asyncio.Event()

    def update(self, svid: Svid) -> None:
        self.secrets = build_secrets(svid)
        self.version = format(svid.serial, "x")
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        await self._changed.wait()


class SecretDiscovery(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, source: SecretSource) -> None:
        self._source = source

    async def StreamSecrets(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        stream = SdsStream()
        source = self._source
        queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

        async def read() -> None:
            async for request in request_iterator:
                await queue.put(request)
            await queue.put(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                next_request = asyncio.ensure_future(queue.get())
                rotated = asyncio.ensure_future(source.changed())
                done, _ = await asyncio.wait(
                    {next_request, rotated}, return_when=asyncio.FIRST_COMPLETED
                )
                if next_request in done:
                    rotated.cancel()
                    request = next_request.result()
                    if request is None:
                        return
                    try:
                        responses = stream.handle_request(request, source.secrets, source.version)
                    except SdsProtocolError as exc:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                    # A rotation that landed together with this request is not lost.
                    responses = responses or stream.handle_update(source.secrets, source.version)
                else:
                    next_request.cancel()
                    responses = stream.handle_update(source.secrets, source.version)
                for response in responses:
                    yield response
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def FetchSecrets(
        self, request: discovery_pb2.DiscoveryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> discovery_pb2.DiscoveryResponse:
        stream = SdsStream(names=set(request.resource_names))
        return stream.response(self._source.secrets, self._source.version)
