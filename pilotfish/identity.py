"""Workload identities: SPIFFE IDs of the form ``spiffe://<trust-domain>/ns/<ns>/sa/<account>``.

Shared by the control plane's CA (which writes them into certificates) and the sidecar (which
reads them back out of a peer's certificate and checks them against what it expects).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# SPIFFE restricts the trust domain to lowercase letters, digits, dots, dashes and underscores,
# and path segments to letters, digits, dots, dashes and underscores (no "." or ".." segments).
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
_MAX_ID_LENGTH = 2048


class InvalidSpiffeId(ValueError):
    """A string is not a SPIFFE ID of the shape the mesh issues."""


def _check_segment(kind: str, value: str) -> None:
    if not _SEGMENT.match(value) or value in {".", ".."}:
        raise InvalidSpiffeId(f"invalid {kind} {value!r}")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A workload's identity: its trust domain, Kubernetes-style namespace and service account."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.match(self.trust_domain):
            raise InvalidSpiffeId(f"invalid trust domain {self.trust_domain!r}")
        _check_segment("namespace", self.namespace)
        _check_segment("service account", self.service_account)

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """The inverse of ``uri``; anything else (other paths, queries, ports) is refused."""
        if len(uri) > _MAX_ID_LENGTH or not uri.startswith("spiffe://"):
            raise InvalidSpiffeId(f"not a SPIFFE ID: {uri[:80]!r}")
        trust_domain, _, path = uri[len("spiffe://") :].partition("/")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise InvalidSpiffeId(f"expected spiffe://<domain>/ns/<ns>/sa/<account>: {uri[:80]!r}")
        return cls(trust_domain, parts[1], parts[3])


def check_trust_domain(value: str) -> str:
    if not _TRUST_DOMAIN.match(value):
        raise InvalidSpiffeId(
            f"invalid trust domain {value!r} (lowercase letters, digits, '.', '-', '_')"
        )
    return value
