"""TLS contexts built from the workload's certificate, and checking a peer's SPIFFE ID.

OpenSSL checks the chain up to a trusted root; it cannot check URI SANs, so ``check_peer`` reads
the SPIFFE ID out of the peer's leaf (with ``cryptography``) right after the handshake and before
a single application byte is read or written.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pilotfish.identity import InvalidSpiffeId, SpiffeId

ALPN_MESH = ("h2",)
ALPN_INBOUND = ("h2", "http/1.1")


class PeerRejected(Exception):
    """The peer's certificate names no identity we accept; the connection must be closed."""


@dataclass(frozen=True)
class Svid:
    """The workload's key and the certificate the CA issued for it (an X.509-SVID)."""

    identity: SpiffeId
    key: ec.EllipticCurvePrivateKey
    chain_pem: bytes
    bundle_pem: bytes
    not_after: float
    received_at: float

    @property
    def renew_at(self) -> float:
        # Half the remaining lifetime, counted from when we got it: the CA backdates not_before
        # for clock skew, which would otherwise make short-lived certificates renew at once.
        return self.received_at + (self.not_after - self.received_at) / 2

    @property
    def serial(self) -> int:
        return x509.load_pem_x509_certificate(self.chain_pem).serial_number


@contextlib.contextmanager
def _private_pem_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read the key from, without the key touching a disk.

    ``SSLContext.load_cert_chain`` only takes paths. On Linux an anonymous memory file serves;
    elsewhere a file in a private temporary directory, removed as soon as it has been read.
    """
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("pilotfish-svid", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory() as tmp:  # created 0700
        path = Path(tmp) / "svid.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield str(path)


def _base_context(svid: Svid, purpose: int) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # SPIFFE certificates carry no DNS names; identity is checked by check_peer instead.
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_verify_locations(cadata=svid.bundle_pem.decode())
    key_pem = svid.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with _private_pem_file(svid.chain_pem + key_pem) as path:
        context.load_cert_chain(path)
    return context


def server_context(svid: Svid, require_client_certificate: bool) -> ssl.SSLContext:
    """Inbound: STRICT requires a client certificate; PERMISSIVE verifies one if sent."""
    context = _base_context(svid, ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    context.set_alpn_protocols(list(ALPN_INBOUND))
    return context


def client_context(svid: Svid) -> ssl.SSLContext:
    """Outbound to a meshed endpoint: present our certificate, require and verify the peer's."""
    context = _base_context(svid, ssl.PROTOCOL_TLS_CLIENT)
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(list(ALPN_MESH))
    return context


def peer_identity(tls: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId | None:
    """The verified peer's SPIFFE ID; None when it sent no certificate (PERMISSIVE inbound).

    Only meaningful after the handshake, on a context that verified the chain.
    """
    der = tls.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        raise PeerRejected("the peer certificate has no subjectAltName") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise PeerRejected(f"the peer certificate has {len(uris)} URI SANs; exactly one expected")
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise PeerRejected(str(exc)) from None


def check_peer(
    tls: ssl.SSLObject | ssl.SSLSocket,
    trust_domain: str,
    expected: Collection[SpiffeId] | None = None,
    *,
    require: bool = True,
) -> SpiffeId | None:
    """The peer's identity if acceptable, else ``PeerRejected``.

    ``expected``: the identities the endpoint may have (from EDS); None accepts any identity in
    the trust domain. ``require``: whether a peer without a certificate is refused.
    """
    identity = peer_identity(tls)
    if identity is None:
        if require:
            raise PeerRejected("the peer sent no certificate")
        return None
    if identity.trust_domain != trust_domain:
        raise PeerRejected(f"{identity} is outside trust domain {trust_domain!r}")
    if expected is not None and identity not in expected:
        wanted = ", ".join(sorted(str(e) for e in expected)) or "none"
        raise PeerRejected(f"the peer is {identity}, expected {wanted}")
    return identity
