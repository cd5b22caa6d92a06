"""The certificate authority's core: turn a CSR and an authenticated identity into a leaf.

No I/O: the signing key, the trust bundle and the clock come in; PEM bytes go out. Loading and
persisting keys lives in ``control_plane.ca.store``, authentication in ``control_plane.ca.auth``.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pilotfish.identity import SpiffeId

DEFAULT_LEAF_TTL = 24 * 3600.0
MIN_LEAF_TTL = 1.0
# Leaves start a minute in the past so a peer whose clock runs slightly behind ours does not
# reject a certificate that is "not yet valid".
BACKDATE = 60.0
ROOT_LIFETIME = 10 * 365 * 86400.0
MIN_RSA_BITS = 2048
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
LeafKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


class CsrRejected(ValueError):
    """The CSR is malformed, badly signed or uses a weak key."""


class IdentityMismatch(CsrRejected):
    """The CSR asks for an identity other than the caller's own."""


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


def _hash_for(key: SigningKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None  # Ed25519 signs without a separate digest
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1):
        return hashes.SHA384()
    return hashes.SHA256()


@dataclass(frozen=True)
class TrustBundle:
    """The roots a workload trusts. Two during a root rotation: the old and the new."""

    roots: tuple[x509.Certificate, ...]

    def pem(self) -> bytes:
        return b"".join(r.public_bytes(serialization.Encoding.PEM) for r in self.roots)

    @classmethod
    def from_pem(cls, data: bytes) -> TrustBundle:
        roots = tuple(x509.load_pem_x509_certificates(data)) if data.strip() else ()
        return cls(_dedupe(roots))


