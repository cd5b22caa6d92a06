from __future__ import annotations

import pytest

from pilotfish.config.route_policy import FallbackConfig, FallbackTrigger, StaticResponse
from sidecar.flags import ResponseFlag
from sidecar.route.policy.fallback import Fallback, FallbackCluster, trigger_for
from sidecar.route.policy.reply import LocalReply

STATIC = StaticResponse(
    status=200,
    headers=(("Content-Type", "application/json"), ("X-Degraded", "1")),
    body='{"quotes": []}',
    grpc_status=14,
    grpc_message="degraded",
)


@pytest.mark.parametrize(
    ("flag", "trigger"),
    [
        (ResponseFlag.NO_HEALTHY_UPSTREAM, FallbackTrigger.NO_HEALTHY_UPSTREAM),
        (ResponseFlag.UPSTREAM_OVERFLOW, FallbackTrigger.CIRCUIT_OPEN),
        (ResponseFlag.UPSTREAM_CONNECT_FAILURE, FallbackTrigger.RETRIES_EXHAUSTED),
        (ResponseFlag.UPSTREAM_RESET, FallbackTrigger.RETRIES_EXHAUSTED),
        (ResponseFlag.UPSTREAM_TIMEOUT, None),
        (ResponseFlag.NO_ROUTE, None),
        (ResponseFlag.DRAINING, None),
    ],
)
def test_trigger_for(flag: ResponseFlag, trigger: FallbackTrigger | None) -> None:
    assert trigger_for(flag) is trigger


def test_static_response_http_and_grpc() -> None:
    fallback = Fallback(FallbackConfig(response=STATIC))
    reply = fallback.decide(FallbackTrigger.CIRCUIT_OPEN, grpc=False)
    assert isinstance(reply, LocalReply)
    assert reply.flag_code == "FB"
    assert reply.headers(grpc=False) == [
        (b":status", b"200"),
        (b"content-type", b"application/json"),
        (b"content-length", b"14"),
        (b"x-degraded", b"1"),
        (b"x-pilotfish-response-flags", b"FB"),
    ]
    assert reply.http_body(grpc=False, method="GET") == b'{"quotes": []}'
    grpc = dict(reply.headers(grpc=True))
    assert grpc[b"grpc-status"] == b"14" and grpc[b"grpc-message"] == b"degraded"


def test_static_response_without_grpc_status_skips_grpc_requests() -> None:
    fallback = Fallback(FallbackConfig(response=StaticResponse(body="later")))
    assert fallback.decide(FallbackTrigger.NO_HEALTHY_UPSTREAM, grpc=True) is None
    assert fallback.decide(FallbackTrigger.NO_HEALTHY_UPSTREAM, grpc=False) is not None


def test_cluster_fallback_once_and_only_for_listed_triggers() -> None:
    fallback = Fallback(
        FallbackConfig(
            cluster="quotes-cache", when=frozenset({FallbackTrigger.NO_HEALTHY_UPSTREAM})
        )
    )
    assert fallback.decide(FallbackTrigger.NO_HEALTHY_UPSTREAM, grpc=True) == FallbackCluster(
        "quotes-cache"
    )
    assert fallback.decide(FallbackTrigger.CIRCUIT_OPEN, grpc=True) is None
    assert fallback.decide(None, grpc=True) is None
    assert fallback.decide(FallbackTrigger.NO_HEALTHY_UPSTREAM, grpc=True, in_fallback=True) is None
    assert (
        fallback.decide(FallbackTrigger.NO_HEALTHY_UPSTREAM, grpc=True, response_started=True)
        is None
    )
