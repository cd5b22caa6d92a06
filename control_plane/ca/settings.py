"""How the control plane's CA is set up (command-line flags), and building it at start."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from control_plane.ca.auth import (
    Authenticator,
    FirstMatch,
    KubernetesTokens,
    TokenReviewer,
    load_bootstrap_tokens,
)
from control_plane.ca.authority import DEFAULT_LEAF_TTL, CertificateAuthority
from control_plane.ca.store import CaStoreError, load_intermediate, load_or_create_root
from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import parse_duration
from pilotfish.identity import InvalidSpiffeId, check_trust_domain


@dataclass(frozen=True)
class CaSettings:
    trust_domain: str = "cluster.local"
    root_dir: Path | None = None
    """A directory with a self-signed root; generated on first start."""
    cert_file: Path | None = None
    key_file: Path | None = None
    roots_file: Path | None = None
    chain_file: Path | None = None
    """Or an operator's intermediate: its certificate, key, the roots and any intermediates."""
    leaf_ttl: float = DEFAULT_LEAF_TTL
    bootstrap_tokens: Path | None = None
    token_audiences: tuple[str, ...] = ()
    """Non-empty: also accept Kubernetes service-account tokens for these audiences (TokenReview
    through the control plane's Kubernetes client)."""


def ca_settings_from_args(args: argparse.Namespace) -> CaSettings | None:
    """From ``pilotfish control-plane``'s flags (defined in ``pilotfish.cli``).

    None when no CA is configured; ``ConfigError`` naming the flag when flags disagree.
    """
    intermediate = [args.ca_cert, args.ca_key, args.ca_roots]
    if args.ca_dir is None and not any(intermediate):
        if args.bootstrap_tokens:
            raise ConfigError("--bootstrap-tokens", "needs a CA (--ca-dir or --ca-cert)")
        return None
    if args.ca_dir is not None and any(intermediate):
        raise ConfigError("--ca-dir", "give either --ca-dir or --ca-cert/--ca-key/--ca-roots")
    if args.ca_dir is None and not all(intermediate):
        raise ConfigError("--ca-cert", "an intermediate needs --ca-cert, --ca-key and --ca-roots")
    try:
        check_trust_domain(args.trust_domain)
    except InvalidSpiffeId as exc:
        raise ConfigError("--trust-domain", str(exc)) from None
    ttl = parse_duration("--cert-ttl", args.cert_ttl)
    if ttl < 1:
        raise ConfigError("--cert-ttl", "expected at least 1s")

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    return CaSettings(
        trust_domain=args.trust_domain,
        root_dir=path(args.ca_dir),
        cert_file=path(args.ca_cert),
        key_file=path(args.ca_key),
        roots_file=path(args.ca_roots),
        chain_file=path(args.ca_chain),
        leaf_ttl=ttl,
        bootstrap_tokens=path(args.bootstrap_tokens),
        token_audiences=(args.ca_token_audience,) if args.kubernetes else (),
    )


def build_authority(settings: CaSettings, clock: Callable[[], float]) -> CertificateAuthority:
    """Load (or on first start create) the CA's keys; ``ConfigError`` if they are unusable."""
    try:
        if settings.root_dir is not None:
            signer, bundle = load_or_create_root(settings.root_dir, settings.trust_domain, clock)
        else:
            assert settings.cert_file and settings.key_file and settings.roots_file
            signer, bundle = load_intermediate(
                settings.cert_file, settings.key_file, settings.roots_file, settings.chain_file
            )
    except CaStoreError as exc:
        raise ConfigError("", f"certificate authority: {exc}") from None
    except OSError as exc:
        raise ConfigError("", f"certificate authority: {exc}") from None
    return CertificateAuthority(signer, bundle, settings.trust_domain, clock, settings.leaf_ttl)


def build_authenticator(
    settings: CaSettings, reviewer: TokenReviewer | None = None
) -> Authenticator:
    """Bootstrap tokens first (a local lookup), then, with a reviewer, the API server."""
    authenticators: list[Authenticator] = []
    if settings.bootstrap_tokens is not None:
        try:
            authenticators.append(
                load_bootstrap_tokens(settings.bootstrap_tokens, settings.trust_domain)
            )
        except OSError as exc:
            raise ConfigError(
                "--bootstrap-tokens", f"{settings.bootstrap_tokens}: {exc.strerror}"
            ) from None
    if reviewer is not None and settings.token_audiences:
        authenticators.append(
            KubernetesTokens(reviewer, settings.trust_domain, settings.token_audiences)
        )
    return FirstMatch(*authenticators)
