"""Active health probes to an endpoint of an mTLS cluster: over the same TLS client context as
the cluster's own connections, with the same check of the server's SPIFFE ID.

A STRICT server refuses plaintext, so the probe must present the workload certificate; and a
probe that a server with the wrong identity answered would mark an impostor healthy, so the
identity is checked before the request is written, as for requests
(``sidecar.upstream.mtls.connect_mtls``). The client context offers only ALPN ``h2``, so both
probes speak HTTP/2 on a fresh connection: ``GET <path>`` judged by ``:status``, or the gRPC
call ``grpc.health.v1.Health/Check`` judged by ``grpc-status`` and ``SERVING``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from pilotfish.config.cluster_policy import HealthCheckConfig, HealthCheckType
from sidecar.upstream.mtls import UpstreamPeerRejected, connect_mtls
from sidecar.upstream.policy.probe import ProbeResult

if TYPE_CHECKING:
    from pilotfish.identity import SpiffeId
    from sidecar.security.workload import WorkloadCertificates

GRPC_HEALTH_PATH = "/grpc.health.v1.Health/Check"
MAX_RESPONSE_BYTES = 64 * 1024
_STREAM = 1

Header = tuple[bytes, bytes]


class _Failed(Exception):
    """The exchange ended without a complete response (the reason is the message)."""


class _H2Exchange(asyncio.Protocol):
    """One request on stream 1 of a new HTTP/2 connection; ``done`` holds the response's
    headers, body and trailers."""

    def __init__(self, headers: Sequence[Header], body: bytes) -> None:
        self._request = (headers, body)
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self._transport: asyncio.Transport | None = None
        self.headers: list[Header] = []
        self.trailers: list[Header] = []
        self.body = bytearray()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        headers, body = self._request
        self._conn.initiate_connection()
        self._conn.send_headers(_STREAM, list(headers), end_stream=not body)
        if body:  # well under the initial window: it goes at once
            self._conn.send_data(_STREAM, body, end_stream=True)
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail(f"HTTP/2 protocol error: {exc}")
            return
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                self.headers = list(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                self.body += event.data
                self._conn.acknowledge_received_data(event.flow_controlled_length, _STREAM)
                if len(self.body) > MAX_RESPONSE_BYTES:
                    self._fail("response too large")
                    return
            elif isinstance(event, h2.events.TrailersReceived):
                self.trailers = list(event.headers)
            elif isinstance(event, h2.events.StreamEnded) and not self.done.done():
                self.done.set_result(None)
            elif isinstance(event, h2.events.StreamReset):
                self._fail(f"stream reset ({event.error_code!r})")
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._fail(f"GOAWAY ({event.error_code!r})")
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc}" if exc else "connection closed")

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _fail(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_exception(_Failed(reason))


def _header(headers: Sequence[Header], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


class MtlsProbe:
    """An HTTP or gRPC health probe over mTLS, expecting one of ``identities`` (empty: any in
    the trust domain). ``workload`` returns the sidecar's current certificate, or None."""

    def __init__(
        self,
        config: HealthCheckConfig,
        authority: str,
        workload: Callable[[], WorkloadCertificates | None],
        identities: Collection[SpiffeId],
    ) -> None:
        self.config = config
        self.authority = config.host or authority
        self._workload = workload
        self._identities = identities

    def _request(self) -> tuple[list[Header], bytes]:
        authority = self.authority.encode()
        if self.config.type is HealthCheckType.GRPC:
            from grpc_health.v1 import health_pb2

            message = health_pb2.HealthCheckRequest(
                service=self.config.service_name
            ).SerializeToString()
            headers = [
                (b":method", b"POST"), (b":scheme", b"https"), (b":authority", authority),
                (b":path", GRPC_HEALTH_PATH.encode()), (b"content-type", b"application/grpc"),
                (b"te", b"trailers"), (b"user-agent", b"pilotfish-health-check"),
            ]  # fmt: skip
            return headers, b"\x00" + len(message).to_bytes(4, "big") + message
        headers = [
            (b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority),
            (b":path", self.config.path.encode()), (b"user-agent", b"pilotfish-health-check"),
        ]  # fmt: skip
        return headers, b""

    async def check(self, host: str, port: int) -> ProbeResult:
        workload = self._workload()
        if workload is None:
            return ProbeResult(False, "mTLS cluster, but this sidecar has no certificate")
        exchange = _H2Exchange(*self._request())
        try:
            async with asyncio.timeout(self.config.timeout):
                await connect_mtls(lambda: exchange, host, port, workload, self._identities)
                await exchange.done
        except TimeoutError:
            return ProbeResult(False, "timeout")
        except UpstreamPeerRejected as exc:
            return ProbeResult(False, f"unexpected peer: {exc}")
        except ssl.SSLError as exc:
            return ProbeResult(False, f"TLS handshake failed: {exc}")
        except OSError as exc:  # refused, reset, unreachable
            return ProbeResult(False, f"connection failed: {exc}")
        except _Failed as exc:
            return ProbeResult(False, str(exc))
        finally:
            exchange.close()
        return self._judge(exchange)

    def _judge(self, exchange: _H2Exchange) -> ProbeResult:
        status_text = _header(exchange.headers, b":status") or b""
        if not status_text.isdigit():
            return ProbeResult(False, "no :status")
        status = int(status_text)
        if self.config.type is not HealthCheckType.GRPC:
            return ProbeResult(self.config.status_ok(status), f"status {status}")
        from grpc_health.v1 import health_pb2

        # A trailers-only response carries grpc-status in its headers.
        grpc_status = _header(exchange.trailers, b"grpc-status") or _header(
            exchange.headers, b"grpc-status"
        )
        if status != 200 or grpc_status != b"0":
            detail = (grpc_status or b"none").decode("latin-1")
            return ProbeResult(False, f"status {status}, grpc-status {detail}")
        body = bytes(exchange.body)
        if len(body) < 5 or body[0] != 0 or int.from_bytes(body[1:5], "big") != len(body) - 5:
            return ProbeResult(False, "not one uncompressed gRPC message")
        response = health_pb2.HealthCheckResponse()
        try:
            response.ParseFromString(body[5:])
        except ValueError:
            return ProbeResult(False, "not a HealthCheckResponse")
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return ProbeResult(name == "SERVING", name)

    def forget(self, host: str, port: int) -> None:
        pass  # every probe opens its own connection

    async def close(self) -> None:
        pass

