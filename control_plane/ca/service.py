"""``pilotfish.ca.v1.CertificateAuthority``: the CA on the control plane's gRPC port."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from control_plane.ca.auth import Authenticator, ReviewUnavailable, Unauthenticated
from control_plane.ca.authority import CertificateAuthority, CsrRejected, IdentityMismatch
from pilotfish.gen.pilotfish.ca.v1 import ca_pb2, ca_pb2_grpc

log = logging.getLogger(__name__)

CA_SERVICE = ca_pb2.DESCRIPTOR.services_by_name["CertificateAuthority"].full_name
_BEARER = "bearer "
# A CSR is a few hundred bytes; anything far larger is not one.
MAX_CSR_BYTES = 16 * 1024


@dataclass
class CaCounters:
    """Outcomes of ``SignCertificate`` calls, for the control plane's metrics."""

    issued: int = 0
    unauthenticated: int = 0
    denied: int = 0
    invalid: int = 0
    unavailable: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        is_bearer = isinstance(value, str) and value[: len(_BEARER)].lower() == _BEARER
        if key == "authorization" and is_bearer:
            return str(value[len(_BEARER) :]).strip() or None
    return None


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


class CertificateServicer(ca_pb2_grpc.CertificateAuthorityServicer):  # type: ignore[misc]
    def __init__(self, authority: CertificateAuthority, authenticator: Authenticator) -> None:
        self.authority = authority
        self._authenticator = authenticator
        self.counters = CaCounters()

    async def SignCertificate(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        token = bearer_token(context.invocation_metadata())
        if token is None:
            self.counters.unauthenticated += 1
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "missing authorization: Bearer <token>"
            )
        assert token is not None
        try:
            identity = await self._authenticator.authenticate(token)
        except Unauthenticated as exc:
            self.counters.unauthenticated += 1
            log.info("certificate request refused: %s (peer %s)", exc, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except ReviewUnavailable as exc:
            self.counters.unavailable += 1
            log.warning("certificate request not decided: %s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if len(request.csr_pem) > MAX_CSR_BYTES:
            self.counters.invalid += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "csr_pem is too large")
        ttl = request.ttl.ToTimedelta().total_seconds() if request.HasField("ttl") else None
        try:
            issued = self.authority.sign(request.csr_pem.encode(), identity, ttl)
        except IdentityMismatch as exc:
            self.counters.denied += 1
            log.warning("certificate request refused: %s (peer %s)", exc, context.peer())
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except CsrRejected as exc:
            self.counters.invalid += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.counters.issued += 1
        return ca_pb2.SignCertificateResponse(
            certificate_chain_pem=issued.chain_pem.decode(),
            trust_bundle_pem=self.authority.bundle.pem().decode(),
            spiffe_id=identity.uri,
            not_before=_timestamp(issued.not_before),
            not_after=_timestamp(issued.not_after),
        )