def _dedupe(certs: Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    seen: set[bytes] = set()
    out = []
    for cert in certs:
        fp = cert.fingerprint(hashes.SHA256())
        if fp not in seen:
            seen.add(fp)
            out.append(cert)
    return tuple(out)


@dataclass(frozen=True)
class Signer:
    """The certificate that signs leaves, its key, and the chain from it up to (excluding) a root.

    For a self-signed root the chain is empty; for an operator's intermediate it holds any further
    intermediates, so a leaf's chain is ``leaf + signer + chain``.
    """

    certificate: x509.Certificate
    key: SigningKey
    chain: tuple[x509.Certificate, ...] = ()

    def __post_init__(self) -> None:
        if self.certificate.public_key() != self.key.public_key():
            raise ValueError("the CA key does not match the CA certificate")
        try:
            constraints = self.certificate.extensions.get_extension_for_class(
                x509.BasicConstraints
            ).value
        except x509.ExtensionNotFound:
            raise ValueError("the CA certificate has no basicConstraints extension") from None
        if not constraints.ca:
            raise ValueError("the CA certificate is not a CA (basicConstraints CA:FALSE)")

    @property
    def is_root(self) -> bool:
        return self.certificate.issuer == self.certificate.subject and not self.chain


@dataclass(frozen=True)
class IssuedCertificate:
    identity: SpiffeId | None
    """None for the control plane's serving certificate (DNS names only)."""
    certificate: x509.Certificate
    chain_pem: bytes
    """The leaf, then every intermediate; never the root (peers hold that in their bundle)."""
    not_before: float
    not_after: float


def create_root(
    trust_domain: str, now: float, lifetime: float = ROOT_LIFETIME
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh self-signed root (P-256) for ``trust_domain``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pilotfish"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"pilotfish root CA for {trust_domain}"),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - BACKDATE))
        .not_valid_after(_utc(now + lifetime))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf_key(csr: x509.CertificateSigningRequest) -> LeafKey:
    key = csr.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CsrRejected(f"RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} needed")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ALLOWED_CURVES):
            raise CsrRejected(f"elliptic curve {key.curve.name} not accepted (P-256 or P-384)")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise CsrRejected(f"key type {type(key).__name__} not accepted")


def requested_identity(csr: x509.CertificateSigningRequest) -> SpiffeId:
    """The one SPIFFE ID a CSR asks for: exactly one URI SAN, and no DNS, IP or e-mail names."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrRejected("the CSR has no subjectAltName with a SPIFFE ID") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or len(san) != 1:
        raise CsrRejected("the CSR must name exactly one URI SAN (its SPIFFE ID) and nothing else")
    try:
        return SpiffeId.parse(uris[0])
    except ValueError as exc:
        raise CsrRejected(str(exc)) from None


class CertificateAuthority:
    """Signs leaves for authenticated workloads; ``clock`` returns Unix seconds."""

    def __init__(
        self,
        signer: Signer,
        bundle: TrustBundle,
        trust_domain: str,
        clock: Callable[[], float],
        leaf_ttl: float = DEFAULT_LEAF_TTL,
    ) -> None:
        if leaf_ttl < MIN_LEAF_TTL:
            raise ValueError(f"leaf lifetime must be at least {MIN_LEAF_TTL:g}s")
        self.signer = signer
        self.bundle = bundle
        self.trust_domain = trust_domain
        self.leaf_ttl = leaf_ttl
        self._clock = clock
        self._issued = 0

    @property
    def issued(self) -> int:
        return self._issued

    def sign(
        self, csr_pem: bytes, authenticated: SpiffeId, ttl: float | None = None
    ) -> IssuedCertificate:
        """Sign ``csr_pem`` if it asks for exactly ``authenticated``; raises ``CsrRejected``."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CsrRejected(f"not a PEM certificate signing request: {exc}") from None
        if not csr.is_signature_valid:
            raise CsrRejected("the CSR's signature does not verify (proof of key possession)")
        leaf_key = _leaf_key(csr)
        wanted = requested_identity(csr)
        if authenticated.trust_domain != self.trust_domain:
            raise IdentityMismatch(
                f"authenticated identity {authenticated} is outside trust domain "
                f"{self.trust_domain!r}"
            )
        if wanted != authenticated:
            raise IdentityMismatch(f"the CSR asks for {wanted} but the caller is {authenticated}")
        return self._issue(leaf_key, authenticated, ttl)

    def issue_server(self, key: LeafKey, dns_names: Sequence[str]) -> IssuedCertificate:
        """A serving certificate for the control plane itself: DNS names only, ``serverAuth``.

        It carries no SPIFFE ID, so no sidecar takes it for a workload, and no workload
        certificate (URI SAN only) passes a client's host name check as the control plane.
        """
        if not dns_names:
            raise ValueError("a serving certificate needs at least one DNS name")
        san = x509.SubjectAlternativeName([x509.DNSName(name) for name in dns_names])
        return self._issue(key, None, None, san, [ExtendedKeyUsageOID.SERVER_AUTH])

    def _issue(
        self,
        leaf_key: LeafKey,
        identity: SpiffeId | None,
        ttl: float | None,
        san: x509.SubjectAlternativeName | None = None,
        usages: Sequence[x509.ObjectIdentifier] = (
            ExtendedKeyUsageOID.SERVER_AUTH,
            ExtendedKeyUsageOID.CLIENT_AUTH,
        ),
    ) -> IssuedCertificate:
        if san is None:
            assert identity is not None
            san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)])
        now = self._clock()
        lifetime = self.leaf_ttl if ttl is None else max(MIN_LEAF_TTL, min(ttl, self.leaf_ttl))
        ca_cert = self.signer.certificate
        # A leaf must not outlive the certificate that signed it: peers would reject the chain.
        not_after = min(now + lifetime, ca_cert.not_valid_after_utc.timestamp())
        not_before = max(now - BACKDATE, ca_cert.not_valid_before_utc.timestamp())
        if not_after <= now:
            raise CsrRejected("the CA certificate has expired; cannot issue")
        if not_before >= not_after:
            raise CsrRejected("the CA certificate is not valid yet; cannot issue")
        key = self.signer.key
        builder = (
            x509.CertificateBuilder()
            # SPIFFE X.509-SVIDs carry the identity only in the URI SAN; the empty subject makes
            # the SAN extension critical (RFC 5280 4.2.1.6).
            .subject_name(x509.Name([]))
            .issuer_name(ca_cert.subject)
            .public_key(leaf_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(not_before))
            .not_valid_after(_utc(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=isinstance(leaf_key, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
            .add_extension(san, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                critical=False,
            )
        )
        cert = builder.sign(key, _hash_for(key))
        chain = [cert, *([] if self.signer.is_root else [ca_cert, *self.signer.chain])]
        self._issued += 1
        return IssuedCertificate(
            identity=identity,
            certificate=cert,
            chain_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
            not_before=not_before,
            not_after=not_after,
        )
