"""The CA core on a fake clock: what it signs, what it refuses, how its roots rotate."""

from __future__ import annotations

import datetime
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from control_plane.ca.authority import (
    BACKDATE,
    DEFAULT_LEAF_TTL,
    CertificateAuthority,
    CsrRejected,
    Signer,
    TrustBundle,
    create_root,
)
from control_plane.ca.store import (
    CaStoreError,
    activate_next_root,
    load_intermediate,
    load_or_create_root,
    retire_previous_roots,
    stage_next_root,
)
from pilotfish.identity import SpiffeId
from sidecar.security.csr import build_csr, generate_key

T0 = 1_800_000_000.0
DOMAIN = "cluster.local"
ALICE = SpiffeId(DOMAIN, "default", "alice")
BOB = SpiffeId(DOMAIN, "default", "bob")


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _authority(clock: FakeClock, ttl: float = DEFAULT_LEAF_TTL) -> CertificateAuthority:
    cert, key = create_root(DOMAIN, clock())
    return CertificateAuthority(
        Signer(cert, key), TrustBundle((cert,)), DOMAIN, clock, leaf_ttl=ttl
    )


def _verify(chain_pem: bytes, roots: TrustBundle, at: float) -> list[str]:
    """Path-validate a chain with cryptography's verifier; returns the URI SANs of the leaf."""
    leaf, *intermediates = x509.load_pem_x509_certificates(chain_pem)
    verifier = (
        PolicyBuilder()
        .store(Store(list(roots.roots)))
        .time(datetime.datetime.fromtimestamp(at, tz=datetime.UTC))
        .build_client_verifier()
    )
    verified = verifier.verify(leaf, intermediates)
    return [
        n.value for n in verified.subjects or [] if isinstance(n, x509.UniformResourceIdentifier)
    ]


def test_issues_a_leaf_for_the_authenticated_identity() -> None:
    clock = FakeClock()
    ca = _authority(clock)
    issued = ca.sign(build_csr(generate_key(), ALICE), ALICE)
    assert issued.not_after == T0 + DEFAULT_LEAF_TTL
    assert issued.not_before == T0 - BACKDATE
    assert _verify(issued.chain_pem, ca.bundle, T0 + 10) == [ALICE.uri]
    leaf = issued.certificate
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    assert ca.issued == 1


def test_leaf_lifetime_follows_the_clock_and_expires() -> None:
    clock = FakeClock()
    ca = _authority(clock, ttl=10.0)
    clock.now += 500
    issued = ca.sign(build_csr(generate_key(), ALICE), ALICE)
    assert issued.not_after == T0 + 510
    _verify(issued.chain_pem, ca.bundle, T0 + 505)
    with pytest.raises(VerificationError):
        _verify(issued.chain_pem, ca.bundle, T0 + 511)


def test_requested_ttl_is_capped_by_the_configured_one() -> None:
    clock = FakeClock()
    ca = _authority(clock, ttl=100.0)
    csr = build_csr(generate_key(), ALICE)
    assert ca.sign(csr, ALICE, ttl=10_000).not_after == T0 + 100
    assert ca.sign(csr, ALICE, ttl=5).not_after == T0 + 5


def test_leaf_never_outlives_its_ca() -> None:
    clock = FakeClock()
    cert, key = create_root(DOMAIN, T0, lifetime=3600)
    ca = CertificateAuthority(Signer(cert, key), TrustBundle((cert,)), DOMAIN, clock)
    assert ca.sign(build_csr(generate_key(), ALICE), ALICE).not_after == T0 + 3600
    clock.now = T0 + 3601
    with pytest.raises(CsrRejected, match="expired"):
        ca.sign(build_csr(generate_key(), ALICE), ALICE)


def test_refuses_a_csr_for_another_identity() -> None:
    ca = _authority(FakeClock())
    with pytest.raises(CsrRejected, match=re.escape(f"asks for {BOB.uri}")):
        ca.sign(build_csr(generate_key(), BOB), ALICE)
    assert ca.issued == 0


def test_refuses_an_identity_outside_the_trust_domain() -> None:
    ca = _authority(FakeClock())
    other = SpiffeId("evil.example", "default", "alice")
    with pytest.raises(CsrRejected, match="outside trust domain"):
        ca.sign(build_csr(generate_key(), other), other)


def _csr_with(
    names: list[x509.GeneralName], key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([], "no subjectAltName"),
        (
            [x509.UniformResourceIdentifier(ALICE.uri), x509.DNSName("alice.example")],
            "exactly one URI SAN",
        ),
        (
            [x509.UniformResourceIdentifier(ALICE.uri), x509.UniformResourceIdentifier(BOB.uri)],
            "exactly one URI SAN",
        ),
        ([x509.UniformResourceIdentifier("spiffe://cluster.local/admin")], "expected spiffe://"),
    ],
)
def test_refuses_csrs_with_other_names(names: list[x509.GeneralName], message: str) -> None:
    ca = _authority(FakeClock())
    with pytest.raises(CsrRejected, match=message):
        ca.sign(_csr_with(names, generate_key()), ALICE)


def test_refuses_weak_keys_and_garbage() -> None:
    ca = _authority(FakeClock())
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CsrRejected, match="1024 bits"):
        ca.sign(_csr_with([x509.UniformResourceIdentifier(ALICE.uri)], weak), ALICE)
    with pytest.raises(CsrRejected, match="not a PEM"):
        ca.sign(
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", ALICE
        )


def test_refuses_a_csr_whose_signature_does_not_verify() -> None:
    ca = _authority(FakeClock())
    csr = x509.load_pem_x509_csr(build_csr(generate_key(), ALICE))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # flip a bit of the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrRejected, match="signature"):
        ca.sign(tampered, ALICE)


