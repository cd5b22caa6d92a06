"""The sidecar's workload certificate: fetched from the CA, rotated at half lifetime.

``WorkloadCertificates`` holds the current certificate and the TLS contexts built from it. A
rotation swaps in new contexts: connections accepted or opened afterwards use the new
certificate, while connections already established keep the old one (their TLS session already
holds it) until they close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
from cryptography.hazmat.primitives import serialization
from google.protobuf import duration_pb2

from pilotfish.config.errors import ConfigError
from pilotfish.gen.pilotfish.ca.v1 import ca_pb2, ca_pb2_grpc
from pilotfish.identity import SpiffeId
from sidecar.security.csr import build_csr, generate_key
from sidecar.security.rotation import RenewalSchedule
from sidecar.security.tls import Svid, client_context, server_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SignedCertificate:
    chain_pem: bytes
    bundle_pem: bytes
    spiffe_id: str
    not_after: float


class CertificateError(Exception):
    """The CA refused or could not be reached; the message says which and why."""


class CertificateSource(Protocol):
    async def sign(self, csr_pem: bytes, ttl: float | None) -> SignedCertificate: ...


class GrpcCertificateSource:
    """``pilotfish.ca.v1.CertificateAuthority`` on the control plane.

    ``token`` is called for every request: a projected service-account token is refreshed on
    disk by the kubelet, so it is read afresh each time rather than once at start.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel | CaChannel,
        token: Callable[[], str],
        timeout: float = 10.0,
    ) -> None:
        self._channel = channel
        self._token = token
        self._timeout = timeout

    async def sign(self, csr_pem: bytes, ttl: float | None) -> SignedCertificate:
        request = ca_pb2.SignCertificateRequest(csr_pem=csr_pem.decode())
        if ttl is not None:
            request.ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl), nanos=int(ttl % 1 * 1e9)))
        try:
            token = self._token()
        except OSError as exc:
            raise CertificateError(f"cannot read the CA token: {exc}") from None
        channel = self._channel.current if isinstance(self._channel, CaChannel) else self._channel
        stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
        try:
            response = await stub.SignCertificate(
                request,
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise CertificateError(f"CA: {exc.code().name}: {exc.details()}") from None
        return SignedCertificate(
            chain_pem=response.certificate_chain_pem.encode(),
            bundle_pem=response.trust_bundle_pem.encode(),
            spiffe_id=response.spiffe_id,
            not_after=response.not_after.ToNanoseconds() / 1e9,
        )


def token_file(path: str | Path) -> Callable[[], str]:
    return lambda: Path(path).read_text().strip()


class CaChannel:
    """The channel to the CA: server-side TLS verified against roots, or plaintext without.

    Over TLS the bearer token cannot be read on the way. The first call trusts the roots given
    to the workload beforehand (it has no certificate yet to learn them from); every
    certificate then brings the mesh's current bundle (``trust``), and the channel is rebuilt
    to trust it too, so the CA stays reachable after a root rotation retires the roots the
    workload started with.
    """

    def __init__(self, address: str, roots_pem: bytes | None) -> None:
        self._address = address
        self._roots = roots_pem
        self._trusted = roots_pem
        self._retired: list[grpc.aio.Channel] = []
        self.current = self._connect(roots_pem)

    def _connect(self, roots: bytes | None) -> grpc.aio.Channel:
        if roots is None:
            return grpc.aio.insecure_channel(self._address)
        return grpc.aio.secure_channel(self._address, grpc.ssl_channel_credentials(roots))

    def trust(self, bundle_pem: bytes) -> None:
        """Trust the given roots and ``bundle_pem`` from the next call on (TLS only)."""
        if self._roots is None or self._roots + bundle_pem == self._trusted:
            return
        self._trusted = self._roots + bundle_pem
        # A call may still be running on the old channel: it is closed with this one.
        self._retired.append(self.current)
        self.current = self._connect(self._trusted)

    async def close(self) -> None:
        for channel in (*self._retired, self.current):
            await channel.close()


def read_roots(flag: str, path: str) -> bytes:
    """PEM roots from ``path``; ``ConfigError`` naming ``flag`` if unreadable or not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(flag, f"{path}: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(flag, f"{path}: no PEM certificate in it")
    return data


class WorkloadCertificates:
    """The current certificate of ``identity`` and the TLS contexts made from it."""

    def __init__(
        self,
        source: CertificateSource,
        identity: SpiffeId,
        ttl: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self._source = source
        self._ttl = ttl
        self._clock = clock
        self._schedule = RenewalSchedule()
        self._svid: Svid | None = None
        self._server_strict: ssl.SSLContext | None = None
        self._server_permissive: ssl.SSLContext | None = None
        self._client: ssl.SSLContext | None = None
        self._task: asyncio.Task[None] | None = None
        self.rotations = 0
        self.failures = 0
        self.last_error = ""
        self.on_change: list[Callable[[Svid], None]] = []
        """Called with every new certificate (the first one too), e.g. to push it over SDS."""

    @property
    def svid(self) -> Svid:
        if self._svid is None:
            raise RuntimeError("no workload certificate yet; await start() first")
        return self._svid

    def server_context(self, strict: bool) -> ssl.SSLContext:
        context = self._server_strict if strict else self._server_permissive
        if context is None:
            raise RuntimeError("no workload certificate yet; await start() first")
        return context

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """mTLS to the control plane's xDS port with the current certificate, trusting the
        mesh's bundle; asked for on each connection, so a reconnect uses the newest one."""
        svid = self.svid
        key_pem = svid.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return grpc.ssl_channel_credentials(svid.bundle_pem, key_pem, svid.chain_pem)

    def client_context(self) -> ssl.SSLContext:
        if self._client is None:
            raise RuntimeError("no workload certificate yet; await start() first")
        return self._client

    async def fetch(self) -> Svid:
        """Get a certificate for a new key and make it current; ``CertificateError`` if not."""
        key = generate_key()  # a new key for every certificate: an old key is worth nothing
        signed = await self._source.sign(build_csr(key, self.identity), self._ttl)
        if signed.spiffe_id != self.identity.uri:
            raise CertificateError(
                f"the CA issued {signed.spiffe_id}, we asked for {self.identity}"
            )
        svid = Svid(
            identity=self.identity,
            key=key,
            chain_pem=signed.chain_pem,
            bundle_pem=signed.bundle_pem,
            not_after=signed.not_after,
            received_at=self._clock(),
        )
        try:
            strict = server_context(svid, require_client_certificate=True)
            permissive = server_context(svid, require_client_certificate=False)
            client = client_context(svid)
        except (ssl.SSLError, ValueError) as exc:
            raise CertificateError(f"the CA's certificate is unusable: {exc}") from None
        # Swapped together, so no connection pairs a new server context with an old client one.
        self._svid, self._server_strict, self._server_permissive, self._client = (
            svid,
            strict,
            permissive,
            client,
        )
        for callback in self.on_change:
            callback(svid)
        return svid

    async def start(self) -> None:
        """Fetch the first certificate (raising if that fails), then keep it fresh."""
        svid = await self.fetch()
        self._schedule.issued(svid.received_at, svid.not_after)
        self._task = asyncio.create_task(self._rotate(), name="workload-certificate")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _rotate(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, self._schedule.next_attempt - self._clock()))
            try:
                svid = await self.fetch()
            except CertificateError as exc:
                self.failures += 1
                self.last_error = str(exc)
                current = self._svid.not_after if self._svid is not None else None
                now = self._clock()
                retry = self._schedule.failed(now, current) - now
                log.warning("certificate rotation failed (retry in %.1fs): %s", retry, exc)
                continue
            self.rotations += 1
            self._schedule.issued(svid.received_at, svid.not_after)
            log.info("workload certificate rotated; valid until %.0f", svid.not_after)
