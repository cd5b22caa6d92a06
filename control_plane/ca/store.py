"""Where the CA's keys live: a directory with a self-signed root, or an operator's intermediate.

A root directory holds:

- ``root-cert.pem`` / ``root-key.pem``: the root that signs workload certificates;
- ``next-root-cert.pem`` / ``next-root-key.pem``: a root staged for rotation, already trusted;
- ``previous-roots.pem``: roots that signed earlier certificates and are still trusted.

Root rotation is three steps, each a restart (or a new control plane) apart, so that every
workload trusts the new root before any certificate signed by it exists, and keeps trusting the
old one until every certificate it signed has expired:

1. ``stage_next_root``: generate the next root; the bundle now holds both.
2. ``activate_next_root``: the next root signs; the old one moves to ``previous-roots.pem``.
3. ``retire_previous_roots``: after one leaf lifetime, drop the old root from the bundle.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from control_plane.ca.authority import ROOT_LIFETIME, Signer, SigningKey, TrustBundle, create_root

ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"
NEXT_CERT = "next-root-cert.pem"
NEXT_KEY = "next-root-key.pem"
PREVIOUS = "previous-roots.pem"


class CaStoreError(Exception):
    """The CA's files are missing, unreadable or inconsistent; the message names the file."""


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` atomically, readable by the owner only from the first byte on."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CaStoreError(f"{path}: cannot read: {exc.strerror}") from None


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as exc:
        raise CaStoreError(f"{path}: not a PEM certificate: {exc}") from None


def _load_certs(path: Path) -> list[x509.Certificate]:
    data = _read(path)
    if not data.strip():
        return []
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CaStoreError(f"{path}: not PEM certificates: {exc}") from None


def _load_key(path: Path) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as exc:
        raise CaStoreError(f"{path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise CaStoreError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def _signer(cert_path: Path, key_path: Path, chain: tuple[x509.Certificate, ...] = ()) -> Signer:
    try:
        return Signer(_load_cert(cert_path), _load_key(key_path), chain)
    except ValueError as exc:
        raise CaStoreError(f"{cert_path}: {exc}") from None


def load_or_create_root(
    directory: str | Path, trust_domain: str, clock: Callable[[], float]
) -> tuple[Signer, TrustBundle]:
    """The directory's root CA, generating and persisting one on first start."""
    base = Path(directory)
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = base / ROOT_CERT, base / ROOT_KEY
    if not cert_path.exists() and not key_path.exists():
        cert, key = create_root(trust_domain, clock(), ROOT_LIFETIME)
        # The key first: a certificate without its key would be a broken directory.
        _write_private(key_path, _key_pem(key))
        _write_private(cert_path, _cert_pem(cert), 0o644)
    signer = _signer(cert_path, key_path)
    if not signer.is_root:
        raise CaStoreError(f"{cert_path}: not self-signed; use an intermediate CA's files instead")
    roots = [signer.certificate]
    if (base / NEXT_CERT).exists():
        roots.append(_load_cert(base / NEXT_CERT))
    if (base / PREVIOUS).exists():
        roots.extend(_load_certs(base / PREVIOUS))
    return signer, TrustBundle.from_pem(b"".join(_cert_pem(c) for c in roots))


def stage_next_root(directory: str | Path, trust_domain: str, now: float) -> x509.Certificate:
    """Rotation step 1: generate the next root, trusted from the next start on, not yet signing."""
    base = Path(directory)
    if not (base / ROOT_CERT).exists():
        raise CaStoreError(f"{base / ROOT_CERT}: no current root to rotate from")
    if (base / NEXT_CERT).exists():
        raise CaStoreError(f"{base / NEXT_CERT}: a next root is already staged")
    cert, key = create_root(trust_domain, now, ROOT_LIFETIME)
    _write_private(base / NEXT_KEY, _key_pem(key))
    _write_private(base / NEXT_CERT, _cert_pem(cert), 0o644)
    return cert


def activate_next_root(directory: str | Path) -> None:
    """Rotation step 2: the staged root signs; the current one stays trusted as a previous root."""
    base = Path(directory)
    _signer(base / NEXT_CERT, base / NEXT_KEY)  # refuse to activate a broken pair
    current = _read(base / ROOT_CERT)
    previous = _read(base / PREVIOUS) if (base / PREVIOUS).exists() else b""
    _write_private(base / PREVIOUS, previous + current, 0o644)
    _write_private(base / ROOT_KEY, _read(base / NEXT_KEY))
    _write_private(base / ROOT_CERT, _read(base / NEXT_CERT), 0o644)
    (base / NEXT_CERT).unlink()
    (base / NEXT_KEY).unlink()


def retire_previous_roots(directory: str | Path) -> None:
    """Rotation step 3: stop trusting the old roots (after every leaf they signed has expired)."""
    with contextlib.suppress(FileNotFoundError):
        (Path(directory) / PREVIOUS).unlink()


def load_intermediate(
    cert_file: str | Path,
    key_file: str | Path,
    roots_file: str | Path,
    chain_file: str | Path | None = None,
) -> tuple[Signer, TrustBundle]:
    """An operator-supplied intermediate CA: its certificate and key, the roots workloads should
    trust (one, or two during the operator's own root rotation), and any intermediates between."""
    chain = tuple(_load_certs(Path(chain_file))) if chain_file is not None else ()
    signer = _signer(Path(cert_file), Path(key_file), chain)
    roots = _load_certs(Path(roots_file))
    if not roots:
        raise CaStoreError(f"{roots_file}: no root certificates")
    top = (signer.chain or (signer.certificate,))[-1]
    if not any(_issued_by(top, root) for root in roots):
        raise CaStoreError(f"{roots_file}: no root issued {top.subject.rfc4514_string()!r}")
    return signer, TrustBundle.from_pem(b"".join(_cert_pem(c) for c in roots))


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