def test_root_directory_is_created_once_and_reloaded(tmp_path: Path) -> None:
    clock = FakeClock()
    signer, bundle = load_or_create_root(tmp_path / "ca", DOMAIN, clock)
    assert signer.is_root and bundle.roots == (signer.certificate,)
    mode = stat.S_IMODE(os.stat(tmp_path / "ca" / "root-key.pem").st_mode)
    assert mode == 0o600
    again, _ = load_or_create_root(tmp_path / "ca", DOMAIN, clock)
    assert again.certificate == signer.certificate


def test_root_directory_with_a_mismatched_key_is_refused(tmp_path: Path) -> None:
    load_or_create_root(tmp_path / "a", DOMAIN, FakeClock())
    load_or_create_root(tmp_path / "b", DOMAIN, FakeClock())
    (tmp_path / "a" / "root-key.pem").write_bytes((tmp_path / "b" / "root-key.pem").read_bytes())
    with pytest.raises(CaStoreError, match="does not match"):
        load_or_create_root(tmp_path / "a", DOMAIN, FakeClock())


def test_root_rotation_keeps_both_roots_trusted(tmp_path: Path) -> None:
    clock = FakeClock()
    directory = tmp_path / "ca"
    old_signer, _ = load_or_create_root(directory, DOMAIN, clock)
    old_leaf = CertificateAuthority(
        old_signer, TrustBundle((old_signer.certificate,)), DOMAIN, clock
    ).sign(build_csr(generate_key(), ALICE), ALICE)

    new_root = stage_next_root(directory, DOMAIN, clock())
    signer, bundle = load_or_create_root(directory, DOMAIN, clock)
    assert signer.certificate == old_signer.certificate  # staged roots are trusted, not used
    assert set(bundle.roots) == {old_signer.certificate, new_root}

    activate_next_root(directory)
    signer, bundle = load_or_create_root(directory, DOMAIN, clock)
    assert signer.certificate == new_root
    assert set(bundle.roots) == {old_signer.certificate, new_root}
    new_leaf = CertificateAuthority(signer, bundle, DOMAIN, clock).sign(
        build_csr(generate_key(), BOB), BOB
    )
    # During the change, a peer holding the bundle accepts leaves from either root.
    assert _verify(old_leaf.chain_pem, bundle, T0 + 1) == [ALICE.uri]
    assert _verify(new_leaf.chain_pem, bundle, T0 + 1) == [BOB.uri]

    retire_previous_roots(directory)
    _, bundle = load_or_create_root(directory, DOMAIN, clock)
    assert bundle.roots == (new_root,)
    with pytest.raises(VerificationError):
        _verify(old_leaf.chain_pem, bundle, T0 + 1)


def _intermediate(
    root_cert: x509.Certificate, root_key: ec.EllipticCurvePrivateKey
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "operator intermediate")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime.fromtimestamp(T0 - 3600, tz=datetime.UTC))
        .not_valid_after(datetime.datetime.fromtimestamp(T0 + 86400 * 30, tz=datetime.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    return cert, key


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def test_operator_intermediate_from_files(tmp_path: Path) -> None:
    clock = FakeClock()
    root_cert, root_key = create_root(DOMAIN, T0 - 86400)
    cert, key = _intermediate(root_cert, root_key)
    (tmp_path / "ca.crt").write_bytes(_pem(cert))
    (tmp_path / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "roots.pem").write_bytes(_pem(root_cert))
    signer, bundle = load_intermediate(
        tmp_path / "ca.crt", tmp_path / "ca.key", tmp_path / "roots.pem"
    )
    issued = CertificateAuthority(signer, bundle, DOMAIN, clock).sign(
        build_csr(generate_key(), ALICE), ALICE
    )
    assert len(x509.load_pem_x509_certificates(issued.chain_pem)) == 2  # leaf + intermediate
    assert _verify(issued.chain_pem, bundle, T0 + 1) == [ALICE.uri]

    other_root, _ = create_root(DOMAIN, T0)
    (tmp_path / "wrong-roots.pem").write_bytes(_pem(other_root))
    with pytest.raises(CaStoreError, match="no root issued"):
        load_intermediate(tmp_path / "ca.crt", tmp_path / "ca.key", tmp_path / "wrong-roots.pem")
    with pytest.raises(CaStoreError, match="cannot read"):
        load_intermediate(tmp_path / "missing.crt", tmp_path / "ca.key", tmp_path / "roots.pem")


def test_refuses_to_issue_before_its_ca_is_valid() -> None:
    clock = FakeClock()
    cert, key = create_root(DOMAIN, T0)
    ca = CertificateAuthority(Signer(cert, key), TrustBundle((cert,)), DOMAIN, clock, leaf_ttl=10)
    clock.now = T0 - 3600
    with pytest.raises(CsrRejected, match="not valid yet"):
        ca.sign(build_csr(generate_key(), ALICE), ALICE)


def test_serving_certificate_is_for_dns_names_and_server_auth_only() -> None:
    clock = FakeClock()
    ca = _authority(clock, ttl=600)
    key = generate_key()
    issued = ca.issue_server(key.public_key(), ["control-plane.pilotfish.svc", "localhost"])
    assert issued.identity is None and issued.not_after == T0 + 600
    leaf = issued.certificate
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["control-plane.pilotfish.svc", "localhost"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == []
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    verifier = (
        PolicyBuilder()
        .store(Store(list(ca.bundle.roots)))
        .time(datetime.datetime.fromtimestamp(T0 + 10, tz=datetime.UTC))
        .build_server_verifier(x509.DNSName("control-plane.pilotfish.svc"))
    )
    verifier.verify(leaf, [])
    with pytest.raises(ValueError, match="at least one DNS name"):
        ca.issue_server(key.public_key(), [])
