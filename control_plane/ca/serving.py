"""The control plane's own TLS: a serving certificate from its CA, rotated, and the two ports.

grpcio cannot make a client certificate optional on one port, so there are two:

* the CA port (server-side TLS): a workload without a certificate yet proves who it is with its
  bearer token, as on the plaintext port, and gets its first certificate;
* the xDS port (mutual TLS): the client must present a certificate chaining to the mesh's trust
  bundle, and the ADS stream's view comes from the SPIFFE ID in it.

Both present the same serving certificate, issued by the control plane's own CA for DNS names
(the names sidecars dial) and renewed at half its lifetime. grpc asks for the certificate on
every handshake through ``dynamic_ssl_server_credentials``, so a renewal reaches new
connections without a restart, and established streams keep theirs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.ca.authority import CertificateAuthority

log = logging.getLogger(__name__)

DEFAULT_SERVING_NAMES = ("localhost",)


@dataclass(frozen=True, slots=True)
class ServingPair:
    key_pem: bytes
    chain_pem: bytes
    not_after: float
    issued_at: float

    @property
    def renew_at(self) -> float:
        return self.issued_at + (self.not_after - self.issued_at) / 2


class ServingCertificate:
    """The current serving certificate; ``renew`` replaces it, ``due`` says when.

    Sans-IO: the clock comes in; the server's renewal task and grpc's handshake callback (on a
    grpc thread) are the only callers.
    """

    def __init__(
        self,
        authority: CertificateAuthority,
        dns_names: Sequence[str],
        clock: Callable[[], float],
    ) -> None:
        self._authority = authority
        self.dns_names = tuple(dns_names)
        self._clock = clock
        self.rotations = 0
        self.current = self._issue()

    def _issue(self) -> ServingPair:
        key = ec.generate_private_key(ec.SECP256R1())
        issued = self._authority.issue_server(key.public_key(), self.dns_names)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return ServingPair(key_pem, issued.chain_pem, issued.not_after, self._clock())

    def renew(self) -> ServingPair:
        """Issue a new certificate and make it current (one assignment: grpc's threads read
        ``current`` without a lock and see the old pair or the new one)."""
        pair = self._issue()
        self.current = pair
        self.rotations += 1
        log.info("control plane serving certificate renewed; valid until %.0f", pair.not_after)
        return pair

    def seconds_to_renewal(self) -> float:
        return max(0.0, self.current.renew_at - self._clock())

    def _configuration(self, pair: ServingPair) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(pair.key_pem, pair.chain_pem)],
            root_certificates=self._authority.bundle.pem(),
        )

    def credentials(self, require_client_certificate: bool) -> grpc.ServerCredentials:
        """Credentials for one port; each handshake picks up the newest certificate."""
        served = [self.current]

        def fetch() -> Any:
            # Called by grpc before each handshake: None keeps the configuration it has.
            pair = self.current
            if pair is served[0]:
                return None
            served[0] = pair
            return self._configuration(pair)

        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self.current),
            fetch,
            require_client_authentication=require_client_certificate,
        )
