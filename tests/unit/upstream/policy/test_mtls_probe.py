"""How the mTLS health probe judges an HTTP/2 response, and what it sends; no sockets."""

from __future__ import annotations

import asyncio

import pytest
from grpc_health.v1 import health_pb2

from pilotfish.config.cluster_policy import HealthCheckConfig, HealthCheckType
from sidecar.upstream.policy.mtls_probe import MtlsProbe, _H2Exchange
from sidecar.upstream.policy.probe import ProbeResult

Headers = list[tuple[bytes, bytes]]


def _grpc_body(status: int) -> bytes:
    message: bytes = health_pb2.HealthCheckResponse(status=status).SerializeToString()
    return b"\x00" + len(message).to_bytes(4, "big") + message


def judge(
    kind: HealthCheckType, headers: Headers, body: bytes = b"", trailers: Headers | None = None
) -> ProbeResult:
    async def run() -> ProbeResult:
        probe = MtlsProbe(HealthCheckConfig(type=kind), "billing", lambda: None, frozenset())
        exchange = _H2Exchange(*probe._request())
        exchange.headers, exchange.body = headers, bytearray(body)
        exchange.trailers = list(trailers or ())
        return probe._judge(exchange)

    return asyncio.run(run())


OK = [(b":status", b"200")]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    ("headers", "body", "trailers", "expected"),
    [
        (OK, _grpc_body(SERVING), [(b"grpc-status", b"0")], ProbeResult(True, "SERVING")),
        (OK, _grpc_body(NOT_SERVING), [(b"grpc-status", b"0")], ProbeResult(False, "NOT_SERVING")),
        # Trailers-only: the status is in the headers.
        ([*OK, (b"grpc-status", b"12")], b"", [], ProbeResult(False, "status 200, grpc-status 12")),
        ([(b":status", b"503")], b"", [], ProbeResult(False, "status 503, grpc-status none")),
        (OK, b"\x01\x00\x00\x00\x00", [(b"grpc-status", b"0")],
         ProbeResult(False, "not one uncompressed gRPC message")),
    ],
)  # fmt: skip
def test_grpc_judgement(
    headers: Headers, body: bytes, trailers: Headers, expected: ProbeResult
) -> None:
    assert judge(HealthCheckType.GRPC, headers, body, trailers) == expected


def test_http_judgement_follows_the_expected_statuses() -> None:
    assert judge(HealthCheckType.HTTP, [(b":status", b"204")]) == ProbeResult(True, "status 204")
    assert judge(HealthCheckType.HTTP, [(b":status", b"500")]) == ProbeResult(False, "status 500")
    assert judge(HealthCheckType.HTTP, []) == ProbeResult(False, "no :status")


def test_without_a_certificate_the_probe_fails_without_connecting() -> None:
    probe = MtlsProbe(HealthCheckConfig(type=HealthCheckType.HTTP), "b", lambda: None, frozenset())
    result = asyncio.run(probe.check("127.0.0.1", 9))
    assert result == ProbeResult(False, "mTLS cluster, but this sidecar has no certificate")
