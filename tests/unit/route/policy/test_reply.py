from __future__ import annotations

import pytest

from pilotfish.config.route_policy import LoadSheddingConfig
from sidecar.flags import ResponseFlag
from sidecar.route.policy.reply import LocalReply, grpc_message, grpc_to_http, http_to_grpc
from sidecar.route.policy.shedding import shed_reply


def test_status_mappings() -> None:
    assert [grpc_to_http(c) for c in (0, 4, 8, 14, 12, 16, 99)] == [
        200, 504, 429, 503, 501, 401, 500,
    ]  # fmt: skip
    assert [http_to_grpc(s) for s in (400, 401, 403, 404, 429, 503, 418)] == [
        13, 16, 7, 12, 14, 14, 2,
    ]  # fmt: skip


def test_from_statuses_needs_one() -> None:
    with pytest.raises(ValueError):
        LocalReply.from_statuses(None, None, "x", "FI")
    both = LocalReply.from_statuses(418, 3, "teapot", "FI")
    assert (both.http_status, both.grpc_status) == (418, 3)


def test_http_and_grpc_forms() -> None:
    reply = LocalReply(http_status=503, grpc_status=14, message="over 100%", flag_code="OM")
    assert reply.headers(grpc=False) == [
        (b":status", b"503"),
        (b"content-type", b"text/plain"),
        (b"content-length", b"10"),
        (b"x-pilotfish-response-flags", b"OM"),
    ]
    assert reply.http_body(grpc=False, method="GET") == b"over 100%\n"
    assert reply.http_body(grpc=False, method="HEAD") == b""
    assert reply.http_body(grpc=True, method="POST") == b""
    grpc = dict(reply.headers(grpc=True))
    assert grpc[b"grpc-message"] == b"over 100%25"
    assert grpc[b"content-type"] == b"application/grpc"


def test_grpc_message_encoding() -> None:
    assert grpc_message("ok é\n") == b"ok %C3%A9%0A"


def test_overload_replies() -> None:
    shed = shed_reply(LoadSheddingConfig())
    assert (shed.http_status, shed.grpc_status, shed.flag_code) == (503, 8, "OM")
    throttled = ResponseFlag.ADAPTIVE_THROTTLE
    assert (throttled.http_status, throttled.grpc_status, throttled.code) == (503, 14, "AT")
