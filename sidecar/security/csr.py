"""The sidecar's key pair and its certificate signing request.

The private key is generated here and never serialised into anything that leaves the process:
the CA sees only the CSR, which carries the public key and a signature proving possession.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pilotfish.identity import SpiffeId


def generate_key() -> ec.EllipticCurvePrivateKey:
    # P-256: the fastest handshakes OpenSSL offers with a curve every TLS peer accepts.
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: ec.EllipticCurvePrivateKey, identity: SpiffeId) -> bytes:
    """A PEM CSR asking for ``identity`` as the certificate's only subject alternative name."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)
