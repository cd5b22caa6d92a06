"""Local replies whose status is not fixed by a ``ResponseFlag``: fault aborts, rate limits,
load shedding, throttling and static fallbacks.

A ``LocalReply`` carries both an HTTP status and a gRPC status; ``headers`` picks the form the
request needs (a trailers-only ``grpc-status`` response for gRPC, a status and body otherwise).
When config names only one of the two, the other follows the standard mappings below.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.flags import RESPONSE_FLAGS_HEADER

_GRPC_TO_HTTP = {
    0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429,
    9: 400, 10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401,
}  # fmt: skip
"""google.rpc.Code → HTTP, as Google APIs and Envoy map them."""
_HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
"""The gRPC spec's HTTP → gRPC mapping; anything else is UNKNOWN (2)."""


def grpc_to_http(grpc_status: int) -> int:
    return _GRPC_TO_HTTP.get(grpc_status, 500)


def http_to_grpc(http_status: int) -> int:
    return _HTTP_TO_GRPC.get(http_status, 2)


def grpc_message(text: str) -> bytes:
    """Percent-encode as the gRPC spec asks for grpc-message."""
    out = bytearray()
    for byte in text.encode():
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out.extend(b"%%%02X" % byte)
    return bytes(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalReply:
    http_status: int
    grpc_status: int
    message: str
    flag_code: str
    """Goes into x-pilotfish-response-flags, e.g. ``FI``, ``RL``, ``FB``."""
    extra_headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes | None = None
    """The HTTP body; None: the message and a newline, as text/plain."""
    content_type: bytes = b"text/plain"
    grpc_response: bytes | None = None
    """A serialized protobuf message: the gRPC form is then headers, the message, trailers."""

    @classmethod
    def from_statuses(
        cls,
        http_status: int | None,
        grpc_status: int | None,
        message: str,
        flag_code: str,
        extra_headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> LocalReply:
        """At least one status; the missing one is mapped from the other."""
        if http_status is None and grpc_status is None:
            raise ValueError("a local reply needs an HTTP or a gRPC status")
        return cls(
            http_status=http_status if http_status is not None else grpc_to_http(grpc_status or 0),
            grpc_status=grpc_status if grpc_status is not None else http_to_grpc(http_status or 0),
            message=message,
            flag_code=flag_code,
            extra_headers=extra_headers,
        )

    def http_body(self, grpc: bool, method: str) -> bytes:
        """What follows the headers (empty for gRPC and HEAD: send headers with end_stream)."""
        if grpc or method == "HEAD":
            return b""
        return self.body if self.body is not None else f"{self.message}\n".encode()

    def grpc_message_parts(
        self,
    ) -> tuple[list[tuple[bytes, bytes]], bytes, list[tuple[bytes, bytes]]]:
        """Headers, the length-prefixed message and trailers of a gRPC reply with a message."""
        assert self.grpc_response is not None
        headers = [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            *self.extra_headers,
            (RESPONSE_FLAGS_HEADER, self.flag_code.encode()),
        ]
        frame = b"\x00" + len(self.grpc_response).to_bytes(4, "big") + self.grpc_response
        trailers = [(b"grpc-status", str(self.grpc_status).encode())]
        if self.message:
            trailers.append((b"grpc-message", grpc_message(self.message)))
        return headers, frame, trailers

    def headers(self, grpc: bool) -> list[tuple[bytes, bytes]]:
        """Send with end_stream when ``http_body`` is empty (gRPC: a trailers-only response)."""
        flag = (RESPONSE_FLAGS_HEADER, self.flag_code.encode())
        if grpc:
            return [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", str(self.grpc_status).encode()),
                (b"grpc-message", grpc_message(self.message)),
                *self.extra_headers,
                flag,
            ]
        body = self.body if self.body is not None else f"{self.message}\n".encode()
        return [
            (b":status", str(self.http_status).encode()),
            (b"content-type", self.content_type),
            (b"content-length", str(len(body)).encode()),
            *self.extra_headers,
            flag,
        ]
